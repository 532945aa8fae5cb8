"""Linear layers through the C++ block GEMM (csrc/packed_linear.cpp) on weights packed once at load.

Decoding is bound by reading the weights; this kernel streams each weight block once for all rows.
On a Zen 4 (2 threads, weights out of cache) it read one bfloat16 row's weights at 25-28 GB/s where
oneDNN's reordered GEMM reached 15-18 GB/s. On AMX CPUs the same packed weights feed the tiles
(csrc/amx.h); on a Xeon (2 threads) against oneDNN's AMX kernels: one row 2.2-3x faster (5632 x
1024: 484 against 1143 us), 16 rows 1.4-2.9x, 128 rows level, 512 rows oneDNN 1.1-1.5x ahead. One
kernel for every row count also keeps a row's bits independent of the batch it is in, which
--enable-deterministic-inference needs and oneDNN does not promise. oneDNN (`onednn.py`) serves
the shapes this layout cannot hold.
"""
from __future__ import annotations

import torch

from dsserve.core.backends import LinearSpec
from dsserve.core.reference import UnquantizedLinear

from . import native
from .packing import pack, packable, unpack


def served(spec: LinearSpec) -> bool:
    """Whether this kernel serves `spec`: unquantized and packable."""
    return spec.quant == "none" and packable(spec.out_features, spec.in_features, spec.dtype) is None


class CpuPackedLinear(UnquantizedLinear):
    def __init__(self, spec: LinearSpec, kernels, isa: native.Isa):
        super().__init__(spec)
        self.kernels, self.isa = kernels, int(isa)

    def process_weights_after_loading(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**params, "weight": pack(params["weight"])}

    def apply(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # the model's case: no reshapes to pay for
            return self.kernels.packed_linear(x.contiguous(), params["weight"], params.get("bias"), self.isa)
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        out = self.kernels.packed_linear(rows, params["weight"], params.get("bias"), self.isa)
        return out.reshape(*x.shape[:-1], self.spec.out_features)

    def dequantized_weight(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return unpack(params["weight"], self.spec.in_features)
