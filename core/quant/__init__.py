"""Quantized weights: the formats dsserve serves (`formats.py`), dynamic activation rounding
(`activations.py`), and which format a checkpoint is served in (`QuantConfig`, from its
config.json and the `--quantization` flag)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from .activations import fake_quantize_per_token_group, quantize_per_token_group
from .formats import FORMATS, TensorLayout, WeightFormat, weight_format

__all__ = [
    "FORMATS",
    "QuantConfig",
    "TensorLayout",
    "WeightFormat",
    "fake_quantize_per_token_group",
    "quantize_per_token_group",
    "weight_format",
]

# config.json `quant_method` -> format (blocks from `weight_block_size`, AWQ's group from `group_size`)
CHECKPOINT_METHODS = {"fp8": "fp8_block", "w8a8_int8": "int8_channel", "blockwise_int8": "int8_block",
                      "awq": "awq"}
# --quantization -> the format it names. SGLang spells AWQ's kernels awq_marlin and (MoE) moe_wna16.
FLAG_FORMATS = {"fp8": "fp8_block", "w8a8_int8": "int8_channel", "int8": "int8_channel",
                "blockwise_int8": "int8_block", "awq": "awq", "awq_marlin": "awq", "moe_wna16": "awq"}
# Formats `--quantization` may make from a bf16/fp32 checkpoint at load (AWQ needs calibration data:
# `dsserve quantize --method awq` rounds to nearest, offline, where a user sees what they get).
ONLINE = ("fp8_block", "int8_channel", "int8_block")
DEFAULT_BLOCK = (128, 128)
DEFAULT_AWQ_GROUP = 128


@dataclass(frozen=True)
class QuantConfig:
    """How a checkpoint's linear and expert weights are served.

    format:  "none" or a FORMATS name. block: the scale block (AWQ: (1, group_size)).
    online:  the checkpoint is float and its weights are quantized at load.
    skip:    module names (AWQ's `modules_to_not_convert`) whose weights stay unquantized.
    """

    format: str = "none"
    block: tuple[int, int] | None = None
    online: bool = False
    skip: tuple[str, ...] = ()

    def format_for(self, module: str) -> str:
        """The format of the linear at checkpoint prefix `module` ("model.layers.0.self_attn.q_proj")."""
        if self.format == "none" or any(re.search(rf"(^|\.){re.escape(s)}(\.|$)", module) for s in self.skip):
            return "none"
        return self.format

    def describe(self) -> str:
        if self.format == "none":
            return "unquantized"
        block = f" {self.block[0]}x{self.block[1]}" if self.block and self.format != "awq" else ""
        group = f" group {self.block[1]}" if self.format == "awq" else ""
        return f"{self.format}{block}{group}" + (", quantized at load" if self.online else "")

    @classmethod
    def resolve(cls, quantization_config: dict | None, flag: str | None, stored_quantized: bool = False
                ) -> "QuantConfig":
        """The format to serve in, from config.json's `quantization_config` and `--quantization`.

        A flag that names another format than the checkpoint's is refused (ValueError, one line); a
        flag on an unquantized checkpoint quantizes it at load where the format allows.
        `stored_quantized`: the checkpoint holds quantized tensors although its config says nothing
        (then the flag names their format)."""
        asked = None
        if flag is not None:
            if flag not in FLAG_FORMATS:
                raise ValueError(f"--quantization {flag} is not served; dsserve serves: {', '.join(FLAG_FORMATS)}")
            asked = FLAG_FORMATS[flag]
        if not quantization_config:
            if asked is None:
                return cls()
            if stored_quantized:
                return cls(asked, DEFAULT_BLOCK if asked != "awq" else (1, DEFAULT_AWQ_GROUP))
            if asked not in ONLINE:
                raise ValueError(f"--quantization {flag}: the checkpoint is not quantized and {asked} cannot be made "
                                 f"at load (it can: {', '.join(ONLINE)}); write an AWQ checkpoint with "
                                 f"`dsserve quantize --method awq`")
            return cls(asked, None if asked == "int8_channel" else DEFAULT_BLOCK, online=True)
        own = _checkpoint_format(quantization_config)
        if asked is not None and asked != own.format:
            raise ValueError(f"--quantization {flag} contradicts the checkpoint's quantization_config "
                             f"(quant_method {quantization_config.get('quant_method')!r}, served as {own.format}); "
                             f"drop the flag to serve it as stored")
        return own


def _checkpoint_format(qc: dict) -> QuantConfig:
    method = qc.get("quant_method")
    if method not in CHECKPOINT_METHODS:
        raise ValueError(f"quantization_config.quant_method {method!r} is not served; dsserve reads: "
                         f"{', '.join(CHECKPOINT_METHODS)}")
    fmt = CHECKPOINT_METHODS[method]
    if fmt == "awq":
        bits, group = qc.get("bits", qc.get("w_bit", 4)), qc.get("group_size", qc.get("q_group_size", 128))
        if bits != 4 or not qc.get("zero_point", True) or str(qc.get("version", "gemm")).lower() != "gemm":
            raise ValueError(f"quantization_config: AWQ with bits {bits}, zero_point {qc.get('zero_point')}, "
                             f"version {qc.get('version')!r} is not served (4-bit GEMM with zero points is)")
        if not isinstance(group, int) or group <= 0:
            raise ValueError(f"quantization_config.group_size must be a positive integer, got {group!r}")
        return QuantConfig("awq", (1, group), skip=tuple(qc.get("modules_to_not_convert") or ()))
    if fmt == "int8_channel":
        return QuantConfig(fmt)
    block = qc.get("weight_block_size")
    if block is None:
        raise ValueError(f"quantization_config: quant_method {method!r} without weight_block_size "
                         "(per-tensor scales) is not served; block-wise scales are")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(f"quantization_config.weight_block_size must be two positive integers [rows, columns], "
                         f"got {block!r}")
    return QuantConfig(fmt, (block[0], block[1]))
