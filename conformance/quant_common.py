"""Quantized weights for the linear and MoE cases: the formats checked, random weights stored in
each, and their real values in float64, computed independently of the core's code from the formulas
of docs/quantization.md."""
from __future__ import annotations

import torch

from dsserve.core.quant import weight_format

# format -> (scale block, the normalised error allowed against x @ dequant(W)^T in float64). The W8A8
# formats round activations to 8 bits per token (per 128-feature group for the block formats), so the
# product carries that rounding: 6e-4 to 1.2e-3 for e4m3 (3 mantissa bits), ~1e-4 for int8; a method
# that keeps activations in 16 or 32 bits does better. AWQ (W4A16) leaves them alone: the dtype's own
# bound. Wrong scales, blocks or packing cost far more.
QUANT_FORMATS = {"fp8_block": ((128, 128), 5e-3), "int8_block": ((128, 128), 1e-3), "int8_channel": (None, 1e-3),
                 "awq": ((1, 128), None)}


def dequantize64(fmt: str, block, stored: dict[str, torch.Tensor], n: int, k: int) -> torch.Tensor:
    """The real weight [n, k] in float64 from a format's stored tensors, written out independently of
    the core's code (docs/quantization.md gives the formulas)."""
    def spread(scale, rows, cols):
        return scale.double().repeat_interleave(rows, 0)[:n].repeat_interleave(cols, 1)[:, :k]

    if fmt in ("fp8_block", "int8_block"):
        return stored["weight"].double() * spread(stored["weight_scale_inv"], *block)
    if fmt == "int8_channel":
        return stored["weight"].double() * stored["weight_scale"].double()
    g = block[1]
    order = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ: nibble i holds output column order[i] of each 8

    def unpack(packed):
        p = packed.to(torch.int64) & 0xFFFFFFFF
        out = torch.empty(p.shape[0], p.shape[1] * 8, dtype=torch.float64)
        for i, col in enumerate(order):
            out[:, col::8] = ((p >> (4 * i)) & 0xF).double()
        return out

    q, z = unpack(stored["qweight"]), unpack(stored["qzeros"]).repeat_interleave(g, 0)[:k]
    return ((q - z) * stored["scales"].double().repeat_interleave(g, 0)[:k]).T


def quantized_weight(fmt: str, block, n: int, k: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A random weight in `fmt`'s stored tensors, rows of very different magnitude (a scale applied to
    the wrong block or row shows)."""
    w = torch.randn(n, k, generator=gen, dtype=torch.float32) * k ** -0.5
    w[: min(n, 128)] *= 8.0
    return weight_format(fmt, block).quantize(w)
