"""Rotary position embeddings: plain, YaRN (DeepSeek), llama3 and linear scaling."""
from __future__ import annotations

import math

import torch
from torch import nn

from .context import LayerContext


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_softmax_scale(rope_scaling: dict | None, head_dim: int) -> float:
    """DeepSeek's softmax scale: head_dim^-0.5 times mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = head_dim ** -0.5
    if rope_scaling and rope_scaling["rope_type"] in ("yarn", "deepseek_yarn"):
        mscale_all_dim = rope_scaling.get("mscale_all_dim") or 0
        if mscale_all_dim:
            m = _yarn_mscale(rope_scaling["factor"], mscale_all_dim)
            scale *= m * m
    return scale


def rope_inv_freq(dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for `dim` rotary dims and the factor cos/sin are multiplied by."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if scaling is None:
        return inv_freq.float(), 1.0
    kind = scaling["rope_type"]
    if kind in ("yarn", "deepseek_yarn"):
        factor = scaling["factor"]
        orig = scaling["original_max_position_embeddings"]
        beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        # ramp 0 keeps the original frequency (extrapolation), 1 takes the interpolated one.
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
        # cos/sin carry mscale(mscale)/mscale(mscale_all_dim), as in DeepSeek-V2/V3's Hugging Face
        # code and transformers; DeepSeek-V3's inference/model.py omits it, which is the same for every
        # published checkpoint (mscale == mscale_all_dim there).
        attn_factor = _yarn_mscale(factor, scaling.get("mscale") or 1) / _yarn_mscale(
            factor, scaling.get("mscale_all_dim") or 0
        )
        return inv_freq.float(), attn_factor
    if kind == "llama3":
        factor = scaling["factor"]
        low_ff, high_ff = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        orig = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((orig / wavelen - low_ff) / (high_ff - low_ff)).clamp(0, 1)
        scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        return scaled.float(), 1.0
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float(), 1.0
    raise ValueError(f"unsupported rope_scaling type '{kind}' (supported: yarn, llama3, linear)")


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over the last dim, through the device's layer ops, in place.

    interleaved=True rotates adjacent pairs (x0, x1), (x2, x3)... as DeepSeek's checkpoints are laid
    out (their reference uses complex numbers over pairs); False rotates the two halves (Llama/Qwen2).
    """

    def __init__(self, dim: int, max_positions: int, theta: float, scaling: dict | None,
                 interleaved: bool, ctx: LayerContext):
        super().__init__()
        inv_freq, attn_factor = rope_inv_freq(dim, theta, scaling)
        self.interleaved, self.ops = interleaved, ctx.ops
        self.max_positions = max_positions
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        self.register_buffer("cos", (freqs.cos() * attn_factor).to(ctx.torch_device), persistent=False)
        self.register_buffer("sin", (freqs.sin() * attn_factor).to(ctx.torch_device), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [T, heads, dim] rotated in place by the angles of positions [T]; returns x."""
        self.ops.rotary_(x, positions, self.cos, self.sin, self.interleaved)
        return x
