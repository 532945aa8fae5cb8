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


def scale_name(fmt) -> str:
    """The name of an int8 format's weight-scale tensor, as its checkpoints spell it (int8_block:
    weight_scale_inv, int8_channel: weight_scale)."""
    return next(name for name in fmt.tensors() if name != "weight")


def activation_group(quant: str, block: tuple[int, int] | None, k: int) -> int:
    """Features per activation scale: the block's columns, or the whole row (per token)."""
    return block[1] if quant == "int8_block" else k


class CpuInt8Linear(QuantizedWeights):
    def __init__(self, spec: LinearSpec, kernels, isa: native.Int8Isa):
        super().__init__(spec)
        self.kernels, self.isa = kernels, int(isa)
        self.scale_name = scale_name(self.format)
        self.group = activation_group(spec.quant, self.format.block, spec.in_features)

    def process_weights_after_loading(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        scale = params[self.scale_name].float()
        packed, comp, column_scale = pack_w8a8(params["weight"], scale, self.format.block, self.group)
        out = {"packed": packed, "comp": comp, "column_scale": column_scale, self.scale_name: scale}
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


def pack_w8a8(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None, group: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 W [..., N, K] with its scales (per row [..., N, 1], or per block [..., N/bn, K/bk] when
    `block`) -> (the packed weight; per block of 16 columns, per activation group of `group` features,
    per column: the +128 compensation (int32) and the weight scale (float32), [..., N/16, G, 16] each,
    laid out for one vector load)."""
    *lead, n, k = weight.shape
    groups = -(-k // group)
    padded = torch.nn.functional.pad(weight, (0, groups * group - k)) if groups * group != k else weight
    comp = padded.reshape(*lead, n, groups, group).sum(dim=-1, dtype=torch.int32) * 128  # [..., N, G]
    per_column = scale.repeat_interleave(block[0], -2)[..., :n, :] if block else scale  # [..., N, G]

    def by_block(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(*lead, n // BLOCK_N, BLOCK_N, groups).transpose(-2, -1).contiguous()

    return pack_int8(weight), by_block(comp), by_block(per_column.float().expand(*lead, n, groups))
