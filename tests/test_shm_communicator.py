"""The cpu plugin's shared-memory communicator over 3 ranks on this host (gloo for the rendezvous):
sums and gathers equal the exact ones for many collectives in a row (both sets of slots reused many
times), in float32 and bfloat16, for tensors that fit a slot and for larger ones (which go through
gloo), and every rank gets the same bits."""
from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 3
SLOT = 4096   # bytes: small slots, so that the larger tensors below take the gloo path


def _rank(rank: int, port: int, out: str) -> None:
    from dsserve.plugins.cpu import shm_communicator

    torch.set_num_threads(1)
    shm_communicator.SLOT_BYTES = SLOT
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    comm = shm_communicator.SharedMemoryCommunicator(rank, WORLD)
    problems, digests = [], []
    for i in range(12):
        dtype = torch.float32 if i % 2 else torch.bfloat16
        n = (7, 100, 900, 1500)[i % 4] * (1 + i // 4)       # 4-byte floats: up to and past a 4096-byte slot
        parts = [torch.randn(n, generator=torch.Generator().manual_seed(100 * i + r)) for r in range(WORLD)]
        mine = parts[rank].to(dtype)
        want = sum(p.to(dtype).double() for p in parts)
        got = comm.all_reduce(mine.clone())
        bound = 1e-5 if dtype == torch.float32 else 2e-2 * want.abs().max().item()
        if got.dtype != dtype or (got.double() - want).abs().max().item() > bound:
            problems.append(f"all_reduce {i}: {dtype}, {n}")
        x = mine.view(1, -1).expand(2, -1).contiguous()
        gathered = comm.all_gather(x, dim=-1)
        if not torch.equal(gathered, torch.cat([p.to(dtype).view(1, -1).expand(2, -1) for p in parts], dim=-1)):
            problems.append(f"all_gather {i}: {dtype}, {n}")
        digests.append(got.double().sum().item())
    Path(out, f"{rank}.json").write_text(json.dumps({"problems": problems, "digests": digests}))
    dist.destroy_process_group()


def test_shared_memory_collectives_match_exact_sums_and_gathers(tmp_path):
    from dsserve.core.distributed import free_local_address

    port = int(free_local_address().rsplit(":", 1)[1])
    mp.start_processes(_rank, args=(port, str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(WORLD)]
    assert all(not r["problems"] for r in results), [r["problems"] for r in results]
    assert results[0]["digests"] == results[1]["digests"] == results[2]["digests"]   # the same bits everywhere
