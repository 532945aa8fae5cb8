"""The SiLU-gated MLP of dense layers and shared experts."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checkpoint import CheckpointModule, LoadTarget, prefixed
from .context import LayerContext
from .linear import Linear


class GatedMLP(CheckpointModule):
    """SiLU-gated MLP (dense layers and shared experts): down(silu(gate x) * up x)."""

    def __init__(self, hidden: int, intermediate: int, ctx: LayerContext, bias: bool = False):
        super().__init__()
        self.gate_up_proj = Linear(hidden, 2 * intermediate, ctx, bias=bias, parallel="column",
                                   parts={"gate_proj": intermediate, "up_proj": intermediate})
        self.down_proj = Linear(intermediate, hidden, ctx, bias=bias, parallel="row")

    def load_targets(self) -> dict[str, LoadTarget]:
        return {**self.gate_up_proj.load_targets(), **prefixed("down_proj", self.down_proj.load_targets())}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
