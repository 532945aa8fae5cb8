"""What the cuda and rocm plugins share: torch's "cuda" device API and the Triton kernels.

HIP builds of torch keep the "cuda" device type, torch.cuda.* and the "nccl" backend name (RCCL
behind it), so the device probing and the Triton backend selection are the same for both; each
plugin adds its own libraries (FlashMLA and DeepGEMM, or the e4m3fnuz conversion).
"""
from __future__ import annotations

import logging
import warnings

import torch

from dsserve.core.backends import AttentionBackend, AttentionSpec, Device, MoEBackend, MoESpec

log = logging.getLogger("dsserve.plugins")
_said: set[str] = set()


def say_once(message: str) -> None:
    """Log a backend choice once per process, not once per layer."""
    if message not in _said:
        _said.add(message)
        log.info(message)


class TorchGpuDevice(Device):
    """A GPU reached through torch.cuda; subclasses say which build of torch they need."""

    torch_type = "cuda"
    dist_backend = "nccl"
    priority = 100
    vendor = "GPU"

    def build_problem(self) -> str | None:
        """Why this torch build cannot drive the device, or None."""
        raise NotImplementedError

    def is_available(self) -> tuple[bool, str]:
        problem = self.build_problem()
        if problem:
            return False, problem
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            usable = torch.cuda.is_available()
            count = torch.cuda.device_count() if usable else 0
        if usable and count > 0:
            return True, ""
        # torch warns with the driver's own explanation (driver too old, no device node, ...).
        detail = next((str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()), "")
        if detail:
            return False, f"{self.name} cannot start: {detail}"
        return False, f"no {self.vendor} GPU visible (torch.cuda.device_count() == 0)"

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def memory_info(self) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(torch.cuda.current_device())
        return int(free), int(total)

    def setup(self, local_rank: int = 0, ranks_on_node: int = 1) -> None:
        torch.cuda.set_device(local_rank)


def triton_kernels(device_name: str):
    """The shared Triton kernels, or None (said once) when triton cannot be imported."""
    try:
        import dsserve.plugins.triton_kernels as kernels
    except ImportError as e:
        say_once(f"{device_name}: triton is not importable ({e}); the torch reference serves attention, MoE, FP8")
        return None
    return kernels


def triton_attention(device_name: str, spec: AttentionSpec) -> AttentionBackend | None:
    """The Triton attention backend for spec, or None (said once) when the kernels do not fit it."""
    kernels = triton_kernels(device_name)
    if kernels is None or spec.kind not in ("mla", "mha"):
        return None
    cls = kernels.TritonMLAAttention if spec.kind == "mla" else kernels.TritonMHAAttention
    why = cls.unsupported(spec)
    if why:
        say_once(f"{device_name}: {spec.kind} attention by the torch reference (Triton kernels: {why})")
        return None
    return cls(spec)


def triton_moe(device_name: str, spec: MoESpec) -> MoEBackend | None:
    kernels = triton_kernels(device_name)
    if kernels is None:
        return None
    why = kernels.TritonMoE.unsupported(spec)
    if why:
        say_once(f"{device_name}: MoE experts by the torch reference (Triton fused MoE: {why})")
        return None
    return kernels.TritonMoE(spec)

