"""Router and routed experts through the device's MoEBackend."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsserve.core.backends import LinearSpec, MoESpec

from .checkpoint import CheckpointModule, LoadTarget
from .context import LayerContext


class RoutedExperts(CheckpointModule):
    """Router + routed experts through the device's MoEBackend.

    Expert weights are stacked for grouped kernels: w13 [E, 2I, D] (gate rows then up rows) and
    w2 [E, D, I]; tensor parallelism shards I. The router runs in float32 as in every reference.

    `spec.quant` is how the checkpoint stores the experts. "fp8_block" (DeepSeek-V3/R1) is served by
    dequantising at load: w13/w2 are in the compute dtype, the loader copies each expert's e4m3
    weight into them (exact: every e4m3 value is a bfloat16/float16 value) and its `weight_scale_inv`
    into a float32 side tensor, and `post_load` multiplies every block by its scale (rounded once to
    the compute dtype) and drops the scales. The MoE backend is then asked for quant "none", so every
    device's plain kernels serve it, at twice the memory of the fp8 experts in bfloat16.
    """

    #: checkpoint formats of the experts that are dequantised at load (see above)
    DEQUANTIZED_AT_LOAD = ("fp8_block",)

    def __init__(self, spec: MoESpec, ctx: LayerContext, correction_bias: bool):
        super().__init__()
        inter = ctx.shard(spec.intermediate_size, "moe_intermediate_size")
        self.checkpoint_quant = spec.quant
        served = "none" if spec.quant in self.DEQUANTIZED_AT_LOAD else spec.quant
        self.spec = spec = MoESpec(**{**spec.__dict__, "intermediate_size": inter, "quant": served})
        self.ctx = ctx
        self.backend = ctx.moe_backend(spec)
        dev, E, D = ctx.torch_device, spec.num_experts, spec.hidden_size
        self.gate_weight = nn.Parameter(torch.empty(E, D, dtype=torch.float32, device=dev), requires_grad=False)
        self.correction_bias = (
            nn.Parameter(torch.empty(E, dtype=torch.float32, device=dev), requires_grad=False)
            if correction_bias else None
        )
        self.w13 = nn.Parameter(torch.empty(E, 2 * inter, D, dtype=ctx.dtype, device=dev), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(E, D, inter, dtype=ctx.dtype, device=dev), requires_grad=False)
        self.block: tuple[int, int] | None = None
        self.scales: dict[str, torch.Tensor] = {}  # fp8_block only, until post_load
        self.fp8_bytes = 0  # what the experts took as stored (8-bit weights + scales), once dequantised
        if self.checkpoint_quant == "fp8_block":
            self.block = bn, bk = tuple(ctx.weight_block_size or (128, 128))
            if ctx.tp_size > 1 and (inter % bn or inter % bk):
                raise ValueError(
                    f"moe_intermediate_size: the {inter} rows/columns of one tensor-parallel shard (of "
                    f"{ctx.tp_size}) split a {bn}x{bk} block of the experts' weight_scale_inv")

            def scale(rows: int, cols: int) -> torch.Tensor:
                return torch.empty(E, -(-rows // bn), -(-cols // bk), dtype=torch.float32, device=dev)

            self.scales = {"gate_proj": scale(inter, D), "up_proj": scale(inter, D), "down_proj": scale(D, inter)}

    def load_targets(self) -> dict[str, LoadTarget]:
        inter = self.spec.intermediate_size
        targets = {"gate.weight": LoadTarget(self.gate_weight)}
        if self.correction_bias is not None:
            targets["gate.e_score_correction_bias"] = LoadTarget(self.correction_bias)
        for e in range(self.spec.num_experts):
            targets[f"experts.{e}.gate_proj.weight"] = LoadTarget(self.w13, (e, slice(0, inter)), 0)
            targets[f"experts.{e}.up_proj.weight"] = LoadTarget(self.w13, (e, slice(inter, 2 * inter)), 0)
            targets[f"experts.{e}.down_proj.weight"] = LoadTarget(self.w2, (e,), 1)
            for name, scale in self.scales.items():
                targets[f"experts.{e}.{name}.weight_scale_inv"] = LoadTarget(scale, (e,), 1 if name == "down_proj" else 0)
        return targets

    def post_load(self) -> None:
        super().post_load()
        if self.scales:
            self._dequantize_experts()
        w13, w2 = self.backend.process_weights_after_loading(self.w13.data, self.w2.data)
        self.w13, self.w2 = nn.Parameter(w13, requires_grad=False), nn.Parameter(w2, requires_grad=False)

    def _dequantize_experts(self) -> None:
        inter, s = self.spec.intermediate_size, self.scales
        self.fp8_bytes = self.w13.numel() + self.w2.numel() + 4 * sum(t.numel() for t in s.values())
        for e in range(self.spec.num_experts):  # one expert at a time: float32 temporaries stay small
            for w, scale in ((self.w13[e, :inter], s["gate_proj"][e]), (self.w13[e, inter:], s["up_proj"][e]),
                             (self.w2[e], s["down_proj"][e])):
                method = self._dequantizer(w.shape)
                # w holds the e4m3 values in the compute dtype (exact); the method takes them as stored
                params = method.process_weights_after_loading(
                    {"weight": w.to(torch.float8_e4m3fn), "weight_scale_inv": scale})
                w.copy_(method.dequantized_weight(params))
        self.scales = {}

    def _dequantizer(self, shape: torch.Size):
        """The device's LinearMethod for the experts' checkpoint format: it knows how its blocks
        scale (the model graph does not redo that arithmetic)."""
        spec = LinearSpec(shape[1], shape[0], False, self.ctx.dtype, self.checkpoint_quant, self.block)
        return self.ctx.registry.linear_method(self.ctx.device, spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.float(), self.gate_weight)
        weights, ids = self.backend.select_experts(logits, self.correction_bias)
        out = self.backend.compute_experts(x, weights, ids, self.w13, self.w2)
        if self.ctx.tp_size > 1:
            out = self.ctx.comm.all_reduce(out)
        return out
