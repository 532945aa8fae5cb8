"""Router and routed experts through the device's MoEBackend."""
from __future__ import annotations

import torch
from torch import nn

from dsserve.core.backends import MoESpec
from dsserve.core.quant import weight_format

from .checkpoint import ANOTHER_RANK, CheckpointModule, LoadTarget, prefixed
from .context import LayerContext
from .linear import Linear

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class RoutedExperts(CheckpointModule):
    """Router + routed experts through the device's MoEBackend.

    Expert weights are stacked for grouped kernels: w13 [E, 2I, D] (gate rows then up rows) and
    w2 [E, D, I]; tensor parallelism shards I, or, with expert parallelism, gives each rank whole
    experts (E / tp of them, the others' tensors skipped at load): a rank computes only the tokens
    that picked one of its experts, and the all-reduce sums the ranks' shares. The router runs in
    float32 as in every reference, over all experts, on every rank.

    Quantized experts stay as the checkpoint stores them (FP8 at 1 byte per weight, AWQ at half a
    byte): w13 and w2 are then dicts of the format's tensors, each stacked over experts, and the
    backend computes them as stored (`MoEBackend.compute_experts`). When the format is made at load
    (`QuantConfig.online`) the float experts are loaded and quantized one expert at a time.
    """

    def __init__(self, spec: MoESpec, ctx: LayerContext, correction_bias: bool):
        super().__init__()
        E = spec.num_experts
        if ctx.expert_parallel:
            if E % ctx.tp_size:
                raise ValueError(f"n_routed_experts ({E}) is not divisible by the expert-parallel size ({ctx.tp_size})")
            inter, self.first_expert, self.local_experts = spec.intermediate_size, ctx.tp_rank * E // ctx.tp_size, \
                E // ctx.tp_size
        else:
            inter, self.first_expert, self.local_experts = ctx.shard(spec.intermediate_size,
                                                                     "moe_intermediate_size"), 0, E
        fmt = ctx.quant.format
        self.spec = spec = MoESpec(**{**spec.__dict__, "intermediate_size": inter, "quant": fmt,
                                      "weight_block_size": ctx.quant.block if fmt != "none" else None,
                                      "batch_invariant": ctx.batch_invariant})
        self.ctx = ctx
        self.backend = ctx.moe_backend(spec)
        self.format = weight_format(fmt, ctx.quant.block) if fmt != "none" else None
        self.online = ctx.quant.online and self.format is not None
        dev, D, L = ctx.torch_device, spec.hidden_size, self.local_experts
        # the router in float32, as DeepSeek's Hugging Face code computes it: expert choices are sensitive
        self.gate = Linear(D, E, ctx, quant="none", dtype=torch.float32)
        self.correction_bias = (
            nn.Parameter(torch.empty(E, dtype=torch.float32, device=dev), requires_grad=False)
            if correction_bias else None
        )
        if self.format is None or self.online:
            self.w13 = nn.Parameter(torch.empty(L, 2 * inter, D, dtype=ctx.dtype, device=dev), requires_grad=False)
            self.w2 = nn.Parameter(torch.empty(L, D, inter, dtype=ctx.dtype, device=dev), requires_grad=False)
        else:
            layouts = self.format.tensors()
            self.w13 = nn.ParameterDict({name: nn.Parameter(torch.empty(
                L, *lay.shape(2 * inter, D), dtype=lay.dtype, device=dev), requires_grad=False)
                for name, lay in layouts.items()})
            self.w2 = nn.ParameterDict({name: nn.Parameter(torch.empty(
                L, *lay.shape(D, inter), dtype=lay.dtype, device=dev), requires_grad=False)
                for name, lay in layouts.items()})
        if self.format is not None and not self.online:
            self._check_blocks(inter)

    def _check_blocks(self, inter: int) -> None:
        """The gate/up merge and a tensor-parallel shard of I must not split an element of any tensor."""
        for name, lay in self.format.tensors().items():
            rows, cols = lay.block
            if inter % rows or (self.ctx.tp_size > 1 and not self.ctx.expert_parallel and cols and inter % cols):
                raise ValueError(
                    f"moe_intermediate_size: the {inter} rows/columns of one expert (on each of {self.ctx.tp_size} "
                    f"tensor-parallel ranks) split a {rows}x{cols} block of the experts' {name} ({self.format.name})")

    def _targets(self, e: int) -> dict[str, LoadTarget]:
        """Expert e's checkpoint tensors: gate_proj and up_proj into w13's rows, down_proj into w2."""
        inter = self.spec.intermediate_size
        whole = self.ctx.expert_parallel  # a rank's experts are whole; else each holds a slice of I

        def dim(d):
            return None if whole else d

        if not isinstance(self.w13, nn.ParameterDict):  # float experts
            return {"gate_proj.weight": LoadTarget(self.w13, (e, slice(0, inter)), dim(0)),
                    "up_proj.weight": LoadTarget(self.w13, (e, slice(inter, 2 * inter)), dim(0)),
                    "down_proj.weight": LoadTarget(self.w2, (e,), dim(1))}
        targets = {}
        for name, lay in self.format.tensors().items():
            (rows, cols), (out_dim, in_dim) = lay.block, lay.dims
            half = inter // rows
            for proj, lo in (("gate_proj", 0), ("up_proj", half)):
                index = (e,) + (slice(None),) * out_dim + (slice(lo, lo + half),)
                targets[f"{proj}.{name}"] = LoadTarget(self.w13[name], index, dim(out_dim))
            targets[f"down_proj.{name}"] = LoadTarget(self.w2[name], (e,), dim(in_dim) if cols else None)
        return targets

    def load_targets(self) -> dict[str, LoadTarget]:
        targets = prefixed("gate", self.gate.load_targets())
        if self.correction_bias is not None:
            targets["gate.e_score_correction_bias"] = LoadTarget(self.correction_bias)
        names = list(self._targets(0))
        for e in range(self.spec.num_experts):
            local = e - self.first_expert
            if 0 <= local < self.local_experts:
                targets.update({f"experts.{e}.{k}": v for k, v in self._targets(local).items()})
            else:
                targets.update({f"experts.{e}.{k}": ANOTHER_RANK for k in names})
        return targets

    def post_load(self) -> None:
        super().post_load()
        w13, w2 = self._weights(self.w13), self._weights(self.w2)
        if self.online:
            w13, w2 = self._quantized(w13), self._quantized(w2)
        w13, w2 = self.backend.process_weights_after_loading(w13, w2)
        del self.w13, self.w2  # a Parameter may become a ParameterDict
        self.w13, self.w2 = self._parameter(w13), self._parameter(w2)
        self._experts = (self._weights(self.w13), self._weights(self.w2))  # as compute_experts takes them

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
        logits = self.gate(x.float())
        weights, ids = self.backend.select_experts(logits, self.correction_bias)
        if self.ctx.expert_parallel:
            out = self._local_share(x, weights, ids)
        else:
            out = self.backend.compute_experts(x, weights, ids, *self._experts)
        if self.ctx.tp_size > 1:
            out = self.ctx.comm.all_reduce(out)
        return out

    def _local_share(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """This rank's experts' part of the output: only tokens that picked one of them are computed;
        a token's picks of other ranks' experts become a weight-0 pick of one of its own, so no
        expert is read that no token chose."""
        local = ids - self.first_expert
        mine = (local >= 0) & (local < self.local_experts)
        rows = mine.any(dim=1).nonzero().squeeze(1)
        out = torch.zeros_like(x)
        if rows.numel() == 0:
            return out
        local, mine, weights = local[rows], mine[rows], weights[rows]
        own = local.gather(1, mine.int().argmax(dim=1, keepdim=True))
        local = torch.where(mine, local, own)
        weights = torch.where(mine, weights, torch.zeros_like(weights))
        out[rows] = self.backend.compute_experts(x[rows], weights, local, *self._experts)
        return out
