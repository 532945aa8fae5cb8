"""Router and routed experts through the device's MoEBackend."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsserve.core.backends import MoESpec
from dsserve.core.quant import weight_format

from .checkpoint import CheckpointModule, LoadTarget
from .context import LayerContext

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class RoutedExperts(CheckpointModule):
    """Router + routed experts through the device's MoEBackend.

    Expert weights are stacked for grouped kernels: w13 [E, 2I, D] (gate rows then up rows) and
    w2 [E, D, I]; tensor parallelism shards I. The router runs in float32 as in every reference.

    Quantized experts stay as the checkpoint stores them (FP8 at 1 byte per weight, AWQ at half a
    byte): w13 and w2 are then dicts of the format's tensors, each stacked over experts, and the
    backend computes them as stored (`MoEBackend.compute_experts`). When the format is made at load
    (`QuantConfig.online`) the float experts are loaded and quantized one expert at a time.
    """

    def __init__(self, spec: MoESpec, ctx: LayerContext, correction_bias: bool):
        super().__init__()
        inter = ctx.shard(spec.intermediate_size, "moe_intermediate_size")
        fmt = ctx.quant.format
        self.spec = spec = MoESpec(**{**spec.__dict__, "intermediate_size": inter, "quant": fmt,
                                      "weight_block_size": ctx.quant.block if fmt != "none" else None})
        self.ctx = ctx
        self.backend = ctx.moe_backend(spec)
        self.format = weight_format(fmt, ctx.quant.block) if fmt != "none" else None
        self.online = ctx.quant.online and self.format is not None
        dev, E, D = ctx.torch_device, spec.num_experts, spec.hidden_size
        self.gate_weight = nn.Parameter(torch.empty(E, D, dtype=torch.float32, device=dev), requires_grad=False)
        self.correction_bias = (
            nn.Parameter(torch.empty(E, dtype=torch.float32, device=dev), requires_grad=False)
            if correction_bias else None
        )
        if self.format is None or self.online:
            self.w13 = nn.Parameter(torch.empty(E, 2 * inter, D, dtype=ctx.dtype, device=dev), requires_grad=False)
            self.w2 = nn.Parameter(torch.empty(E, D, inter, dtype=ctx.dtype, device=dev), requires_grad=False)
        else:
            layouts = self.format.tensors()
            self.w13 = nn.ParameterDict({name: nn.Parameter(torch.empty(
                E, *lay.shape(2 * inter, D), dtype=lay.dtype, device=dev), requires_grad=False)
                for name, lay in layouts.items()})
            self.w2 = nn.ParameterDict({name: nn.Parameter(torch.empty(
                E, *lay.shape(D, inter), dtype=lay.dtype, device=dev), requires_grad=False)
                for name, lay in layouts.items()})
        if self.format is not None and not self.online:
            self._check_blocks(inter)

    def _check_blocks(self, inter: int) -> None:
        """The gate/up merge and a tensor-parallel shard of I must not split an element of any tensor."""
        for name, lay in self.format.tensors().items():
            rows, cols = lay.block
            if inter % rows or (self.ctx.tp_size > 1 and cols and inter % cols):
                raise ValueError(
                    f"moe_intermediate_size: the {inter} rows/columns of one expert (on each of {self.ctx.tp_size} "
                    f"tensor-parallel ranks) split a {rows}x{cols} block of the experts' {name} ({self.format.name})")

    def _targets(self, e: int) -> dict[str, LoadTarget]:
        """Expert e's checkpoint tensors: gate_proj and up_proj into w13's rows, down_proj into w2."""
        inter = self.spec.intermediate_size
        if not isinstance(self.w13, nn.ParameterDict):  # float experts
            return {"gate_proj.weight": LoadTarget(self.w13, (e, slice(0, inter)), 0),
                    "up_proj.weight": LoadTarget(self.w13, (e, slice(inter, 2 * inter)), 0),
                    "down_proj.weight": LoadTarget(self.w2, (e,), 1)}
        targets = {}
        for name, lay in self.format.tensors().items():
            (rows, cols), (out_dim, in_dim) = lay.block, lay.dims
            half = inter // rows
            for proj, lo in (("gate_proj", 0), ("up_proj", half)):
                index = (e,) + (slice(None),) * out_dim + (slice(lo, lo + half),)
                targets[f"{proj}.{name}"] = LoadTarget(self.w13[name], index, out_dim)
            targets[f"down_proj.{name}"] = LoadTarget(self.w2[name], (e,), in_dim if cols else None)
        return targets

    def load_targets(self) -> dict[str, LoadTarget]:
        targets = {"gate.weight": LoadTarget(self.gate_weight)}
        if self.correction_bias is not None:
            targets["gate.e_score_correction_bias"] = LoadTarget(self.correction_bias)
        for e in range(self.spec.num_experts):
            targets.update({f"experts.{e}.{k}": v for k, v in self._targets(e).items()})
        return targets

    def post_load(self) -> None:
        super().post_load()
        w13, w2 = self._weights(self.w13), self._weights(self.w2)
        if self.online:
            w13, w2 = self._quantized(w13), self._quantized(w2)
        w13, w2 = self.backend.process_weights_after_loading(w13, w2)
        del self.w13, self.w2  # a Parameter may become a ParameterDict
        self.w13, self.w2 = self._parameter(w13), self._parameter(w2)

    def _quantized(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Float experts [E, N, K] quantized one expert at a time, stacked per stored tensor."""
        per_expert = [self.format.quantize(w[e]) for e in range(w.shape[0])]
        return {name: torch.stack([q[name] for q in per_expert]) for name in per_expert[0]}

    @staticmethod
    def _weights(w):
        return dict(w) if isinstance(w, nn.ParameterDict) else w.data

    @staticmethod
    def _parameter(w):
        if isinstance(w, dict):
            return nn.ParameterDict({k: nn.Parameter(v, requires_grad=False) for k, v in w.items()})
        return nn.Parameter(w, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.float(), self.gate_weight)
        weights, ids = self.backend.select_experts(logits, self.correction_bias)
        out = self.backend.compute_experts(x, weights, ids, self._weights(self.w13), self._weights(self.w2))
        if self.ctx.tp_size > 1:
            out = self.ctx.comm.all_reduce(out)
        return out
