"""The pre-norm decoder layer and the decoder-only LM shell every architecture shares."""
from __future__ import annotations

import torch
from torch import nn

from dsserve.core.forward_batch import AttentionMetadata
from dsserve.models.config import ModelConfig

from .checkpoint import CheckpointModule, LoadTarget, prefixed
from .context import LayerContext
from .embedding import Embedding
from .linear import Linear
from .norm import RMSNorm


class DecoderLayer(CheckpointModule):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, cfg: ModelConfig, ctx: LayerContext):
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, cache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), meta, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderOnlyLM(CheckpointModule):
    """The part every supported architecture shares: embed, decoder layers, norm, LM head.

    Checkpoint names: `model.embed_tokens`, `model.layers.{i}`, `model.norm`, `lm_head`.
    """

    def __init__(self, cfg: ModelConfig, ctx: LayerContext, make_layer):
        super().__init__()
        self.cfg, self.ctx = cfg, ctx
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, ctx)
        self.layers = nn.ModuleList(make_layer(i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, ctx, parallel="column", quant="none")

    def load_targets(self) -> dict[str, LoadTarget]:
        targets = prefixed("model.embed_tokens", self.embed_tokens.load_targets())
        for i, layer in enumerate(self.layers):
            targets.update(prefixed(f"model.layers.{i}", layer.load_targets()))
        targets.update(prefixed("model.norm", self.norm.load_targets()))
        if self.lm_head is not None:
            targets.update(prefixed("lm_head", self.lm_head.load_targets()))
        return targets

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_caches: list) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm."""
        x = self.embed_tokens(input_ids)
        for layer, cache in zip(self.layers, kv_caches):
            x = layer(x, meta, cache)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, vocab] of the given rows."""
        if self.lm_head is None:
            logits = torch.nn.functional.linear(hidden, self.embed_tokens.weight)
        else:
            logits = self.lm_head(hidden)
            if self.ctx.tp_size > 1:
                logits = self.ctx.comm.all_gather(logits, dim=-1)
        return logits.float()

    def attention_backends(self):
        return self.ctx.attention_backends()
