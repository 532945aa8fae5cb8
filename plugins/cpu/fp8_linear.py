"""FP8 weight-only linear layers (fp8_block, DeepSeek-V3/R1's checkpoints) through the C++ kernel
(csrc/fp8_linear.cpp).

The weights stay e4m3 (1 byte each: V3/R1 need half the memory of a bfloat16 copy) and are widened in
registers, block column by block column, with the block's scale applied to each column's float32 sum:
to bfloat16 for vdpbf16ps on bfloat16 activations where the CPU has AVX512-BF16 (on AMX CPUs, calls of
6 rows or more widen each block once and run on the tiles), to float32 for FMAs on float32
activations elsewhere (AVX2). Activations are not rounded to 8 bits: no CPU has FP8
arithmetic, so the W8A8 rounding of the GPU kernels (and of the reference, which follows them) would
only cost accuracy here; the result is closer to the dequantised weight's product than the reference's.
"""
from __future__ import annotations

import torch

from dsserve.core.backends import LinearSpec, MoESpec
from dsserve.core.reference import QuantizedWeights

from .native import Isa
from .packing import BLOCK_N, pack_fp8, unpack_fp8


def unsupported(spec: LinearSpec | MoESpec) -> str | None:
    if spec.quant != "fp8_block":
        return f"quantization {spec.quant!r}"
    bn, bk = spec.weight_block_size or (128, 128)
    if bn % BLOCK_N or bk % 2:
        return f"{bn}x{bk} blocks (multiples of 16 rows and even columns needed)"
    shapes = ([(spec.out_features, spec.in_features)] if isinstance(spec, LinearSpec) else
              [(2 * spec.intermediate_size, spec.hidden_size), (spec.hidden_size, spec.intermediate_size)])
    for n, k in shapes:
        if n % BLOCK_N or k % 2:
            return f"a [{n}, {k}] weight (16-row blocks and even K needed)"
    return None


def activation_dtype(isa: Isa) -> torch.dtype:
    """bfloat16 where the CPU has vdpbf16ps, float32 (exact FMAs) elsewhere."""
    return torch.bfloat16 if isa >= Isa.AVX512_BF16 else torch.float32


def uses_tiles(spec: LinearSpec | MoESpec, isa: Isa) -> bool:
    """Whether calls of enough rows run on AMX tiles: not where a row's bits must not depend on the
    other rows of the call (the tiles sum a scale group in another order than the vector kernel that
    serves a few rows)."""
    return isa is Isa.AMX_BF16 and not spec.batch_invariant


def column_scales(scale: torch.Tensor, bn: int, n: int) -> torch.Tensor:
    """Block scales [..., N/bn, G] -> per block of 16 columns, per group, per column: [..., N/16, G, 16]."""
    per_column = scale.float().repeat_interleave(bn, -2)[..., :n, :]  # [..., N, G]
    *lead, _, groups = per_column.shape
    return per_column.reshape(*lead, n // BLOCK_N, BLOCK_N, groups).transpose(-2, -1).contiguous()


class CpuFp8Linear(QuantizedWeights):
    def __init__(self, spec: LinearSpec, kernels, isa: Isa, vbmi: bool = False):
        super().__init__(spec)
        self.kernels, self.act_dtype, self.amx = kernels, activation_dtype(isa), uses_tiles(spec, isa)
        # the table-lookup widening, where the CPU has it and the shapes allow it
        self.vbmi = vbmi and self.act_dtype == torch.bfloat16 and spec.in_features % 4 == 0 and self.format.block[1] % 4 == 0

    def process_weights_after_loading(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        bn, _ = self.format.block
        out = {"packed": pack_fp8(params["weight"], self.vbmi), "weight_scale_inv": params["weight_scale_inv"].float(),
               "column_scale": column_scales(params["weight_scale_inv"], bn, self.spec.out_features)}
        if "bias" in params:
            out["bias"] = params["bias"]
        return out

    def apply(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(self.act_dtype).contiguous()
        out = self.kernels.fp8_linear(rows, params["packed"], params["column_scale"], params.get("bias"),
                                      self.format.block[1], x.dtype == torch.float32, self.vbmi, self.amx)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.spec.out_features)

    def dequantized_weight(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        weight = unpack_fp8(params["packed"], self.spec.in_features, self.vbmi)
        return self.format.dequantize({"weight": weight, "weight_scale_inv": params["weight_scale_inv"]})
