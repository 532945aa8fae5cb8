"""Routed experts on the CPU: one C++ call per layer for the routing of every token (csrc/routing.cpp)
and one for every expert of the batch (csrc/fused_moe.cpp), on weights packed once at load."""
from __future__ import annotations

import torch

from dsserve.core.backends import MoESpec
from dsserve.core.reference import ReferenceMoE

from . import native
from .fp8_linear import activation_dtype, column_scales, uses_tiles
from .fp8_linear import unsupported as fp8_unsupported
from .int8_linear import FORMATS as INT8_FORMATS
from .int8_linear import activation_group, pack_w8a8, scale_name
from .packing import pack, pack_fp8, packable


def unsupported(spec: MoESpec) -> str | None:
    """Why the fused kernels cannot serve `spec` (None: they can)."""
    if spec.quant not in ("none", "fp8_block", *INT8_FORMATS):
        return f"quantization {spec.quant!r}"
    if spec.intermediate_size % 16:
        return f"intermediate_size {spec.intermediate_size} is not a multiple of 16 (gate and up blocks)"
    if spec.quant == "fp8_block":
        return fp8_unsupported(spec)
    for what, (n, k) in {"w13": (2 * spec.intermediate_size, spec.hidden_size),
                         "w2": (spec.hidden_size, spec.intermediate_size)}.items():
        reason = packable(n, k, spec.dtype)
        if reason:
            return f"{what}: {reason}"
    if spec.quant == "int8_block" and spec.weight_block_size and spec.weight_block_size[1] % 4:
        return f"weight block {spec.weight_block_size}: the input block must be a multiple of 4"
    return None


_SCORING = {"softmax": 0, "sigmoid": 1}
_TOPK_METHODS = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}


class CpuRoutedMoE(ReferenceMoE):
    """What the cpu MoE backends share: routing in one C++ call (csrc/routing.cpp) instead of the
    reference's ~15 small torch ops (70 -> a few us a layer at batch 1); the same arithmetic, so the
    same experts."""

    def __init__(self, spec: MoESpec, kernels):
        super().__init__(spec)
        self.kernels = kernels

    def select_experts(self, router_logits, correction_bias):
        s = self.spec
        if s.scoring_func not in _SCORING or s.topk_method not in _TOPK_METHODS:
            return super().select_experts(router_logits, correction_bias)  # it names what is unknown
        bias = correction_bias if correction_bias is not None else torch.empty(0)
        logits = router_logits if router_logits.dtype == torch.float32 else router_logits.float()
        weights, ids = self.kernels.route(logits, bias, _SCORING[s.scoring_func],
                                          _TOPK_METHODS[s.topk_method], s.n_group, s.topk_group, s.top_k,
                                          s.norm_topk_prob, s.routed_scaling_factor)
        return weights, ids


class CpuFusedMoE(CpuRoutedMoE):
    """Unquantized bfloat16/float32 experts through the fused C++ kernel; `isa` picks its variant."""

    def __init__(self, spec: MoESpec, kernels, isa: native.Isa):
        super().__init__(spec, kernels)
        self.isa = int(isa)

    def process_weights_after_loading(self, w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pack(w13), pack(w2)

    def compute_experts(self, hidden, topk_weights, topk_ids, w13, w2):
        return self.kernels.fused_moe(hidden.contiguous(), w13, w2, topk_weights, topk_ids, self.isa)


class CpuInt8MoE(CpuRoutedMoE):
    """int8 W8A8 experts (int8_channel, int8_block) through the fused C++ kernel: the experts stay
    int8, packed at load with their compensation and per-column scales; activations are quantized in
    the call as the reference rounds them."""

    def __init__(self, spec: MoESpec, kernels, isa: native.Int8Isa):
        super().__init__(spec, kernels)
        self.isa = int(isa)
        self.scale_name = scale_name(self.format)

    def _pack(self, w: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
        scale = w[self.scale_name].float()
        group = activation_group(self.spec.quant, self.format.block, k)
        packed, comp, column_scale = pack_w8a8(w["weight"], scale, self.format.block, group)
        return {"packed": packed, "comp": comp, "column_scale": column_scale, self.scale_name: scale}

    def process_weights_after_loading(self, w13, w2):
        return self._pack(w13, self.spec.hidden_size), self._pack(w2, self.spec.intermediate_size)

    def compute_experts(self, hidden, topk_weights, topk_ids, w13, w2):
        s = self.spec
        return self.kernels.fused_moe_int8(
            hidden.contiguous(), w13["packed"], w13["comp"], w13["column_scale"], w2["packed"], w2["comp"],
            w2["column_scale"], topk_weights, topk_ids, activation_group(s.quant, self.format.block, s.hidden_size),
            activation_group(s.quant, self.format.block, s.intermediate_size), self.isa)


class CpuFp8MoE(CpuRoutedMoE):
    """FP8 weight-only experts (fp8_block, DeepSeek-V3/R1) through the fused C++ kernel: the experts stay
    e4m3 (1 byte per weight), widened in registers; activations bfloat16 on AVX512-BF16 CPUs, float32
    elsewhere (see fp8_linear.py for why they are not rounded to 8 bits)."""

    def __init__(self, spec: MoESpec, kernels, isa: native.Isa, vbmi: bool = False):
        super().__init__(spec, kernels)
        self.act_dtype, self.amx = activation_dtype(isa), uses_tiles(spec, isa)
        self.vbmi = (vbmi and self.act_dtype == torch.bfloat16 and spec.hidden_size % 4 == 0
                     and spec.intermediate_size % 4 == 0 and self.format.block[1] % 4 == 0)

    def _pack(self, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n = w["weight"].shape[-2]
        return {"packed": pack_fp8(w["weight"], self.vbmi), "weight_scale_inv": w["weight_scale_inv"].float(),
                "column_scale": column_scales(w["weight_scale_inv"], self.format.block[0], n)}

    def process_weights_after_loading(self, w13, w2):
        return self._pack(w13), self._pack(w2)

    def compute_experts(self, hidden, topk_weights, topk_ids, w13, w2):
        out = self.kernels.fused_moe_fp8(hidden.to(self.act_dtype).contiguous(), w13["packed"], w13["column_scale"],
                                         w2["packed"], w2["column_scale"], topk_weights, topk_ids,
                                         self.format.block[1], self.vbmi, self.amx)
        return out.to(hidden.dtype)
