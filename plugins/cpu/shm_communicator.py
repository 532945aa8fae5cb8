"""All-reduce and all-gather for tensor-parallel ranks on one host, through shared memory.

gloo's all-reduce of a decode step's small tensors costs hundreds of microseconds; a tp=2 decode on
the bench model spent 64% of its time in collectives (benchmarks/tp_scaling.py). Here each rank
copies its tensor into its own slot of a segment every rank maps, publishes a generation number
after it, spins until every rank's number has arrived, and reduces all slots itself, in rank order
(so every rank computes the same sum). Two sets of slots alternate: a rank can only reuse a set
once every rank has published into the other one, which each does only after reading this one.

Ordering relies on x86's total store order: a rank's data stores are visible to the others before
its generation number is. Tensors larger than a slot, and broadcasts, go through gloo.
"""
from __future__ import annotations

import socket
import time
from multiprocessing import resource_tracker, shared_memory

import torch
import torch.distributed as dist

from dsserve.core.reference import TorchDistributedCommunicator

SLOT_BYTES = 8 << 20
_FLAGS = 64   # bytes reserved per rank for its two generation numbers (a cache line of its own)
_TIMEOUT_S = 600.0


def on_one_host(group: object) -> bool:
    """Whether every rank of the group runs on this host (asked of every rank, collectively)."""
    names: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(names, socket.gethostname(), group=group)
    return len(set(names)) == 1


class SharedMemoryCommunicator(TorchDistributedCommunicator):
    def __init__(self, rank: int, world_size: int, group: object = None):
        super().__init__(rank=rank, world_size=world_size, group=group)
        size = world_size * _FLAGS + 2 * world_size * SLOT_BYTES
        name = [None]
        if rank == 0:
            self._shm = shared_memory.SharedMemory(create=True, size=size)
            name[0] = self._shm.name
        dist.broadcast_object_list(name, src=0, group=group)
        if rank != 0:
            self._shm = shared_memory.SharedMemory(name=name[0])
            # Python < 3.13 registers an attached segment with this process's resource tracker too,
            # which would try to unlink it again at exit: rank 0 owns it.
            resource_tracker.unregister(self._shm._name, "shared_memory")
        dist.barrier(group=group)
        if rank == 0:
            self._shm.unlink()   # every rank has it mapped: it goes away with the last of them
        raw = torch.frombuffer(self._shm.buf, dtype=torch.uint8)
        self._flags = raw[: world_size * _FLAGS].view(torch.int64).view(world_size, _FLAGS // 8)[:, :2]
        self._slots = raw[world_size * _FLAGS:].view(2, world_size, SLOT_BYTES)
        self._generation = 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        slots = self._exchange(x)
        if slots is None:
            return super().all_reduce(x)
        total = slots.sum(dim=0, dtype=torch.float32) if x.dtype in (torch.bfloat16, torch.float16) else slots.sum(0)
        x.copy_(total.view(x.shape))
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        slots = self._exchange(x)
        if slots is None:
            return super().all_gather(x, dim)
        parts = slots.view(self.world_size, *x.shape)
        return torch.cat(list(parts.unbind(0)), dim=dim)

    def _exchange(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every rank's x as a [world, numel] view of the slots (in x's dtype), or None for a tensor
        that does not fit a slot."""
        nbytes = x.numel() * x.element_size()
        if nbytes > SLOT_BYTES or x.device.type != "cpu":
            return None
        self._generation += 1
        g, parity = self._generation, self._generation & 1
        slots = self._slots[parity, :, :nbytes].view(x.dtype)
        slots[self.rank].copy_(x.reshape(-1))
        self._flags[self.rank, parity] = g
        column = self._flags[:, parity]
        spins, deadline = 0, None
        while not bool((column == g).all()):
            spins += 1
            if spins % 4096 == 0:
                deadline = deadline or time.monotonic() + _TIMEOUT_S
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rank {self.rank}: a peer did not reach collective {g} within {_TIMEOUT_S:.0f} s")
        return slots
