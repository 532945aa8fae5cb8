"""The torch-native RMSNorm and rotary embedding every device falls back on (see `LayerOps`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backends import LayerOps


class ReferenceLayerOps(LayerOps):
    def rms_norm(self, x, weight, eps, residual=None, out=None):
        if residual is not None:
            residual.add_(x)
            x = residual
        # torch's fused RMSNorm accumulates in float32 as every DeepSeek/Llama reference does; it
        # rounds once (after the weight) where they round before it too
        y = F.rms_norm(x, weight.shape, weight, eps)
        return y if out is None else out.copy_(y)

    def rotary_(self, x, positions, cos, sin, interleaved):
        c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)    # [T, 1, D/2]
        xf = x.float()
        if interleaved:
            a, b = xf[..., 0::2], xf[..., 1::2]
            x.copy_(torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2))
        else:
            a, b = xf.chunk(2, dim=-1)
            x.copy_(torch.cat((a * c - b * s, b * c + a * s), dim=-1))
