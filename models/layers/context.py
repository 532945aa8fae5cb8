"""LayerContext: what every layer needs to build itself (device, plugins, dtype, parallel rank)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsserve.core.backends import (
    AttentionBackend,
    AttentionSpec,
    Communicator,
    Device,
    LayerOps,
    MoEBackend,
    MoESpec,
)
from dsserve.core.plugins import PluginRegistry
from dsserve.core.quant import QuantConfig


@dataclass
class LayerContext:
    """What every layer needs to build itself: the device, its plugins, dtype and parallel rank."""

    device: Device
    registry: PluginRegistry
    dtype: torch.dtype
    torch_device: torch.device
    comm: Communicator
    quant: QuantConfig = field(default_factory=QuantConfig)  # how linears and experts are stored
    page_size: int | None = None
    kv_cache_dtype: torch.dtype | None = None  # None: the compute dtype (`cache_dtype`)
    expert_parallel: bool = False  # routed experts split by expert over the tensor-parallel ranks
    batch_invariant: bool = False  # --enable-deterministic-inference: the specs ask for it (LinearSpec, MoESpec)
    _attention: dict = field(default_factory=dict)
    _ops: LayerOps | None = None

    @property
    def cache_dtype(self) -> torch.dtype:
        """The KV cache's dtype, which attention specs carry (an fp8 cache halves a bf16 one)."""
        return self.kv_cache_dtype or self.dtype

    @property
    def tp_rank(self) -> int:
        return self.comm.rank

    @property
    def tp_size(self) -> int:
        return self.comm.world_size

    def attention_backend(self, spec: AttentionSpec) -> AttentionBackend:
        """One backend per distinct spec, shared by all layers with that spec."""
        if spec not in self._attention:
            self._attention[spec] = self.registry.attention_backend(self.device, spec)
        return self._attention[spec]

    def attention_backends(self) -> list[AttentionBackend]:
        return list(self._attention.values())

    @property
    def ops(self) -> LayerOps:
        """The device's RMSNorm and rotary embedding, one instance for every layer."""
        if self._ops is None:
            self._ops = self.registry.layer_ops(self.device)
        return self._ops

    def moe_backend(self, spec: MoESpec) -> MoEBackend:
        return self.registry.moe_backend(self.device, spec)

    def shard(self, size: int, what: str) -> int:
        if size % self.tp_size:
            raise ValueError(f"{what} ({size}) is not divisible by the tensor-parallel size {self.tp_size}")
        return size // self.tp_size
