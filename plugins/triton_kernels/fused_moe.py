"""Fused MoE with Triton: routed experts as two grouped GEMMs over expert-sorted token rows.

1. `moe_align` (torch ops, no host synchronisation): the T*k (token, expert) pairs are sorted by
   expert, and each expert's run is padded to a multiple of the GEMM row block BLOCK_M with a
   sentinel pair id (T*k), so every row block belongs to exactly one expert. The buffers are sized
   for the worst case (every expert's run padded) and the kernels skip blocks past the real end.
2. `_moe_gemm_w13_silu`: per (row block, column block of the intermediate size) one program loads the
   block's expert's gate and up rows of w13, accumulates both products over the hidden size in
   float32, and writes silu(gate) * up for each pair (SiLU-and-mul fused into the GEMM epilogue).
3. `_moe_gemm_w2`: the same grouped GEMM against w2, the routing weight of each pair multiplied in.
4. The k rows of each token are summed in float32 (torch), giving [T, hidden].

Tokens are processed in chunks (`CHUNK_PAIRS` pairs at a time) so the per-pair buffers stay bounded
for long prefills.

FP8 experts (MoESpec.quant "fp8_block", DeepSeek-V3/R1's W8A8 format; the kernels' FP8 flag): the
weights stay 8-bit with one float32 scale per (bn x bk) block, and each GEMM's input is quantized per
token per bk features (torch, `quantize_per_token_group`, the function the reference rounds with):
the hidden states once per token, the intermediate silu(gate) * up (written in float32) once per
pair. The kernels walk K one scale group at a time (BLOCK_K = bk), as fp8_gemm.py does, multiplying
the group's float32 partial product by the token's and the column's scale before accumulating. The
weight scale is read per output column (its row n // bn), so bn needs no relation to BLOCK_N and a
scale row may hold rows of both gate and up. 8-bit operands reach tl.dot natively (where the claims
table of ../gpu.py says so: sm_90, gfx942) or, with `upcast`, as their raw bytes widened to float16 by
integer ops
(`e4m3_bytes_to_f16`): exact, and no 8-bit float type enters the kernel, which Triton refuses to
compile for e4m3fn below sm_89.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from dsserve.core.backends import MoEBackend, MoESpec
from dsserve.core.quant import quantize_per_token_group, weight_format
from dsserve.core.reference import select_experts
from dsserve.plugins.gpu import GpuTarget, device_target

from .fp8_gemm import UPCAST_SCALE, e4m3_bytes_to_f16, fp8_operand, native_fp8_dot
from .strides import last_dim_contiguous

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CHUNK_PAIRS = 64 * 1024


@triton.jit
def _moe_gemm_w13_silu(
    X, XScale, W13, WScale, Act, SortedPairs, BlockExpert, NumPadded,
    num_pairs, hidden, inter,
    stride_xt, stride_we, stride_wn, stride_wk, stride_at,
    stride_xst, stride_wse, stride_wsn,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    FP8: tl.constexpr, SCALE_BN: tl.constexpr, UPCAST: tl.constexpr, DOT_SCALE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(NumPadded):
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(SortedPairs + rows)
    row_ok = pair < num_pairs
    token = (pair // TOP_K).to(tl.int64)
    expert = tl.load(BlockExpert + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    w_base = W13 + expert * stride_we
    if FP8:  # the scale row of each gate and up column (one row may cover both when inter % bn != 0)
        s_gate = WScale + expert * stride_wse + (cols // SCALE_BN).to(tl.int64) * stride_wsn
        s_up = WScale + expert * stride_wse + ((cols + inter) // SCALE_BN).to(tl.int64) * stride_wsn

    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < hidden
        x = tl.load(X + token[:, None] * stride_xt + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        w_gate = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None] * stride_wk, mask=w_mask, other=0.0)
        w_up = tl.load(w_base + (cols[None, :] + inter) * stride_wn + ks[:, None] * stride_wk, mask=w_mask, other=0.0)
        if FP8:  # one scale group per step: both scales applied to its float32 partial product
            g = k0 // BLOCK_K
            x_s = tl.load(XScale + token * stride_xst + g, mask=row_ok, other=0.0) * DOT_SCALE
            gate_s = tl.load(s_gate + g, mask=col_ok, other=0.0)
            up_s = tl.load(s_up + g, mask=col_ok, other=0.0)
            if UPCAST:
                x = e4m3_bytes_to_f16(x)
                w_gate = e4m3_bytes_to_f16(w_gate)
                w_up = e4m3_bytes_to_f16(w_up)
            acc_gate += tl.dot(x, w_gate) * (x_s[:, None] * gate_s[None, :])
            acc_up += tl.dot(x, w_up) * (x_s[:, None] * up_s[None, :])
        else:
            x = x.to(w_gate.dtype)
            acc_gate += tl.dot(x, w_gate, input_precision=PRECISION)
            acc_up += tl.dot(x, w_up, input_precision=PRECISION)
    act = acc_gate * tl.sigmoid(acc_gate) * acc_up
    tl.store(Act + pair.to(tl.int64)[:, None] * stride_at + cols[None, :], act.to(Act.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _moe_gemm_w2(
    Act, ActScale, W2, WScale, Out, SortedPairs, BlockExpert, NumPadded, PairWeights,
    num_pairs, hidden, inter,
    stride_at, stride_we, stride_wn, stride_wk, stride_ot,
    stride_ast, stride_wse, stride_wsn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    FP8: tl.constexpr, SCALE_BN: tl.constexpr, UPCAST: tl.constexpr, DOT_SCALE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(NumPadded):
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(SortedPairs + rows)
    row_ok = pair < num_pairs
    pair64 = pair.to(tl.int64)
    expert = tl.load(BlockExpert + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    w_base = W2 + expert * stride_we
    if FP8:
        s_col = WScale + expert * stride_wse + (cols // SCALE_BN).to(tl.int64) * stride_wsn

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < inter
        a = tl.load(Act + pair64[:, None] * stride_at + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if FP8:
            g = k0 // BLOCK_K
            a_s = tl.load(ActScale + pair64 * stride_ast + g, mask=row_ok, other=0.0) * DOT_SCALE
            w_s = tl.load(s_col + g, mask=col_ok, other=0.0)
            if UPCAST:
                a = e4m3_bytes_to_f16(a)
                w = e4m3_bytes_to_f16(w)
            acc += tl.dot(a, w) * (a_s[:, None] * w_s[None, :])
        else:
            acc += tl.dot(a.to(w.dtype), w, input_precision=PRECISION)
    weight = tl.load(PairWeights + pair64, mask=row_ok, other=0.0)
    acc = acc * weight[:, None]
    tl.store(Out + pair64[:, None] * stride_ot + cols[None, :], acc.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Sort the (token, expert) pairs by expert and pad each expert's run to a multiple of block_m.

    Returns (sorted_pairs [max_blocks * block_m] int32: pair ids t * k + j, padded with T*k;
    block_expert [max_blocks] int32: the expert of each row block; num_padded [1] int32: rows in
    use). max_blocks is the worst case, so nothing here waits for the device.
    """
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    pairs = flat.numel()
    max_blocks = triton.cdiv(pairs, block_m) + min(num_experts, pairs)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    blocks = (counts + block_m - 1) // block_m
    block_end = torch.cumsum(blocks, 0)
    first_row = (block_end - blocks) * block_m  # padded start row of each expert's run
    first_pair = torch.cumsum(counts, 0) - counts  # start of each expert's run when unpadded
    order = torch.sort(flat, stable=True).indices
    expert_of = flat[order]
    rank = torch.arange(pairs, device=device) - first_pair[expert_of]
    sorted_pairs = torch.full((max_blocks * block_m,), pairs, dtype=torch.int32, device=device)
    sorted_pairs[first_row[expert_of] + rank] = order.to(torch.int32)
    block_expert = torch.searchsorted(block_end, torch.arange(max_blocks, device=device), right=True)
    block_expert = block_expert.clamp_(max=num_experts - 1).to(torch.int32)
    num_padded = (block_end[-1:] * block_m).to(torch.int32)
    return sorted_pairs, block_expert, num_padded


def moe_config(pairs: int, target: GpuTarget | None, upcast: bool) -> dict:
    """Tiles, warps and stages of both GEMMs for `pairs` (token, expert) pairs on `target` (None: the
    interpreter), FP8 operands widened in the kernel or not (`upcast`). FP8 experts take BLOCK_K = their
    scale block instead."""
    if target is None:  # the interpreter: few, large programs
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}
    if pairs <= 64:
        cfg = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4}
    elif upcast:  # gate and up tiles widened to float16 in registers: 64x128 spills on sm_80
        # 256 threads: 8 warps of 32 or 4 wavefronts of 64 (8 of those would leave gfx90a half its VGPRs)
        cfg = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 256 // target.warp_size}
    else:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8}
    # AMD's pipeliner keeps num_stages - 1 tiles in LDS: two of these take 72-80 KiB, past the 64 KiB
    # of gfx90a/gfx942
    cfg["num_stages"] = 2 if target.backend == "hip" else 3
    return cfg


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor | dict[str, torch.Tensor],
    w2: torch.Tensor | dict[str, torch.Tensor],
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    block: tuple[int, int] = (128, 128),
    upcast: bool = False,
    target: GpuTarget | None = None,
) -> torch.Tensor:
    """sum_j topk_weights[t, j] * w2[e] @ (silu(gate_e x) * (up_e x)), e = topk_ids[t, j].

    hidden [T, H]; w13 [E, 2I, H]; w2 [E, H, I]; topk_weights [T, k] float; topk_ids [T, k].
    Returns (or fills `out`, any row stride) [T, H] in hidden's dtype.

    FP8 experts (W8A8 with `block` = (bn, bk) scales): w13 = {"weight": [E, 2I, H] e4m3fn or
    e4m3fnuz, "weight_scale_inv": [E, ceil(2I/bn), ceil(H/bk)] float32} and w2 likewise ([E, H, I],
    [E, ceil(H/bn), ceil(I/bk)]); both GEMMs' inputs are quantized per token per bk features to the
    weights' 8-bit type. `upcast`: widen the 8-bit operands to float16 inside the kernels (GPUs
    without an 8-bit float tl.dot) instead of multiplying them natively.
    target: the GPU target to configure the launches for (default: hidden's device's, none on CPU).
    """
    fp8 = isinstance(w13, dict)
    tokens, hidden_size = hidden.shape
    num_experts, two_inter, _ = (w13["weight"] if fp8 else w13).shape
    inter = two_inter // 2
    k = topk_ids.shape[1]
    if out is None:
        out = hidden.new_empty(tokens, hidden_size)
    if tokens == 0:
        return out
    hidden = last_dim_contiguous(hidden)
    if fp8:
        bn, bk = block
        if bk < 16 or bk & (bk - 1):
            raise ValueError(f"the K scale block {bk} must be a power of two >= 16")
        w13_s, w2_s = last_dim_contiguous(w13["weight_scale_inv"]), last_dim_contiguous(w2["weight_scale_inv"])
        w13, w2 = last_dim_contiguous(w13["weight"]), last_dim_contiguous(w2["weight"])
        fp8_dtype = w13.dtype
        if fp8_dtype not in UPCAST_SCALE or w2.dtype != fp8_dtype:
            raise TypeError(f"FP8 experts must be e4m3fn or e4m3fnuz, both alike (got {fp8_dtype}, {w2.dtype})")
        precision = None
        fp8_args = {"FP8": True, "SCALE_BN": bn, "UPCAST": upcast,
                    "DOT_SCALE": UPCAST_SCALE[fp8_dtype] if upcast else 1.0}
        scale_strides = (w13_s.stride(0), w13_s.stride(1)), (w2_s.stride(0), w2_s.stride(1))
    else:
        w13, w2 = last_dim_contiguous(w13), last_dim_contiguous(w2)
        w13_s, w2_s = w13, w2  # not read
        precision = "ieee" if w13.dtype == torch.float32 else None
        fp8_args = {"FP8": False, "SCALE_BN": 1, "UPCAST": False, "DOT_SCALE": 1.0}
        scale_strides = (0, 0), (0, 0)
    w13_arg, w2_arg = (fp8_operand(w13, upcast), fp8_operand(w2, upcast)) if fp8 else (w13, w2)
    target = target or device_target(hidden.device)
    step = max(1, CHUNK_PAIRS // k)
    for t0 in range(0, tokens, step):
        t1 = min(tokens, t0 + step)
        ids = topk_ids[t0:t1]
        pairs = ids.numel()
        cfg = dict(config or moe_config(pairs, target, fp8 and upcast))
        block_m, block_n, block_k = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
        if fp8:
            if config and block_k != bk:
                raise ValueError(f"FP8 experts take BLOCK_K = the scale block {bk}, not {block_k}")
            block_k = bk  # one scale group per step
        sorted_pairs, block_expert, num_padded = moe_align(ids, num_experts, block_m)
        max_blocks = block_expert.shape[0]

        x, x_s = hidden[t0:t1], w13_s  # x_s not read unless fp8
        if fp8:
            x, x_s = quantize_per_token_group(x, bk, fp8_dtype)
            x = fp8_operand(x, upcast)
        # FP8: the intermediate stays float32 until it is quantized, as the reference rounds it
        act = hidden.new_empty(pairs, inter, dtype=torch.float32 if fp8 else w13.dtype)
        _moe_gemm_w13_silu[(max_blocks, triton.cdiv(inter, block_n))](
            x, x_s, w13_arg, w13_s, act, sorted_pairs, block_expert, num_padded,
            pairs, hidden_size, inter,
            x.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), act.stride(0),
            x_s.stride(0), *scale_strides[0],
            TOP_K=k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision, **fp8_args, **cfg,
        )

        a, a_s = act, w2_s  # a_s not read unless fp8
        if fp8:
            a, a_s = quantize_per_token_group(act, bk, fp8_dtype)
            a = fp8_operand(a, upcast)
        per_pair = hidden.new_empty(pairs, hidden_size)
        weights = topk_weights[t0:t1].reshape(-1).to(torch.float32).contiguous()
        _moe_gemm_w2[(max_blocks, triton.cdiv(hidden_size, block_n))](
            a, a_s, w2_arg, w2_s, per_pair, sorted_pairs, block_expert, num_padded, weights,
            pairs, hidden_size, inter,
            a.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), per_pair.stride(0),
            a_s.stride(0), *scale_strides[1],
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision, **fp8_args, **cfg,
        )
        out[t0:t1] = per_pair.view(t1 - t0, k, hidden_size).sum(dim=1, dtype=torch.float32).to(out.dtype)
    return out


def _fp8_dtype_for(device: torch.device) -> torch.dtype:
    """The 8-bit float the experts compute in on `device`, by the claims table: e4m3fnuz on MI300-series
    GPUs (gfx94x, whose FP8 MFMA reads only fnuz; the rocm plugin's FP8 linears convert alike), else
    e4m3fn as stored."""
    target = device_target(device)
    return target.fp8_dtype if target is not None else torch.float8_e4m3fn


class TritonMoE(MoEBackend):
    """Routing by the core's reference `select_experts` (torch ops: it must pick exactly the
    reference's experts, and it is a handful of small ops per layer); experts by `fused_moe`, float
    or FP8 block-scaled ("fp8_block": weights kept 8-bit, activations quantized per token per bk)."""

    #: the 8-bit format FP8 experts compute in (None: from the weights' device at load, see
    #: `_fp8_dtype_for`); e4m3fnuz converts the e4m3fn checkpoint once (same bytes, scales x2).
    fp8_dtype: torch.dtype | None = None
    #: widen 8-bit operands to float16 in the kernels (None: where the device has no 8-bit tl.dot).
    upcast: bool | None = None

    @staticmethod
    def unsupported(spec: MoESpec) -> str | None:
        if spec.dtype not in _DTYPES:
            return f"dtype {spec.dtype} (supported: float16, bfloat16, float32)"
        if spec.quant == "none":
            return None
        if spec.quant != "fp8_block":
            return f"quantized experts ({spec.quant}; the kernels take fp8_block)"
        bn, bk = weight_format(spec.quant, spec.weight_block_size).block
        if bk < 16 or bk & (bk - 1):
            return f"fp8_block experts with {bn}x{bk} blocks: the input block must be a power of two >= 16"
        return None

    @classmethod
    def supports(cls, spec: MoESpec) -> bool:
        return cls.unsupported(spec) is None

    def select_experts(self, router_logits, correction_bias):
        return select_experts(router_logits, correction_bias, self.spec)

    def process_weights_after_loading(self, w13, w2):
        if self.spec.quant != "fp8_block" or w13["weight"].dtype != torch.float8_e4m3fn:
            return w13, w2
        if (self.fp8_dtype or _fp8_dtype_for(w13["weight"].device)) != torch.float8_e4m3fnuz:
            return w13, w2
        from dsserve.plugins.rocm.fp8 import e4m3fn_to_e4m3fnuz

        converted = []
        for w in (w13, w2):
            weight, scale = e4m3fn_to_e4m3fnuz(w["weight"], w["weight_scale_inv"])
            converted.append({**w, "weight": weight, "weight_scale_inv": scale})
        return tuple(converted)

    def compute_experts(self, hidden, topk_weights, topk_ids, w13, w2):
        if self.spec.quant == "none":
            return fused_moe(hidden, w13, w2, topk_weights, topk_ids)
        upcast = self.upcast if self.upcast is not None else not native_fp8_dot(hidden.device)
        block = weight_format(self.spec.quant, self.spec.weight_block_size).block
        return fused_moe(hidden, w13, w2, topk_weights, topk_ids, block=block, upcast=upcast)
