"""Which rank a model worker is, and joining its torch.distributed group.

One worker process per tensor-parallel rank; the engine (scheduler, HTTP) stays outside them. On
one node it sends every rank the same step; across nodes (`relayed`) it sends rank 0 the step and
rank 0 broadcasts it to every other rank over a gloo group (torch.distributed is the transport).
The process group's backend is the device's (`Device.dist_backend`: gloo on CPUs, NCCL/RCCL on GPUs,
HCCL on Ascend); collectives go through the device's `dsserve_communicator` hook.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600
# The gloo group rank 0 relays the engine's messages over (one model, so one group, per process).
_relay_group = None


@dataclass(frozen=True)
class RankInfo:
    """A worker's place among the ranks of one model."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0          # its index among the ranks on this node
    ranks_on_node: int = 1
    init_method: str | None = None   # "tcp://HOST:PORT" of the rendezvous; None for a single rank
    timeout_s: float = DEFAULT_TIMEOUT_S
    relayed: bool = False        # the ranks span nodes: only rank 0 hears the engine (see `relay`)

    def join(self, backend: str) -> None:
        """Join the default process group (a single rank joins none)."""
        if self.world_size == 1:
            return
        try:
            dist.init_process_group(backend, init_method=self.init_method, rank=self.rank,
                                    world_size=self.world_size, timeout=timedelta(seconds=self.timeout_s))
        except Exception as e:  # a peer that never came: say where and who waited
            raise RuntimeError(f"rank {self.rank} of {self.world_size}: the rendezvous at {self.init_method} did not "
                               f"complete within {self.timeout_s:g} s ({type(e).__name__}: {e})") from None
        if self.relayed:
            global _relay_group
            _relay_group = dist.new_group(backend="gloo")

    def relay(self, message=None):
        """Rank 0 sends `message` to every rank; every rank returns it (the others pass None)."""
        box = [message]
        dist.broadcast_object_list(box, src=0, group=_relay_group)
        return box[0]

    def leave(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def free_local_address() -> str:
    """tcp://127.0.0.1:PORT with a port free at the time of asking (single-node rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"
