"""Quantized linear layers in plain torch: every format of `dsserve.core.quant`.

A method holds the checkpoint's tensors as stored (8-bit or packed 4-bit weights and their scales,
laid out as the format says) and applies the scheme's arithmetic exactly: activations rounded as
the scheme's kernels round them (dynamic per-token or per-token-group 8-bit scales for W8A8, none
for AWQ's W4A16), times the dequantised weight, accumulated in float32. Only the summation order
differs from a kernel, so device kernels are checked against it to float32 rounding.

Storage choice: the weight stays quantized (as loaded) and is dequantised per call, in float32, a
slab of output rows at a time. Dequantising once at load would make each call cheaper but doubles
(bfloat16) or quadruples (float32) the weight memory of the largest checkpoints dsserve serves, and
a bfloat16 copy would round the dequantised weight, which the oracle must not do. The reference is
the fallback and the oracle, so exactness and the checkpoint's memory footprint win over speed.
"""
from __future__ import annotations

import torch

from ..backends import LinearMethod, LinearSpec
from ..quant import weight_format

# Dequantised weight elements held at once by `apply` (float32): 16M elements = 64 MiB.
SLAB_ELEMENTS = 1 << 24


class QuantizedWeights(LinearMethod):
    """What every quantized method shares: the format's checkpoint tensors (plus an optional bias),
    the weight rows and columns each element covers, and the dequantised weight. Subclasses
    implement `apply`; one that converts the tensors after loading keeps `self.format.dequantize`
    right for what it returns (as rocm's e4m3fnuz conversion does, doubling the scales)."""

    def __init__(self, spec: LinearSpec):
        super().__init__(spec)
        self.format = weight_format(spec.quant, spec.weight_block_size)

    def create_weights(self) -> dict[str, torch.Tensor]:
        s = self.spec
        params = {name: torch.empty(layout.shape(s.out_features, s.in_features), dtype=layout.dtype)
                  for name, layout in self.format.tensors().items()}
        if s.bias:
            params["bias"] = torch.empty(s.out_features, dtype=s.dtype)
        return params

    def param_block(self, name: str) -> tuple[int, int]:
        layout = self.format.tensors().get(name)
        return layout.block if layout else (1, 1)

    def param_dims(self, name: str) -> tuple[int, int]:
        layout = self.format.tensors().get(name)
        return layout.dims if layout else (0, 1)

    def dequantized_weight(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """float32 [out, in]: each stored value times its scale (minus its zero point), rounded once."""
        return self.format.dequantize(params)


class ReferenceQuantizedLinear(QuantizedWeights):
    """y = round_activations(x) @ dequant(W)^T (+ b) in float32, a slab of output rows at a time."""

    def apply(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        n, k = self.spec.out_features, self.spec.in_features
        lead = x.shape[:-1]
        xr = self.format.round_activations(x.reshape(-1, k).float())
        y = torch.empty(xr.shape[0], n, dtype=torch.float32, device=x.device)
        step = self.format.row_multiple()
        rows = max(step, (SLAB_ELEMENTS // max(1, k)) // step * step)
        for n0 in range(0, n, rows):
            n1 = min(n, n0 + rows)
            y[:, n0:n1] = xr @ self.format.dequantize(self.format.rows(params, n0, n1))[: n1 - n0].t()
        if "bias" in params:
            y += params["bias"].float()
        return y.to(x.dtype).view(*lead, n)
