"""FP8 on AMD Instinct MI300-series GPUs (gfx94x), whose 8-bit float is e4m3fnuz, not OCP e4m3fn.

The two formats share the bit layout but differ in exponent bias (8 for fnuz, 7 for fn), so a byte
read as fnuz is worth half of the same byte read as fn; fnuz has no negative zero, and its 0x80 is
NaN where fn's 0x80 is -0. AMD's documented conversion of an e4m3fn checkpoint therefore keeps the
bytes, replaces 0x80 by 0x00 (+0), and doubles the dequantisation scale. (e4m3fn's NaN bytes 0x7F /
0xFF would become +-240; checkpoints contain none.) Torch only here: nothing imports triton.
"""
from __future__ import annotations

import torch

from ..gpu import target_of


def e4m3fn_to_e4m3fnuz(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3fn weight, its float32 scales) -> (the same bytes as e4m3fnuz, scales * 2), so that
    weight_fnuz * scale_fnuz == weight * scale element for element."""
    if weight.dtype != torch.float8_e4m3fn:
        raise TypeError(f"expected a float8_e4m3fn weight, got {weight.dtype}")
    bits = weight.view(torch.int8).clone()
    bits[bits == -128] = 0  # fn's -0 would read as fnuz's NaN
    return bits.view(torch.float8_e4m3fnuz), scale * 2.0


def uses_fnuz(arch: str) -> bool:
    """Whether a gcnArchName (e.g. "gfx942:sramecc+:xnack-") computes in e4m3fnuz, by the claims table
    (MI300A/MI300X/MI325X; gfx950, MI350, uses OCP e4m3fn and is not a claimed target)."""
    target = target_of(arch)
    return target is not None and target.fp8_dtype == torch.float8_e4m3fnuz
