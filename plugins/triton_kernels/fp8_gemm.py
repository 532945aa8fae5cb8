"""FP8 block-scaled GEMM with Triton (DeepSeek-V3's checkpoint format).

y[m, n] = sum over input groups g of (sum_{k in g} xq[m, k] * wq[n, k]) * x_scale[m, g] * w_scale[n // bn, g]

Activations are quantized per token per `bk`-element group (torch ops, the same function as the
core's `ReferenceFp8BlockLinear`, so both see identical 8-bit inputs); each program owns a
BLOCK_M x BLOCK_N output tile and walks K one scale group at a time (BLOCK_K = bk), taking the
group's partial product in float32 from tl.dot and multiplying both scales in before accumulating.

`upcast` selects how the 8-bit operands reach tl.dot: natively (GPUs with 8-bit float MMA; the
claims table in ../gpu.py says which: sm_90, gfx942) or as their raw bytes widened to float16 by
integer ops (`e4m3_bytes_to_f16`), which is exact (every e4m3 value is a float16 value) and names no
8-bit float type in the kernel: Triton refuses fp8e4nv pointers below sm_89, so an upcast that
converted loaded e4m3 values would not compile on A100/A10 (checked by compiling for sm_80 in
tests/test_triton_aot.py). The interpreter runs both.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from dsserve.core.backends import LinearSpec
from dsserve.core.quant import quantize_per_token_group, weight_format
from dsserve.core.reference import QuantizedWeights
from dsserve.plugins.gpu import GpuTarget, device_target

_FP8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
# `e4m3_bytes_to_f16` yields value * 2^(e4m3 bias - float16 bias): 2^-8 for e4m3fn (bias 7), 2^-7 for
# e4m3fnuz (bias 8). A product of two such operands is undone by this factor (a power of two: exact).
UPCAST_SCALE = {torch.float8_e4m3fn: 2.0 ** 16, torch.float8_e4m3fnuz: 2.0 ** 14}


@triton.jit
def e4m3_bytes_to_f16(b):
    """e4m3 (fn or fnuz) bytes (uint8) -> float16 holding value * 2^-8 (fn) or 2^-7 (fnuz), exactly:
    the sign moves to bit 15 and the 4 exponent + 3 mantissa bits to float16's exponent and top
    mantissa bits, unchanged (an e4m3 subnormal lands on a float16 subnormal of the same scale)."""
    b = b.to(tl.int32)
    return (((b & 0x80) << 8) | ((b & 0x7F) << 7)).to(tl.int16).to(tl.float16, bitcast=True)


def fp8_operand(t: torch.Tensor, upcast: bool) -> torch.Tensor:
    """An 8-bit tensor as the kernels take it: as is, or its raw bytes for the in-kernel upcast."""
    return t.view(torch.uint8) if upcast else t


@triton.jit
def _fp8_block_gemm(
    A, AScale, B, BScale, C, Bias,
    M, N, K,
    stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
    SCALE_BN: tl.constexpr,  # output features per weight-scale row
    BLOCK_K: tl.constexpr,  # = the scale group along K
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    b_scale_row = (rn // SCALE_BN).to(tl.int64) * stride_bsn

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g in range(tl.cdiv(K, BLOCK_K)):
        ks = g * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(A + rm64[:, None] * stride_am + ks[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(B + rn64[None, :] * stride_bn + ks[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        a_s = tl.load(AScale + rm64 * stride_asm + g, mask=m_ok, other=0.0)
        b_s = tl.load(BScale + b_scale_row + g, mask=n_ok, other=0.0)
        if UPCAST:  # A and B point at the bytes (uint8)
            a = e4m3_bytes_to_f16(a)
            b = e4m3_bytes_to_f16(b)
        acc += tl.dot(a, b) * DOT_SCALE * a_s[:, None] * b_s[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(C + rm64[:, None] * stride_cm + rn[None, :], acc.to(C.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def gemm_config(m: int, bn: int, target: GpuTarget | None, upcast: bool) -> dict:
    """Output tile (rows by the number of tokens m, columns by the weight-scale block bn), warps and
    pipeline stages of the GEMM on `target` (None: the interpreter, which takes no warps or stages),
    8-bit operands widened in the kernel or not (`upcast`)."""
    cfg = {"BLOCK_M": 16 if m <= 16 else (32 if m <= 64 else 64),
           "BLOCK_N": min(128, max(16, triton.next_power_of_2(bn)))}
    if target is not None:
        # both operand tiles widened to float16 in registers: 4 warps spill at 64 rows on sm_80
        cfg.update(num_warps=8 if upcast and cfg["BLOCK_M"] == 64 else 4, num_stages=3)
    return cfg


def fp8_block_gemm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    *,
    block: tuple[int, int] = (128, 128),
    out_dtype: torch.dtype = torch.bfloat16,
    bias: torch.Tensor | None = None,
    upcast: bool = False,
    out: torch.Tensor | None = None,
    target: GpuTarget | None = None,
) -> torch.Tensor:
    """xq [M, >=K] 8-bit with x_scale [M, ceil(K/bk)] float32; weight [N, K] 8-bit with weight_scale
    [ceil(N/bn), ceil(K/bk)] float32. Returns (or fills `out`, any row stride) [M, N].
    target: the GPU target to configure the launch for (default: xq's device's, none on CPU)."""
    m = xq.shape[0]
    n, k = weight.shape
    bn, bk = block
    if bk & (bk - 1) or bk < 16:
        raise ValueError(f"the K scale block {bk} must be a power of two >= 16")
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return out
    for name, t in (("activations", xq), ("weight", weight), ("x_scale", x_scale), ("weight_scale", weight_scale),
                    ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension")
    if upcast and weight.dtype not in UPCAST_SCALE:
        raise ValueError(f"the float16 upcast reads e4m3 bytes, not {weight.dtype}")
    if xq.dtype != weight.dtype:
        raise ValueError(f"activations ({xq.dtype}) and weight ({weight.dtype}) must share their 8-bit format")
    cfg = gemm_config(m, bn, target or device_target(xq.device), upcast)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _fp8_block_gemm[grid](
        fp8_operand(xq, upcast), x_scale, fp8_operand(weight, upcast), weight_scale, out,
        bias if bias is not None else out,
        m, n, k,
        xq.stride(0), x_scale.stride(0), weight.stride(0), weight_scale.stride(0), out.stride(0),
        SCALE_BN=bn, BLOCK_K=bk, UPCAST=upcast, DOT_SCALE=UPCAST_SCALE[weight.dtype] if upcast else 1.0,
        HAS_BIAS=bias is not None, **cfg,
    )
    return out


def native_fp8_dot(device: torch.device) -> bool:
    """Whether tl.dot takes 8-bit float operands natively on this device, by the claims table (else
    they are upcast, which compiles on every GPU)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return True  # the interpreter computes either way; callers on CPU pick explicitly
    target = device_target(device)
    return target is not None and target.fp8_dot == "native"


class Fp8BlockLinear(QuantizedWeights):
    """Block-FP8 weights applied by the Triton kernel (weights as the checkpoint stores them; the
    tensors, their blocks and `dequantized_weight` come from the core's `QuantizedWeights`)."""

    #: the 8-bit format weights are kept in and activations quantized to.
    fp8_dtype: torch.dtype = torch.float8_e4m3fn
    #: force the float16 upcast inside the kernel (None: decide from the device).
    upcast: bool | None = None

    @staticmethod
    def unsupported(spec: LinearSpec) -> str | None:
        if spec.quant != "fp8_block":
            return f"quantization {spec.quant!r} is not fp8_block"
        if spec.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"activation dtype {spec.dtype}"
        bn, bk = weight_format(spec.quant, spec.weight_block_size).block
        if bk < 16 or bk & (bk - 1):
            return f"weight block {bn}x{bk}: the input block must be a power of two >= 16"
        return None

    @classmethod
    def supports(cls, spec: LinearSpec) -> bool:
        return cls.unsupported(spec) is None

    def apply(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        weight, scale = params["weight"], params["weight_scale_inv"]
        block = self.format.block
        n, k = weight.shape
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k)
        xq, xs = quantize_per_token_group(x2, block[1], weight.dtype)
        upcast = self.upcast if self.upcast is not None else not native_fp8_dot(x.device)
        y = fp8_block_gemm(xq, xs, weight, scale, block=block, out_dtype=x.dtype, bias=params.get("bias"),
                           upcast=upcast)
        return y.view(*lead, n)
