"""MLA decode through DeepSeek's FlashMLA (the `flash_mla` package), for Hopper GPUs.

UNTESTED HERE: written against FlashMLA's documented Python API (README and
flash_mla/flash_mla_interface.py) on a machine without a GPU; nothing in this file has run.

    sched, splits = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v,
                                      sched, splits, softmax_scale=..., causal=...)

q [B, s_q, h_q, 576], k_cache [num_blocks, 64, h_kv=1, 576] (the latent cache with a unit head
axis), block_table [B, max_blocks] int32, cache_seqlens [B] int32, head_dim_v = 512; out
[B, s_q, h_q, 512]. Older releases return (tile_scheduler_metadata, num_splits) tensors from
get_mla_metadata; newer ones return (FlashMLASchedMeta, None) and fill the metadata on first use;
calling both the same way works with either, and the metadata is computed once per forward pass
(`prepare`) and shared by every layer, as both allow. Extend stays on the Triton/reference path.
"""
from __future__ import annotations

import torch
from dsserve.core.backends import AttentionSpec
from dsserve.core.forward_batch import AttentionMetadata
from dsserve.plugins.triton_kernels import TritonMLAAttention
from dsserve.plugins.triton_kernels.paged_attention import write_cache_rows

PAGE_SIZE = 64
RANK, ROPE = 512, 64


def unsupported(spec: AttentionSpec) -> str | None:
    """Why FlashMLA cannot serve `spec` (regardless of the GPU), or None."""
    if spec.kind != "mla":
        return "not MLA"
    if spec.dtype not in (torch.bfloat16, torch.float16):
        return f"cache dtype {spec.dtype} (FlashMLA decodes bfloat16/float16 caches)"
    if spec.kv_scale != 1.0:
        return f"kv_scale {spec.kv_scale} (FlashMLA reads the cache unscaled)"
    if (spec.kv_lora_rank, spec.qk_rope_head_dim) != (RANK, ROPE):
        return f"latent {spec.kv_lora_rank}+{spec.qk_rope_head_dim} (FlashMLA needs 512+64)"
    if spec.page_size not in (None, PAGE_SIZE):
        return f"page size {spec.page_size} (FlashMLA needs {PAGE_SIZE})"
    return None


class FlashMLAAttention(TritonMLAAttention):
    """Decode by FlashMLA; extend as `TritonMLAAttention`. Page size 64."""

    def __init__(self, spec: AttentionSpec):
        super().__init__(spec)
        import flash_mla

        self._get_metadata = flash_mla.get_mla_metadata
        self._decode = flash_mla.flash_mla_with_kvcache
        self._sched: tuple[AttentionMetadata, object, object] | None = None

    @property
    def page_size(self) -> int:
        return PAGE_SIZE

    def _metadata(self, meta: AttentionMetadata, heads: int):
        if self._sched is None or self._sched[0] is not meta:
            # s_q = 1 token per sequence, h_kv = 1 latent head shared by all query heads.
            sched, splits = self._get_metadata(meta.seq_lens, heads, 1)
            self._sched = (meta, sched, splits)
        return self._sched[1], self._sched[2]

    def prepare(self, meta: AttentionMetadata) -> None:
        super().prepare(meta)
        if meta.is_decode:
            self._metadata(meta, self.spec.num_heads)

    def forward_decode(self, q_latent, q_pe, latent, cache, meta):
        write_cache_rows(cache.view(-1, cache.shape[-1]), meta.out_cache_loc, latent)
        q = torch.cat([q_latent, q_pe.to(q_latent.dtype)], dim=-1).unsqueeze(1)  # [B, 1, H, 576]
        sched, splits = self._metadata(meta, q.shape[2])
        out, _lse = self._decode(q, cache.unsqueeze(2), meta.page_table, meta.seq_lens, RANK, sched, splits,
                                 softmax_scale=self.spec.scale, causal=False)
        return out.squeeze(1)
