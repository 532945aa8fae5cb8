"""Linear layers through the C++ block GEMM (csrc/packed_linear.cpp) on weights packed once at load.

Decoding is bound by reading the weights; this kernel streams each weight block once for all rows
and reached 25-28 GB/s for one bfloat16 row on a Zen 4 (2 threads, weights out of cache) where
oneDNN's reordered GEMM reached 15-18 GB/s; at 16 rows the two are level, at 256 rows oneDNN is
3-15% ahead. On a CPU with AMX, oneDNN's AMX kernels serve instead (see `preferred`).
"""
from __future__ import annotations

import torch

from dsserve.core.backends import LinearSpec
from dsserve.core.reference import UnquantizedLinear

from . import native
from .packing import pack, packable, unpack


def preferred(spec: LinearSpec, flags: frozenset[str]) -> bool:
    """Whether this kernel serves `spec` on a CPU with `flags`: unquantized, packable, and no AMX unless
    the spec asks for batch-invariant rows (this kernel runs K in one order for every row count;
    oneDNN does not promise that)."""
    return (spec.quant == "none" and packable(spec.out_features, spec.in_features, spec.dtype) is None
            and (spec.batch_invariant or not {"amx_bf16", "amx_int8"} & flags))


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
