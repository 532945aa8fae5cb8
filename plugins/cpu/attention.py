"""MLA on the CPU: decode through the C++ kernel (csrc/mla_decode.cpp), every cached latent row read
once per step for all heads, split over the KV length so one long sequence uses every core; the
query absorption and output expansion on the block GEMM with each head's w_kc / w_vc packed once
(torch's bmm re-packs them on every call: ~8 GB/s against ~25 here). Extend (prefill) stays the
reference's, on the weights unpacked per call."""
from __future__ import annotations

import torch

from dsserve.core.backends import AttentionSpec
from dsserve.core.reference import ReferenceMHAAttention, ReferenceMLAAttention, write_cache

from .packing import pack, packable, unpack

# Split a sequence's KV length into chunks of at least this many tokens, and give the threads about
# this many chunks each, so that batch 1 keeps every core busy without splitting short contexts.
MIN_CHUNK_TOKENS = 64
CHUNKS_PER_THREAD = 2


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

    # w_kc [H, nope, L] is used as x @ w_kc: per head a linear layer with weight w_kc[h]^T [L, nope];
    # w_vc [H, L, v] likewise with w_vc[h]^T [v, L]. Both are kept packed in that form.
    def process_weights_after_loading(self, w_kc, w_vc):
        return pack(w_kc.transpose(1, 2)), pack(w_vc.transpose(1, 2))

    def absorb_query(self, q_nope, w_kc):
        return self.kernels.head_linear(q_nope.contiguous(), w_kc, self.isa)

    def expand_output(self, o_latent, w_vc):
        return self.kernels.head_linear(o_latent.contiguous(), w_vc, self.isa)

    def forward_extend(self, q_nope, q_pe, latent, cache, meta, w_kc, w_vc):
        nope, rank = self.spec.head_dim - self.spec.qk_rope_head_dim, self.spec.kv_lora_rank
        return super().forward_extend(q_nope, q_pe, latent, cache, meta,
                                      unpack(w_kc, nope).transpose(1, 2), unpack(w_vc, rank).transpose(1, 2))

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


class CpuMHAAttention(ReferenceMHAAttention):
    """MHA/GQA (the R1-Distill models) through torch's SDPA kernels on the gathered pages. Decode stays
    in a half-precision cache's dtype (SDPA accumulates and takes the softmax in float32): 16 sequences
    x 1024 cached tokens, 16 heads, went from 7.7 ms (float32 upcast) to 4.2 ms a layer on a Zen 4.
    Prefill keeps the reference's float32 upcast, which measured faster there (32 against 40 ms for
    512 tokens, causal)."""

    upcast_half_decode = False
