"""Find a checkpoint folder, build its model graph and fill it from safetensors shards.

Every failure a user can fix raises CheckpointError with one line naming the file and the problem.
"""
from __future__ import annotations

import json
import logging
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from dsserve.core.quant import QuantConfig
from dsserve.models.config import ConfigError, ModelConfig

from .deepseek import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from .layers import CheckpointModule, DecoderOnlyLM, LayerContext, RoutedExperts
from .layers.checkpoint import ANOTHER_RANK
from .llama import LlamaForCausalLM, Qwen2ForCausalLM

log = logging.getLogger("dsserve.loader")

ARCHITECTURES: dict[str, type[DecoderOnlyLM]] = {
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tensors some exporters write that carry nothing the graph needs.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attn\.bias|\.masked_bias)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# Stored tensors of the quantized formats (dsserve.core.quant): counted as stored, never cast.
QUANTIZED_SUFFIXES = (".weight_scale_inv", ".weight_scale", ".qweight", ".qzeros", ".scales")
_SAFETENSORS_BYTES = {"F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "I32": 4, "F32": 4, "F16": 2, "BF16": 2}
ModuleT = TypeVar("ModuleT", bound=CheckpointModule)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be served; the message is one line a user can act on."""


def resolve_model_path(model_path: str | None) -> Path:
    """A local folder as given, the embedded tiny model for None, or a Hugging Face hub id."""
    if model_path is None:
        from .tiny import ensure_tiny_model

        return ensure_tiny_model()
    path = Path(model_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: is a file; --model-path takes a checkpoint folder")
    looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", model_path) and not model_path.startswith((".", "/"))
    if not looks_like_hub_id:
        raise CheckpointError(f"{path}: model folder not found")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # offline, unknown repo, auth: all end the same way for the user
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{model_path}: not a local folder, and fetching it from the Hugging Face hub failed ({reason}); "
            "download it first or pass a local path"
        ) from None


def read_config(folder: Path) -> ModelConfig:
    return read_config_file(folder / "config.json")


def read_config_file(path: Path) -> ModelConfig:
    """A config.json (any file name: `dsserve plan` reads published configs on their own)."""
    try:
        cfg = ModelConfig.from_file(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if cfg.architecture not in ARCHITECTURES:
        raise CheckpointError(
            f"{path}: unsupported architecture '{cfg.architecture}'; supported: {', '.join(ARCHITECTURES)}"
        )
    return cfg


def checkpoint_files(folder: Path) -> dict[str, list[str]]:
    """{shard file: [tensor names]} from the index, or the single model.safetensors."""
    index = folder / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            files.setdefault(shard, []).append(name)
        for shard in files:
            if not (folder / shard).exists():
                raise CheckpointError(f"{folder / shard}: shard listed in {INDEX_FILE} is missing")
        return files
    single = folder / SINGLE_FILE
    if not single.exists():
        raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are served)")
    return {SINGLE_FILE: _tensor_names(single)}


def _tensor_names(path: Path) -> list[str]:
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None


def _is_extra_layer(name: str, cfg: ModelConfig) -> bool:
    """The MTP (next-token prediction) layers stored after the last decoder layer."""
    m = _LAYER.match(name)
    return bool(m) and int(m.group(1)) >= cfg.num_hidden_layers


def quant_config(folder: Path, cfg: ModelConfig, flag: str | None) -> QuantConfig:
    """The format the linears and experts are served in, from config.json and `--quantization`
    (see QuantConfig.resolve); one line naming config.json or the flag when they cannot be served."""
    stored = any(name.endswith(QUANTIZED_SUFFIXES) for names in checkpoint_files(folder).values() for name in names)
    try:
        quant = QuantConfig.resolve(cfg.quantization_config, flag, stored_quantized=stored)
    except ValueError as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
    if quant.skip:
        raise CheckpointError(
            f"{folder / 'config.json'}: quantization_config.modules_to_not_convert {list(quant.skip)} is not served "
            "yet (every linear and expert weight must be in the checkpoint's format)")
    return quant


def weight_bytes(folder: Path, files: dict[str, list[str]], cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes the weights take while loading, read from the safetensors headers alone: quantized
    tensors and their scales as stored, float weights in `dtype` (a checkpoint quantized at load is
    float until its layers quantize it)."""
    elem = torch.empty(0, dtype=dtype).element_size()
    total = 0
    for shard, names in files.items():
        with safe_open(folder / shard, framework="pt") as f:
            for name in names:
                if _is_extra_layer(name, cfg):
                    continue
                tensor = f.get_slice(name)
                numel = 1
                for d in tensor.get_shape():
                    numel *= d
                stored = tensor.get_dtype()
                as_stored = name.endswith(QUANTIZED_SUFFIXES) or stored.startswith(("F8", "I8", "I32", "U8"))
                total += numel * (_SAFETENSORS_BYTES.get(stored, elem) if as_stored else elem)
    return total


def build_model(folder: Path, cfg: ModelConfig, ctx: LayerContext, allow_nonfinite: bool = False) -> DecoderOnlyLM:
    """The model of `cfg` filled from `folder`'s weights; a weight holding NaN or inf is refused unless
    `allow_nonfinite` (--allow-nonfinite-weights)."""
    files = checkpoint_files(folder)
    need = weight_bytes(folder, files, cfg, ctx.dtype) // max(ctx.tp_size, 1)
    free, _ = ctx.device.memory_info()
    if need > free:
        raise CheckpointError(
            f"{folder}: the weights need {need / 2**30:.2f} GiB in {str(ctx.dtype).removeprefix('torch.')} "
            f"per rank but only {free / 2**30:.2f} GiB is free on {ctx.device.name}"
        )
    model = construct(folder, lambda: ARCHITECTURES[cfg.architecture](cfg, ctx))
    skipped = load_weights(model, folder, files, cfg, ctx, lambda name: not _is_extra_layer(name, cfg), allow_nonfinite)
    if skipped:
        log.info("skipped %d tensors of the MTP layer (layer index >= %d); speculative decoding loads them "
                 "(models/mtp.py)", skipped, cfg.num_hidden_layers)
    model.post_load()
    _log_resident_weights(model, ctx)
    return model.eval()


def construct(folder: Path, make: Callable[[], ModuleT]) -> ModuleT:
    """The module `make` builds (no autograd); a size its layers refuse names config.json."""
    try:
        with torch.no_grad():
            return make()
    except ValueError as e:  # the layers refuse sizes they cannot shard or split (one line each)
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None


def load_weights(model: CheckpointModule, folder: Path, files: dict[str, list[str]], cfg: ModelConfig,
                 ctx: LayerContext, owns: Callable[[str], bool], allow_nonfinite: bool = False) -> int:
    """Fill `model` with the checkpoint's tensors that `owns` (the main model: all but the MTP layers';
    an MTP layer: its own); each must have a target and each target a tensor. Returns how many tensors
    it left to others."""
    targets = model.load_targets()
    seen: set[str] = set()
    skipped = 0
    total = sum(len(v) for v in files.values())
    with progress_bar(total=total, desc="Loading weights", unit="tensor", leave=False) as bar:
        for files_done, (shard, names) in enumerate(files.items(), 1):
            path = folder / shard
            with safe_open(path, framework="pt") as f:
                for name in names:
                    bar.update(1)
                    if not owns(name):
                        skipped += 1
                        continue
                    if _IGNORED.search(name):
                        continue
                    if name not in targets:
                        raise CheckpointError(f"{path}: unexpected tensor '{name}' for {cfg.architecture}")
                    target = targets[name]
                    if target is ANOTHER_RANK:
                        continue
                    filled = _copy_into(target, f.get_slice(name), name, path, ctx)
                    if not allow_nonfinite:
                        _refuse_nonfinite(filled, name, path)
                    seen.add(name)
            if bar.disable:
                _log_files_loaded(files_done, len(files))
    missing = [n for n, t in targets.items() if t is not ANOTHER_RANK and n not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{folder}: tensor '{missing[0]}' is missing from the checkpoint{more}")
    return skipped


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar on a terminal only: in a log file every redraw of the bar stays, and a message
    printed meanwhile lands on the bar's line."""
    return tqdm(iterable, disable=not sys.stderr.isatty(), **kwargs)


def _log_files_loaded(done: int, count: int) -> None:
    """Progress where no bar is drawn (a log): a line every tenth of the files, when there are several."""
    if count > 1 and (done % max(1, count // 10) == 0 or done == count):
        log.info("loading weights: %d of %d files", done, count)


def has_nonfinite(t: torch.Tensor) -> bool:
    """Whether a float tensor holds NaN or inf: one reduction, no temporary the size of the tensor
    (min and max propagate NaN, and an inf is itself the min or max; a sum would also overflow on
    large finite float16 tensors). Integer tensors (quantized values) hold only numbers."""
    if not t.is_floating_point() or t.numel() == 0:
        return False
    if t.element_size() == 1:
        return _fp8_has_nonfinite(t)
    low, high = torch.aminmax(t)
    # .item() rather than tensor ops on the two results: ~7 us a tensor instead of ~50.
    return not (math.isfinite(low.item()) and math.isfinite(high.item()))


def _refuse_nonfinite(tensor: torch.Tensor, name: str, path: Path) -> None:
    """NaN or inf weights load without a word and make every output token garbage (or none at all).
    The dtype is named: a float32 value beyond float16's range becomes inf only as it loads."""
    if has_nonfinite(tensor):
        dtype = str(tensor.dtype).removeprefix("torch.")
        raise CheckpointError(f"{path}: tensor '{name}' holds NaN or inf as {dtype}; "
                              "pass --allow-nonfinite-weights to load it anyway")


def _fp8_has_nonfinite(t: torch.Tensor) -> bool:
    """8-bit floats have no min/max kernels, so their bytes are read as integers. The sign is the top
    bit and the non-finite codes of e4m3fn and e5m2 (the 8-bit floats checkpoints store) are exactly
    those whose other bits exceed the largest finite value's: a positive one reads as a signed byte
    above it, a negative one as an unsigned byte above 0x80 + it."""
    largest = torch.tensor(torch.finfo(t.dtype).max, dtype=t.dtype).view(torch.int8).item()
    return t.view(torch.int8).max().item() > largest or t.view(torch.uint8).max().item() > 0x80 + largest


def _copy_into(target, tensor_slice, name: str, path: Path, ctx: LayerContext) -> torch.Tensor:
    """Copy one stored tensor (this rank's part of it) into its place in the model; returns that place."""
    dest = target.destination()
    shape = list(tensor_slice.get_shape())
    expected = list(dest.shape)
    which, count = target.shard or (ctx.tp_rank, ctx.tp_size)
    if target.shard_dim is not None:
        expected[target.shard_dim] *= count
    if shape != expected:
        raise CheckpointError(
            f"{path}: tensor '{name}' has shape {tuple(shape)}, expected {tuple(expected)}"
        )
    _check_dtype(dest.dtype, tensor_slice.get_dtype(), name, path)
    if target.shard_dim is None or count == 1:
        tensor = tensor_slice[:]
    else:  # a memory-mapped slice: only this rank's rows or columns are read
        size = dest.shape[target.shard_dim]
        index = [slice(None)] * len(shape)
        index[target.shard_dim] = slice(which * size, (which + 1) * size)
        tensor = tensor_slice[tuple(index)]
    return dest.copy_(tensor)


_STORAGE = {torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int8: "I8", torch.int32: "I32"}
# The stored types a float tensor is converted from (an integer one, an I64 embedding say, would be
# converted silently into a model that only says nonsense).
_FLOAT_STORAGE = ("BF16", "F16", "F32", "F64")


def _check_dtype(want: torch.dtype, stored: str, name: str, path: Path) -> None:
    """Quantized values are copied bit for bit, never converted: an integer or 8-bit tensor must be
    stored in exactly the type the format expects, and a float slot takes only float values."""
    if want in _STORAGE and stored != _STORAGE[want]:
        raise CheckpointError(f"{path}: tensor '{name}' is {stored}, the checkpoint's format stores it as {_STORAGE[want]}")
    if want not in _STORAGE and stored in _STORAGE.values():
        raise CheckpointError(
            f"{path}: tensor '{name}' is {stored} but a float tensor is expected there; the checkpoint looks "
            "quantized: does config.json lack its quantization_config (or pass --quantization)?")
    if want not in _STORAGE and stored not in _FLOAT_STORAGE:
        raise CheckpointError(
            f"{path}: tensor '{name}' is {stored}, expected a float type ({', '.join(_FLOAT_STORAGE)})")


def _log_resident_weights(model: DecoderOnlyLM, ctx: LayerContext) -> None:
    """One line: the bytes the weights hold on the device, and how the linears and experts are stored."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    experts = sum(p.numel() * p.element_size() for m in model.modules() if isinstance(m, RoutedExperts)
                  for name, p in m.named_parameters() if name.startswith(("w13", "w2")))
    routed = f", routed experts {_size(experts)}" if experts else ""
    log.info("weights: %s resident%s; linears and experts %s", _size(total), routed, ctx.quant.describe())


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"
