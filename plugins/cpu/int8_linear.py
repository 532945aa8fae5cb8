"""W8A8 int8 linear layers (int8_channel, int8_block) through the C++ kernel (csrc/int8_linear.cpp).

The weights stay int8, packed once at load into vpdpbusd's layout with each column's compensation
(128 x its weights' sum per scale group: VNNI multiplies the activations as unsigned bytes, x + 128);
the activations are quantized inside the call exactly as the reference rounds them (per token, or
per token per block column), so the int32 products are the reference's to the last bit and only the
float32 scaling of their sums differs in rounding.
"""
from __future__ import annotations

import torch

from dsserve.core.backends import LinearSpec
from dsserve.core.reference import QuantizedWeights

from . import native
from .packing import BLOCK_N, pack_int8, unpack_int8

FORMATS = ("int8_channel", "int8_block")


def unsupported(spec: LinearSpec) -> str | None:
    if spec.quant not in FORMATS:
        return f"quantization {spec.quant!r}"
    if spec.dtype not in (torch.bfloat16, torch.float32):
        return f"{spec.dtype} activations"
    if spec.out_features % BLOCK_N:
        return f"{spec.out_features} output features are not a multiple of {BLOCK_N}"
    if spec.quant == "int8_block" and spec.weight_block_size and spec.weight_block_size[1] % 4:
        return f"weight block {spec.weight_block_size}: the input block must be a multiple of 4"
    return None


class CpuInt8Linear(QuantizedWeights):
    def __init__(self, spec: LinearSpec, kernels, isa: native.Int8Isa):
        super().__init__(spec)
        self.kernels, self.isa = kernels, int(isa)
        blocked = spec.quant == "int8_block"
        self.scale_name = "weight_scale_inv" if blocked else "weight_scale"
        self.group = self.format.block[1] if blocked else spec.in_features  # activation scale group

    def process_weights_after_loading(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The packed weight, and per block of 16 columns, per scale group, per column: the +128
        compensation and the weight scale, laid out for one vector load each."""
        w, scale = params["weight"], params[self.scale_name].float()
        n, k = w.shape
        groups = -(-k // self.group)
        padded = torch.nn.functional.pad(w, (0, groups * self.group - k)) if groups * self.group != k else w
        comp = padded.view(n, groups, self.group).sum(dim=-1, dtype=torch.int32) * 128  # [N, G]
        if self.spec.quant == "int8_block":
            per_column = scale.repeat_interleave(self.format.block[0], 0)[:n]  # [N, G]
        else:
            per_column = scale.view(n, 1)
        out = {"packed": pack_int8(w), "comp": _by_block(comp), "column_scale": _by_block(per_column),
               self.scale_name: scale}
        if "bias" in params:
            out["bias"] = params["bias"]
        return out

    def apply(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        out = self.kernels.int8_linear(rows, params["packed"], params["comp"], params["column_scale"],
                                       params.get("bias"), self.group, self.isa)
        return out.reshape(*x.shape[:-1], self.spec.out_features)

    def dequantized_weight(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        weight = unpack_int8(params["packed"], self.spec.in_features)
        return self.format.dequantize({"weight": weight, self.scale_name: params[self.scale_name]})


def _by_block(t: torch.Tensor) -> torch.Tensor:
    """[N, G] -> [N/16, G, 16]: one block's 16 columns contiguous per group."""
    n, g = t.shape
    return t.view(n // BLOCK_N, BLOCK_N, g).transpose(1, 2).contiguous()
