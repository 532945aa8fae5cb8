"""The communicator hook: single-rank identities on the device, and the collectives over two ranks in
two worker processes where the device can host them (see `multirank.py`).

What counts as the device's own: a case whose communicator class is not the core's reference. The
single-rank case is skipped as "reference" when the answer is the reference's identity (like any op).
The two-rank case runs whatever the class: it checks the collectives against values every rank
computes itself (not against the reference), and so exercises the torch.distributed backend the
device names (`Device.dist_backend`), which a model on several ranks needs. But with the reference's
TorchDistributedCommunicator it counts as the reference's, not the device's: that backend is a name
in the device's description, not an implementation of it, and counting it would let a device pass
with nothing of its own checked.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from dsserve.conformance import multirank
from dsserve.conformance.harness import (
    DTYPES,
    HOST,
    Context,
    Guarded,
    class_path,
    dtype_name,
    one_line,
)
from dsserve.core.backends import Communicator


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_single_rank(ctx: Context, make_case, dtype):
    dt = DTYPES[dtype]
    case = make_case("communicator", f"communicator world_size=1 dtype={dtype}")
    case.note_dtype(dt)
    comm = case.serve(ctx, "communicator", expect=Communicator, group=None, rank=0, world_size=1)
    if comm.rank != 0 or comm.world_size != 1:
        case.fail(f"the communicator says rank={comm.rank} world_size={comm.world_size}, asked for 0 of 1")
    gen = torch.Generator().manual_seed(case.seed)
    values = torch.randn(4, 6, 3, generator=gen, dtype=torch.float64).to(dt)
    for what, call in (("all_reduce", lambda x: comm.all_reduce(x)),
                       ("all_gather(dim=-1)", lambda x: comm.all_gather(x, dim=-1)),
                       ("all_gather(dim=0)", lambda x: comm.all_gather(x, dim=0)),
                       ("broadcast(src=0)", lambda x: comm.broadcast(x, src=0))):
        g = Guarded("x", values, dt, ctx.torch_device)
        with case.calling(what):
            out = call(g.tensor)
        ok = case.check_tensor(what, out, tuple(values.shape), dt, ctx.torch_device)
        if ok and not torch.equal(out.to(HOST), values):
            case.fail(f"{what} over one rank is not the identity")
        g.check(case, in_place=not what.startswith("all_gather"))
    x = Guarded("x", values, dt, ctx.torch_device).tensor
    case.timed(lambda: comm.all_reduce(x), None, ctx.torch_device)
    case.done()


def multi_rank_obstacle(ctx: Context) -> str | None:
    """Why two ranks cannot run here, or None."""
    import torch.distributed as dist

    if ctx.registry_factory is None:
        return ("the registry was given in-process without a registry_factory, so worker processes "
                "cannot rebuild it")
    if not dist.is_available():
        return "this torch build has no torch.distributed"
    backend = ctx.device.dist_backend
    try:
        if not dist.is_backend_available(backend):
            return f"torch.distributed has no '{backend}' backend in this build"
    except Exception as exc:
        return f"cannot tell whether torch.distributed has the '{backend}' backend: {one_line(exc)}"
    if torch.empty(0, device=ctx.torch_device).device.type == HOST.type:
        return None  # host memory: any number of processes can share the device
    module = getattr(torch, ctx.torch_device.type, None)
    count = module.device_count() if module is not None and hasattr(module, "device_count") else 0
    if count < multirank.WORLD_SIZE:
        return f"{multirank.WORLD_SIZE} ranks need {multirank.WORLD_SIZE} devices; {count} visible"
    return None


def test_two_ranks(ctx: Context, make_case):
    names = list(DTYPES)
    case = make_case("communicator", f"communicator world_size={multirank.WORLD_SIZE} "
                                     f"dtypes={','.join(names)}")
    obstacle = multi_rank_obstacle(ctx)
    if obstacle:
        case.skip(f"not run: {obstacle}")
    # Asking the hook needs no process group for the answer's type (for the table, should the workers
    # fail); where a plugin needs one to answer at all, the workers find out.
    try:
        case.props["implementation"] = class_path(ctx.registry.communicator(ctx.device, None, 0,
                                                                            multirank.WORLD_SIZE))
    except Exception:
        pass

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="dsserve-conformance-") as out_dir:
        args = (multirank.free_port(), ctx.device.name, ctx.registry_factory, names, out_dir, ctx.host_threads)
        try:
            mp.start_processes(multirank.worker, args=args, nprocs=multirank.WORLD_SIZE, join=True,
                               start_method="spawn")
        except Exception as exc:
            case.fail(f"the worker processes failed: {one_line(exc)[:400]}")
            case.done()
        results = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(multirank.WORLD_SIZE)]
    for r in results:
        if "setup_error" in r:
            case.fail(f"rank {r['rank']} could not set up: {one_line(r['setup_error'])[-400:]}")
    if case.problems:
        case.done()
    entries = {name: [r["cases"].get(name, {}) for r in results] for name in names}
    impl = next((e.get("implementation") for es in entries.values() for e in es if e.get("implementation")), "")
    case.props["implementation"] = impl or case.props["implementation"]
    # what the ranks ran: the device's own only if a class is not the reference's (see the docstring)
    case.props["served_by"] = sorted({e["implementation"] for es in entries.values() for e in es
                                      if e.get("implementation")})
    for name, es in entries.items():
        for e in es:
            for p in e.get("problems", []):
                case.fail(f"dtype={name}: {p}")
    case.props["dtype"] = dtype_name(DTYPES[names[0]])
    case.done()
