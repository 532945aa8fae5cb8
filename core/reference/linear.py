"""The unquantized GEMM; quantized schemes come from their own `LinearMethod`s."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backends import LinearMethod


class UnquantizedLinear(LinearMethod):
    """y = x W^T (+ b) with the weight stored as the checkpoint stores it, [out, in]."""

    def create_weights(self) -> dict[str, torch.Tensor]:
        s = self.spec
        params = {"weight": torch.empty(s.out_features, s.in_features, dtype=s.dtype)}
        if s.bias:
            params["bias"] = torch.empty(s.out_features, dtype=s.dtype)
        return params

    def apply(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if self.spec.batch_invariant and x.numel() > x.shape[-1]:
            # One call per row: BLAS picks its kernel and K split by the shape, so only a shape that
            # never changes gives a row the same bits in every batch.
            rows = x.reshape(-1, x.shape[-1])
            out = torch.cat([F.linear(row, params["weight"], params.get("bias")) for row in rows.split(1)])
            return out.reshape(*x.shape[:-1], out.shape[-1])
        return F.linear(x, params["weight"], params.get("bias"))
