"""The torch-native reference plugin: answers every backend hook last, for any device.

It is what a device falls back to for an op its plugin does not serve, and the oracle the
conformance suite checks plugins against. It provides no device of its own.
"""
from __future__ import annotations

from ..backends import AttentionSpec, Device, LinearSpec, MoESpec
from ..hookspecs import hookimpl
from ..quant import FORMATS
from .attention import ReferenceMHAAttention, ReferenceMLAAttention, from_cache, to_cache, write_cache
from .communicator import SingleProcessCommunicator, TorchDistributedCommunicator, torch_communicator
from .layer_ops import ReferenceLayerOps
from .linear import UnquantizedLinear
from .moe import ReferenceMoE, select_experts
from .quant_linear import QuantizedWeights, ReferenceQuantizedLinear

__all__ = [
    "ReferenceMHAAttention",
    "ReferenceMLAAttention",
    "ReferenceLayerOps",
    "ReferenceMoE",
    "QuantizedWeights",
    "ReferenceQuantizedLinear",
    "SingleProcessCommunicator",
    "TorchDistributedCommunicator",
    "torch_communicator",
    "UnquantizedLinear",
    "from_cache",
    "select_experts",
    "to_cache",
    "write_cache",
]


@hookimpl(trylast=True)
def dsserve_attention_backend(device: Device, spec: AttentionSpec):
    if spec.kind == "mla":
        return ReferenceMLAAttention(spec)
    if spec.kind == "mha":
        return ReferenceMHAAttention(spec)
    return None


@hookimpl(trylast=True)
def dsserve_moe_backend(device: Device, spec: MoESpec):
    return ReferenceMoE(spec) if spec.quant == "none" or spec.quant in FORMATS else None


@hookimpl(trylast=True)
def dsserve_linear_method(device: Device, spec: LinearSpec):
    if spec.quant == "none":
        return UnquantizedLinear(spec)
    return ReferenceQuantizedLinear(spec) if spec.quant in FORMATS else None


@hookimpl(trylast=True)
def dsserve_layer_ops(device: Device):
    return ReferenceLayerOps()


@hookimpl(trylast=True)
def dsserve_communicator(device: Device, group: object, rank: int, world_size: int):
    return torch_communicator(group, rank, world_size)
