"""DeepSeek-V3's multi-token-prediction (MTP, "NextN") layer: the draft model of speculative decoding.

The checkpoint stores it after the last decoder layer, as layer `num_hidden_layers` (61 in V3/R1):
`enorm`, `hnorm`, `eh_proj` [hidden, 2 * hidden], a whole decoder layer (MLA + MoE) under the same
prefix, `shared_head.norm`, and in the published checkpoints copies of the embedding
(`embed_tokens`) and the output head (`shared_head.head`). A draft step, for the pair of the main
model's hidden state h_i and the embedding of the next token t_{i+1} (DeepSeek-V3 report, §2.2):

    x = eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)])
    x = shared_head.norm(decoder_layer(x))         # attending over the MTP layer's own KV cache
    logits = shared_head.head(x)                   # the draft of t_{i+2}

h_i is the main model's hidden state AFTER its final norm (what `DecoderOnlyLM.forward` returns); the
x a step returns is the h of the next draft step. That is the contract `hnorm` was trained on: the
`modeling_deepseek.py` shipped with DeepSeek's MTP checkpoints passes the main model's normed output,
and SGLang's deepseek_nextn and transformers' MtpModel feed the normed hidden and chain the normed x.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dsserve.core.backends import AttentionBackend
from dsserve.core.forward_batch import AttentionMetadata
from dsserve.models.config import ModelConfig

from .deepseek import DeepseekV2ForCausalLM, deepseek_decoder_layer
from .layers import CheckpointModule, Embedding, LayerContext, Linear, LoadTarget, RMSNorm, prefixed
from .layers.decoder import head_logits
from .loader import CheckpointError, checkpoint_files, construct, load_weights


class MTPLayer(CheckpointModule):
    """The MTP layer stored as checkpoint layer `layer`, built with the main model's layer classes.

    The embedding and the output head are the layer's stored copies when the checkpoint has them,
    else the main model's, used in place (never copied or loaded twice).
    """

    def __init__(self, cfg: ModelConfig, ctx: LayerContext, main: DeepseekV2ForCausalLM, layer: int,
                 own_embedding: bool, own_head: bool):
        super().__init__()
        self.prefix = f"model.layers.{layer}"
        dim = cfg.hidden_size
        self.enorm = RMSNorm(dim, cfg.rms_norm_eps, ctx)
        self.hnorm = RMSNorm(dim, cfg.rms_norm_eps, ctx)
        # unquantized whatever the checkpoint's format: DeepSeek's FP8 checkpoints store it in BF16
        self.eh_proj = Linear(2 * dim, dim, ctx, quant="none")
        self.decoder = deepseek_decoder_layer(cfg, ctx, main.rope, layer)
        self.head_norm = RMSNorm(dim, cfg.rms_norm_eps, ctx)
        self.embed_tokens = Embedding(cfg.vocab_size, dim, ctx) if own_embedding else None
        # as the main model's lm_head: split over the vocabulary, never quantized
        self.head = Linear(dim, cfg.vocab_size, ctx, parallel="column", quant="none") if own_head else None
        # The main model's parts, kept as functions rather than submodules so that they are neither
        # loaded nor repacked (post_load) a second time here.
        self._main_embed, self._main_logits = main.embed_tokens.forward, main.compute_logits

    def load_targets(self) -> dict[str, LoadTarget]:
        """Full checkpoint names (`model.layers.{layer}.…`); the decoder layer's tensors sit directly
        under the prefix, beside the MTP layer's own."""
        parts = {"enorm": self.enorm, "hnorm": self.hnorm, "eh_proj": self.eh_proj, "shared_head.norm": self.head_norm,
                 "embed_tokens": self.embed_tokens, "shared_head.head": self.head}
        targets = self.decoder.load_targets()
        for name, part in parts.items():
            if part is not None:
                targets.update(prefixed(name, part.load_targets()))
        return prefixed(self.prefix, targets)

    def forward(self, input_ids: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata,
                cache) -> torch.Tensor:
        """One draft step over packed tokens: input_ids [T] (t_{i+1} of each row), hidden [T, hidden]
        (h_i: the main model's normed hidden state, or the previous draft step's output). `meta`
        places the rows in the MTP layer's own cache (`cache`, of `attention_backends()`'s backend).
        Returns the normed hidden states [T, hidden]: `compute_logits`' input and the next step's h."""
        embedded = self._main_embed(input_ids) if self.embed_tokens is None else self.embed_tokens(input_ids)
        x = self.eh_proj(torch.cat([self.enorm(embedded), self.hnorm(hidden)], dim=-1))
        x, residual = self.decoder(x, None, meta, cache)
        return self.head_norm(x, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 draft logits [N, vocab] of the given rows of `forward`'s output."""
        return self._main_logits(hidden) if self.head is None else head_logits(self.head, hidden)

    def attention_backends(self) -> list[AttentionBackend]:
        """The backend of the layer's attention, once: the KV pool adds one cache for it (the layer's
        own, beside the main model's), and it is prepared before each MTP pass. It may be the very
        backend instance the main model's layers use (one per distinct spec)."""
        return [self.decoder.self_attn.backend]


def build_mtp(folder: Path, cfg: ModelConfig, ctx: LayerContext, main: DeepseekV2ForCausalLM,
              allow_nonfinite: bool = False) -> MTPLayer:
    """The checkpoint's (first) MTP layer, filled from `folder`'s weights with the loader's checks, on
    `main`'s context and beside it (`main` was built from the same folder by `build_model`)."""
    if not cfg.num_nextn_predict_layers:
        raise CheckpointError(f"{folder / 'config.json'}: num_nextn_predict_layers is 0 or absent: the model has no "
                              "MTP layer")
    files = checkpoint_files(folder)
    layer = cfg.num_hidden_layers
    prefix = f"model.layers.{layer}."
    stored = {name for names in files.values() for name in names if name.startswith(prefix)}
    if not stored:
        raise CheckpointError(f"{folder}: config.json declares {cfg.num_nextn_predict_layers} MTP layer(s) but the "
                              f"checkpoint stores no tensor of it ({prefix}*)")
    mtp = construct(folder, lambda: MTPLayer(cfg, ctx, main, layer,
                                             own_embedding=f"{prefix}embed_tokens.weight" in stored,
                                             own_head=f"{prefix}shared_head.head.weight" in stored))
    load_weights(mtp, folder, files, cfg, ctx, lambda name: name.startswith(prefix), allow_nonfinite)
    mtp.post_load()
    return mtp.eval()
