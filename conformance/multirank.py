"""The worker processes of the multi-rank communicator check.

Each worker rebuilds the registry with the picklable factory it is given, joins a process group over
the device's `dist_backend`, asks the `dsserve_communicator` hook for its rank's communicator and
checks every collective against values it can compute itself (every rank knows every rank's input).
It writes its findings as JSON; the parent test turns them into the case's result.
"""
from __future__ import annotations

import json
import socket
import traceback
from datetime import timedelta
from pathlib import Path

import torch

WORLD_SIZE = 2
SHAPE = (3, 5, 4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_input(rank: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(*SHAPE, generator=gen, dtype=torch.float64).to(dtype)


def _same(got: object, want: torch.Tensor) -> bool:
    return (isinstance(got, torch.Tensor) and tuple(got.shape) == tuple(want.shape) and got.dtype == want.dtype
            and torch.equal(got.detach().to(want.device), want))


def check_collectives(comm, rank: int, dtype: torch.dtype, dev: torch.device) -> list[str]:
    problems = []
    inputs = [rank_input(r, dtype) for r in range(WORLD_SIZE)]
    mine = inputs[rank]
    if getattr(comm, "rank", None) != rank or getattr(comm, "world_size", None) != WORLD_SIZE:
        problems.append(f"rank {rank}: communicator says rank={getattr(comm, 'rank', None)} "
                        f"world_size={getattr(comm, 'world_size', None)}")
    # Two addends: the correctly rounded sum is the same whatever order or width the backend uses.
    want = (inputs[0].double() + inputs[1].double()).to(dtype)
    got = comm.all_reduce(mine.clone().to(dev))
    if not _same(got, want):
        problems.append(f"rank {rank}: all_reduce differs from the sum of the ranks' tensors")
    for dim in (0, 1, -1):
        got = comm.all_gather(mine.clone().to(dev), dim=dim)
        if not _same(got, torch.cat(inputs, dim=dim)):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            problems.append(f"rank {rank}: all_gather(dim={dim}) returned {shape}, not the ranks' "
                            f"tensors concatenated in rank order")
    src = WORLD_SIZE - 1
    x = mine.clone().to(dev)
    got = comm.broadcast(x, src=src)
    if not _same(got, inputs[src]) or not _same(x, inputs[src]):
        problems.append(f"rank {rank}: broadcast(src={src}) did not leave rank {src}'s tensor in place")
    return problems


def worker(rank: int, port: int, device_name: str, registry_factory, dtype_names: list[str], out_dir: str,
           host_threads: int | None = 1) -> None:
    import torch.distributed as dist

    result: dict = {"rank": rank, "cases": {}}
    try:
        registry = registry_factory()
        device = registry.select_device(device_name)
        device.setup(rank)
        if host_threads:
            torch.set_num_threads(host_threads)
        dev = device.torch_device(rank)
        dist.init_process_group(device.dist_backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
        try:
            for name in dtype_names:
                dtype = getattr(torch, name)
                entry = {"implementation": "", "problems": []}
                result["cases"][name] = entry
                try:
                    comm = registry.communicator(device, None, rank, WORLD_SIZE)
                    cls = type(comm)
                    entry["implementation"] = f"{cls.__module__}.{cls.__qualname__}"
                    entry["problems"] = check_collectives(comm, rank, dtype, dev)
                except Exception as exc:  # the implementation under test raised
                    entry["problems"].append(f"rank {rank}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
        finally:
            dist.destroy_process_group()
    except Exception:
        result["setup_error"] = traceback.format_exc(limit=4)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
