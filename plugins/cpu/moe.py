"""Routed experts on the CPU: one C++ call per layer for every expert of the batch (csrc/fused_moe.cpp)
on weights packed once at load; routing is the reference's `select_experts` (a few small ops)."""
from __future__ import annotations

import torch

from dsserve.core.backends import MoESpec
from dsserve.core.reference import ReferenceMoE

from . import native
from .packing import pack, packable


def unsupported(spec: MoESpec) -> str | None:
    """Why the fused kernel cannot serve `spec` (None: it can)."""
    if spec.quant != "none":
        return f"quantization {spec.quant!r}"
    for what, (n, k) in {"w13": (2 * spec.intermediate_size, spec.hidden_size),
                         "w2": (spec.hidden_size, spec.intermediate_size)}.items():
        reason = packable(n, k, spec.dtype)
        if reason:
            return f"{what}: {reason}"
    if spec.intermediate_size % 16:
        return f"intermediate_size {spec.intermediate_size} is not a multiple of 16 (gate and up blocks)"
    return None


class CpuFusedMoE(ReferenceMoE):
    """Unquantized bfloat16/float32 experts through the fused C++ kernel; `isa` picks its variant."""

    def __init__(self, spec: MoESpec, kernels, isa: native.Isa):
        super().__init__(spec)
        self.kernels, self.isa = kernels, int(isa)

    def process_weights_after_loading(self, w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pack(w13), pack(w2)

    def compute_experts(self, hidden, topk_weights, topk_ids, w13, w2):
        return self.kernels.fused_moe(hidden.contiguous(), w13, w2, topk_weights, topk_ids, self.isa)
