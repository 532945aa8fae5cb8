"""One paged-attention kernel family behind every Triton attention backend (MLA and MHA/GQA).

The kernel reads keys and values straight out of the paged cache through the page table; nothing is
gathered on the host. Its unit of work is one *program* = (sequence, block of query heads that share
one KV head, block of query tokens, KV split):

* the program's rows are (token, head) pairs: `HPP` query heads of one KV head times `TPP` query
  tokens, flattened into one `BLOCK_M`-row tile, so grouped-query heads (and all of MLA's heads,
  which share the single latent "head") ride through one `tl.dot` instead of one head at a time;
* keys are `K1` (width D1) optionally followed by `K2` (width D2, MLA's rotary part); values are `V`
  or, for MLA, the K1 tile itself (the latent is both key and value), loaded once;
* query token j of a sequence sits at position prefix + j and sees keys 0 .. prefix + j (decode is
  the one-token case, so one kernel serves decode, prefill and prefill on top of a cached prefix);
* with NUM_SPLITS > 1 each program covers only its share of the sequence (split-K, for long decode
  contexts with few sequences) and writes a partial result (acc / l and log2-sum-exp), which
  `_merge_splits` combines; with NUM_SPLITS == 1 the program writes the normalised output directly.

The softmax is computed online in base 2 (scores pre-multiplied by scale * log2(e)), in float32.
Rows that see no key (an empty split) keep m = -inf and are handled without producing NaN.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from dsserve.core.reference import write_cache

LOG2E = 1.4426950408889634
#: query heads (of one KV head) per decode program: the rows of its tl.dot, one token each
DECODE_HEADS = 16


@triton.jit
def _paged_attn_fwd(
    Q1, Q2, K1, K2, V,
    PageTable, SeqLens, ExtLens, ExtStart,
    Out, MidO, MidLse,
    qk_scale,  # softmax scale * log2(e)
    stride_q1t, stride_q1h, stride_q2t, stride_q2h,
    stride_k1s, stride_k1h, stride_k2s, stride_k2h, stride_vs, stride_vh,
    stride_pt,
    stride_ot, stride_oh,
    stride_mt, stride_mh, stride_ms,
    stride_lt, stride_lh,
    GROUP: tl.constexpr,  # query heads per KV head
    HPP: tl.constexpr,  # query heads per program
    TPP: tl.constexpr,  # query tokens per program
    BLOCK_M: tl.constexpr,  # power of two >= HPP * TPP (and >= 16 for tl.dot)
    BLOCK_N: tl.constexpr,  # keys per iteration
    PAGE_SIZE: tl.constexpr,
    D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr,
    BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_K2: tl.constexpr, V_IS_K1: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    head_block = tl.program_id(1)
    qs = tl.program_id(2)
    q_block = qs // NUM_SPLITS
    split = qs % NUM_SPLITS

    heads_blocks_per_kv = (GROUP + HPP - 1) // HPP
    kv_head = head_block // heads_blocks_per_kv
    g0 = (head_block % heads_blocks_per_kv) * HPP

    seq_len = tl.load(SeqLens + b)
    ext_len = tl.load(ExtLens + b)
    ext_start = tl.load(ExtStart + b)
    prefix = seq_len - ext_len
    t0 = q_block * TPP
    if t0 >= ext_len:
        return

    rows = tl.arange(0, BLOCK_M)
    r_tok = t0 + rows // HPP
    r_grp = g0 + rows % HPP
    row_ok = (rows < HPP * TPP) & (r_grp < GROUP) & (r_tok < ext_len)
    head = (kv_head * GROUP + r_grp).to(tl.int64)
    tok = (ext_start + r_tok).to(tl.int64)
    q_pos = prefix + r_tok

    d1 = tl.arange(0, BLOCK_D1)
    q1 = tl.load(Q1 + tok[:, None] * stride_q1t + head[:, None] * stride_q1h + d1[None, :],
                 mask=row_ok[:, None] & (d1[None, :] < D1), other=0.0)
    if HAS_K2:
        d2 = tl.arange(0, BLOCK_D2)
        q2 = tl.load(Q2 + tok[:, None] * stride_q2t + head[:, None] * stride_q2h + d2[None, :],
                     mask=row_ok[:, None] & (d2[None, :] < D2), other=0.0)
    dv = tl.arange(0, BLOCK_DV)

    # This program's keys: its split of the sequence, cut at the causal limit of its last token.
    split_len = tl.cdiv(seq_len, NUM_SPLITS)
    k_lo = split * split_len
    k_hi = tl.minimum(k_lo + split_len, seq_len)
    last_tok = tl.minimum(t0 + TPP, ext_len) - 1
    k_hi = tl.minimum(k_hi, prefix + last_tok + 1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    kv_head64 = kv_head.to(tl.int64)
    for start in range(k_lo, k_hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        kv_ok = pos < k_hi
        page = tl.load(PageTable + b * stride_pt + pos // PAGE_SIZE, mask=kv_ok, other=0).to(tl.int64)
        slot = page * PAGE_SIZE + pos % PAGE_SIZE
        k1 = tl.load(K1 + slot[:, None] * stride_k1s + kv_head64 * stride_k1h + d1[None, :],
                     mask=kv_ok[:, None] & (d1[None, :] < D1), other=0.0)
        s = tl.dot(q1, tl.trans(k1.to(q1.dtype)), input_precision=PRECISION)
        if HAS_K2:
            k2 = tl.load(K2 + slot[:, None] * stride_k2s + kv_head64 * stride_k2h + d2[None, :],
                         mask=kv_ok[:, None] & (d2[None, :] < D2), other=0.0)
            s += tl.dot(q2, tl.trans(k2.to(q2.dtype)), input_precision=PRECISION)
        s = s * qk_scale
        visible = row_ok[:, None] & kv_ok[None, :] & (pos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if V_IS_K1:
            v = k1
        else:
            v = tl.load(V + slot[:, None] * stride_vs + kv_head64 * stride_vh + dv[None, :],
                        mask=kv_ok[:, None] & (dv[None, :] < DV), other=0.0)
        v = v.to(q1.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    l_div = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_div[:, None]
    out_mask = row_ok[:, None] & (dv[None, :] < DV)
    if NUM_SPLITS == 1:
        tl.store(Out + tok[:, None] * stride_ot + head[:, None] * stride_oh + dv[None, :],
                 o.to(Out.dtype.element_ty), mask=out_mask)
    else:
        tl.store(MidO + tok[:, None] * stride_mt + head[:, None] * stride_mh + split * stride_ms + dv[None, :],
                 o, mask=out_mask)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_div))
        tl.store(MidLse + tok * stride_lt + head * stride_lh + split, lse, mask=row_ok)


@triton.jit
def _merge_splits(
    MidO, MidLse, Out,
    stride_mt, stride_mh, stride_ms,
    stride_lt, stride_lh,
    stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_DV)
    s_ok = s < NUM_SPLITS
    lse = tl.load(MidLse + t * stride_lt + h * stride_lh + s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    o = tl.load(MidO + t * stride_mt + h * stride_mh + s[:, None] * stride_ms + d[None, :],
                mask=s_ok[:, None] & (d[None, :] < DV), other=0.0)
    num = tl.sum(w[:, None] * o, axis=0)
    den = tl.sum(w, axis=0)
    den = tl.where(den == 0.0, 1.0, den)
    tl.store(Out + t * stride_ot + h * stride_oh + d, (num / den).to(Out.dtype.element_ty), mask=d < DV)


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(1, n)))


def paged_attention(
    q1: torch.Tensor,
    q2: torch.Tensor | None,
    k1: torch.Tensor,
    k2: torch.Tensor | None,
    v: torch.Tensor | None,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    extend_start: torch.Tensor,
    *,
    scale: float,
    page_size: int,
    max_extend_len: int,
    num_splits: int = 1,
    out: torch.Tensor | None = None,
    block_m: int = 16,
    block_n: int = 32,
    num_warps: int | None = None,
    num_stages: int = 1,
) -> torch.Tensor:
    """Causal attention of packed queries over a paged cache; returns [T, H, DV].

    q1 [T, H, D1] and q2 [T, H, D2] (or None): the query parts matched against k1 and k2.
    k1 [slots, Hkv, D1], k2 [slots, Hkv, D2] or None, v [slots, Hkv, DV] or None (then the values
    are k1's rows, as in MLA): flat views of the cache (slot = page * page_size + offset); any
    strides with a unit last dimension.
    page_table [B, max_pages] int32; seq_lens, extend_lens, extend_start [B] int32: sequence i's
    queries are rows extend_start[i] .. + extend_lens[i] at positions seq_lens[i] - extend_lens[i] ...
    max_extend_len: the largest extend_lens entry (a host int, so the grid needs no device sync).
    num_splits: KV splits per sequence (split-K); results are merged by a second kernel.
    out: optional [T, H, DV] destination (any strides with a unit last dimension).
    """
    tokens, heads, d1 = q1.shape
    kv_heads = k1.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not group over {kv_heads} KV heads")
    group = heads // kv_heads
    d2 = q2.shape[-1] if q2 is not None else 0
    dv = v.shape[-1] if v is not None else d1
    if out is None:
        out = q1.new_empty(tokens, heads, dv)
    if tokens == 0 or max_extend_len == 0:
        return out
    for t in (q1, q2, k1, k2, v, out):
        if t is not None and t.stride(-1) != 1:
            raise ValueError("the last dimension of every operand must be contiguous")

    hpp = min(group, block_m)
    tpp = max(1, block_m // hpp)
    bm = _pow2(hpp * tpp)
    head_blocks = kv_heads * triton.cdiv(group, hpp)
    q_blocks = triton.cdiv(max_extend_len, tpp)
    num_splits = max(1, int(num_splits))
    # float32 stays float32 on tensor-core GPUs too (Triton would otherwise use tf32 there); other
    # dtypes take the backend's default.
    precision = "ieee" if q1.dtype == torch.float32 else None

    if num_splits > 1:
        mid_o = torch.empty(tokens, heads, num_splits, dv, dtype=torch.float32, device=q1.device)
        mid_lse = torch.empty(tokens, heads, num_splits, dtype=torch.float32, device=q1.device)
    else:  # unused; any tensor keeps the signature uniform
        mid_o = mid_lse = out
    q2_ = q2 if q2 is not None else q1
    k2_ = k2 if k2 is not None else k1
    v_ = v if v is not None else k1
    extra = {"num_stages": num_stages}
    if num_warps is not None:
        extra["num_warps"] = num_warps
    grid = (seq_lens.shape[0], head_blocks, q_blocks * num_splits)
    _paged_attn_fwd[grid](
        q1, q2_, k1, k2_, v_,
        page_table, seq_lens, extend_lens, extend_start,
        out, mid_o, mid_lse,
        float(scale) * LOG2E,
        q1.stride(0), q1.stride(1), q2_.stride(0), q2_.stride(1),
        k1.stride(0), k1.stride(1), k2_.stride(0), k2_.stride(1), v_.stride(0), v_.stride(1),
        page_table.stride(0),
        out.stride(0), out.stride(1),
        mid_o.stride(0) if num_splits > 1 else 0, mid_o.stride(1) if num_splits > 1 else 0,
        mid_o.stride(2) if num_splits > 1 else 0,
        mid_lse.stride(0) if num_splits > 1 else 0, mid_lse.stride(1) if num_splits > 1 else 0,
        GROUP=group, HPP=hpp, TPP=tpp, BLOCK_M=bm, BLOCK_N=block_n, PAGE_SIZE=page_size,
        D1=d1, D2=d2, DV=dv,
        BLOCK_D1=_pow2(d1), BLOCK_D2=_pow2(d2) if d2 else 16, BLOCK_DV=_pow2(dv),
        HAS_K2=q2 is not None, V_IS_K1=v is None,
        NUM_SPLITS=num_splits, PRECISION=precision,
        **extra,
    )
    if num_splits > 1:
        _merge_splits[(tokens, heads)](
            mid_o, mid_lse, out,
            mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
            mid_lse.stride(0), mid_lse.stride(1),
            out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, BLOCK_S=_pow2(num_splits, 2), DV=dv, BLOCK_DV=_pow2(dv),
        )
    return out


def choose_num_splits(batch: int, head_programs: int, longest: int, *, num_sms: int | None,
                      max_splits: int = 16, min_tokens_per_split: int = 256) -> int:
    """KV splits for a decode pass: enough programs to fill the GPU, none shorter than
    `min_tokens_per_split` tokens. Without a known SM count (the interpreter) one split."""
    if not num_sms or longest <= min_tokens_per_split:
        return 1
    want = math.ceil(2 * num_sms / max(1, batch * head_programs))
    cap = math.ceil(longest / min_tokens_per_split)
    return max(1, min(max_splits, want, cap))


def num_decode_splits(batch: int, heads: int, kv_heads: int, longest: int, *, num_sms: int | None) -> int:
    """`choose_num_splits` for a decode pass whose programs take DECODE_HEADS query heads each."""
    head_programs = kv_heads * triton.cdiv(heads // kv_heads, DECODE_HEADS)
    return choose_num_splits(batch, head_programs, longest, num_sms=num_sms)


def device_sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors (compute units on ROCm) of a GPU device; None on CPU."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def write_cache_rows(flat: torch.Tensor, loc: torch.Tensor, rows: torch.Tensor, kv_scale: float = 1.0) -> None:
    """flat[loc] = rows as the cache stores them, for any cache dtype: the reference's own write
    (divided by kv_scale and clamped for 8-bit floats, which go through a byte view since index_copy_
    has no float8 kernel on every backend), so every backend's cache holds the same bits."""
    write_cache(flat, loc, rows, kv_scale)
