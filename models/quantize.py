"""`dsserve quantize` and `dsserve convert`: rewrite a checkpoint folder's weights in another format.

quantize: a float (bf16/fp16/fp32) Hugging Face folder -> the same folder in one of the public
quantized layouts (docs/quantization.md): every projection weight of attention, dense MLPs, shared
and routed experts (the MTP layer's too) replaced by the format's tensors, round to nearest;
embeddings, lm_head, norms, the router gate and its bias kept as they are; config.json gains the
format's `quantization_config`; tokenizer and other files are copied.

convert: a quantized folder -> float weights in `--dtype` (what DeepSeek's fp8_cast_bf16.py does
before serving V3/R1 on GPUs without FP8), config.json without `quantization_config`.

Both stream: one output tensor at a time, shards of at most SHARD_BYTES, an index when more than one.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsserve.core.quant import QuantConfig, weight_format
from dsserve.models.config import ModelConfig

from .loader import (INDEX_FILE, SINGLE_FILE, CheckpointError, checkpoint_files, progress_bar, quant_config,
                     read_config)

# The weights a quantized checkpoint stores quantized (DeepSeek-V3's FP8 release quantizes exactly
# these; the INT8 and AWQ releases of R1 follow it).
QUANTIZABLE = re.compile(
    r"\.(self_attn\.(q_a_proj|q_b_proj|q_proj|k_proj|v_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))\.weight$")
# `dsserve quantize --method` -> format; the same names as --quantization where they exist
METHODS = {"fp8": "fp8_block", "w8a8_int8": "int8_channel", "int8_block": "int8_block", "awq": "awq"}
SHARD_BYTES = 4 << 30
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class _Writer:
    """Collects output tensors into safetensors shards of at most SHARD_BYTES, then the index."""

    def __init__(self, out: Path):
        self.out, self.pending, self.size, self.total = out, {}, 0, 0
        self.shards: list[dict[str, torch.Tensor]] = []
        self.weight_map: dict[str, str] = {}

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.size + nbytes > SHARD_BYTES:
            self._flush()
        self.pending[name] = t.contiguous()
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        part = self.out / f"part-{len(self.shards):05d}.safetensors"  # renamed once the count is known
        save_file(self.pending, str(part), metadata={"format": "pt"})
        self.shards.append({n: None for n in self.pending})
        self.pending, self.size = {}, 0

    def close(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        for i, names in enumerate(self.shards):
            final = SINGLE_FILE if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            (self.out / f"part-{i:05d}.safetensors").rename(self.out / final)
            self.weight_map.update({n: final for n in names})
        if count > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


class _Reader:
    """Tensors of a checkpoint folder by name, each file opened once."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = checkpoint_files(folder)
        self.file_of = {n: shard for shard, names in self.files.items() for n in names}
        self.open = {shard: safe_open(folder / shard, framework="pt") for shard in self.files}

    def names(self) -> list[str]:
        return list(self.file_of)

    def get(self, name: str) -> torch.Tensor:
        return self.open[self.file_of[name]].get_tensor(name)


def _start(src: Path, out: Path) -> tuple[_Reader, dict]:
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: the output folder exists and is not empty")
    reader = _Reader(src)
    out.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():  # tokenizer, generation config, remote code, license...
        if p.is_file() and not p.name.endswith(".safetensors") and p.name not in (INDEX_FILE, "config.json"):
            shutil.copy2(p, out / p.name)
    return reader, json.loads((src / "config.json").read_text())


def _finish(out: Path, writer: _Writer, config: dict) -> None:
    writer.close()
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def quantize_checkpoint(src: Path, out: Path, method: str, block: tuple[int, int] | None = None) -> QuantConfig:
    """Write `src` (a float checkpoint) to `out` in `method`'s format; returns how it is served."""
    if method not in METHODS:
        raise ValueError(f"--method {method}: not a format dsserve writes ({', '.join(METHODS)})")
    cfg = read_config(src)
    if cfg.quantization_config:
        raise CheckpointError(f"{src / 'config.json'}: already quantized "
                              f"({cfg.quantization_config.get('quant_method')}); convert it to float first")
    fmt = weight_format(METHODS[method], block)
    _check_merged_parts(cfg, fmt, method, src)
    reader, config = _start(src, out)
    writer = _Writer(out)
    for name in progress_bar(reader.names(), desc=f"Quantizing to {fmt.name}", unit="tensor"):
        t = reader.get(name)
        if not QUANTIZABLE.search(name):
            writer.add(name, t)
            continue
        prefix = name.removesuffix(".weight")
        try:
            stored = fmt.quantize(t)
        except ValueError as e:
            raise CheckpointError(f"{src}: tensor '{name}' {tuple(t.shape)}: {e}") from None
        for suffix, q in stored.items():
            writer.add(f"{prefix}.{suffix}", q)
    config["quantization_config"] = fmt.quantization_config()
    _finish(out, writer, config)
    return QuantConfig.resolve(config["quantization_config"], None)


def _check_merged_parts(cfg: ModelConfig, fmt, method: str, src: Path) -> None:
    """dsserve (like SGLang and vLLM) serves gate_proj + up_proj, and Llama's q/k/v, as one merged
    weight, so each part must end on a block of every stored tensor; refuse before writing a
    checkpoint that could not be served, and say which block would fit."""
    rows = fmt.row_multiple()
    parts = {"intermediate_size": cfg.intermediate_size, "moe_intermediate_size": cfg.moe_intermediate_size}
    if cfg.model_type not in ("deepseek_v2", "deepseek_v3"):
        parts.update({"num_attention_heads x head_dim": cfg.num_attention_heads * cfg.head_dim,
                      "num_key_value_heads x head_dim": cfg.num_key_value_heads * cfg.head_dim})
    for what, size in parts.items():
        if size and size % rows:
            raise CheckpointError(
                f"{src / 'config.json'}: {what} {size} is not a multiple of the {rows} weight rows of one "
                f"{fmt.name} block (merged projections are split there); pass a smaller --block")


def convert_checkpoint(src: Path, out: Path, dtype: str = "bfloat16") -> None:
    """Write `src` (a quantized checkpoint) to `out` with every quantized weight dequantised to `dtype`."""
    cfg: ModelConfig = read_config(src)
    quant = quant_config(src, cfg, None)
    if quant.format == "none":
        raise CheckpointError(f"{src / 'config.json'}: no quantization_config; the checkpoint is already float")
    fmt = weight_format(quant.format, quant.block)
    stored = tuple(fmt.tensors())
    reader, config = _start(src, out)
    writer = _Writer(out)
    names = reader.names()
    for name in progress_bar(names, desc=f"Converting to {dtype}", unit="tensor"):
        prefix, _, suffix = name.rpartition(".")
        group = {part: f"{prefix}.{part}" for part in stored}
        complete = all(n in reader.file_of for n in group.values())
        if suffix not in stored or (not complete and suffix == stored[0] and reader.get(name).is_floating_point()
                                    and reader.get(name).element_size() > 1):
            writer.add(name, reader.get(name))  # a float tensor (fp8's "weight" name is also a float one's)
            continue
        if not complete:
            missing = next(n for n in group.values() if n not in reader.file_of)
            raise CheckpointError(f"{src}: tensor '{missing}' is missing (it goes with '{name}')")
        if suffix == stored[0]:  # each quantized weight once, at its first tensor
            parts = {part: reader.get(n) for part, n in group.items()}
            writer.add(f"{prefix}.weight", fmt.dequantize(parts).to(DTYPES[dtype]))
    config.pop("quantization_config", None)
    config["torch_dtype"] = dtype
    _finish(out, writer, config)


def register_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="write a float checkpoint in a quantized format (fp8, w8a8_int8, "
                                        "int8_block, awq)")
    p.add_argument("--model-path", required=True, help="the float checkpoint folder")
    p.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    p.add_argument("--method", required=True, choices=list(METHODS))
    p.add_argument("--block", type=int, nargs=2, metavar=("ROWS", "COLS"), default=None,
                   help="scale block of fp8/int8_block (default 128 128)")
    p.add_argument("--group-size", type=int, default=None, help="AWQ's group of input features (default 128)")
    p.set_defaults(func=_quantize)


def register_convert(sub) -> None:
    p = sub.add_parser("convert", help="write a quantized checkpoint with float weights")
    p.add_argument("--model-path", required=True, help="the quantized checkpoint folder")
    p.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.set_defaults(func=_convert)


def _quantize(ns) -> int:
    block = tuple(ns.block) if ns.block else ((1, ns.group_size) if ns.group_size else None)
    quant = quantize_checkpoint(Path(ns.model_path), Path(ns.out), ns.method, block)
    print(f"wrote {ns.out} ({quant.describe()}); serve it with dsserve --model-path {ns.out}")
    return 0


def _convert(ns) -> int:
    convert_checkpoint(Path(ns.model_path), Path(ns.out), ns.dtype)
    print(f"wrote {ns.out} ({ns.dtype})")
    return 0

