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

DTYPES = (torch.float32, torch.bfloat16)


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


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
