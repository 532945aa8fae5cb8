"""Attention on the CPU.

MLA decode runs in the C++ kernel (csrc/mla_decode.cpp): every cached latent row read once per step
for all heads, split over the KV length so one long sequence uses every core; the query absorption
and output expansion on the block GEMM with each head's w_kc / w_vc packed once (torch's bmm
re-packs them on every call: ~8 GB/s against ~25 here).

Extend (prefill) of both MLA and MHA runs torch's flash kernel for CPU in the compute dtype (it
accumulates and takes the softmax in float32), on 4-D inputs with equal head dims: given 3-D
tensors, or MLA's 192-wide keys with 128-wide values, SDPA takes its math path instead (512 tokens,
16 heads, bf16: 23 against 40 ms). The context is expanded to per-head K/V at most
EXTEND_KV_CHUNK tokens at a time, the chunks merged by their log-sum-exp, so a long prompt never
materialises per-head K/V for all of its context.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from dsserve.core.backends import AttentionSpec
from dsserve.core.reference import ReferenceMHAAttention, ReferenceMLAAttention, write_cache

from .packing import pack, packable

# Split a sequence's KV length into chunks of at least this many tokens, and give the threads about
# this many chunks each, so that batch 1 keeps every core busy without splitting short contexts.
MIN_CHUNK_TOKENS = 64
CHUNKS_PER_THREAD = 2
# The chunk when results must not depend on the batch (spec.batch_invariant): a constant, so a
# sequence's chunks, and the order its partial softmaxes merge in, follow from its length alone.
INVARIANT_CHUNK_TOKENS = 256
# Context tokens expanded to per-head keys and values at a time in extend.
EXTEND_KV_CHUNK = 4096

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def extend_attention(q: torch.Tensor, kv: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]], prefix: int,
                     scale: float, chunk: int = EXTEND_KV_CHUNK) -> torch.Tensor:
    """Causal attention of one sequence's new tokens over its whole context, through the flash kernel.

    q [H, n, D]: the queries of positions prefix .. prefix + n - 1. kv(j0, j1) gives the keys and
    values of context positions j0 .. j1 - 1 as [H, j1 - j0, D] each (values padded to D).
    Returns [H, n, D] in q's dtype.
    """
    heads, n, dim = q.shape
    context = prefix + n
    q4 = q[None]
    if context <= chunk:
        k, v = kv(0, context)
        if prefix == 0:
            return _flash(q4, k[None], v[None], 0.0, True, scale=scale)[0][0]
        return _flash(q4, k[None], v[None], 0.0, False, attn_mask=_causal_bias(n, prefix, 0, context, q.dtype),
                      scale=scale)[0][0]
    out = torch.zeros(heads, n, dim, dtype=torch.float32)
    lse = torch.full((heads, n), float("-inf"))
    for j0 in range(0, context, chunk):
        j1 = min(context, j0 + chunk)
        r0 = max(0, j0 - prefix)  # the first query that sees key j0: earlier ones see none of this chunk
        k, v = kv(j0, j1)
        bias = None if j1 - 1 <= prefix + r0 else _causal_bias(n - r0, prefix + r0, j0, j1, q.dtype)
        o_c, lse_c = _flash(q4[:, :, r0:], k[None], v[None], 0.0, False, attn_mask=bias, scale=scale)[:2]
        o_c, lse_c = o_c[0].float(), lse_c[0]
        merged = torch.logaddexp(lse[:, r0:], lse_c)
        out[:, r0:] = out[:, r0:] * torch.exp(lse[:, r0:] - merged)[..., None] + o_c * torch.exp(lse_c - merged)[..., None]
        lse[:, r0:] = merged
    return out.to(q.dtype)


def _causal_bias(n: int, first: int, j0: int, j1: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [n, j1 - j0]: query i (at position first + i) sees keys j0 .. first + i."""
    keys = torch.arange(j0, j1)
    visible = keys[None, :] <= (torch.arange(n) + first)[:, None]
    return torch.zeros(n, j1 - j0, dtype=dtype).masked_fill_(~visible, float("-inf"))


def unsupported(spec: AttentionSpec) -> str | None:
    if spec.kind != "mla":
        return f"{spec.kind} attention"
    if spec.fp8_cache:
        # The decode kernel reads the cache rows as bf16 or fp32 (and packs the weights in the cache's
        # dtype); the reference serves an 8-bit float cache.
        return f"{str(spec.dtype).removeprefix('torch.')} cache: the C++ MLA decode reads bfloat16 or float32 ones"
    if spec.kv_scale != 1.0:
        return f"kv_scale {spec.kv_scale}: the C++ MLA decode reads the cache unscaled"
    nope = spec.head_dim - spec.qk_rope_head_dim
    for n, k in ((spec.kv_lora_rank, nope), (spec.v_head_dim, spec.kv_lora_rank)):
        reason = packable(n, k, spec.dtype)
        if reason:
            return reason
    return None


class CpuMLAAttention(ReferenceMLAAttention):
    def __init__(self, spec: AttentionSpec, kernels, isa):
        super().__init__(spec)
        self.kernels, self.isa = kernels, int(isa)
        self._decode_split: tuple[object, int] = (None, 1)  # (the pass's metadata, tokens a KV chunk)

    # w_kc [H, nope, L] is used as x @ w_kc: per head a linear layer with weight w_kc[h]^T [L, nope];
    # w_vc [H, L, v] likewise with w_vc[h]^T [v, L]. Both are kept packed in that form. Extend expands
    # the context's latent to every head's k_nope and v in one GEMM on kv_b_proj's own layout
    # [H * (nope + v), L], packed as well (the per-head bmm on the unpacked halves, broadcasting the
    # latent to every head, took 3.5 ms a layer for 512 tokens, plus its copies).
    def process_weights_after_loading(self, w_kc, w_vc):
        heads, nope, rank = w_kc.shape
        kv_b = torch.cat([w_kc, w_vc.transpose(1, 2)], dim=1).reshape(-1, rank)
        return {"absorb": pack(w_kc.transpose(1, 2)), "kv_b": pack(kv_b)}, pack(w_vc.transpose(1, 2))

    def absorb_query(self, q_nope, w_kc):
        return self.kernels.head_linear(q_nope.contiguous(), w_kc["absorb"], self.isa)

    def expand_output(self, o_latent, w_vc):
        return self.kernels.head_linear(o_latent.contiguous(), w_vc, self.isa)

    def forward_extend(self, q_nope, q_pe, latent, cache, meta, w_kc, w_vc):
        s = self.spec
        nope, rank, rope, v_dim = s.head_dim - s.qk_rope_head_dim, s.kv_lora_rank, s.qk_rope_head_dim, s.v_head_dim
        flat = cache.view(-1, cache.shape[-1])
        write_cache(flat, meta.out_cache_loc, latent)
        dtype, heads = q_nope.dtype, q_nope.shape[1]
        out = q_nope.new_empty(q_nope.shape[0], heads, v_dim)
        for seq in self._plans.extend(meta):
            rows = slice(seq.start, seq.start + seq.length)
            q = torch.cat([q_nope[rows], q_pe[rows]], dim=-1).transpose(0, 1)   # [H, n, Dq]

            def kv(j0: int, j1: int, slots=seq.slots):
                ctx = self._read(flat, slots[j0:j1], dtype)
                m = ctx.shape[0]
                expanded = self.kernels.packed_linear(ctx[:, :rank].contiguous(), w_kc["kv_b"], None, self.isa)
                expanded = expanded.view(m, heads, nope + v_dim).transpose(0, 1)   # [H, m, nope + v]
                k = ctx.new_empty(heads, m, nope + rope)
                k[..., :nope] = expanded[..., :nope]
                k[..., nope:] = ctx[:, rank:]
                v = ctx.new_zeros(heads, m, nope + rope)   # values padded to the keys' width
                v[..., :v_dim] = expanded[..., nope:]
                return k, v

            o = extend_attention(q, kv, seq.slots.numel() - seq.length, s.scale)
            out[rows] = o[..., :v_dim].transpose(0, 1)
        return out

    def prepare(self, meta):
        # decode needs no gathered slots (the kernel reads the page table), only the KV split, once a pass
        if meta.is_decode:
            self._decode_split = (meta, self._chunk_tokens(meta))
        else:
            super().prepare(meta)

    def _chunk_tokens(self, meta) -> int:
        """The KV chunk of a decode pass: the longest sequence in about CHUNKS_PER_THREAD chunks a
        thread over the batch, none under MIN_CHUNK_TOKENS, a multiple of the kernel's 16-token
        blocks; a constant where the batch must not matter."""
        if self.spec.batch_invariant:
            return INVARIANT_CHUNK_TOKENS
        longest = max(meta.seq_lens_cpu)
        wanted = -(-CHUNKS_PER_THREAD * torch.get_num_threads() // len(meta.seq_lens_cpu))
        chunks = max(1, min(wanted, longest // MIN_CHUNK_TOKENS))
        per = -(-longest // chunks)
        return (per + 15) // 16 * 16

    def forward_decode(self, q_latent, q_pe, latent, cache, meta):
        if self._decode_split[0] is not meta:  # a caller that skipped prepare
            self.prepare(meta)
        flat = cache.view(-1, cache.shape[-1])
        # an unscaled cache of the compute dtype (`unsupported`): no casts in the common case, each an op
        same = latent.dtype == flat.dtype
        flat.index_copy_(0, meta.out_cache_loc, latent if same else latent.to(flat.dtype))
        q = torch.cat([q_latent, q_pe], dim=-1)
        out = self.kernels.mla_decode(q if same else q.to(flat.dtype), flat, meta.page_table, meta.seq_lens,
                                      meta.page_size, self.spec.kv_lora_rank, self.spec.scale, self._decode_split[1],
                                      self.isa)
        return out if same else out.to(q_latent.dtype)


class CpuMHAAttention(ReferenceMHAAttention):
    """MHA/GQA (the R1-Distill models) through torch's SDPA kernels on the gathered pages. Decode stays
    in a half-precision cache's dtype (SDPA accumulates and takes the softmax in float32): 16 sequences
    x 1024 cached tokens, 16 heads, went from 7.7 ms (float32 upcast) to 4.2 ms a layer on a Zen 4.
    Prefill runs `extend_attention`."""

    upcast_half_decode = False

    def forward_extend(self, q, k, v, cache, meta):
        k_flat, v_flat = self._write_kv(k, v, cache, meta)
        heads, kv_heads = q.shape[1], k_flat.shape[1]
        dim, dim_v = q.shape[-1], v_flat.shape[-1]
        out = q.new_empty(q.shape[0], heads, dim_v)
        for seq in self._plans.extend(meta):
            rows = slice(seq.start, seq.start + seq.length)

            def kv(j0: int, j1: int, slots=seq.slots):
                keys = self._read(k_flat, slots[j0:j1], q.dtype).transpose(0, 1)   # [Hkv, m, D]
                vals = self._read(v_flat, slots[j0:j1], q.dtype).transpose(0, 1)
                if heads != kv_heads:  # query head h reads KV head h // group
                    keys = keys.repeat_interleave(heads // kv_heads, dim=0)
                    vals = vals.repeat_interleave(heads // kv_heads, dim=0)
                return keys, F.pad(vals, (0, dim - dim_v))

            o = extend_attention(q[rows].transpose(0, 1), kv, seq.slots.numel() - seq.length, self.spec.scale)
            out[rows] = o[..., :dim_v].transpose(0, 1)
        return out
