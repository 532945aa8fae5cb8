"""Linear layers through the device's LinearMethod, tensor-parallel by column or row."""
from __future__ import annotations

import torch
from torch import nn

from dsserve.core.backends import LinearSpec
from dsserve.core.quant import weight_format

from .checkpoint import CheckpointModule, LoadTarget
from .context import LayerContext


class Linear(CheckpointModule):
    """y = x W^T (+ b) through the device's LinearMethod for the checkpoint's quantization.

    parallel="column" shards the output features over tensor-parallel ranks, "row" shards the input
    features and all-reduces the partial sums. `parts` merges several checkpoint tensors stacked
    along the output dim (e.g. gate_proj + up_proj -> gate_up_proj): {checkpoint name: out size}.
    Every tensor of the method (weight, bias, block scales) is split in the units its
    `LinearMethod.param_block` gives, along the dims its `param_dims` gives, so a part or shard
    boundary must fall on a block boundary. `quant="none"` keeps a layer unquantized whatever the
    checkpoint's format (lm_head). When the checkpoint is float and the format is made at load
    (`QuantConfig.online`), the layer loads the float weight and quantizes it in `post_load`.
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
        part_shards: dict[str, tuple[int, int]] | None = None,
        dtype: torch.dtype | None = None,
    ):
        """`part_shards[part]` = (i, n): a column-parallel part this rank takes slice i of n of (not
        its own of tp_size): KV heads replicated when there are fewer of them than ranks. `dtype`: the
        layer's own compute dtype where it is not the model's (the MoE router's float32)."""
        super().__init__()
        self.ctx, self.parallel = ctx, parallel
        self.part_shards = part_shards or {}
        if parallel == "column" and parts:
            parts = {k: (v // self.part_shards[k][1] if k in self.part_shards else ctx.shard(v, k))
                     for k, v in parts.items()}
            out_features = sum(parts.values())
        elif parallel == "column":
            out_features = ctx.shard(out_features, "output features")
        elif parallel == "row":
            in_features = ctx.shard(in_features, "input features")
        self.parts = dict(parts or {})
        fmt = ctx.quant.format if quant is None else quant
        spec = LinearSpec(in_features, out_features, bias, dtype or ctx.dtype, fmt,
                          ctx.quant.block if fmt != "none" else None, batch_invariant=ctx.batch_invariant)
        self.method = ctx.registry.linear_method(ctx.device, spec)
        self.online = ctx.quant.online and fmt != "none"
        self.params = nn.ParameterDict()
        with ctx.torch_device:  # methods allocate on the default device
            weights = self._float_weights(spec) if self.online else self.method.create_weights()
        for name, t in weights.items():
            self.params[name] = nn.Parameter(t, requires_grad=False)
        self.out_features = out_features
        if not self.online:  # quantized at load, the merged or sharded weight gets its own block grid
            self._check_boundaries()

    @staticmethod
    def _float_weights(spec: LinearSpec) -> dict[str, torch.Tensor]:
        """The tensors of a float checkpoint, loaded before the layer quantizes them."""
        params = {"weight": torch.empty(spec.out_features, spec.in_features, dtype=spec.dtype)}
        if spec.bias:
            params["bias"] = torch.empty(spec.out_features, dtype=spec.dtype)
        return params

    def _layout(self, pname: str) -> tuple[tuple[int, int], tuple[int, int]]:
        """(param_block, param_dims) of a loaded tensor: the method's, or plain for a float weight."""
        if self.online:
            return (1, 1), (0, 1)
        return self.method.param_block(pname), self.method.param_dims(pname)

    def _check_boundaries(self) -> None:
        """Refuse a merged part or a tensor-parallel shard that would split a block of some stored
        tensor (a block scale cannot be cut in two): raise ValueError saying which and why."""
        spec, tp = self.method.spec, self.ctx.tp_size
        for pname in self.params:
            rows, cols = self.method.param_block(pname)
            what = f"{pname} (one element per {rows}x{cols or 'all'} weight block, {spec.quant})"
            sizes = list(self.parts.items())
            if tp > 1 and self.parallel == "column":
                for part, size in sizes or [("output features", spec.out_features)]:
                    if size % rows:
                        raise ValueError(
                            f"{part}: the {size} rows of one tensor-parallel shard (of {tp}) split a block of "
                            f"{what}; the shard must be a multiple of {rows} rows")
            if tp > 1 and self.parallel == "row" and cols and spec.in_features % cols:
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
            (rows, cols), (out_dim, in_dim) = self._layout(pname)
            if p.dim() == 1:
                out_dim, in_dim = 0, None
            # a per-row scale ([out, 1], cols 0) is whole on every row shard
            dim = {"column": out_dim, "row": in_dim if cols else None}.get(self.parallel)
            if not self.parts:
                targets[pname] = LoadTarget(p, (), dim)
                continue
            start = 0
            for part, size in self.parts.items():
                # in units of this tensor's elements: whole blocks, the last part's may be partial
                index = (slice(None),) * out_dim + (slice(start // rows, -(-(start + size) // rows)),)
                targets[f"{part}.{pname}"] = LoadTarget(p, index, dim, self.part_shards.get(part))
                start += size
        return targets

    def post_load(self) -> None:
        params = dict(self.params)
        if self.online:
            params = {**weight_format(self.method.spec.quant, self.method.spec.weight_block_size).quantize(
                params.pop("weight")), **params}
        new = self.method.process_weights_after_loading(params)
        self.params = nn.ParameterDict({k: nn.Parameter(v, requires_grad=False) for k, v in new.items()})
        self._applied = dict(self.params)  # what apply reads each call: a plain dict, not a Module lookup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply(self._applied, x)
        if self.parallel == "row" and self.ctx.tp_size > 1:
            y = self.ctx.comm.all_reduce(y)
        return y
