"""Paged multi-head / grouped-query attention with Triton.

Both passes first write the new tokens' K and V into their pages (`index_copy_` at
`meta.out_cache_loc`), then run `paged_attention`, which reads every key and value, prefix and new
alike, from the pages through the page table:

* decode: one query token per sequence; the `group` query heads that share a KV head form the rows
  of one tl.dot (padded to 16), and long contexts are split over several programs (split-K) whose
  partial results a second kernel merges;
* extend / prefill: query j of a sequence sits at position prefix + j and sees keys 0 .. prefix + j;
  each program takes a block of (token, head) rows of one KV head.
"""
from __future__ import annotations

import torch
from dsserve.core.backends import AttentionSpec, MHAAttentionBackend
from dsserve.core.forward_batch import AttentionMetadata
from dsserve.plugins.gpu import GpuTarget, device_target

from .paged_attention import (
    DECODE_HEADS,
    device_sm_count,
    num_decode_splits,
    paged_attention,
    write_cache_rows,
)
from .strides import last_dim_contiguous

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def mha_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    num_splits: int = 1,
    out: torch.Tensor | None = None,
    extend_lens: torch.Tensor | None = None,
    extend_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, H, D]; k_cache [num_pages, page_size, Hkv, D], v_cache [..., Dv]. Returns [B, H, Dv]."""
    batch, heads, _ = q.shape
    page_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    k_flat = k_cache.view(-1, kv_heads, k_cache.shape[-1])
    v_flat = v_cache.view(-1, kv_heads, v_cache.shape[-1])
    if extend_lens is None or extend_start is None:  # a decode pass's: all ones, 0 .. B-1
        extend_lens = torch.ones(batch, dtype=torch.int32, device=q.device)
        extend_start = torch.arange(batch, dtype=torch.int32, device=q.device)
    return paged_attention(
        last_dim_contiguous(q), None, k_flat, None, v_flat, page_table, seq_lens, extend_lens, extend_start,
        scale=scale, page_size=page_size, max_extend_len=1, num_splits=num_splits, out=out,
        block_m=min(heads // kv_heads, DECODE_HEADS), block_n=32, num_warps=4, num_stages=2,
    )


def mha_extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    extend_start: torch.Tensor,
    max_extend_len: int,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    target: GpuTarget | None = None,
) -> torch.Tensor:
    """Causal attention of packed queries q [T, H, D] over prefix + new tokens, all in the pages.
    target: the GPU target to configure the launch for (default: q's device's, none on CPU)."""
    target = target or device_target(q.device)
    # 64 query rows against 32 keys at a time spill scalar registers (SGPRs) on gfx90a and gfx942
    keys_per_step = 16 if target is not None and target.backend == "hip" else 32
    page_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    k_flat = k_cache.view(-1, kv_heads, k_cache.shape[-1])
    v_flat = v_cache.view(-1, kv_heads, v_cache.shape[-1])
    return paged_attention(
        last_dim_contiguous(q), None, k_flat, None, v_flat, page_table, seq_lens, extend_lens, extend_start,
        scale=scale, page_size=page_size, max_extend_len=max_extend_len, num_splits=1, out=out,
        block_m=64, block_n=keys_per_step, num_warps=4, num_stages=2,
    )


class TritonMHAAttention(MHAAttentionBackend):
    """MHA / GQA over the paged K and V caches with the Triton paged kernel."""

    #: KV splits per decode sequence; None lets `choose_num_splits` decide from the GPU's SM count.
    decode_splits: int | None = None

    @staticmethod
    def unsupported(spec: AttentionSpec) -> str | None:
        """Why the kernels cannot serve `spec`, or None when they can."""
        if spec.kind != "mha":
            return f"kind {spec.kind!r} is not mha"
        if spec.dtype not in _DTYPES:
            return f"dtype {spec.dtype} (supported: float16, bfloat16, float32)"
        if spec.kv_scale != 1.0:
            return f"kv_scale {spec.kv_scale} (the kernels read the cache unscaled)"
        if spec.num_kv_heads < 1 or spec.num_heads % spec.num_kv_heads:
            return f"{spec.num_heads} query heads over {spec.num_kv_heads} KV heads"
        if not 0 < spec.head_dim <= 256 or not 0 < spec.v_head_dim <= 256:
            return f"head sizes {spec.head_dim}/{spec.v_head_dim} (kernel limit 256, padded to powers of two)"
        if spec.page_size is not None and spec.page_size < 1:
            return f"page size {spec.page_size}"
        return None

    @classmethod
    def supports(cls, spec: AttentionSpec) -> bool:
        return cls.unsupported(spec) is None

    def _write_kv(self, k, v, cache, meta):
        k_cache, v_cache = cache
        write_cache_rows(k_cache.view(-1, *k_cache.shape[2:]), meta.out_cache_loc, k)
        write_cache_rows(v_cache.view(-1, *v_cache.shape[2:]), meta.out_cache_loc, v)

    def forward_extend(self, q, k, v, cache, meta: AttentionMetadata):
        self._write_kv(k, v, cache, meta)
        return mha_extend_attention(q, cache[0], cache[1], meta.page_table, meta.seq_lens, meta.extend_lens,
                                    meta.extend_start, max(meta.extend_lens_cpu, default=0), self.spec.scale)

    def forward_decode(self, q, k, v, cache, meta: AttentionMetadata):
        self._write_kv(k, v, cache, meta)
        if self.decode_splits is not None:
            splits = self.decode_splits
        else:
            splits = num_decode_splits(meta.batch_size, q.shape[1], cache[0].shape[2],
                                       max(meta.seq_lens_cpu, default=0), num_sms=device_sm_count(q.device))
        return mha_decode_attention(q, cache[0], cache[1], meta.page_table, meta.seq_lens, self.spec.scale,
                                    num_splits=splits, extend_lens=meta.extend_lens, extend_start=meta.extend_start)
