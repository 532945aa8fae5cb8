"""dsserve.plugins.cpu: the host CPU.

Provides the `cpu` device (threads from the cores this process may use, float32 or bfloat16 by the
CPU's bf16 units, memory from /proc/meminfo) and answers every backend hook for it.

Linear layers run through the C++ block GEMM on weights packed at load (`linear.py`; AMX tiles on
CPUs that have them, csrc/amx.h), or through oneDNN on weights reordered once at load
(`onednn.py`) for shapes the packing cannot hold. Routed experts run
through the C++ fused-MoE kernel (`moe.py`, `csrc/fused_moe.cpp`: one call per layer, weights packed
at load, routing in one more call, `csrc/routing.cpp`, AVX-512-BF16 / AVX-512 / AVX2 variants picked from the CPU's flags by `native.py`, compiled
on first use); where it cannot be built, or for a spec it does not serve, the reference does.
Quantized checkpoints keep their bytes: int8 W8A8 linear layers and experts (int8_channel,
int8_block) run through the C++ int8 kernels (`int8_linear.py`, csrc/int8_linear.cpp and
fused_moe.cpp: activations quantized in the call as the reference rounds them, vpdpbusd on
AVX512-VNNI CPUs, tdpbusd tiles on AMX-INT8 ones, int16 vpmaddwd on AVX2), and FP8 weight-only ones (fp8_block, DeepSeek-V3/R1) through
the e4m3-widening kernels (`fp8_linear.py`, csrc/fp8_gemm.h: to bfloat16 for vdpbf16ps, or to float32
for FMAs without AVX512-BF16). RMSNorm with its residual add and rotary embedding run one C++
call each (`layer_ops.py`). MHA/GQA attention runs on torch's SDPA kernels with decode kept in the
cache's half dtype (`CpuMHAAttention`). AWQ, 8-bit caches and collectives are the core's torch-native
reference implementations for now: a spec this module does not serve is answered None, so the reference
decides for itself.
"""
from __future__ import annotations

import logging

from dsserve.core.backends import (
    AttentionBackend,
    AttentionSpec,
    Communicator,
    Device,
    LayerOps,
    LinearMethod,
    LinearSpec,
    MoEBackend,
    MoESpec,
)
from dsserve.core.hookspecs import hookimpl

from .device import CpuDevice

__all__ = ["CpuDevice"]

DEVICE_NAME = CpuDevice.name
_said: set[str] = set()


@hookimpl
def dsserve_devices() -> list[Device]:
    return [CpuDevice()]


@hookimpl
def dsserve_attention_backend(device: Device, spec: AttentionSpec) -> AttentionBackend | None:
    from dsserve.core.reference import ReferenceMHAAttention, ReferenceMLAAttention

    from . import native
    from .attention import CpuMHAAttention, CpuMLAAttention, unsupported

    kernels = native.kernels()
    reason = unsupported(spec)
    if kernels is not None and reason is None:
        return CpuMLAAttention(spec, kernels, native.isa())
    if kernels is not None and spec.kind == "mla" and spec.fp8_cache and reason not in _said:
        _said.add(reason)  # once per process, not per layer: the start-up log says who serves the cache
        logging.getLogger("dsserve").info("cpu: MLA attention by the torch reference (%s)", reason)
    if spec.kind == "mla":
        return ReferenceMLAAttention(spec)
    if spec.kind == "mha" and not spec.fp8_cache:
        return CpuMHAAttention(spec)
    if spec.kind == "mha":
        return ReferenceMHAAttention(spec)
    return None


@hookimpl
def dsserve_moe_backend(device: Device, spec: MoESpec) -> MoEBackend | None:
    from . import native
    from .moe import CpuFp8MoE, CpuFusedMoE, CpuInt8MoE, unsupported

    kernels, reason = native.kernels(), unsupported(spec)
    if kernels is not None and reason is None and spec.quant == "none":
        return CpuFusedMoE(spec, kernels, native.isa())
    if kernels is not None and reason is None and spec.quant == "fp8_block":
        return CpuFp8MoE(spec, kernels, native.isa(), native.fp8_vbmi())
    if kernels is not None and reason is None and native.int8_isa() is not None:
        return CpuInt8MoE(spec, kernels, native.int8_isa())
    if spec.quant != "none":
        return None  # the reference decides for itself
    from dsserve.core.reference import ReferenceMoE

    return ReferenceMoE(spec)


@hookimpl
def dsserve_linear_method(device: Device, spec: LinearSpec) -> LinearMethod | None:
    if spec.quant != "none":
        return _quantized_linear(spec)
    from . import native, onednn
    from .device import cpu_flags
    from .linear import CpuPackedLinear, served

    kernels = native.kernels()
    if kernels is not None and served(spec):
        return CpuPackedLinear(spec, kernels, native.isa())
    if onednn.serves(spec.dtype, cpu_flags()) and not spec.batch_invariant:
        return onednn.OneDnnLinear(spec)
    from dsserve.core.reference import UnquantizedLinear

    return UnquantizedLinear(spec)


def _quantized_linear(spec: LinearSpec) -> LinearMethod | None:
    """int8 W8A8 formats through the C++ VNNI/AVX2 kernel, fp8_block weight-only through the e4m3-widening
    kernel; the others (and unbuildable kernels) to the reference."""
    from . import fp8_linear, int8_linear, native

    kernels, isa = native.kernels(), native.int8_isa()
    if kernels is not None and isa is not None and int8_linear.unsupported(spec) is None:
        return int8_linear.CpuInt8Linear(spec, kernels, isa)
    if kernels is not None and fp8_linear.unsupported(spec) is None:
        return fp8_linear.CpuFp8Linear(spec, kernels, native.isa(), native.fp8_vbmi())
    return None


@hookimpl
def dsserve_layer_ops(device: Device) -> LayerOps | None:
    from . import native
    from .layer_ops import CpuLayerOps

    kernels = native.kernels()
    return CpuLayerOps(kernels) if kernels is not None else None


@hookimpl
def dsserve_communicator(device: Device, group: object, rank: int, world_size: int) -> Communicator | None:
    """Ranks on one host: all-reduce and all-gather through shared memory (gloo for what does not
    fit its slots); across hosts, torch.distributed over gloo."""
    from dsserve.core.reference import torch_communicator

    from .shm_communicator import SharedMemoryCommunicator, on_one_host

    if world_size > 1 and on_one_host(group):
        return SharedMemoryCommunicator(rank, world_size, group)
    return torch_communicator(group, rank, world_size)
