"""Dynamic activation quantization: one scale per token per group of input features.

W8A8 schemes round each token's activations to 8 bits before the product, with a float32 scale per
group of `group` features (128 for the block formats, the whole row for per-channel int8). Kernels
multiply the 8-bit values and apply both scales; the reference multiplies `fake_quantize_*`'s
output (the 8-bit values times their scale, in float32), which is the same arithmetic up to the
summation order.
"""
from __future__ import annotations

import torch


def _qmax(dtype: torch.dtype) -> float:
    return float(torch.iinfo(dtype).max if not dtype.is_floating_point else torch.finfo(dtype).max)


def quantize_per_token_group(
    x: torch.Tensor, group: int, dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x_q [M, ceil(K/group) * group] in `dtype` (an 8-bit float or int8), zero-padded;
    scale [M, ceil(K/group)] float32) with x[m, k] ~= x_q[m, k] * scale[m, k // group].
    scale = amax(group) / the type's max (amax floored at 1e-10: an all-zero group gives zeros);
    int8 rounds to nearest and never uses -128."""
    m, k = x.shape
    groups = -(-k // group)
    xf = x.float()
    if groups * group != k:
        xf = torch.nn.functional.pad(xf, (0, groups * group - k))
    xg = xf.view(m, groups, group)
    qmax = _qmax(dtype)
    scale = xg.abs().amax(dim=-1).clamp(min=1e-10) / qmax
    v = xg / scale[:, :, None]
    if not dtype.is_floating_point:
        v = v.round()
    q = v.clamp(-qmax, qmax).to(dtype)
    return q.view(m, groups * group), scale


def fake_quantize_per_token_group(x: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """x [M, K] -> float32 [M, K]: each value as `quantize_per_token_group` rounds it (q * scale)."""
    m, k = x.shape
    q, scale = quantize_per_token_group(x, group, dtype)
    return (q.float().view(m, scale.shape[1], group) * scale[:, :, None]).view(m, q.shape[1])[:, :k]
