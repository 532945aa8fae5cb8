"""Linear layers through the device's LinearMethod, tensor-parallel by column or row."""
from __future__ import annotations

import torch
from torch import nn

from dsserve.core.backends import LinearSpec

from .checkpoint import CheckpointModule, LoadTarget
from .context import LayerContext


class Linear(CheckpointModule):
    """y = x W^T (+ b) through the device's LinearMethod for the checkpoint's quantization.

    parallel="column" shards the output features over tensor-parallel ranks, "row" shards the input
    features and all-reduces the partial sums. `parts` merges several checkpoint tensors stacked
    along the output dim (e.g. gate_proj + up_proj -> gate_up_proj): {checkpoint name: out size}.
    Every tensor of the method (weight, bias, block scales) is split in the units its
    `LinearMethod.param_block` gives, so a part or shard boundary must fall on a block boundary.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        ctx: LayerContext,
        bias: bool = False,
        parallel: str = "none",
        parts: dict[str, int] | None = None,
        quant: str | None = None,
    ):
        super().__init__()
        self.ctx, self.parallel = ctx, parallel
        if parallel == "column":
            out_features = ctx.shard(out_features, "output features")
        elif parallel == "row":
            in_features = ctx.shard(in_features, "input features")
        self.parts = {k: (v // ctx.tp_size if parallel == "column" else v) for k, v in (parts or {}).items()}
        quant = quant or ctx.quant
        spec = LinearSpec(in_features, out_features, bias, ctx.dtype, quant,
                          ctx.weight_block_size if quant != "none" else None)
        self.method = ctx.registry.linear_method(ctx.device, spec)
        self.params = nn.ParameterDict()
        with ctx.torch_device:  # methods allocate on the default device
            weights = self.method.create_weights()
        for name, t in weights.items():
            self.params[name] = nn.Parameter(t, requires_grad=False)
        self.out_features = out_features
        self._check_boundaries()

    def _check_boundaries(self) -> None:
        """Refuse a merged part or a tensor-parallel shard that would split a block of some tensor
        (a block scale cannot be cut in two): raise ValueError saying which and why."""
        spec, tp = self.method.spec, self.ctx.tp_size
        for pname in self.params:
            rows, cols = self.method.param_block(pname)
            what = f"{pname} (one element per {rows}x{cols} weight block, {spec.quant})"
            sizes = list(self.parts.items())
            if tp > 1 and self.parallel == "column":
                for part, size in sizes or [("output features", spec.out_features)]:
                    if size % rows:
                        raise ValueError(
                            f"{part}: the {size} rows of one tensor-parallel shard (of {tp}) split a block of "
                            f"{what}; the shard must be a multiple of {rows} rows")
            if tp > 1 and self.parallel == "row" and spec.in_features % cols and self.params[pname].dim() == 2:
                raise ValueError(
                    f"input features: the {spec.in_features} columns of one tensor-parallel shard (of {tp}) "
                    f"split a block of {what}; the shard must be a multiple of {cols} columns")
            for part, size in sizes[:-1]:
                if size % rows:
                    raise ValueError(
                        f"merged linear parts {' + '.join(f'{k} ({v})' for k, v in sizes)}: part {part} "
                        f"ends inside a block of {what}; every part but the last must be a multiple of {rows} rows")

    def load_targets(self) -> dict[str, LoadTarget]:
        targets = {}
        for pname, p in self.params.items():
            # dim 0 follows the output features, dim 1 (2-D tensors) the input features
            dim = {"column": 0, "row": 1 if p.dim() == 2 else None}.get(self.parallel)
            if not self.parts:
                targets[pname] = LoadTarget(p, (), dim)
                continue
            rows = self.method.param_block(pname)[0]
            start = 0
            for part, size in self.parts.items():
                # in units of this tensor's elements: whole blocks, the last part's may be partial
                index = (slice(start // rows, -(-(start + size) // rows)),)
                targets[f"{part}.{pname}"] = LoadTarget(p, index, dim)
                start += size
        return targets

    def post_load(self) -> None:
        new = self.method.process_weights_after_loading(dict(self.params))
        self.params = nn.ParameterDict({k: nn.Parameter(v, requires_grad=False) for k, v in new.items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply(self.params, x)
        if self.parallel == "row" and self.ctx.tp_size > 1:
            y = self.ctx.comm.all_reduce(y)
        return y
