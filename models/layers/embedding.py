"""The token embedding table."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointModule, LoadTarget
from .context import LayerContext


class Embedding(CheckpointModule):
    def __init__(self, vocab_size: int, dim: int, ctx: LayerContext):
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(vocab_size, dim, dtype=ctx.dtype, device=ctx.torch_device), requires_grad=False
        )

    def load_targets(self) -> dict[str, LoadTarget]:
        return {"weight": LoadTarget(self.weight)}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)
