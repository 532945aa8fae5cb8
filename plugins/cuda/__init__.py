"""dsserve.plugins.cuda: NVIDIA GPUs through a CUDA build of torch.

What it provides:
* the `cuda` device, and when it is unusable, why (driver, CPU-only torch, no GPU visible);
* which GPUs, dtypes and formats the Triton kernels serve: the claims table of ../gpu.py (sm_80 for
  compute capability 8.x, sm_90 for 9.x; bfloat16/float16; docs/gpu.md); anything else goes to the
  reference (float32, Blackwell and older GPUs included);
* attention: MLA decode by FlashMLA when `flash_mla` is importable, the claims table lists it for the
  GPU (sm_90) and the spec fits it (bfloat16/float16 cache, 512+64 latent, page size 64); otherwise,
  and for extend, the shared Triton kernels (`dsserve.plugins.triton_kernels`); MHA/GQA by the
  Triton kernels;
* MoE: the Triton fused-MoE kernel (unquantized and FP8 block-scaled experts, W8A8 like the linears;
  other formats by the reference); routing by the reference's torch ops;
* linear: FP8 block-scaled GEMMs by DeepGEMM when `deep_gemm` is importable, the claims table lists
  it for the GPU (sm_90) and the call is bfloat16 with 128x128 blocks; otherwise the Triton FP8
  kernel (8-bit operands into tl.dot on sm_90, their bytes widened to float16 on sm_80, as the table
  says). Unquantized GEMMs are left to the reference (`F.linear`, i.e. cuBLAS);
* collectives: the reference `TorchDistributedCommunicator` over torch.distributed's NCCL groups.
Which accelerated library is used, or why it is not, is logged once per choice.

Verification: the Triton kernels pass their tests in Triton's interpreter on CPU
(tests/test_triton_kernels.py), and every launch the table claims compiles for sm_80 and sm_90 within
their shared memory and without register spills (tests/test_triton_aot.py, Triton's compiler without
a GPU); NOTHING in this plugin has run on an NVIDIA GPU yet, and the
FlashMLA / DeepGEMM paths (flashmla.py, deepgemm.py) are written from those libraries' documented
APIs only. A spec the kernels do not handle is answered None, so the reference serves it.

Importing this module imports nothing beyond torch; CUDA is probed only inside the device methods,
and triton, flash_mla and deep_gemm are imported inside the hooks, for the cuda device only.
"""
from __future__ import annotations

import importlib.util

import torch

from dsserve.core.backends import (
    AttentionBackend,
    AttentionSpec,
    Communicator,
    Device,
    LinearMethod,
    LinearSpec,
    MoEBackend,
    MoESpec,
)
from dsserve.core.hookspecs import hookimpl
from dsserve.core.reference import torch_communicator

from ..gpu import (
    Claim,
    TorchGpuDevice,
    claim_problem,
    library_problem,
    say_once,
    triton_attention,
    triton_kernels,
    triton_moe,
)

__all__ = ["CudaDevice"]

DEVICE_NAME = "cuda"


class CudaDevice(TorchGpuDevice):
    """NVIDIA GPUs; tensors on torch's "cuda" type, process groups over NCCL."""

    name = DEVICE_NAME
    vendor = "NVIDIA"

    def build_problem(self) -> str | None:
        if torch.version.hip:
            return "this torch is a HIP (ROCm) build; use --device rocm"
        if not torch.version.cuda:
            return f"torch {torch.__version__} is a CPU-only build (install a CUDA build of torch)"
        return None

    def describe(self) -> str:
        ok, reason = self.is_available()
        if not ok:
            return f"cuda: unavailable: {reason}"
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return (f"cuda: {torch.cuda.get_device_name(index)} (sm_{major}{minor}), "
                f"{torch.cuda.device_count()} visible, CUDA {torch.version.cuda}; bfloat16")


@hookimpl
def dsserve_devices() -> list[Device]:
    return [CudaDevice()]


# ------------------------------------------------------------------------------------ backend hooks


def _flashmla_unusable(spec: AttentionSpec) -> str | None:
    from .flashmla import unsupported

    reason = unsupported(spec)
    if reason:
        return reason
    if importlib.util.find_spec("flash_mla") is None:
        return "flash_mla is not installed"
    return library_problem("flash_mla")


def _deepgemm_unusable(spec: LinearSpec) -> str | None:
    if importlib.util.find_spec("deep_gemm") is None:
        return "deep_gemm is not installed"
    reason = library_problem("deep_gemm")
    if reason:
        return reason
    if spec.weight_block_size not in (None, (128, 128)):
        return f"weight block {spec.weight_block_size}"
    return None


@hookimpl
def dsserve_attention_backend(device: Device, spec: AttentionSpec) -> AttentionBackend | None:
    if spec.kind == "mla":
        reason = _flashmla_unusable(spec)
        if reason is None:
            try:
                from .flashmla import FlashMLAAttention

                backend = FlashMLAAttention(spec)
                say_once("cuda: MLA decode by FlashMLA; extend by the Triton kernels")
                return backend
            except Exception as e:  # noqa: BLE001 -- an installed but broken build: fall back, say so
                reason = f"flash_mla failed to load ({type(e).__name__}: {e})"
        say_once(f"cuda: FlashMLA not used for MLA decode: {reason}")
    return triton_attention(DEVICE_NAME, spec)


@hookimpl
def dsserve_moe_backend(device: Device, spec: MoESpec) -> MoEBackend | None:
    return triton_moe(DEVICE_NAME, spec)


@hookimpl
def dsserve_linear_method(device: Device, spec: LinearSpec) -> LinearMethod | None:
    if spec.quant != "fp8_block":
        return None  # unquantized GEMMs: the reference's F.linear is cuBLAS already
    kernels = triton_kernels(DEVICE_NAME)
    if kernels is None or not kernels.Fp8BlockLinear.supports(spec):
        return None
    unclaimed = claim_problem(Claim("linear", spec.dtype, "fp8_block"))
    if unclaimed:
        say_once(f"cuda: FP8 block GEMMs by the torch reference ({unclaimed})")
        return None
    reason = _deepgemm_unusable(spec)
    if reason is None:
        try:
            from .deepgemm import DeepGemmFp8Linear

            method = DeepGemmFp8Linear(spec)
            say_once("cuda: FP8 block GEMMs by DeepGEMM (bfloat16, 128x128 blocks), else the Triton kernel")
            return method
        except Exception as e:  # noqa: BLE001 -- as above
            reason = f"deep_gemm failed to load ({type(e).__name__}: {e})"
    say_once(f"cuda: FP8 block GEMMs by the Triton kernel (DeepGEMM not used: {reason})")
    return kernels.Fp8BlockLinear(spec)


@hookimpl
def dsserve_communicator(device: Device, group: object, rank: int, world_size: int) -> Communicator | None:
    """torch.distributed collectives over NCCL groups."""
    return torch_communicator(group, rank, world_size)
