"""Building blocks shared by the model graphs. Device work goes through the hooks, via `LayerContext`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
import torch
import torch.nn.functional as F
from torch import nn

from dsserve.core.backends import (
    AttentionBackend,
    AttentionSpec,
    Communicator,
    Device,
    LinearSpec,
    MoEBackend,
    MoESpec,
)
from dsserve.models.config import ModelConfig
from dsserve.core.forward_batch import AttentionMetadata
from dsserve.core.plugins import PluginRegistry


@dataclass
class LayerContext:
    """What every layer needs to build itself: the device, its plugins, dtype and parallel rank."""

    device: Device
    registry: PluginRegistry
    dtype: torch.dtype
    torch_device: torch.device
    comm: Communicator
    quant: str = "none"
    weight_block_size: tuple[int, int] | None = None  # the checkpoint's quantization_config says
    page_size: int | None = None
    _attention: dict = field(default_factory=dict)

    @property
    def tp_rank(self) -> int:
        return self.comm.rank

    @property
    def tp_size(self) -> int:
        return self.comm.world_size

    def attention_backend(self, spec: AttentionSpec) -> AttentionBackend:
        """One backend per distinct spec, shared by all layers with that spec."""
        if spec not in self._attention:
            self._attention[spec] = self.registry.attention_backend(self.device, spec)
        return self._attention[spec]

    def attention_backends(self) -> list[AttentionBackend]:
        return list(self._attention.values())

    def moe_backend(self, spec: MoESpec) -> MoEBackend:
        return self.registry.moe_backend(self.device, spec)

    def shard(self, size: int, what: str) -> int:
        if size % self.tp_size:
            raise ValueError(f"{what} ({size}) is not divisible by the tensor-parallel size {self.tp_size}")
        return size // self.tp_size


# ------------------------------------------------------------------------------ checkpoint targets


@dataclass
class LoadTarget:
    """Where one checkpoint tensor goes: `param[index]`, after taking this rank's slice of `shard_dim`."""

    param: torch.Tensor
    index: tuple = ()
    shard_dim: int | None = None

    def destination(self) -> torch.Tensor:
        return self.param[self.index] if self.index else self.param


class CheckpointModule(nn.Module):
    """A module that names the checkpoint tensors it consumes (relative to its own prefix)."""

    def load_targets(self) -> dict[str, LoadTarget]:
        targets: dict[str, LoadTarget] = {}
        for name, child in self.named_children():
            if isinstance(child, CheckpointModule):
                targets.update({f"{name}.{k}": v for k, v in child.load_targets().items()})
            elif isinstance(child, nn.ModuleList):
                for i, sub in enumerate(child):
                    if isinstance(sub, CheckpointModule):
                        targets.update({f"{name}.{i}.{k}": v for k, v in sub.load_targets().items()})
        return targets

    def post_load(self) -> None:
        """Repack weights once loading is complete (recursively)."""
        for child in self.children():
            if isinstance(child, CheckpointModule):
                child.post_load()
            elif isinstance(child, nn.ModuleList):
                for sub in child:
                    if isinstance(sub, CheckpointModule):
                        sub.post_load()


# ----------------------------------------------------------------------------------------- linear


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


class RMSNorm(CheckpointModule):
    def __init__(self, dim: int, eps: float, ctx: LayerContext):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=ctx.dtype, device=ctx.torch_device), requires_grad=False)

    def load_targets(self) -> dict[str, LoadTarget]:
        return {"weight": LoadTarget(self.weight)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as every DeepSeek/Llama reference does, then cast back.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Embedding(CheckpointModule):
    def __init__(self, vocab_size: int, dim: int, ctx: LayerContext):
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(vocab_size, dim, dtype=ctx.dtype, device=ctx.torch_device), requires_grad=False
        )

    def load_targets(self) -> dict[str, LoadTarget]:
        return {"weight": LoadTarget(self.weight)}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class GatedMLP(CheckpointModule):
    """SiLU-gated MLP (dense layers and shared experts): down(silu(gate x) * up x)."""

    def __init__(self, hidden: int, intermediate: int, ctx: LayerContext, bias: bool = False):
        super().__init__()
        self.gate_up_proj = Linear(hidden, 2 * intermediate, ctx, bias=bias, parallel="column",
                                   parts={"gate_proj": intermediate, "up_proj": intermediate})
        self.down_proj = Linear(intermediate, hidden, ctx, bias=bias, parallel="row")

    def load_targets(self) -> dict[str, LoadTarget]:
        return {**self.gate_up_proj.load_targets(), **prefixed("down_proj", self.down_proj.load_targets())}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def prefixed(prefix: str, targets: dict[str, LoadTarget]) -> dict[str, LoadTarget]:
    return {f"{prefix}.{k}": v for k, v in targets.items()}


# ------------------------------------------------------------------------------------------- RoPE


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_softmax_scale(rope_scaling: dict | None, head_dim: int) -> float:
    """DeepSeek's softmax scale: head_dim^-0.5 times mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = head_dim ** -0.5
    if rope_scaling and rope_scaling["rope_type"] in ("yarn", "deepseek_yarn"):
        mscale_all_dim = rope_scaling.get("mscale_all_dim") or 0
        if mscale_all_dim:
            m = _yarn_mscale(rope_scaling["factor"], mscale_all_dim)
            scale *= m * m
    return scale


def rope_inv_freq(dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for `dim` rotary dims and the factor cos/sin are multiplied by."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if scaling is None:
        return inv_freq.float(), 1.0
    kind = scaling["rope_type"]
    if kind in ("yarn", "deepseek_yarn"):
        factor = scaling["factor"]
        orig = scaling["original_max_position_embeddings"]
        beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        # ramp 0 keeps the original frequency (extrapolation), 1 takes the interpolated one.
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
        # cos/sin carry mscale(mscale)/mscale(mscale_all_dim), as in DeepSeek-V2/V3's Hugging Face
        # code and transformers; DeepSeek-V3's inference/model.py omits it, which is the same for every
        # published checkpoint (mscale == mscale_all_dim there).
        attn_factor = _yarn_mscale(factor, scaling.get("mscale") or 1) / _yarn_mscale(
            factor, scaling.get("mscale_all_dim") or 0
        )
        return inv_freq.float(), attn_factor
    if kind == "llama3":
        factor = scaling["factor"]
        low_ff, high_ff = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        orig = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((orig / wavelen - low_ff) / (high_ff - low_ff)).clamp(0, 1)
        scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        return scaled.float(), 1.0
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float(), 1.0
    raise ValueError(f"unsupported rope_scaling type '{kind}' (supported: yarn, llama3, linear)")


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over the last dim.

    interleaved=True rotates adjacent pairs (x0, x1), (x2, x3)... as DeepSeek's checkpoints are laid
    out (their reference uses complex numbers over pairs); False rotates the two halves (Llama/Qwen2).
    """

    def __init__(self, dim: int, max_positions: int, theta: float, scaling: dict | None,
                 interleaved: bool, device: torch.device):
        super().__init__()
        inv_freq, attn_factor = rope_inv_freq(dim, theta, scaling)
        self.interleaved = interleaved
        self.max_positions = max_positions
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        self.register_buffer("cos", (freqs.cos() * attn_factor).to(device), persistent=False)
        self.register_buffer("sin", (freqs.sin() * attn_factor).to(device), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [T, ..., dim] rotated by the angles of positions [T]."""
        shape = (positions.shape[0],) + (1,) * (x.dim() - 2) + (-1,)
        cos = self.cos[positions].view(shape)
        sin = self.sin[positions].view(shape)
        xf = x.float()
        if self.interleaved:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        else:
            x1, x2 = xf.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(x.dtype)



# -------------------------------------------------------------------------------------------- MoE


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
        if not self.scales:
            return
        from dsserve.core.reference.fp8_linear import dequantize_blockwise

        inter, s = self.spec.intermediate_size, self.scales
        self.fp8_bytes = self.w13.numel() + self.w2.numel() + 4 * sum(t.numel() for t in s.values())
        for e in range(self.spec.num_experts):  # one expert at a time: float32 temporaries stay small
            for w, scale in ((self.w13[e, :inter], s["gate_proj"][e]), (self.w13[e, inter:], s["up_proj"][e]),
                             (self.w2[e], s["down_proj"][e])):
                w.copy_(dequantize_blockwise(w, scale, self.block))
        self.scales = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.float(), self.gate_weight)
        weights, ids = self.backend.select_experts(logits, self.correction_bias)
        out = self.backend.compute_experts(x, weights, ids, self.w13, self.w2)
        if self.ctx.tp_size > 1:
            out = self.ctx.comm.all_reduce(out)
        return out


# ------------------------------------------------------------------------------------ the LM shell


class DecoderLayer(CheckpointModule):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, cfg: ModelConfig, ctx: LayerContext):
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, cache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), meta, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderOnlyLM(CheckpointModule):
    """The part every supported architecture shares: embed, decoder layers, norm, LM head.

    Checkpoint names: `model.embed_tokens`, `model.layers.{i}`, `model.norm`, `lm_head`.
    """

    def __init__(self, cfg: ModelConfig, ctx: LayerContext, make_layer):
        super().__init__()
        self.cfg, self.ctx = cfg, ctx
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, ctx)
        self.layers = nn.ModuleList(make_layer(i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, ctx, parallel="column", quant="none")

    def load_targets(self) -> dict[str, LoadTarget]:
        targets = prefixed("model.embed_tokens", self.embed_tokens.load_targets())
        for i, layer in enumerate(self.layers):
            targets.update(prefixed(f"model.layers.{i}", layer.load_targets()))
        targets.update(prefixed("model.norm", self.norm.load_targets()))
        if self.lm_head is not None:
            targets.update(prefixed("lm_head", self.lm_head.load_targets()))
        return targets

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_caches: list) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm."""
        x = self.embed_tokens(input_ids)
        for layer, cache in zip(self.layers, kv_caches):
            x = layer(x, meta, cache)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, vocab] of the given rows."""
        if self.lm_head is None:
            logits = torch.nn.functional.linear(hidden, self.embed_tokens.weight)
        else:
            logits = self.lm_head(hidden)
            if self.ctx.tp_size > 1:
                logits = self.ctx.comm.all_gather(logits, dim=-1)
        return logits.float()

    def attention_backends(self):
        return self.ctx.attention_backends()
