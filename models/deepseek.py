"""DeepSeek-V2 / V3 / R1: multi-head latent attention and MoE with shared experts.

Follows the published checkpoints (tensor names, interleaved RoPE dims, YaRN) — see DeepSeek-V3's
`inference/model.py` and the Hugging Face implementations; where they differ it says so inline.
"""
from __future__ import annotations

import torch

from dsserve.core.backends import AttentionSpec, MoESpec
from dsserve.models.config import ModelConfig
from dsserve.core.forward_batch import AttentionMetadata

from .layers import (
    CheckpointModule,
    DecoderLayer,
    DecoderOnlyLM,
    GatedMLP,
    LayerContext,
    LoadTarget,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    RoutedExperts,
    prefixed,
    yarn_softmax_scale,
)

# The q/kv latent norms use 1e-6 whatever rms_norm_eps says: DeepSeek's inference/model.py, its
# Hugging Face code and transformers all build them with the RMSNorm default.
LATENT_NORM_EPS = 1e-6


class MLAttention(CheckpointModule):
    """Multi-head latent attention. The cache keeps, per token, the normalised compressed KV
    (kv_lora_rank) and the rotated shared rope key (qk_rope_head_dim)."""

    def __init__(self, cfg: ModelConfig, ctx: LayerContext, rope: RotaryEmbedding):
        super().__init__()
        self.ctx, self.rope = ctx, rope
        self.heads = ctx.shard(cfg.num_attention_heads, "num_attention_heads")
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        qk_dim = self.nope + self.rope_dim
        H = cfg.num_attention_heads
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, ctx, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS, ctx)
            self.q_b_proj = Linear(cfg.q_lora_rank, H * qk_dim, ctx, parallel="column")
        else:
            self.q_proj = Linear(cfg.hidden_size, H * qk_dim, ctx, parallel="column")
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, cfg.kv_lora_rank + self.rope_dim, ctx,
                                         bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS, ctx)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, H * (self.nope + self.v_dim), ctx, parallel="column")
        self.o_proj = Linear(H * self.v_dim, cfg.hidden_size, ctx, bias=cfg.attention_bias, parallel="row")
        self.backend = ctx.attention_backend(AttentionSpec(
            kind="mla", num_heads=self.heads, num_kv_heads=1, head_dim=qk_dim, v_head_dim=self.v_dim,
            scale=yarn_softmax_scale(cfg.rope_scaling, qk_dim), dtype=ctx.cache_dtype, page_size=ctx.page_size,
            kv_lora_rank=cfg.kv_lora_rank, qk_rope_head_dim=self.rope_dim, batch_invariant=ctx.batch_invariant,
        ))
        self.w_kc = self.w_vc = None

    def post_load(self) -> None:
        super().post_load()
        # Split kv_b_proj into the per-head up-projections used by the absorbed decode path. The weight
        # comes dequantised from its method (a quantized kv_b_proj stays quantized for its own GEMMs);
        # it is rounded once, to the compute dtype.
        w = self.kv_b_proj.method.dequantized_weight(dict(self.kv_b_proj.params))
        w = w.to(self.ctx.dtype).reshape(self.heads, self.nope + self.v_dim, self.kv_lora_rank)
        self.w_kc, self.w_vc = self.backend.process_weights_after_loading(
            w[:, : self.nope].contiguous(),                              # [H, nope, L]
            w[:, self.nope:].transpose(1, 2).contiguous())               # [H, L, v]

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, cache: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if hasattr(self, "q_b_proj") else self.q_proj(x)
        q = q.view(T, self.heads, self.nope + self.rope_dim)
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        self.rope(q_pe, meta.positions)                              # in place, inside q
        # the projection's output becomes the cached latent in place: c normalised, k_pe rotated
        latent = self.kv_a_proj_with_mqa(x)
        c, k_pe = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        self.kv_a_layernorm(c, out=c)
        self.rope(k_pe.unsqueeze(1), meta.positions)
        if meta.is_decode:
            q_latent = self.backend.absorb_query(q_nope, self.w_kc)                       # [B, H, L]
            o = self.backend.forward_decode(q_latent, q_pe, latent, cache, meta)
            o = self.backend.expand_output(o, self.w_vc)                                # [B, H, v]
        else:
            o = self.backend.forward_extend(q_nope, q_pe, latent, cache, meta, self.w_kc, self.w_vc)
        return self.o_proj(o.reshape(T, self.heads * self.v_dim))


class DeepseekMoE(CheckpointModule):
    """Routed experts plus always-on shared experts."""

    def __init__(self, cfg: ModelConfig, ctx: LayerContext):
        super().__init__()
        spec = MoESpec(
            num_experts=cfg.n_routed_experts, top_k=cfg.num_experts_per_tok, hidden_size=cfg.hidden_size,
            intermediate_size=cfg.moe_intermediate_size, scoring_func=cfg.scoring_func,
            topk_method=cfg.topk_method, n_group=cfg.n_group, topk_group=cfg.topk_group,
            norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor,
            dtype=ctx.dtype,
        )
        self.routed = RoutedExperts(spec, ctx, correction_bias=cfg.topk_method == "noaux_tc")
        self.shared_experts = (
            GatedMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, ctx)
            if cfg.n_shared_experts else None
        )

    def load_targets(self) -> dict[str, LoadTarget]:
        targets = self.routed.load_targets()
        if self.shared_experts is not None:
            targets.update(prefixed("shared_experts", self.shared_experts.load_targets()))
        return targets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.routed(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


def deepseek_decoder_layer(cfg: ModelConfig, ctx: LayerContext, rope: RotaryEmbedding, layer: int) -> DecoderLayer:
    """The checkpoint's layer `layer`: MLA, then MoE or a dense MLP where the config puts them. The MTP
    layers (models/mtp.py), stored after the last decoder layer, are built by it too."""
    mlp = DeepseekMoE(cfg, ctx) if cfg.is_moe_layer(layer) else GatedMLP(cfg.hidden_size, cfg.intermediate_size, ctx)
    return DecoderLayer(MLAttention(cfg, ctx, rope), mlp, cfg, ctx)


class DeepseekV2ForCausalLM(DecoderOnlyLM):
    def __init__(self, cfg: ModelConfig, ctx: LayerContext):
        max_pos = max(cfg.max_position_embeddings, 1)
        rope = RotaryEmbedding(cfg.qk_rope_head_dim, max_pos, cfg.rope_theta, cfg.rope_scaling,
                               interleaved=cfg.rope_interleave, ctx=ctx)
        super().__init__(cfg, ctx, lambda i: deepseek_decoder_layer(cfg, ctx, rope, i))
        self.rope = rope  # shared by every layer, the MTP layer's included


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """Same graph; V3 differs only in config (sigmoid noaux_tc routing, MTP layer)."""
