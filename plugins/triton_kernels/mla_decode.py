"""Paged MLA attention on the latent cache with Triton.

Decode attends in latent space with the absorbed query: scores = (q_latent . c + q_pe . k_pe) * scale
over the cache rows [c (kv_lora_rank) | k_pe (qk_rope_head_dim)], values = c. It is
`paged_attention` with K1 = the c columns, K2 = the k_pe columns, the values read from the K1 tile
(never loaded twice), one KV "head" shared by all query heads (so up to 16 heads share each key tile
in one tl.dot), and split-K over the sequence: stage 1 runs one program per (sequence, head block,
KV split) and reads the pages of its split through the page table inside the kernel, stage 2 merges
the splits by their log-sum-exp.

Extend (prefill) has two paths:
* short extends (at most `absorb_extend_max_tokens` new tokens in every sequence: chunked-prefill
  continuations, short prompts) use the same Triton kernel in latent space: q_nope is multiplied by
  w_kc first, the kernel runs causally over prefix + new tokens, and w_vc is applied after;
* long extends reuse the core's reference extend (`ReferenceMLAAttention.forward_extend`, torch
  SDPA per sequence with the latent expanded to per-head K/V, without its float32 upcast), because
  the absorbed form costs about (2 * kv_lora_rank + rope) / (qk_head_dim + v_head_dim) ~ 3.4x the
  attention FLOPs of the expanded form for DeepSeek-V3 once the prompt is long.
"""
from __future__ import annotations

import torch
from dsserve.core.backends import AttentionSpec, MLAAttentionBackend
from dsserve.core.forward_batch import AttentionMetadata
from dsserve.core.reference import ReferenceMLAAttention

from .paged_attention import (
    DECODE_HEADS,
    device_sm_count,
    num_decode_splits,
    paged_attention,
    write_cache_rows,
)
from .strides import last_dim_contiguous

_COMPUTE = (torch.float16, torch.bfloat16, torch.float32)
_CACHE = _COMPUTE + (torch.float8_e4m3fn, torch.float8_e5m2)
_HALF = (torch.float16, torch.bfloat16)


def _keys_per_step(cache: torch.Tensor) -> int:
    """An 8-bit cache tile is converted to the query dtype in registers, next to the 512-wide latent
    accumulator: 32 keys at a time spill on sm_90 (e4m3), 16 on no target."""
    return 16 if cache.element_size() == 1 else 32


def _latent_keys(cache: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent cache [num_pages, page_size, rank + rope] as the kernel's keys: K1 [slots, 1, rank],
    the compressed KV (also the values), and K2 [slots, 1, rope], the shared rotary key."""
    flat = cache.view(-1, cache.shape[-1])
    return flat[:, :rank].unsqueeze(1), flat[:, rank:].unsqueeze(1)


def mla_decode_attention(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    num_splits: int = 1,
    out: torch.Tensor | None = None,
    extend_lens: torch.Tensor | None = None,
    extend_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paged MLA decode over the latent cache [num_pages, page_size, rank + rope].

    q_latent [B, H, rank], q_pe [B, H, rope], page_table [B, max_pages] int32, seq_lens [B] int32
    (the new token already in the cache). Returns (or fills `out`) [B, H, rank] in q_latent's dtype.
    """
    batch, heads, rank = q_latent.shape
    k1, k2 = _latent_keys(cache, rank)
    if extend_lens is None or extend_start is None:  # a decode pass's: all ones, 0 .. B-1
        extend_lens = torch.ones(batch, dtype=torch.int32, device=q_latent.device)
        extend_start = torch.arange(batch, dtype=torch.int32, device=q_latent.device)
    return paged_attention(
        last_dim_contiguous(q_latent), last_dim_contiguous(q_pe), k1, k2, None,
        page_table, seq_lens, extend_lens, extend_start,
        scale=scale, page_size=cache.shape[1], max_extend_len=1, num_splits=num_splits, out=out,
        block_m=min(heads, DECODE_HEADS), block_n=_keys_per_step(cache), num_warps=4, num_stages=2,
    )


def mla_extend_attention(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    extend_start: torch.Tensor,
    max_extend_len: int,
    scale: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal latent attention of packed absorbed queries q_latent [T, H, rank] (q_pe [T, H, rope])
    over prefix + new tokens, all in the latent cache. Returns (or fills `out`) [T, H, rank]."""
    k1, k2 = _latent_keys(cache, q_latent.shape[-1])
    return paged_attention(
        last_dim_contiguous(q_latent), last_dim_contiguous(q_pe), k1, k2, None,
        page_table, seq_lens, extend_lens, extend_start,
        scale=scale, page_size=cache.shape[1], max_extend_len=max_extend_len, num_splits=1, out=out,
        block_m=16, block_n=_keys_per_step(cache), num_warps=4, num_stages=1,
    )


class TritonMLAAttention(MLAAttentionBackend):
    """MLA with the Triton paged kernel (decode: split-K in latent space; short extends: absorbed
    latent attention; long extends: the reference's expanded SDPA)."""

    #: KV splits per decode sequence; None lets `choose_num_splits` decide from the GPU's SM count.
    decode_splits: int | None = None
    #: extends whose longest sequence adds more new tokens than this go to the expanded path.
    absorb_extend_max_tokens: int = 256

    @staticmethod
    def unsupported(spec: AttentionSpec) -> str | None:
        """Why the kernels cannot serve `spec`, or None when they can."""
        if spec.kind != "mla":
            return f"kind {spec.kind!r} is not mla"
        if spec.dtype not in _CACHE:
            return f"cache dtype {spec.dtype} (supported: float16, bfloat16, float32, float8)"
        if not 0 < spec.kv_lora_rank <= 1024 or not 0 < spec.qk_rope_head_dim <= 256:
            return f"latent width {spec.kv_lora_rank}+{spec.qk_rope_head_dim} (kernel limits 1024+256)"
        if spec.page_size is not None and spec.page_size < 1:
            return f"page size {spec.page_size}"
        return None

    @classmethod
    def supports(cls, spec: AttentionSpec) -> bool:
        return cls.unsupported(spec) is None

    def __init__(self, spec: AttentionSpec):
        super().__init__(spec)
        self._expanded = ReferenceMLAAttention(spec)
        self._expanded.upcast_half = False

    def prepare(self, meta: AttentionMetadata) -> None:
        if not meta.is_decode and max(meta.extend_lens_cpu, default=0) > self.absorb_extend_max_tokens:
            self._expanded.prepare(meta)

    def _num_splits(self, meta: AttentionMetadata, device: torch.device, heads: int) -> int:
        if self.decode_splits is not None:
            return self.decode_splits
        return num_decode_splits(meta.batch_size, heads, 1, max(meta.seq_lens_cpu, default=0),
                                 num_sms=device_sm_count(device))

    # The kernel reads the cache as stored (an 8-bit float tile is upcast to the query's dtype in
    # registers); the per-tensor kv_scale k is applied outside it: the real latent is k * stored, so
    # the scores are the stored ones times k (folded into the softmax scale) and the weighted latent,
    # the stored one times k.
    def forward_decode(self, q_latent, q_pe, latent, cache, meta):
        k = self.spec.kv_scale
        flat = cache.view(-1, cache.shape[-1])
        write_cache_rows(flat, meta.out_cache_loc, latent, k)
        splits = self._num_splits(meta, q_latent.device, q_latent.shape[1])
        out = mla_decode_attention(q_latent, q_pe, cache, meta.page_table, meta.seq_lens, self.spec.scale * k,
                                   num_splits=splits, extend_lens=meta.extend_lens, extend_start=meta.extend_start)
        return out if k == 1.0 else out.mul_(k)

    def forward_extend(self, q_nope, q_pe, latent, cache, meta, w_kc, w_vc):
        if max(meta.extend_lens_cpu, default=0) > self.absorb_extend_max_tokens:
            return self._expanded.forward_extend(q_nope, q_pe, latent, cache, meta, w_kc, w_vc)
        s = self.spec
        write_cache_rows(cache.view(-1, cache.shape[-1]), meta.out_cache_loc, latent, s.kv_scale)
        dtype = q_nope.dtype
        cd = torch.float32 if dtype in _HALF else dtype
        # Absorb w_kc into the query: q_latent[t, h] = q_nope[t, h] @ w_kc[h].
        q_lat = torch.bmm(q_nope.transpose(0, 1).to(cd), w_kc.to(cd)).transpose(0, 1).to(dtype)
        # The latent output stays in float32 until w_vc is applied.
        o_lat = torch.empty(q_nope.shape[0], q_nope.shape[1], s.kv_lora_rank, dtype=cd, device=q_nope.device)
        mla_extend_attention(q_lat, q_pe, cache, meta.page_table, meta.seq_lens, meta.extend_lens, meta.extend_start,
                             max(meta.extend_lens_cpu, default=0), s.scale * s.kv_scale, out=o_lat)
        if s.kv_scale != 1.0:  # as in decode
            o_lat.mul_(s.kv_scale)
        return torch.bmm(o_lat.transpose(0, 1), w_vc.to(cd)).transpose(0, 1).to(dtype)
