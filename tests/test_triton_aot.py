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

SHARED_LIMIT = {80: 164 * 1024, 90: 227 * 1024}


def _compile_fp8_gemm(arch: int, operand: str, upcast: bool) -> dict:
    """The block-FP8 GEMM as `fp8_block_gemm` launches it on a GPU (DeepSeek-V3's 128x128 blocks, a
    prefill tile, bf16 out), with 8-bit operands typed `operand` ("u8": their bytes)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dsserve.plugins.triton_kernels.fp8_gemm import UPCAST_SCALE, _fp8_block_gemm

    signature = {"A": f"*{operand}", "AScale": "*fp32", "B": f"*{operand}", "BScale": "*fp32", "C": "*bf16",
                 "Bias": "*bf16", "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32", "stride_asm": "i32",
                 "stride_bn": "i32", "stride_bsn": "i32", "stride_cm": "i32"}
    constexprs = {"SCALE_BN": 128, "BLOCK_K": 128, "BLOCK_M": 64, "BLOCK_N": 128, "UPCAST": upcast,
                  "DOT_SCALE": UPCAST_SCALE[torch.float8_e4m3fn] if upcast else 1.0, "HAS_BIAS": False}
    signature.update({name: "constexpr" for name in constexprs})
    try:
        kernel = triton.compile(ASTSource(_fp8_block_gemm, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": 4, "num_stages": 3})
    except Exception as exc:  # noqa: BLE001 -- what the compiler says is the result
        return {"ok": False, "error": str(exc)[-400:]}
    return {"ok": True, "shared": kernel.metadata.shared}


CASES = {"sm80-bytes-upcast": (80, "u8", True), "sm80-e4m3-pointers": (80, "fp8e4nv", True),
         "sm90-native": (90, "fp8e4nv", False)}


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


if __name__ == "__main__":
    print(json.dumps({name: _compile_fp8_gemm(*args) for name, args in CASES.items()}))
