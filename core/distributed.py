"""Which rank a model worker is, and joining its torch.distributed group.

One worker process per tensor-parallel rank; the engine (scheduler, HTTP) stays outside them and
sends every rank the same step. The process group's backend is the device's (`Device.dist_backend`:
gloo on CPUs, NCCL/RCCL on GPUs, HCCL on Ascend); collectives go through the device's
`dsserve_communicator` hook.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600


@dataclass(frozen=True)
class RankInfo:
    """A worker's place among the ranks of one model."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0          # its index among the ranks on this node
    ranks_on_node: int = 1
    init_method: str | None = None   # "tcp://HOST:PORT" of the rendezvous; None for a single rank
    timeout_s: float = DEFAULT_TIMEOUT_S

    def join(self, backend: str) -> None:
        """Join the default process group (a single rank joins none)."""
        if self.world_size == 1:
            return
        dist.init_process_group(backend, init_method=self.init_method, rank=self.rank, world_size=self.world_size,
                                timeout=timedelta(seconds=self.timeout_s))

    def leave(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def free_local_address() -> str:
    """tcp://127.0.0.1:PORT with a port free at the time of asking (single-node rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"
