"""Linear layers through oneDNN, on weights reordered once at load into oneDNN's blocked layout.

oneDNN picks AMX, AVX-512 (BF16/VNNI) or AVX2 kernels for the CPU it runs on. Handing it a plain
[out, in] weight makes it reorder that weight on every call, which for decoding's few rows costs
more than the GEMM: measured on a Zen 4 (AVX-512 BF16, 2 threads), one bfloat16 row against a
4096 x 512 weight takes 192 us plain and 58 us reordered; 16 rows 366 us and 200 us; a 512-row
prefill chunk gains ~5%. torch exposes the ops its own CPU compiler emits for linear layers:
`mkldnn._reorder_linear_weight` (once) and `mkldnn._linear_pointwise` (per call). Where a build
lacks them, the reference's F.linear serves.
"""
from __future__ import annotations

import torch

from dsserve.core.reference import UnquantizedLinear

# oneDNN's reordered bfloat16 linear refuses CPUs without these ("bf16 path needs the cpu support
# avx_ne_convert or avx512bw, avx512vl and avx512dq"): an AVX2-only CPU asked for --dtype bfloat16.
_BF16_FLAGS = ({"avx512bw", "avx512vl", "avx512dq"}, {"avx_ne_convert"})


def serves(dtype: torch.dtype, flags: frozenset[str]) -> bool:
    """Whether oneDNN's reordered linear runs `dtype` on a CPU with `flags` in this torch build."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    if dtype == torch.bfloat16:
        return any(needed <= flags for needed in _BF16_FLAGS)
    return dtype == torch.float32


class OneDnnLinear(UnquantizedLinear):
    """Unquantized float32/bfloat16 linear layers; the weight param is oneDNN's opaque tensor after
    loading (`dequantized_weight` gives the plain [out, in] one back)."""

    def process_weights_after_loading(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The batch-size hint only steers the blocked layout; a single-row hint serves every size here.
        return {**params, "weight": torch.ops.mkldnn._reorder_linear_weight(params["weight"], 1)}

    def apply(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        weight = params["weight"]
        rows = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(rows, weight, params.get("bias"), "none", [], "")
        return out.reshape(*x.shape[:-1], weight.shape[0])

    def dequantized_weight(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return params["weight"].to_dense()
