"""Block-FP8 GEMM through DeepSeek's DeepGEMM (the `deep_gemm` package), for Hopper (sm90) GPUs.

UNTESTED HERE: written against DeepGEMM's documented API on a machine without a GPU; nothing in this
file has run.

    fp8_gemm_nt((x_fp8 [M, K], x_scale [M, K/128] fp32), (w_fp8 [N, K], w_scale [N/128, K/128] fp32), out [M, N] bf16)

is the current name (DeepGEMM 2.x: it lays the scales out as its kernels need); releases before it
call the same GEMM `gemm_fp8_fp8_bf16_nt` and want the activation scales in a TMA-aligned
column-major layout (`get_col_major_tma_aligned_tensor`). Output is bfloat16 only, K must be a
multiple of 128, and the weight blocks must be 128x128; anything else, and sm100 (whose DeepGEMM
kernels take UE8M0 power-of-two scales, which would re-round DeepSeek-V3's float32 block scales), goes
to the Triton kernel of `Fp8BlockLinear`.
"""
from __future__ import annotations

import torch
from dsserve.core.quant import quantize_per_token_group
from dsserve.plugins.triton_kernels import Fp8BlockLinear


class DeepGemmFp8Linear(Fp8BlockLinear):
    """Fp8BlockLinear whose bfloat16 GEMMs run on DeepGEMM; other cases on the Triton kernel."""

    def __init__(self, spec):
        super().__init__(spec)
        import deep_gemm

        self._dg = deep_gemm
        self._new_api = hasattr(deep_gemm, "fp8_gemm_nt")

    def apply(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        weight, scale = params["weight"], params["weight_scale_inv"]
        n, k = weight.shape
        if x.dtype != torch.bfloat16 or k % 128 or n % 64 or self.format.block != (128, 128):
            return super().apply(params, x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k)
        xq, xs = quantize_per_token_group(x2, 128, torch.float8_e4m3fn)
        out = torch.empty(x2.shape[0], n, dtype=torch.bfloat16, device=x.device)
        if self._new_api:
            self._dg.fp8_gemm_nt((xq, xs), (weight, scale), out)
        else:
            self._dg.gemm_fp8_fp8_bf16_nt((xq, self._dg.get_col_major_tma_aligned_tensor(xs)), (weight, scale), out)
        if "bias" in params:
            out += params["bias"].to(out.dtype)
        return out.view(*lead, n)
