"""Triton kernels compiled ahead of time for real GPU targets with Triton's own compiler (no GPU is
needed to compile): what an A100 would refuse at its first FP8 request fails here instead.

The suite runs Triton in its interpreter (conftest sets TRITON_INTERPRET=1, which makes every
`@triton.jit` an interpreted function), so the compiles run in a child interpreter without it: this
file, run as a script, compiles and prints what each target made of each kernel as JSON.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SHARED_LIMIT = {80: 164 * 1024, 90: 227 * 1024, "gfx90a": 64 * 1024, "gfx942": 64 * 1024}


def _compile(kernel, signature: dict, constexprs: dict, arch: int | str, options: dict) -> dict:
    """Compile `kernel` for a CUDA compute capability (int) or an AMD gfx arch (str): whether it
    compiled, and its shared memory or the compiler's error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("hip", arch, 64) if isinstance(arch, str) else GPUTarget("cuda", arch, 32)
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=target, options=options)
    except Exception as exc:  # noqa: BLE001 -- what the compiler says is the result
        return {"ok": False, "error": str(exc)[-400:]}
    return {"ok": True, "shared": compiled.metadata.shared}


def _compile_fp8_gemm(arch: int, operand: str, upcast: bool) -> dict:
    """The block-FP8 GEMM as `fp8_block_gemm` launches it on a GPU (DeepSeek-V3's 128x128 blocks, a
    prefill tile, bf16 out), with 8-bit operands typed `operand` ("u8": their bytes)."""
    import torch

    from dsserve.plugins.triton_kernels.fp8_gemm import UPCAST_SCALE, _fp8_block_gemm

    signature = {"A": f"*{operand}", "AScale": "*fp32", "B": f"*{operand}", "BScale": "*fp32", "C": "*bf16",
                 "Bias": "*bf16", "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32", "stride_asm": "i32",
                 "stride_bn": "i32", "stride_bsn": "i32", "stride_cm": "i32"}
    constexprs = {"SCALE_BN": 128, "BLOCK_K": 128, "BLOCK_M": 64, "BLOCK_N": 128, "UPCAST": upcast,
                  "DOT_SCALE": UPCAST_SCALE[torch.float8_e4m3fn] if upcast else 1.0, "HAS_BIAS": False}
    return _compile(_fp8_block_gemm, signature, constexprs, arch, {"num_warps": 4, "num_stages": 3})


def _compile_moe_w13(arch: int | str, fp8: bool) -> dict:
    """The fused MoE's gate/up kernel at the configuration `fused_moe` picks for more than 64 (token,
    expert) pairs on a GPU (the largest tiles), bf16 or FP8 through the byte upcast."""
    from dsserve.plugins.triton_kernels.fused_moe import _config, _moe_gemm_w13_silu

    cfg = _config(1024, on_gpu=True)
    operand = "u8" if fp8 else "bf16"
    signature = {"X": f"*{operand}", "XScale": "*fp32", "W13": f"*{operand}", "WScale": "*fp32",
                 "Act": "*fp32" if fp8 else "*bf16", "SortedPairs": "*i32", "BlockExpert": "*i32", "NumPadded": "*i32",
                 **{name: "i32" for name in ("num_pairs", "hidden", "inter", "stride_xt", "stride_we", "stride_wn",
                                             "stride_wk", "stride_at", "stride_xst", "stride_wse", "stride_wsn")}}
    constexprs = {"TOP_K": 8, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
                  "BLOCK_K": 128 if fp8 else cfg["BLOCK_K"], "PRECISION": None, "FP8": fp8,
                  "SCALE_BN": 128 if fp8 else 1, "UPCAST": fp8, "DOT_SCALE": 2.0 ** 16 if fp8 else 1.0}
    return _compile(_moe_gemm_w13_silu, signature, constexprs, arch,
                    {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})


CASES = {"sm80-bytes-upcast": (_compile_fp8_gemm, 80, "u8", True),
         "sm80-e4m3-pointers": (_compile_fp8_gemm, 80, "fp8e4nv", True),
         "sm90-native": (_compile_fp8_gemm, 90, "fp8e4nv", False),
         **{f"moe-w13-{arch}-{'fp8' if fp8 else 'bf16'}": (_compile_moe_w13, arch, fp8)
            for arch in (80, "gfx90a", "gfx942") for fp8 in (False, True)}}


@pytest.fixture(scope="module")
def compiled() -> dict:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_fp8_block_gemm_compiles_for_ampere_through_the_byte_upcast(compiled):
    assert compiled["sm80-bytes-upcast"]["ok"], compiled["sm80-bytes-upcast"]
    assert compiled["sm80-bytes-upcast"]["shared"] <= SHARED_LIMIT[80]
    # why the upcast reads bytes: the e4m3 pointer type itself does not exist below sm_89
    assert not compiled["sm80-e4m3-pointers"]["ok"]
    assert "fp8e4nv not supported" in compiled["sm80-e4m3-pointers"]["error"]


def test_fp8_block_gemm_compiles_natively_for_hopper(compiled):
    assert compiled["sm90-native"]["ok"], compiled["sm90-native"]
    assert compiled["sm90-native"]["shared"] <= SHARED_LIMIT[90]


@pytest.mark.parametrize("arch", [80, "gfx90a", "gfx942"])
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_fused_moe_w13_fits_the_targets_shared_memory(compiled, arch, dtype):
    """MI250/MI300 have 64 KiB of LDS: a pipeline too deep for it raises OutOfResources at the first
    MoE layer."""
    result = compiled[f"moe-w13-{arch}-{dtype}"]
    assert result["ok"], result
    assert result["shared"] <= SHARED_LIMIT[arch], result


if __name__ == "__main__":
    print(json.dumps({name: compile_case(*args) for name, (compile_case, *args) in CASES.items()}))
