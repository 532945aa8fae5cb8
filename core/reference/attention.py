"""Paged attention in plain torch: the answer every device's kernels are checked against.

Extend loops over sequences (each has its own prefix and causal mask) and lets
`scaled_dot_product_attention` do the work; decode pads every sequence's context to the longest one
and runs the batch in a few batched calls. Half-precision tensors are computed in float32: the
reference is an oracle first, and a subclass that prefers speed can set `upcast_half = False` (or
`upcast_half_decode = False` to keep only decode in the half dtype; softmax stays float32 either way).

The cache may be in another dtype than the queries (an 8-bit float cache, `--kv-cache-dtype
fp8_e4m3`): new tokens are written through `to_cache` (divided by the spec's kv_scale, clamped,
converted) and every gathered context is read back through `from_cache` into the compute dtype, so
the attention itself never sees the cache's format.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backends import MHAAttentionBackend, MLAAttentionBackend
from ..forward_batch import AttentionMetadata

_HALF = (torch.float16, torch.bfloat16)
# Gathered context elements per decode chunk. Small enough to stay in cache and below the size at
# which the allocator maps fresh (page-faulting) memory for every call: on CPU, gathering a few
# sequences at a time measured 2-4x faster than gathering the whole batch at once.
_DECODE_CHUNK_ELEMENTS = 1 << 18


@dataclass
class _ExtendSeq:
    start: int  # first row of this sequence in the packed token axis
    length: int  # new tokens
    slots: torch.Tensor  # [prefix + length] int64, flat cache slots in position order
    mask: torch.Tensor | None  # [length, prefix + length] bool (True = attend); None: plain causal


@dataclass
class _DecodePlan:
    slots: torch.Tensor  # [B, L] int64, padded with slot 0
    valid: torch.Tensor  # [B, L] bool


def is_fp8(dtype: torch.dtype) -> bool:
    """An 8-bit float format (e4m3, e5m2): a cache dtype, never a compute dtype."""
    return dtype.is_floating_point and dtype.itemsize == 1


def to_cache(rows: torch.Tensor, dtype: torch.dtype, kv_scale: float = 1.0) -> torch.Tensor:
    """Real values as a cache in `dtype` stores them: rows / kv_scale (see `AttentionSpec.kv_scale`).

    8-bit floats are clamped to the format's largest finite value first: e4m3fn has no infinity, and
    where a conversion does not saturate a value past 448 becomes NaN, which would poison every
    later score of the sequence; e5m2 would give inf. The division runs in float32 (float64 for the
    oracle) so that a half-precision row is rounded once, to the cache's format."""
    if kv_scale == 1.0 and not is_fp8(dtype):
        return rows.to(dtype)
    x = rows.to(torch.promote_types(rows.dtype, torch.float32))
    if kv_scale != 1.0:
        x = x / kv_scale
    if is_fp8(dtype):
        bound = torch.finfo(dtype).max
        x = x.clamp(-bound, bound)
    return x.to(dtype)


def from_cache(stored: torch.Tensor, dtype: torch.dtype, kv_scale: float = 1.0) -> torch.Tensor:
    """Cached elements as real values in `dtype`: stored * kv_scale."""
    x = stored.to(dtype)
    return x if kv_scale == 1.0 else x * kv_scale  # not in place: `to` may have returned `stored`


def write_cache(flat: torch.Tensor, loc: torch.Tensor, rows: torch.Tensor, kv_scale: float = 1.0) -> None:
    """The new tokens' rows into the flat cache at slots `loc` (meta.out_cache_loc), stored as
    `to_cache` says."""
    rows = to_cache(rows, flat.dtype, kv_scale)
    if is_fp8(flat.dtype):
        # 8-bit float caches: index_copy_ has no kernel for them on every backend; bytes do.
        flat, rows = flat.view(torch.uint8), rows.view(torch.uint8)
    flat.index_copy_(0, loc, rows)


def _extend_plan(meta: AttentionMetadata) -> list[_ExtendSeq]:
    seqs = []
    starts = [0]
    for n in meta.extend_lens_cpu[:-1]:
        starts.append(starts[-1] + n)
    for i, (start, n, prefix) in enumerate(zip(starts, meta.extend_lens_cpu, meta.prefix_lens_cpu)):
        if n == 0:
            continue
        slots = meta.cache_slots(i)
        mask = None
        if prefix > 0:
            # Query j sits at position prefix + j and sees keys 0 .. prefix + j. is_causal alone
            # would align the diagonal to key 0, which is wrong once a prefix is cached.
            keys = torch.arange(prefix + n, device=slots.device)
            queries = torch.arange(n, device=slots.device) + prefix
            mask = keys[None, :] <= queries[:, None]
        seqs.append(_ExtendSeq(start, n, slots, mask))
    return seqs


def _decode_plan(meta: AttentionMetadata) -> _DecodePlan:
    page = meta.page_size
    longest = max(meta.seq_lens_cpu) if meta.seq_lens_cpu else 0
    num_pages = (longest + page - 1) // page
    pages = meta.page_table[:, :num_pages].to(torch.int64)
    offsets = torch.arange(page, device=pages.device)
    slots = (pages[:, :, None] * page + offsets).reshape(pages.shape[0], -1)[:, :longest]
    positions = torch.arange(longest, device=pages.device)
    valid = positions[None, :] < meta.seq_lens.to(pages.device, torch.int64)[:, None]
    slots = slots.masked_fill(~valid, 0).contiguous()
    return _DecodePlan(slots, valid)


class _PlanCache:
    """Per-pass index tensors shared by every layer; rebuilt by `prepare` or when the metadata
    object changes (a caller that skipped `prepare`)."""

    def __init__(self):
        self._extend: tuple[AttentionMetadata, list[_ExtendSeq]] | None = None
        self._decode: tuple[AttentionMetadata, _DecodePlan] | None = None

    def prepare(self, meta: AttentionMetadata) -> None:
        if meta.is_decode:
            self._decode = (meta, _decode_plan(meta))
            self._extend = None
        else:
            self._extend = (meta, _extend_plan(meta))
            self._decode = None

    def extend(self, meta: AttentionMetadata) -> list[_ExtendSeq]:
        if self._extend is None or self._extend[0] is not meta:
            self._extend = (meta, _extend_plan(meta))
        return self._extend[1]

    def decode(self, meta: AttentionMetadata) -> _DecodePlan:
        if self._decode is None or self._decode[0] is not meta:
            self._decode = (meta, _decode_plan(meta))
        return self._decode[1]


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    # Always at least float32, whatever the compute dtype.
    return torch.softmax(scores, dim=-1, dtype=torch.float32 if scores.dtype in _HALF else None).to(scores.dtype)


def _decode_groups(meta: AttentionMetadata, longest: int, width: int, one_by_one: bool):
    """(b0, b1, tokens): the decode's sequences in groups of as many as fit _DECODE_CHUNK_ELEMENTS,
    padded to the batch's longest; or, batch-invariant, one at a time on its own length, so that
    its attention runs on shapes no other sequence changes."""
    if one_by_one:
        for b, n in enumerate(meta.seq_lens_cpu):
            yield b, b + 1, n
        return
    step = max(1, _DECODE_CHUNK_ELEMENTS // max(1, longest * width))
    for b0 in range(0, meta.batch_size, step):
        yield b0, min(meta.batch_size, b0 + step), longest


class _ReferenceAttention:
    """What the MLA and MHA references share: the per-pass plans and the compute dtype."""

    upcast_half = True
    upcast_half_decode = True

    def __init__(self, spec):
        super().__init__(spec)
        self._plans = _PlanCache()

    def prepare(self, meta: AttentionMetadata) -> None:
        self._plans.prepare(meta)

    def _compute_dtype(self, dtype: torch.dtype, decode: bool = False) -> torch.dtype:
        upcast = self.upcast_half and (self.upcast_half_decode or not decode)
        return torch.float32 if (upcast and dtype in _HALF) else dtype

    def _write(self, flat: torch.Tensor, loc: torch.Tensor, rows: torch.Tensor) -> None:
        write_cache(flat, loc, rows, self.spec.kv_scale)

    def _read(self, flat: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The cache rows at `slots` as real values in the compute dtype."""
        if is_fp8(flat.dtype):  # gathered as bytes, as written: index_select may lack float8 kernels too
            rows = flat.view(torch.uint8).index_select(0, slots).view(flat.dtype)
        else:
            rows = flat.index_select(0, slots)
        return from_cache(rows, dtype, self.spec.kv_scale)


class ReferenceMLAAttention(_ReferenceAttention, MLAAttentionBackend):
    """MLA over the latent cache: extend expands to per-head K/V, decode stays in latent space."""

    def forward_extend(self, q_nope, q_pe, latent, cache, meta, w_kc, w_vc):
        s = self.spec
        rank = s.kv_lora_rank
        flat = cache.view(-1, cache.shape[-1])
        self._write(flat, meta.out_cache_loc, latent)
        cd = self._compute_dtype(q_nope.dtype)
        heads = q_nope.shape[1]
        out = q_nope.new_empty(q_nope.shape[0], heads, w_vc.shape[-1])
        w_kc_t = w_kc.to(cd).transpose(1, 2)  # [H, kv_lora_rank, nope]
        w_vc_c = w_vc.to(cd)  # [H, kv_lora_rank, v]
        for seq in self._plans.extend(meta):
            rows = slice(seq.start, seq.start + seq.length)
            ctx = self._read(flat, seq.slots, cd)  # [L, rank + rope]
            c, k_pe = ctx[:, :rank], ctx[:, rank:]
            k_nope = torch.matmul(c, w_kc_t)  # [H, L, nope]
            v = torch.matmul(c, w_vc_c)  # [H, L, v]
            k = torch.cat([k_nope, k_pe.expand(heads, -1, -1)], dim=-1)
            q = torch.cat([q_nope[rows], q_pe[rows]], dim=-1).to(cd).transpose(0, 1)  # [H, n, Dq]
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=seq.mask, is_causal=seq.mask is None, scale=s.scale
            )
            out[rows] = o.transpose(0, 1).to(out.dtype)
        return out

    def forward_decode(self, q_latent, q_pe, latent, cache, meta):
        s = self.spec
        rank = s.kv_lora_rank
        flat = cache.view(-1, cache.shape[-1])
        self._write(flat, meta.out_cache_loc, latent)
        plan = self._plans.decode(meta)
        cd = self._compute_dtype(q_latent.dtype)
        q = torch.cat([q_latent, q_pe], dim=-1).to(cd)  # [B, H, D]
        batch, heads, width = q.shape
        out = q_latent.new_empty(batch, heads, rank)
        for b0, b1, longest in _decode_groups(meta, plan.slots.shape[1], width, s.batch_invariant):
            n = b1 - b0
            ctx = self._read(flat, plan.slots[b0:b1, :longest].reshape(-1), cd).view(n, longest, width)
            scores = torch.matmul(q[b0:b1], ctx.transpose(1, 2)).mul_(s.scale)  # [n, H, L]
            scores.masked_fill_(~plan.valid[b0:b1, None, :longest], float("-inf"))
            probs = _softmax(scores)
            out[b0:b1] = torch.matmul(probs, ctx[:, :, :rank]).to(out.dtype)
        return out


class ReferenceMHAAttention(_ReferenceAttention, MHAAttentionBackend):
    """Multi-head / grouped-query attention over the paged K and V caches."""

    def _write_kv(self, k, v, cache, meta):
        k_cache, v_cache = cache
        k_flat = k_cache.view(-1, *k_cache.shape[2:])
        v_flat = v_cache.view(-1, *v_cache.shape[2:])
        self._write(k_flat, meta.out_cache_loc, k)
        self._write(v_flat, meta.out_cache_loc, v)
        return k_flat, v_flat

    def forward_extend(self, q, k, v, cache, meta):
        k_flat, v_flat = self._write_kv(k, v, cache, meta)
        cd = self._compute_dtype(q.dtype)
        heads, kv_heads = q.shape[1], k_flat.shape[1]
        group = heads // kv_heads
        out = q.new_empty(q.shape[0], heads, v_flat.shape[-1])
        for seq in self._plans.extend(meta):
            rows = slice(seq.start, seq.start + seq.length)
            keys = self._read(k_flat, seq.slots, cd).transpose(0, 1)  # [Hkv, L, D]
            vals = self._read(v_flat, seq.slots, cd).transpose(0, 1)  # [Hkv, L, Dv]
            if group > 1:  # query head h reads KV head h // group
                keys = keys.repeat_interleave(group, dim=0)
                vals = vals.repeat_interleave(group, dim=0)
            o = F.scaled_dot_product_attention(
                q[rows].to(cd).transpose(0, 1), keys, vals,
                attn_mask=seq.mask, is_causal=seq.mask is None, scale=self.spec.scale,
            )
            out[rows] = o.transpose(0, 1).to(out.dtype)
        return out

    def forward_decode(self, q, k, v, cache, meta):
        k_flat, v_flat = self._write_kv(k, v, cache, meta)
        plan = self._plans.decode(meta)
        cd = self._compute_dtype(q.dtype, decode=True)
        batch, heads, dim = q.shape
        kv_heads, dim_v = k_flat.shape[1], v_flat.shape[2]
        group = heads // kv_heads
        # The `group` query heads sharing a KV head (h // group) see the same keys with the same
        # mask, so they ride as `group` query rows of one attention per KV head; K and V are used
        # as strided views of the gathered cache, never copied per head.
        qg = q.to(cd).view(batch, kv_heads, group, dim)
        out = q.new_empty(batch, heads, dim_v)
        for b0, b1, longest in _decode_groups(meta, plan.slots.shape[1], kv_heads * (dim + dim_v),
                                              self.spec.batch_invariant):
            n = b1 - b0
            idx = plan.slots[b0:b1, :longest].reshape(-1)
            keys = self._read(k_flat, idx, cd).view(n, longest, kv_heads, dim).transpose(1, 2)
            vals = self._read(v_flat, idx, cd).view(n, longest, kv_heads, dim_v).transpose(1, 2)
            o = F.scaled_dot_product_attention(
                qg[b0:b1], keys, vals, attn_mask=plan.valid[b0:b1, None, None, :longest], scale=self.spec.scale
            )  # [n, Hkv, group, Dv]
            out[b0:b1] = o.reshape(n, heads, dim_v).to(out.dtype)
        return out
