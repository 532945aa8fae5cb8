"""Weights laid out for the C++ block GEMMs (csrc/block_gemm.h, csrc/int8_gemm.h), once, at load.

W [..., N, K] becomes [..., N / 16, K * 16]: blocks of 16 output rows whose K x 16 weights one
vector load after another feeds to 16 accumulators. bfloat16 keeps pairs of K together (the
operand layout of vdpbf16ps); float32 is K-major within a block; int8 keeps groups of 4 k together
(vpdpbusd's layout), K zero-padded to a multiple of 4.
"""
from __future__ import annotations

import torch

BLOCK_N = 16


def packable(n: int, k: int, dtype: torch.dtype) -> str | None:
    """Why [n, k] cannot be packed for `dtype` (None: it can)."""
    if dtype not in (torch.bfloat16, torch.float32):
        return f"{dtype} is not served (bfloat16 and float32 are)"
    if n % BLOCK_N:
        return f"{n} output rows are not a multiple of {BLOCK_N}"
    if dtype == torch.bfloat16 and k % 2:
        return f"{k} input columns are odd (bfloat16 pairs them)"
    return None


def pack(w: torch.Tensor) -> torch.Tensor:
    """W [..., N, K] in bfloat16 or float32 -> the packed [..., N / 16, K * 16]."""
    *lead, n, k = w.shape
    reason = packable(n, k, w.dtype)
    if reason:
        raise ValueError(f"cannot pack a [{n}, {k}] weight: {reason}")
    blocks = w.reshape(*lead, n // BLOCK_N, BLOCK_N, k)
    if w.dtype == torch.bfloat16:
        # [.., nb, 16, K/2, 2] -> [.., nb, K/2, 16, 2]
        packed = blocks.reshape(*lead, n // BLOCK_N, BLOCK_N, k // 2, 2).transpose(-3, -2)
    else:
        packed = blocks.transpose(-2, -1)  # [.., nb, K, 16]
    return packed.contiguous().reshape(*lead, n // BLOCK_N, k * BLOCK_N)


def unpack(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of `pack`, for the experts' plain weights (tests; a format change)."""
    *lead, nb, _ = packed.shape
    if packed.dtype == torch.bfloat16:
        w = packed.reshape(*lead, nb, k // 2, BLOCK_N, 2).transpose(-3, -2)
    else:
        w = packed.reshape(*lead, nb, k, BLOCK_N).transpose(-2, -1)
    return w.reshape(*lead, nb * BLOCK_N, k)


def pack_int8(w: torch.Tensor) -> torch.Tensor:
    """W [..., N, K] int8 -> [..., N / 16, ceil(K / 4) * 64]: block[(k / 4) * 64 + j * 4 + k % 4] = W[n0 + j][k]."""
    *lead, n, k = w.shape
    if w.dtype != torch.int8 or n % BLOCK_N:
        raise ValueError(f"cannot pack a [{n}, {k}] {w.dtype} weight as int8 blocks of {BLOCK_N} rows")
    k4 = -(-k // 4)
    padded = torch.nn.functional.pad(w, (0, k4 * 4 - k)) if k4 * 4 != k else w
    blocks = padded.reshape(*lead, n // BLOCK_N, BLOCK_N, k4, 4).transpose(-3, -2)  # [.., nb, K4, 16, 4]
    return blocks.contiguous().reshape(*lead, n // BLOCK_N, k4 * 4 * BLOCK_N)


def unpack_int8(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of `pack_int8`."""
    *lead, nb, _ = packed.shape
    k4 = -(-k // 4)
    w = packed.reshape(*lead, nb, k4, BLOCK_N, 4).transpose(-3, -2)
    return w.reshape(*lead, nb * BLOCK_N, k4 * 4)[..., :k]


def pack_fp8(w: torch.Tensor, vbmi: bool = False) -> torch.Tensor:
    """W [..., N, K] float8_e4m3fn -> uint8 [..., N / 16, K * 16] in the bfloat16 pair layout (csrc/fp8_gemm.h);
    `vbmi`: each 64 bytes reordered for the table-lookup variant (K a multiple of 4)."""
    *lead, n, k = w.shape
    if w.dtype != torch.float8_e4m3fn or n % BLOCK_N or k % (4 if vbmi else 2):
        raise ValueError(f"cannot pack a [{n}, {k}] {w.dtype} weight as e4m3 blocks of {BLOCK_N} rows")
    pairs = w.view(torch.uint8).reshape(*lead, n // BLOCK_N, BLOCK_N, k // 2, 2).transpose(-3, -2)
    packed = pairs.contiguous().reshape(*lead, n // BLOCK_N, k * BLOCK_N)
    if vbmi:  # chunk[L * 16 + h * 8 + j] = natural[h * 32 + L * 8 + j]: [2 h, 4 L, 8 j] -> [4 L, 2 h, 8 j]
        chunks = packed.reshape(*lead, n // BLOCK_N, k // 4, 2, 4, 8).transpose(-3, -2)
        packed = chunks.contiguous().reshape(*lead, n // BLOCK_N, k * BLOCK_N)
    return packed


def unpack_fp8(packed: torch.Tensor, k: int, vbmi: bool = False) -> torch.Tensor:
    """The inverse of `pack_fp8`."""
    *lead, nb, _ = packed.shape
    if vbmi:
        packed = packed.reshape(*lead, nb, k // 4, 4, 2, 8).transpose(-3, -2).reshape(*lead, nb, k * BLOCK_N)
    w = packed.reshape(*lead, nb, k // 2, BLOCK_N, 2).transpose(-3, -2)
    return w.reshape(*lead, nb * BLOCK_N, k).view(torch.float8_e4m3fn)
