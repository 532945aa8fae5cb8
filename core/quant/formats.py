"""The quantized weight formats dsserve reads and writes, each in its published checkpoint layout.

A format knows, for one linear weight W [N out, K in]: the tensors a checkpoint stores for it (name,
dtype, which weight rows and columns one element covers, which tensor dim follows the output
features), how to make them from a float weight (`quantize`: round to nearest, what `--quantization`
at load and `dsserve quantize` do), how to get the real weight back (`dequantize`, in float32), and how
the scheme rounds activations before the product (`round_activations`: dynamic per-token or
per-token-group scales for W8A8, nothing for weight-only formats). docs/quantization.md lists the
layouts with the checkpoints they come from.

Everything here is plain torch and exact about its arithmetic: the reference methods, the online
quantizer and the checkpoint writer share it, so they cannot drift apart.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from .activations import fake_quantize_per_token_group

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
INT8_MAX = 127  # symmetric: -128 is never produced, as in every published int8 checkpoint
AWQ_BITS = 4
AWQ_PACK = 32 // AWQ_BITS  # 4-bit values per int32
# AutoAWQ's GEMM packing: nibble i of each int32 holds output column AWQ_ORDER[i] of its 8.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# The inverse: the nibble that holds output column c.
AWQ_NIBBLE = tuple(AWQ_ORDER.index(c) for c in range(AWQ_PACK))
_TINY = 1e-12  # floor of a scale, so an all-zero block quantizes to zeros


@dataclass(frozen=True)
class TensorLayout:
    """One stored tensor of a quantized weight W [N, K].

    block: (weight rows, weight columns) one element covers; (1, 1) for an element-wise tensor;
           columns 0: the whole row (a per-channel scale [N, 1], which row shards all keep whole).
    dims:  (the tensor dim that follows W's rows, the one that follows its columns); (0, 1) unless
           the format stores the tensor transposed (AWQ). A 1-D tensor (a bias) follows the rows.
    """

    dtype: torch.dtype
    block: tuple[int, int] = (1, 1)
    dims: tuple[int, int] = (0, 1)
    one_dim: bool = False

    def shape(self, n: int, k: int) -> tuple[int, ...]:
        rows, cols = -(-n // self.block[0]), (-(-k // self.block[1]) if self.block[1] else 1)
        if self.one_dim:
            return (rows,)
        return (rows, cols) if self.dims == (0, 1) else (cols, rows)


class WeightFormat(ABC):
    """How one quantization scheme stores, makes and reads back a linear weight."""

    #: the scheme's name in LinearSpec.quant / MoESpec.quant
    name: str
    #: weight bits, for the resident-size line of the start-up log
    bits: int = 8

    @abstractmethod
    def tensors(self) -> dict[str, TensorLayout]:
        """The stored tensors of one weight (no bias), by checkpoint name."""

    @abstractmethod
    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """w [N, K] float -> the stored tensors, round to nearest."""

    @abstractmethod
    def dequantize(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The real weight [N, K] in float32 from the stored tensors (extra entries are ignored)."""

    def round_activations(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 -> the values the scheme multiplies (rounded as its kernels round them).
        Weight-only formats: x unchanged."""
        return x

    @abstractmethod
    def quantization_config(self) -> dict:
        """config.json's `quantization_config` of a checkpoint in this format."""

    def row_multiple(self) -> int:
        """Weight rows that can be cut from the others without splitting an element of some tensor."""
        return max(layout.block[0] for layout in self.tensors().values())

    def rows(self, params: dict[str, torch.Tensor], n0: int, n1: int) -> dict[str, torch.Tensor]:
        """The stored tensors of weight rows n0:n1 (n0 a multiple of `row_multiple`)."""
        out = {}
        for name, layout in self.tensors().items():
            r = layout.block[0]
            out[name] = params[name].narrow(layout.dims[0], n0 // r, -(-n1 // r) - n0 // r)
        return out


def _blocks(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """w [N, K] -> zero-padded float32 view [N/bn, bn, K/bk, bk]."""
    n, k = w.shape
    bn, bk = block
    nb, kb = -(-n // bn), -(-k // bk)
    padded = torch.zeros(nb * bn, kb * bk, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w.float()
    return padded.view(nb, bn, kb, bk)


def _expand(scale: torch.Tensor, block: tuple[int, int], n: int, k: int) -> torch.Tensor:
    """A per-block scale [N/bn, K/bk] spread over the weight's elements [N, K] (float32)."""
    return scale.float().repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]


class BlockFormat(WeightFormat):
    """Symmetric 8-bit weights with one float32 `weight_scale_inv` per (bn x bk) block; activations
    rounded to the same 8-bit type per token per bk input features (DeepSeek-V3's FP8 recipe, and
    meituan's Block-INT8 of R1)."""

    storage: torch.dtype
    qmax: float

    def __init__(self, block: tuple[int, int] | None = None):
        self.block = tuple(block) if block else (128, 128)

    def tensors(self) -> dict[str, TensorLayout]:
        return {"weight": TensorLayout(self.storage),
                "weight_scale_inv": TensorLayout(torch.float32, self.block)}

    def _round(self, v: torch.Tensor) -> torch.Tensor:
        return v.clamp(-self.qmax, self.qmax).to(self.storage)

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        n, k = w.shape
        blocks = _blocks(w, self.block)
        scale = (blocks.abs().amax(dim=(1, 3)) / self.qmax).clamp(min=_TINY)
        q = self._round(blocks / scale[:, None, :, None])
        return {"weight": q.view(blocks.shape[0] * self.block[0], -1)[:n, :k].contiguous(),
                "weight_scale_inv": scale}

    def dequantize(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        w = params["weight"]
        return w.float() * _expand(params["weight_scale_inv"], self.block, *w.shape)

    def round_activations(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_per_token_group(x, self.block[1], self.storage)

    def quantization_config(self) -> dict:
        return {"activation_scheme": "dynamic", "quant_method": self.quant_method,
                "weight_block_size": list(self.block)}


class Fp8Block(BlockFormat):
    """DeepSeek-V3/R1's own format: e4m3 weights, 128x128 blocks."""

    name, storage, qmax, quant_method = "fp8_block", torch.float8_e4m3fn, FP8_MAX, "fp8"

    def quantization_config(self) -> dict:
        return {**super().quantization_config(), "fmt": "e4m3"}


class Int8Block(BlockFormat):
    """meituan/DeepSeek-R1-Block-INT8: int8 weights, 128x128 blocks, per-token-group int8 activations."""

    name, storage, qmax, quant_method = "int8_block", torch.int8, float(INT8_MAX), "blockwise_int8"

    def _round(self, v: torch.Tensor) -> torch.Tensor:
        return v.round().clamp(-self.qmax, self.qmax).to(torch.int8)


class Int8Channel(WeightFormat):
    """meituan/DeepSeek-R1-Channel-INT8 (SGLang's w8a8_int8): int8 weights with one float32
    `weight_scale` [N, 1] per output channel; activations int8 with one scale per token."""

    name = "int8_channel"

    def __init__(self, block: tuple[int, int] | None = None):
        self.block = None  # one scale per row: no block

    def tensors(self) -> dict[str, TensorLayout]:
        return {"weight": TensorLayout(torch.int8), "weight_scale": TensorLayout(torch.float32, (1, 0))}

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        wf = w.float()
        scale = (wf.abs().amax(dim=1, keepdim=True) / INT8_MAX).clamp(min=_TINY)
        return {"weight": (wf / scale).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), "weight_scale": scale}

    def dequantize(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return params["weight"].float() * params["weight_scale"].float()

    def round_activations(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_per_token_group(x, x.shape[-1], torch.int8)

    def quantization_config(self) -> dict:
        return {"activation_scheme": "dynamic", "quant_method": "w8a8_int8"}


class Awq(WeightFormat):
    """AutoAWQ's GEMM format (cognitivecomputations/DeepSeek-R1-AWQ): 4-bit asymmetric weights per
    `group` input features, stored transposed: `qweight` int32 [K, N/8] (8 output columns per int32,
    in AWQ_ORDER), `qzeros` int32 [K/group, N/8] packed alike, `scales` float16 [K/group, N].
    W[n, k] = (q - zero) * scale. Activations are not quantized (W4A16)."""

    name, bits = "awq", AWQ_BITS

    def __init__(self, block: tuple[int, int] | None = None):
        self.group = int(block[1]) if block else 128

    @property
    def block(self) -> tuple[int, int]:
        return (1, self.group)

    def tensors(self) -> dict[str, TensorLayout]:
        g = self.group
        return {"qweight": TensorLayout(torch.int32, (AWQ_PACK, 1), (1, 0)),
                "qzeros": TensorLayout(torch.int32, (AWQ_PACK, g), (1, 0)),
                "scales": TensorLayout(torch.float16, (1, g), (1, 0))}

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        n, k = w.shape
        if n % AWQ_PACK:
            raise ValueError(f"AWQ packs {AWQ_PACK} output features per int32; {n} is not a multiple")
        g = self.group
        groups = -(-k // g)
        wt = torch.zeros(groups * g, n, dtype=torch.float32, device=w.device)
        wt[:k] = w.float().t()
        wg = wt.view(groups, g, n)
        lo, hi = wg.amin(dim=1).clamp(max=0), wg.amax(dim=1).clamp(min=0)
        qmax = (1 << AWQ_BITS) - 1
        # scales are stored in float16: round them first so quantizing and dequantizing agree
        scale = ((hi - lo) / qmax).clamp(min=1e-6).half()
        zero = (-lo / scale.float()).round().clamp(0, qmax)
        q = ((wg / scale.float()[:, None]).round() + zero[:, None]).clamp(0, qmax)
        return {"qweight": _awq_pack(q.view(groups * g, n)[:k]), "qzeros": _awq_pack(zero), "scales": scale}

    def dequantize(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        q, zero = _awq_unpack(params["qweight"]), _awq_unpack(params["qzeros"])
        k = q.shape[0]
        scale = params["scales"].float()
        g = self.group
        wt = (q - zero.repeat_interleave(g, 0)[:k]) * scale.repeat_interleave(g, 0)[:k]
        return wt.t()

    def quantization_config(self) -> dict:
        return {"quant_method": "awq", "bits": AWQ_BITS, "group_size": self.group, "version": "gemm",
                "zero_point": True}


def _awq_pack(q: torch.Tensor) -> torch.Tensor:
    """[R, N] values 0..15 -> int32 [R, N/8] in AWQ_ORDER."""
    r, n = q.shape
    cols = q.to(torch.int64).view(r, n // AWQ_PACK, AWQ_PACK)
    packed = torch.zeros(r, n // AWQ_PACK, dtype=torch.int64, device=q.device)
    for nibble, column in enumerate(AWQ_ORDER):
        packed |= cols[:, :, column] << (AWQ_BITS * nibble)
    # int32 two's complement of the 32-bit pattern
    return (packed - ((packed >> 31) << 32)).to(torch.int32)


def _awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, N/8] -> float32 [R, N] values 0..15."""
    p = packed.to(torch.int64) & 0xFFFFFFFF
    cols = [(p >> (AWQ_BITS * AWQ_NIBBLE[c])) & 0xF for c in range(AWQ_PACK)]
    return torch.stack(cols, dim=-1).view(packed.shape[0], -1).float()


FORMATS: dict[str, type[WeightFormat]] = {f.name: f for f in (Fp8Block, Int8Block, Int8Channel, Awq)}


def weight_format(quant: str, block: tuple[int, int] | None = None) -> WeightFormat:
    """The format of LinearSpec/MoESpec `quant` with its scale block (or AWQ's (1, group))."""
    if quant not in FORMATS:
        raise ValueError(f"unknown weight format {quant!r}; known: {', '.join(FORMATS)}")
    return FORMATS[quant](block)
