"""RMSNorm through the device's layer ops (float32 inside, as every DeepSeek/Llama reference computes it)."""
from __future__ import annotations

import torch
from torch import nn

from .checkpoint import CheckpointModule, LoadTarget
from .context import LayerContext


class RMSNorm(CheckpointModule):
    def __init__(self, dim: int, eps: float, ctx: LayerContext):
        super().__init__()
        self.eps, self.ops = eps, ctx.ops
        self.weight = nn.Parameter(torch.ones(dim, dtype=ctx.dtype, device=ctx.torch_device), requires_grad=False)

    def load_targets(self) -> dict[str, LoadTarget]:
        return {"weight": LoadTarget(self.weight)}

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """The norm of x, or with `residual` that of residual + x (residual updated in place, see
        `LayerOps.rms_norm`); `out` receives it (x itself for a norm in place)."""
        return self.ops.rms_norm(x, self.weight, self.eps, residual, out)
