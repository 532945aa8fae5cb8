"""Where a decode step's time goes on the CPU: the C++ kernels against everything else.

`decode_step_profile(runner, batch, steps)` runs where the model lives (pass it to
`engine.run_on_worker`): `batch` sequences of a 32-token random prompt, then `steps` decode passes
of one token each. It times the whole forward (median) and the time inside the cpu plugin's C++
kernels (each call timed); the rest is torch's small ops (norms, RoPE, casts, residual adds),
the dispatcher and Python. torch's profiler counts the top-level torch ops of a step in a
separate run (its own per-op cost would distort a time split of ops this small).
"""
from __future__ import annotations

import random
import statistics
import time

PROMPT = 32


def decode_step_profile(runner, batch: int, steps: int = 40) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from dsserve.core.batch import BatchItem
    from dsserve.plugins.cpu import native

    rng = random.Random(batch)
    page = runner.kv.page_size
    per_seq = -(-(PROMPT + steps + 8) // page)
    pages = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(batch)]
    prompts = [[rng.randrange(100, runner.config.vocab_size) for _ in range(PROMPT)] for _ in range(batch)]
    runner.forward([BatchItem(p, 0, pg, "last") for p, pg in zip(prompts, pages)])

    def step(i: int):
        return [BatchItem([rng.randrange(100, runner.config.vocab_size)], PROMPT + i, pg, "last") for pg in pages]

    for i in range(3):  # warm-up
        runner.forward(step(i))
    kernels, in_kernels = native.kernels(), {}
    originals = {name: getattr(kernels, name) for name in dir(kernels)
                 if not name.startswith("_") and callable(getattr(kernels, name))}

    def timed(name, fn):
        def call(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                in_kernels[name] = in_kernels.get(name, 0.0) + time.perf_counter() - t
        return call

    walls = []
    for name, fn in originals.items():
        setattr(kernels, name, timed(name, fn))
    try:
        for i in range(3, 3 + steps):
            items = step(i)
            t = time.perf_counter()
            runner.forward(items)
            walls.append(time.perf_counter() - t)
    finally:
        for name, fn in originals.items():
            setattr(kernels, name, fn)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(3 + steps, 3 + steps + 5):
            runner.forward(step(i))
    # top-level torch ops only (an op's own sub-ops, a cast's copy say, are part of it)
    top = [e for e in prof.events() if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    return {
        "forward_s": statistics.median(walls),
        "kernels_s": sum(in_kernels.values()) / steps,
        "kernel_split": {k: v / steps for k, v in sorted(in_kernels.items(), key=lambda kv: -kv[1])},
        "torch_op_count": len(top) // 5,
    }


def time_collectives(runner) -> None:
    """Time every all_reduce / all_gather of this rank from now on (read with `collective_seconds`)."""
    comm = runner.model.ctx.comm
    comm.seconds = {}
    for name in ("all_reduce", "all_gather"):
        fn = getattr(type(comm), name)

        def timed(*args, _fn=fn, _name=name, **kwargs):
            t = time.perf_counter()
            try:
                return _fn(comm, *args, **kwargs)
            finally:
                comm.seconds[_name] = comm.seconds.get(_name, 0.0) + time.perf_counter() - t
        setattr(comm, name, timed)


def collective_seconds(runner, reset: bool = True) -> dict[str, float]:
    """Seconds this rank spent in each collective since `time_collectives` (or the last reset)."""
    comm = runner.model.ctx.comm
    seconds = dict(comm.seconds)
    if reset:
        comm.seconds.clear()
    return seconds
