"""dsserve.plugins.rocm: AMD GPUs through a HIP (ROCm) build of torch.

What it provides:
* the `rocm` device, and when it is unusable, why;
* which GPUs, dtypes and formats the Triton kernels serve: the claims table of ../gpu.py (gfx90a,
  MI200; gfx942 for gfx94x, MI300; bfloat16/float16; docs/gpu.md); anything else goes to the
  reference (float32, gfx950, RDNA and older Instinct GPUs included);
* attention (MLA decode and extend, MHA/GQA decode and extend) and MoE experts (unquantized and FP8
  block-scaled; FP8 experts are converted to e4m3fnuz on gfx94x as the linears are) by the Triton
  kernels shared with cuda (`dsserve.plugins.triton_kernels`); routing by the reference's torch ops;
* linear: FP8 block-scaled GEMMs by the same Triton kernel. On MI300-series GPUs (gfx94x), whose
  8-bit float is e4m3fnuz, the e4m3fn checkpoint weights are converted after loading (same bytes,
  0x80 -> 0, scales doubled, as AMD documents; see fp8.py) and activations are quantized to
  e4m3fnuz; gfx90a keeps e4m3fn and widens the bytes to float16 in the kernel. Unquantized GEMMs are left to the reference (`F.linear`,
  i.e. hipBLASLt);
* collectives: the reference `TorchDistributedCommunicator` over torch.distributed's "nccl" groups,
  which HIP builds of torch implement with RCCL.

Verification: the Triton kernels pass their tests in Triton's interpreter on CPU, e4m3fnuz GEMM
included, and the fnuz conversion is checked bit for bit against the e4m3fn values
(tests/test_triton_kernels.py), and every launch the table claims compiles for gfx90a and gfx942
within their 64 KiB of LDS and without register spills (tests/test_triton_aot.py, Triton's compiler
without a GPU); NOTHING here has run on an AMD GPU yet. A spec the kernels do not handle is answered
None, so the reference serves it.

On HIP builds torch keeps the "cuda" device type and API (torch.cuda.*). Importing this module
imports nothing beyond torch; triton is imported inside the hooks, for the rocm device only.
"""
from __future__ import annotations

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
    device_arch,
    say_once,
    triton_attention,
    triton_kernels,
    triton_moe,
)

__all__ = ["RocmDevice"]

DEVICE_NAME = "rocm"


class RocmDevice(TorchGpuDevice):
    """AMD Instinct/Radeon GPUs; tensors on torch's "cuda" type, process groups over RCCL."""

    name = DEVICE_NAME
    vendor = "AMD"

    def build_problem(self) -> str | None:
        if torch.version.hip:
            return None
        if torch.version.cuda:
            return f"torch {torch.__version__} is a CUDA build; use --device cuda (or install a ROCm build of torch)"
        return f"torch {torch.__version__} is a CPU-only build (install a ROCm build of torch)"

    def is_available(self) -> tuple[bool, str]:
        ok, reason = super().is_available()
        if reason.startswith("no AMD GPU visible"):
            reason += "; check HIP_VISIBLE_DEVICES and access to /dev/kfd"
        return ok, reason

    def describe(self) -> str:
        ok, reason = self.is_available()
        if not ok:
            return f"rocm: unavailable: {reason}"
        index = torch.cuda.current_device()
        arch = device_arch()
        arch = f" ({arch})" if arch else ""
        return (f"rocm: {torch.cuda.get_device_name(index)}{arch}, {torch.cuda.device_count()} visible, "
                f"HIP {torch.version.hip}; bfloat16")


@hookimpl
def dsserve_devices() -> list[Device]:
    return [RocmDevice()]


# ------------------------------------------------------------------------------------ backend hooks


@hookimpl
def dsserve_attention_backend(device: Device, spec: AttentionSpec) -> AttentionBackend | None:
    return triton_attention(DEVICE_NAME, spec)


@hookimpl
def dsserve_moe_backend(device: Device, spec: MoESpec) -> MoEBackend | None:
    return triton_moe(DEVICE_NAME, spec)


@hookimpl
def dsserve_linear_method(device: Device, spec: LinearSpec) -> LinearMethod | None:
    if spec.quant != "fp8_block":
        return None  # unquantized GEMMs: the reference's F.linear is hipBLASLt already
    kernels = triton_kernels(DEVICE_NAME)
    if kernels is None or not kernels.Fp8BlockLinear.supports(spec):
        return None
    unclaimed = claim_problem(Claim("linear", spec.dtype, "fp8_block"))
    if unclaimed:
        say_once(f"rocm: FP8 block GEMMs by the torch reference ({unclaimed})")
        return None
    from .fp8 import uses_fnuz

    arch = device_arch()
    if arch and uses_fnuz(arch):
        from .fp8_linear import Fp8BlockLinearFnuz

        say_once(f"rocm: FP8 block GEMMs by the Triton kernel in e4m3fnuz ({arch})")
        return Fp8BlockLinearFnuz(spec)
    say_once(f"rocm: FP8 block GEMMs by the Triton kernel in e4m3fn ({arch or 'no GPU visible'})")
    return kernels.Fp8BlockLinear(spec)


@hookimpl
def dsserve_communicator(device: Device, group: object, rank: int, world_size: int) -> Communicator | None:
    """torch.distributed collectives over the "nccl" groups, which HIP builds implement with RCCL."""
    return torch_communicator(group, rank, world_size)
