"""`dsserve plan`: what a model needs per tensor-parallel rank, from its config alone.

The model is built on the meta device (no memory, no weights read) with one rank's shapes, so the
numbers are the layers' own: every shard rule, replicated tensor and quantized format counts as it
will when served. Weights per rank, KV cache bytes per token per rank (MLA's latent cache is whole
on every rank; MHA's KV heads are split or replicated), and the longest context the device's free
memory holds after the weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dsserve.core.config import EngineArgs
from dsserve.core.kv_cache import KVPool
from dsserve.core.model_runner import compute_dtype
from dsserve.core.plugins import PluginRegistry, default_registry
from dsserve.core.quant import QuantConfig
from dsserve.core.reference import SingleProcessCommunicator

from .config import ModelConfig
from .layers import LayerContext
from .loader import ARCHITECTURES, CheckpointError, read_config_file, resolve_model_path

@dataclass(frozen=True)
class Plan:
    model: str
    tp: int
    dtype: str
    weights_format: str
    weights_total: int          # bytes of one unsharded copy (what the checkpoint holds, served)
    weights_per_rank: int
    kv_bytes_per_token: int     # per rank
    device: str
    free_per_rank: int          # bytes of device memory free to each rank now
    max_context: int            # the model's own limit
    mem_fraction_static: float

    @property
    def kv_tokens(self) -> int:
        """Tokens of KV cache each rank can hold after its weights (0: the weights do not fit)."""
        spare = self.free_per_rank - self.weights_per_rank
        return max(0, int(spare * self.mem_fraction_static) // self.kv_bytes_per_token)

    @property
    def fits(self) -> bool:
        return self.kv_tokens >= 1

    @property
    def longest_context(self) -> int:
        return min(self.kv_tokens, self.max_context)

    def shortfall(self) -> str:
        """Why the plan does not fit, for a refusal."""
        return (f"its weights take {_size(self.weights_per_rank)} per rank and {self.device} has "
                f"{_size(self.free_per_rank)} free per rank (raise --tp, or quantize)")

    def lines(self) -> list[str]:
        head = (f"plan: {self.model} at tp={self.tp}, {self.dtype}, weights {self.weights_format}: "
                f"{_size(self.weights_total)} in all, {_size(self.weights_per_rank)} per rank; KV cache "
                f"{self.kv_bytes_per_token} B/token per rank")
        memory = (f"plan: {self.device}: {_size(self.free_per_rank)} free per rank; after the weights, "
                  f"{self.mem_fraction_static:g} of the rest holds {self.kv_tokens} tokens of KV cache")
        if not self.fits:
            return [head, memory + f": the weights do not fit ({_size(self.weights_per_rank)} per rank)"]
        return [head, memory + f": longest context {self.longest_context} tokens (the model's own limit: "
                               f"{self.max_context})"]


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def register(sub) -> None:
    parser = sub.add_parser("plan", help="weights and KV cache per rank, and the longest context that fits, "
                                         "without loading the weights")
    parser.add_argument("--model-path", "--model", dest="model_path", default=None,
                        help="checkpoint folder or its config.json (default: dsserve-tiny)")
    for flag, kind, default, text in (
            ("--tp-size", int, 1, "tensor-parallel size"), ("--ep-size", int, 1, "expert-parallel size (1 or --tp-size)"), ("--device", str, None, "device (default: the best available)"),
            ("--dtype", str, "auto", "compute dtype"), ("--quantization", str, None, "weight format, as for serve"),
            ("--context-length", int, None, "maximum tokens per sequence"),
            ("--mem-fraction-static", float, 0.5, "fraction of the memory left after the weights for the KV cache")):
        parser.add_argument(flag, *(["--tp"] if flag == "--tp-size" else []), type=kind, default=default, help=text)
    parser.set_defaults(func=_run)


def _run(ns) -> int:
    args = EngineArgs.from_kwargs(**{k: v for k, v in vars(ns).items() if k not in ("command", "func")})
    plan = make_plan(args)
    print("\n".join(plan.lines()))
    return 0 if plan.fits else 1


def make_plan(args: EngineArgs, registry: PluginRegistry | None = None) -> Plan:
    """The plan for `args` (model path or a config.json file, tp size, dtype, quantization, device)."""
    registry = registry or default_registry()
    path = (Path(args.model_path) if args.model_path and Path(args.model_path).is_file()
            else resolve_model_path(args.model_path) / "config.json")
    cfg, name = read_config_file(path), str(path.parent if path.name == "config.json" else path)
    device = registry.select_device(args.device)
    dtype = compute_dtype(device, args.dtype)
    try:
        quant = QuantConfig.resolve(cfg.quantization_config, args.quantization,
                                    stored_quantized=bool(cfg.quantization_config))
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from None
    per_rank, kv = _weight_bytes(cfg, device, registry, dtype, quant, 0, args.tp_size, args.ep_size)
    total = per_rank if args.tp_size == 1 else _weight_bytes(cfg, device, registry, dtype, quant, 0, 1, 1)[0]
    free, _ = device.memory_info()
    if device.memory_per_node:
        free //= args.tp_size // args.nnodes
    fmt = quant.format if quant.format != "none" else str(dtype).removeprefix("torch.")
    context = min(args.context_length or cfg.max_position_embeddings, cfg.max_position_embeddings)
    return Plan(name, args.tp_size, str(dtype).removeprefix("torch."), fmt + (" (quantized at load)" if quant.online
                                                                               else ""),
                total, per_rank, kv, device.name, free, context, args.mem_fraction_static)


def _weight_bytes(cfg: ModelConfig, device, registry, dtype, quant, rank: int, world: int,
                  ep: int) -> tuple[int, int]:
    """(weight bytes, KV bytes per token) of rank `rank` of `world`, built on the meta device."""
    # Shapes only: nothing runs on the meta device, so the identity communicator stands in for the group.
    ctx = LayerContext(device=device, registry=registry, dtype=dtype, torch_device=torch.device("meta"),
                       comm=SingleProcessCommunicator(rank=rank, world_size=world), quant=quant,
                       expert_parallel=ep > 1)
    try:
        with torch.no_grad():
            model = ARCHITECTURES[cfg.architecture](cfg, ctx)
    except ValueError as e:  # a size the layers cannot shard
        raise CheckpointError(f"config.json: {e}") from None
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    backends = [layer.self_attn.backend for layer in model.layers]
    return weights, KVPool.bytes_per_token(backends)
