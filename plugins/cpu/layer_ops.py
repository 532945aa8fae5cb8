"""RMSNorm (residual add fused) and rotary embedding in one C++ call each (csrc/layer_ops.cpp).

At batch 1 a bench-model decode step runs 33 norms and 16 rotations: through torch they cost ~20 us
and ~30 us each in dispatch (F.rms_norm alone runs five kernels for one row), a tenth of the step.
The kernels serve bfloat16 and float32 on the CPU; anything else goes to the reference.
"""
from __future__ import annotations

import torch

from dsserve.core.reference import ReferenceLayerOps

_SERVED = (torch.bfloat16, torch.float32)


class CpuLayerOps(ReferenceLayerOps):
    def __init__(self, kernels):
        self.kernels = kernels

    def rms_norm(self, x, weight, eps, residual=None, out=None):
        if x.dtype not in _SERVED or weight.dtype != x.dtype or x.dim() != 2 or x.stride(-1) != 1:
            return super().rms_norm(x, weight, eps, residual, out)
        return self.kernels.rms_norm(x, weight, eps, residual, out)

    def rotary_(self, x, positions, cos, sin, interleaved):
        if x.dtype not in _SERVED or x.stride(-1) != 1 or positions.dtype != torch.int64:
            return super().rotary_(x, positions, cos, sin, interleaved)
        self.kernels.rotary(x, positions.contiguous(), cos, sin, interleaved)
