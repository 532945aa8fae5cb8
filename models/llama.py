"""Llama and Qwen2 (the DeepSeek-R1-Distill models): GQA attention with half-split RoPE."""
from __future__ import annotations

import torch

from dsserve.core.backends import AttentionSpec
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
    RotaryEmbedding,
    prefixed,
)


class GQAttention(CheckpointModule):
    def __init__(self, cfg: ModelConfig, ctx: LayerContext, rope: RotaryEmbedding):
        super().__init__()
        self.rope = rope
        self.heads = ctx.shard(cfg.num_attention_heads, "num_attention_heads")
        self.head_dim = d = cfg.head_dim
        H, Hkv, tp = cfg.num_attention_heads, cfg.num_key_value_heads, ctx.tp_size
        replicas = None
        if Hkv >= tp:
            self.kv_heads = ctx.shard(Hkv, "num_key_value_heads")
        elif tp % Hkv:
            raise ValueError(f"num_key_value_heads ({Hkv}) must divide or be a multiple of the tensor-parallel "
                             f"size ({tp}): with fewer KV heads than ranks each KV head is replicated on "
                             f"{tp} / {Hkv} ranks")
        else:  # fewer KV heads than ranks: each rank keeps the one its query heads read
            self.kv_heads = 1
            replicas = (ctx.tp_rank * Hkv // tp, Hkv)
        self.qkv_proj = Linear(cfg.hidden_size, (H + 2 * Hkv) * d, ctx, bias=cfg.qkv_bias, parallel="column",
                               parts={"q_proj": H * d, "k_proj": Hkv * d, "v_proj": Hkv * d},
                               part_shards={"k_proj": replicas, "v_proj": replicas} if replicas else None)
        self.o_proj = Linear(H * d, cfg.hidden_size, ctx, bias=cfg.attention_bias and not cfg.qkv_bias,
                             parallel="row")
        self.backend = ctx.attention_backend(AttentionSpec(
            kind="mha", num_heads=self.heads, num_kv_heads=self.kv_heads, head_dim=d, v_head_dim=d,
            scale=d ** -0.5, dtype=ctx.cache_dtype, page_size=ctx.page_size, batch_invariant=ctx.batch_invariant,
        ))

    def load_targets(self) -> dict[str, LoadTarget]:
        return {**self.qkv_proj.load_targets(), **prefixed("o_proj", self.o_proj.load_targets())}

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, cache) -> torch.Tensor:
        T, d = x.shape[0], self.head_dim
        q, k, v = self.qkv_proj(x).split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        q = self.rope(q.view(T, self.heads, d), meta.positions)   # in place, inside the qkv output
        k = self.rope(k.view(T, self.kv_heads, d), meta.positions)
        v = v.view(T, self.kv_heads, d)
        attend = self.backend.forward_decode if meta.is_decode else self.backend.forward_extend
        return self.o_proj(attend(q, k, v, cache, meta).reshape(T, self.heads * d))


class LlamaForCausalLM(DecoderOnlyLM):
    def __init__(self, cfg: ModelConfig, ctx: LayerContext):
        rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling,
                               interleaved=False, ctx=ctx)
        mlp_bias = bool(cfg.raw.get("mlp_bias"))
        super().__init__(cfg, ctx, lambda i: DecoderLayer(
            GQAttention(cfg, ctx, rope), GatedMLP(cfg.hidden_size, cfg.intermediate_size, ctx, bias=mlp_bias),
            cfg, ctx))
        self.rope = rope


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with q/k/v biases (set by ModelConfig.qkv_bias for model_type qwen2)."""
