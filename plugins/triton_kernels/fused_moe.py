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
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from dsserve.core.backends import MoEBackend, MoESpec
from dsserve.core.reference import select_experts

from .strides import last_dim_contiguous

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CHUNK_PAIRS = 64 * 1024


@triton.jit
def _moe_gemm_w13_silu(
    X, W13, Act, SortedPairs, BlockExpert, NumPadded,
    num_pairs, hidden, inter,
    stride_xt, stride_we, stride_wn, stride_wk, stride_at,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
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

    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < hidden
        x = tl.load(X + token[:, None] * stride_xt + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        w_gate = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None] * stride_wk, mask=w_mask, other=0.0)
        w_up = tl.load(w_base + (cols[None, :] + inter) * stride_wn + ks[:, None] * stride_wk, mask=w_mask, other=0.0)
        x = x.to(w_gate.dtype)
        acc_gate += tl.dot(x, w_gate, input_precision=PRECISION)
        acc_up += tl.dot(x, w_up, input_precision=PRECISION)
    act = acc_gate * tl.sigmoid(acc_gate) * acc_up
    tl.store(Act + pair.to(tl.int64)[:, None] * stride_at + cols[None, :], act.to(Act.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _moe_gemm_w2(
    Act, W2, Out, SortedPairs, BlockExpert, NumPadded, PairWeights,
    num_pairs, hidden, inter,
    stride_at, stride_we, stride_wn, stride_wk, stride_ot,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
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

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < inter
        a = tl.load(Act + pair64[:, None] * stride_at + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
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


def _config(pairs: int, on_gpu: bool) -> dict:
    if not on_gpu:  # the interpreter: few, large programs
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}
    if pairs <= 64:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """sum_j topk_weights[t, j] * w2[e] @ (silu(gate_e x) * (up_e x)), e = topk_ids[t, j].

    hidden [T, H]; w13 [E, 2I, H]; w2 [E, H, I]; topk_weights [T, k] float; topk_ids [T, k].
    Returns (or fills `out`, any row stride) [T, H] in hidden's dtype.
    """
    tokens, hidden_size = hidden.shape
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    k = topk_ids.shape[1]
    if out is None:
        out = hidden.new_empty(tokens, hidden_size)
    if tokens == 0:
        return out
    hidden, w13, w2 = last_dim_contiguous(hidden), last_dim_contiguous(w13), last_dim_contiguous(w2)
    precision = "ieee" if w13.dtype == torch.float32 else None
    step = max(1, CHUNK_PAIRS // k)
    for t0 in range(0, tokens, step):
        t1 = min(tokens, t0 + step)
        ids = topk_ids[t0:t1]
        pairs = ids.numel()
        cfg = dict(config or _config(pairs, hidden.is_cuda))
        bm, bn, bk = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
        sorted_pairs, block_expert, num_padded = moe_align(ids, num_experts, bm)
        max_blocks = block_expert.shape[0]
        act = hidden.new_empty(pairs, inter, dtype=w13.dtype)
        _moe_gemm_w13_silu[(max_blocks, triton.cdiv(inter, bn))](
            hidden[t0:t1], w13, act, sorted_pairs, block_expert, num_padded,
            pairs, hidden_size, inter,
            hidden.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), act.stride(0),
            TOP_K=k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION=precision, **cfg,
        )
        per_pair = hidden.new_empty(pairs, hidden_size)
        weights = topk_weights[t0:t1].reshape(-1).to(torch.float32).contiguous()
        _moe_gemm_w2[(max_blocks, triton.cdiv(hidden_size, bn))](
            act, w2, per_pair, sorted_pairs, block_expert, num_padded, weights,
            pairs, hidden_size, inter,
            act.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), per_pair.stride(0),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION=precision, **cfg,
        )
        out[t0:t1] = per_pair.view(t1 - t0, k, hidden_size).sum(dim=1, dtype=torch.float32).to(out.dtype)
    return out


class TritonMoE(MoEBackend):
    """Routing by the core's reference `select_experts` (torch ops: it must pick exactly the
    reference's experts, and it is a handful of small ops per layer); experts by `fused_moe`."""

    @staticmethod
    def unsupported(spec: MoESpec) -> str | None:
        if spec.quant != "none":
            return f"quantized experts ({spec.quant})"
        if spec.dtype not in _DTYPES:
            return f"dtype {spec.dtype} (supported: float16, bfloat16, float32)"
        return None

    @classmethod
    def supports(cls, spec: MoESpec) -> bool:
        return cls.unsupported(spec) is None

    def select_experts(self, router_logits, correction_bias):
        return select_experts(router_logits, correction_bias, self.spec)

    def compute_experts(self, hidden, topk_weights, topk_ids, w13, w2):
        return fused_moe(hidden, w13, w2, topk_weights, topk_ids)
