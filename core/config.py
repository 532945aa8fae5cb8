"""EngineArgs: the engine's options, each a CLI flag and an `Engine(...)` keyword.

The HTTP server's own flags extend these in `dsserve.server.args.ServerArgs`; a flag is declared with
`flag(...)`, and `add_cli_args` turns every field of the class into an argparse option.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, dataclass, field, fields
from typing import Any


# SGLang's --quantization names; dsserve.core.quant.QuantConfig says which are served and refuses the rest.
QUANTIZATION_METHODS = [
    "fp8", "w8a8_int8", "w8a8_fp8", "blockwise_int8", "int8", "awq", "awq_marlin", "gptq", "gptq_marlin",
    "moe_wna16", "compressed-tensors", "bitsandbytes", "gguf", "modelopt", "modelopt_fp4", "w4afp8", "mxfp4",
]


# Both names mean drafting with the model's own MTP layer (SGLang spells DeepSeek's NEXTN as EAGLE too).
SERVED_SPECULATIVE_ALGORITHMS = ("EAGLE", "NEXTN")


def flag_error(name: str, message: str) -> ValueError:
    """A bad flag value, named as the user types it."""
    return ValueError(f"--{name.replace('_', '-')} {message}")


def flag(default: Any, help: str, group: str = "model", **extra: Any) -> Any:
    """A field of an options dataclass: its default, its --help text and its --help group."""
    return field(default=default, metadata={"help": help, "group": group, **extra})


@dataclass
class EngineArgs:
    """Every option of the offline Engine (flag names follow SGLang's)."""

    # model
    model_path: str | None = flag(None, "Hugging Face folder or hub id; default: the embedded dsserve-tiny",
                                  aliases=["--model"])
    tokenizer_path: str | None = flag(None, "tokenizer folder (default: the model folder)")
    trust_remote_code: bool = flag(False, "allow custom code shipped with the tokenizer")
    context_length: int | None = flag(None, "maximum tokens per sequence (default: the model's)")
    dtype: str = flag("auto", "compute dtype: auto, float32, bfloat16, float16",
                      choices=["auto", "float32", "bfloat16", "float16", "half", "bf16", "fp32"])
    allow_nonfinite_weights: bool = flag(False, "load a checkpoint whose weights hold NaN or inf (refused by "
                                         "default: such a model only generates garbage)")
    # device
    device: str | None = flag(None, "device to run on (`dsserve plugins` lists them); default: the best available",
                              group="device")
    # memory
    max_total_tokens: int | None = flag(None, "KV cache size in tokens (default: from --mem-fraction-static)",
                                        group="memory")
    mem_fraction_static: float = flag(0.5, "fraction of free device memory for the KV cache after weights",
                                      group="memory")
    page_size: int | None = flag(None, "tokens per KV page (default: the attention backend's choice)",
                                 group="memory")
    max_running_requests: int = flag(64, "most requests decoding at once", group="memory")
    chunked_prefill_size: int = flag(2048, "most prompt tokens prefilled in one step (longer prompts take "
                                     "several steps while others keep decoding)", group="memory")
    disable_radix_cache: bool = flag(False, "do not reuse the KV of shared prompt prefixes", group="memory")
    # runtime
    seed: int = flag(0, "random seed for sampling without a per-request seed", group="runtime",
                     aliases=["--random-seed"])
    log_level: str = flag("info", "logging level", group="runtime",
                          choices=["debug", "info", "warning", "error", "critical"])
    model_worker: str = flag("process", "where the model runs: process (its own; nothing the caller's threads do "
                             "slows it) or thread (the engine's thread in this process: starts faster, and "
                             "tests and debuggers reach the model)", group="runtime", choices=["process", "thread"])
    enable_deterministic_inference: bool = flag(
        False, "batch-invariant numerics: a seeded request samples the same tokens alone, in any batch, after "
        "retraction and from the prefix cache (prefill attends token by token as decode does, fixed attention "
        "splits; the README says when a seed reproduces tokens)", group="runtime")
    # parallelism (single device today: values above 1 are accepted with a warning)
    tp_size: int = flag(1, "tensor-parallel size", group="parallelism", aliases=["--tp"])
    dp_size: int = flag(1, "data-parallel size", group="parallelism", aliases=["--dp"])
    ep_size: int = flag(1, "expert-parallel size", group="parallelism", aliases=["--ep"])
    enable_dp_attention: bool = flag(False, "data-parallel attention with tensor-parallel MoE", group="parallelism")
    nnodes: int = flag(1, "number of nodes", group="parallelism")
    node_rank: int = flag(0, "this node's rank, 0 .. nnodes-1", group="parallelism")
    dist_init_addr: str | None = flag(None, "HOST:PORT of node 0 for the distributed rendezvous",
                                      group="parallelism")
    dist_timeout: int | None = flag(None, "seconds before a distributed operation times out",
                                    group="parallelism")
    # weights and KV formats
    quantization: str | None = flag(None, "weight format: a float checkpoint is quantized at load (fp8: 128x128 "
                                    "blocks, w8a8_int8: per channel, blockwise_int8); on a quantized checkpoint it "
                                    "must name the checkpoint's own format", group="quantization",
                                    choices=QUANTIZATION_METHODS)
    kv_cache_dtype: str = flag("auto", "KV cache dtype (auto: the compute dtype; fp8_e4m3 / fp8_e5m2: 8-bit "
                               "floats, half a bfloat16 cache's bytes)", group="quantization",
                               choices=["auto", "fp8_e4m3", "fp8_e5m2", "bf16", "bfloat16"])
    load_format: str = flag("auto", "weight file format", group="quantization",
                            choices=["auto", "safetensors", "pt", "dummy"])
    model_loader_extra_config: str | None = flag(None, "JSON options for the weight loader (e.g. "
                                                 '{"enable_multithread_load": true})', group="quantization")
    # kernels and graph capture (accepted; a warning names the ones without effect)
    attention_backend: str | None = flag(None, "attention kernel family (default: the device plugin's choice)",
                                         group="kernels")
    enable_torch_compile: bool = flag(False, "compile the decode graph with torch.compile", group="kernels")
    torch_compile_max_bs: int | None = flag(None, "largest batch compiled with torch.compile", group="kernels")
    # SGLang spells these after torch's device type: --<type>-graph-bs and so on, for every device type
    # an installed plugin provides (see _device_aliases).
    device_graph_bs: list[int] | None = flag(None, "batch sizes to capture as device graphs", group="kernels",
                                             nargs="+", metavar="BS", device_aliases=["--{}-graph-bs"])
    device_graph_max_bs: int | None = flag(None, "largest batch captured as a device graph", group="kernels",
                                           metavar="BS", device_aliases=["--{}-graph-max-bs"])
    disable_device_graph: bool = flag(False, "do not capture device graphs", group="kernels",
                                      device_aliases=["--disable-{}-graph"])
    disable_overlap_schedule: bool = flag(False, "do not overlap scheduling with the forward pass",
                                          group="kernels")
    # speculative decoding (MTP / EAGLE)
    speculative_algorithm: str | None = flag(
        None, "speculative decoding: EAGLE or NEXTN drafts with the checkpoint's own MTP layer and verifies the "
        "drafts in one pass (output unchanged); EAGLE3, STANDALONE and NGRAM are not served",
        group="speculative decoding", choices=["EAGLE", "EAGLE3", "NEXTN", "STANDALONE", "NGRAM"])
    speculative_draft_model_path: str | None = flag(None, "draft model folder (not served: the model's MTP layer "
                                                    "drafts)", group="speculative decoding")
    speculative_num_steps: int | None = flag(None, "draft tokens per step, each chained on the MTP layer's "
                                             "previous output (default 1: the one token DeepSeek trained it for)",
                                             group="speculative decoding")
    speculative_eagle_topk: int | None = flag(None, "draft branches per step (1: a single chain, the only shape "
                                              "served)", group="speculative decoding")
    speculative_num_draft_tokens: int | None = flag(None, "tokens verified per step (a chain verifies "
                                                    "--speculative-num-steps + 1)", group="speculative decoding")
    # prefill/decode disaggregation
    disaggregation_mode: str = flag("null", "serve only prefill or only decode", group="disaggregation",
                                    choices=["null", "prefill", "decode"])
    disaggregation_transfer_backend: str | None = flag(None, "KV transfer library", group="disaggregation",
                                                       choices=["mooncake", "nixl", "ascend", "fake"])
    disaggregation_bootstrap_port: int | None = flag(None, "bootstrap server port of a prefill server",
                                                     group="disaggregation")
    disaggregation_ib_device: str | None = flag(None, "InfiniBand devices for the KV transfer",
                                                group="disaggregation")

    def __post_init__(self) -> None:
        aliases = {"half": "float16", "bf16": "bfloat16", "fp32": "float32"}
        self.dtype = aliases.get(self.dtype, self.dtype)
        valid_dtypes = {"auto", "float32", "bfloat16", "float16"}
        if self.dtype not in valid_dtypes:
            raise ValueError(f"--dtype must be one of {sorted(valid_dtypes)}, got {self.dtype!r}")
        if self.model_worker not in ("process", "thread"):
            raise flag_error("model_worker", f"must be process or thread, got {self.model_worker!r}")
        if not 0.0 < self.mem_fraction_static <= 1.0:
            raise flag_error("mem_fraction_static", f"must be in (0, 1], got {self.mem_fraction_static}")
        for name in ("max_total_tokens", "page_size", "context_length", "max_running_requests",
                     "chunked_prefill_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise flag_error(name, f"must be >= 1, got {value}")
        self._check_compat_flags()
        if self.nnodes > 1 and not self.dist_init_addr:
            raise flag_error("nnodes", f"{self.nnodes} needs --dist-init-addr HOST:PORT (node 0's rendezvous)")
        if self.ep_size not in (1, self.tp_size):
            raise flag_error("ep_size", f"must be 1 or --tp-size ({self.tp_size}): experts are split over the "
                                        f"tensor-parallel ranks, got {self.ep_size}")

    @property
    def speculative_steps(self) -> int:
        """Draft tokens proposed per step by the MTP layer; 0 without speculative decoding."""
        if self.speculative_algorithm not in SERVED_SPECULATIVE_ALGORITHMS:
            return 0
        return self.speculative_num_steps or 1

    def _check_compat_flags(self) -> None:
        """The values of the SGLang-compatibility flags (parallelism, kernels, speculative, disaggregation)."""
        for name in ("tp_size", "dp_size", "ep_size", "nnodes", "torch_compile_max_bs", "device_graph_max_bs",
                     "dist_timeout", "speculative_num_steps", "speculative_eagle_topk",
                     "speculative_num_draft_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise flag_error(name, f"must be >= 1, got {value}")
        if self.disaggregation_bootstrap_port is not None and not 0 <= self.disaggregation_bootstrap_port <= 65535:
            raise flag_error("disaggregation_bootstrap_port",
                             f"must be in 0..65535, got {self.disaggregation_bootstrap_port}")
        if not 0 <= self.node_rank < self.nnodes:
            raise flag_error("node_rank",
                             f"must be in 0..{self.nnodes - 1} (--nnodes {self.nnodes}), got {self.node_rank}")
        if self.tp_size % self.nnodes:
            raise flag_error("tp_size", f"({self.tp_size}) must be a multiple of --nnodes ({self.nnodes})")
        if self.enable_dp_attention and self.tp_size % self.dp_size:
            raise flag_error("dp_size",
                             f"({self.dp_size}) must divide --tp-size ({self.tp_size}) with --enable-dp-attention")
        if self.dist_init_addr is not None:
            host, sep, port = self.dist_init_addr.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
                raise flag_error("dist_init_addr", f"must be HOST:PORT, got {self.dist_init_addr!r}")
        if self.model_loader_extra_config is not None:
            try:
                extra = json.loads(self.model_loader_extra_config)
            except json.JSONDecodeError as e:
                raise flag_error("model_loader_extra_config", f"is not valid JSON ({e.msg})") from None
            if not isinstance(extra, dict):
                raise flag_error("model_loader_extra_config", "must be a JSON object")
        if self.device_graph_bs is not None:
            # SGLang takes `--<type>-graph-bs 1 2 4` and users also write `1,2,4`.
            try:
                self.device_graph_bs = [int(x) for item in self.device_graph_bs
                                        for x in str(item).split(",") if x.strip()]
            except ValueError:
                raise flag_error("device_graph_bs",
                                 f"takes batch sizes (integers), got {self.device_graph_bs}") from None
        if self.device_graph_bs is not None and any(bs < 1 for bs in self.device_graph_bs):
            raise flag_error("device_graph_bs", f"sizes must be >= 1, got {self.device_graph_bs}")

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """One argparse option per field, grouped as in --help."""
        groups: dict[str, argparse._ArgumentGroup] = {}
        for f in fields(cls):
            meta = f.metadata
            group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
            names = [f"--{f.name.replace('_', '-')}", *meta.get("aliases", [])]
            names += [n for n in _device_aliases(meta.get("device_aliases", ())) if n not in names]
            default = None if f.default is MISSING else f.default
            if f.type in ("bool", bool):
                group.add_argument(*names, dest=f.name, action="store_true", default=default, help=meta["help"])
                continue
            kind = {"int | None": int, "int": int, "float": float, "float | None": float}.get(str(f.type), str)
            group.add_argument(*names, dest=f.name, type=kind, default=default, help=meta["help"],
                               choices=meta.get("choices"), nargs=meta.get("nargs"), metavar=meta.get("metavar"))

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace):
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls)})

    @classmethod
    def from_kwargs(cls, **kwargs: Any):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; see `dsserve --help`")
        return cls(**kwargs)


def _device_aliases(patterns: list[str]) -> list[str]:
    """Option names spelled after each torch device type the installed plugins provide."""
    if not patterns:
        return []
    try:
        from .plugins import default_registry

        types = sorted({device.torch_type for device, _ in default_registry().devices()})
    except Exception:  # noqa: BLE001 - a broken plugin must not break --help
        return []
    return [pattern.format(t) for pattern in patterns for t in types]
