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
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    The residual stream travels beside the block's output and each add is fused into the norm that
    follows it (`LayerOps.rms_norm`): a layer returns (its MLP's output, the stream without it), and
    the next layer's input norm, or the model's final one, adds the two.
    """

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, cfg: ModelConfig, ctx: LayerContext):
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata,
                cache) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's output (the embeddings in the first layer, whose residual is None)."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h = self.input_layernorm(x, residual)
        h = self.post_attention_layernorm(self.self_attn(h, meta, cache), residual)
        return self.mlp(h), residual


def head_logits(head: Linear, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits [N, vocab] through a column-parallel output head: each rank computes its slice
    of the vocabulary and every rank gets them all."""
    logits = head(hidden)
    if head.ctx.tp_size > 1:
        logits = head.ctx.comm.all_gather(logits, dim=-1)
    return logits.float()


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
        x, residual = self.embed_tokens(input_ids), None
        for layer, cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, meta, cache)
        return self.norm(x, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, vocab] of the given rows."""
        if self.lm_head is None:
            return torch.nn.functional.linear(hidden, self.embed_tokens.weight).float()
        return head_logits(self.lm_head, hidden)

    def attention_backends(self):
        return self.ctx.attention_backends()
