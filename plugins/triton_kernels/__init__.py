"""dsserve.plugins.triton_kernels: Triton kernels shared by the cuda and rocm plugins.

Not a plugin itself (it registers no hooks and provides no device): the cuda and rocm plugins import
it lazily, inside their backend hooks, once their device is in use, and return these backends for
the specs each class's `supports(spec)` accepts (`unsupported(spec)` says why not).

* `TritonMLAAttention` (mla_decode.py): paged MLA decode on the latent cache, split-K with a merge
  kernel; short extends by the same kernel in absorbed (latent) form, long extends by the
  reference's expanded SDPA. It reads 8-bit (e4m3/e5m2) latent caches too, with their kv_scale.
* `TritonMHAAttention` (mha_attention.py): paged MHA/GQA decode (split-K) and extend with a cached
  prefix; caches in a 16/32-bit float dtype with kv_scale 1 only (the reference serves the others).
* `TritonMoE` (fused_moe.py): expert-sorted, block-padded token pairs, a grouped w13 GEMM with
  SiLU-and-mul fused in, a grouped w2 GEMM with the routing weight fused in, a sum over the k
  experts; routing by the reference `select_experts`. FP8 experts ("fp8_block", DeepSeek-V3/R1's
  W8A8 format) too: 8-bit weights with their block scales, activations quantized per token per
  block column, on MI300 (gfx94x) converted to e4m3fnuz after loading.
* `Fp8BlockLinear` (fp8_gemm.py): DeepSeek-V3's block-FP8 weights (128x128 scales) against
  per-token-per-128 quantized activations, accumulated group by group with both scales.

Verification: tests/test_triton_kernels.py runs every kernel in Triton's interpreter
(TRITON_INTERPRET=1, CPU tensors, float32 and float16) against the core's references, and runs
dsserve-tiny on the attention and MoE kernels to the reference's exact greedy tokens. On real GPUs
they are UNTESTED and untuned: block sizes, warps and stages are reasonable defaults, not measured,
and GPU-only behaviour (tf32/fp8 tensor-core paths, AMD's backend) has not been exercised. What is
checked without a GPU: tests/test_triton_aot.py compiles every launch the cuda and rocm plugins claim
(the table in ../gpu.py) for sm_80, sm_90, gfx90a and gfx942 with Triton's own compiler, at the
configurations the launchers pick for DeepSeek and R1-Distill shapes, and fails on a compile error,
shared memory (LDS) past the target's, or a register spill (docs/gpu.md has the numbers).
`fp8_block_gemm`, `fused_moe` and `mha_extend_attention` pick their tiles, warps and stages per
target (their `target` argument; default: the tensors' device's).

Importing this package imports triton.
"""
from __future__ import annotations

from .fp8_gemm import Fp8BlockLinear, fp8_block_gemm
from .fused_moe import TritonMoE, fused_moe, moe_align
from .mha_attention import (
    TritonMHAAttention,
    mha_decode_attention,
    mha_extend_attention,
)
from .mla_decode import TritonMLAAttention, mla_decode_attention
from .paged_attention import paged_attention

__all__ = [
    "Fp8BlockLinear",
    "TritonMHAAttention",
    "TritonMLAAttention",
    "TritonMoE",
    "fp8_block_gemm",
    "fused_moe",
    "mha_decode_attention",
    "mha_extend_attention",
    "mla_decode_attention",
    "moe_align",
    "paged_attention",
]
