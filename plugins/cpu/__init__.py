"""dsserve.plugins.cpu: the host CPU.

Provides the `cpu` device (threads from the cores this process may use, float32 or bfloat16 by the
CPU's bf16 units, memory from /proc/meminfo) and answers every backend hook for it.

Linear layers run through oneDNN (`onednn.py`: faster than MKL for decoding's skinny GEMMs); attention,
MoE and collectives are the core's torch-native reference implementations, the best CPU code dsserve
has for them today (a padded all-expert bmm and oneDNN expert GEMMs were measured and were slower).
Further CPU kernels (INT8 through torch._int_mm, IPEX/AMX) replace them here, one hook at a time,
without touching the core. A spec this module
does not name (a quantization scheme, say) is answered None, so the reference decides for itself.
"""
from __future__ import annotations

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

from .device import CpuDevice

__all__ = ["CpuDevice"]

DEVICE_NAME = CpuDevice.name


@hookimpl
def dsserve_devices() -> list[Device]:
    return [CpuDevice()]


@hookimpl
def dsserve_attention_backend(device: Device, spec: AttentionSpec) -> AttentionBackend | None:
    from dsserve.core.reference import ReferenceMHAAttention, ReferenceMLAAttention

    if spec.kind == "mla":
        return ReferenceMLAAttention(spec)
    if spec.kind == "mha":
        return ReferenceMHAAttention(spec)
    return None


@hookimpl
def dsserve_moe_backend(device: Device, spec: MoESpec) -> MoEBackend | None:
    if spec.quant != "none":
        return None
    from dsserve.core.reference import ReferenceMoE

    return ReferenceMoE(spec)


@hookimpl
def dsserve_linear_method(device: Device, spec: LinearSpec) -> LinearMethod | None:
    if spec.quant != "none":
        return None
    from .onednn import OneDnnLinear

    return OneDnnLinear(spec)


@hookimpl
def dsserve_communicator(device: Device, group: object, rank: int, world_size: int) -> Communicator | None:
    """torch.distributed collectives over gloo groups."""
    from dsserve.core.reference import torch_communicator

    return torch_communicator(group, rank, world_size)
