"""MLA decode on the CPU through the C++ kernel (csrc/mla_decode.cpp): every cached latent row read
once per step for all heads, split over the KV length so one long sequence uses every core. Extend
(prefill) stays the reference's."""
from __future__ import annotations

import torch

from dsserve.core.backends import AttentionSpec
from dsserve.core.reference import ReferenceMLAAttention, write_cache

# Split a sequence's KV length into chunks of at least this many tokens, and give the threads about
# this many chunks each, so that batch 1 keeps every core busy without splitting short contexts.
MIN_CHUNK_TOKENS = 64
CHUNKS_PER_THREAD = 2


def unsupported(spec: AttentionSpec) -> str | None:
    if spec.kind != "mla":
        return f"{spec.kind} attention"
    if spec.dtype not in (torch.bfloat16, torch.float32):
        return f"{spec.dtype}"
    return None


class CpuMLAAttention(ReferenceMLAAttention):
    def __init__(self, spec: AttentionSpec, kernels):
        super().__init__(spec)
        self.kernels = kernels

    def forward_decode(self, q_latent, q_pe, latent, cache, meta):
        flat = cache.view(-1, cache.shape[-1])
        write_cache(flat, meta.out_cache_loc, latent)
        q = torch.cat([q_latent, q_pe], dim=-1).to(flat.dtype).contiguous()
        longest = max(meta.seq_lens_cpu)
        wanted = -(-CHUNKS_PER_THREAD * torch.get_num_threads() // len(meta.seq_lens_cpu))
        chunks = max(1, min(wanted, longest // MIN_CHUNK_TOKENS))
        out = self.kernels.mla_decode(q, flat, meta.page_table, meta.seq_lens, meta.page_size,
                                      self.spec.kv_lora_rank, self.spec.scale, chunks)
        return out.to(q_latent.dtype)
