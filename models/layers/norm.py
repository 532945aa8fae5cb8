"""RMSNorm, computed in float32 as every DeepSeek/Llama reference does."""
from __future__ import annotations

import torch
from torch import nn

from .checkpoint import CheckpointModule, LoadTarget
from .context import LayerContext


class RMSNorm(CheckpointModule):
    def __init__(self, dim: int, eps: float, ctx: LayerContext):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=ctx.dtype, device=ctx.torch_device), requires_grad=False)

    def load_targets(self) -> dict[str, LoadTarget]:
        return {"weight": LoadTarget(self.weight)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as every DeepSeek/Llama reference does, then cast back.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)
