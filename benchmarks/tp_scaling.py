"""Tensor parallelism on one host: the bench model at tp=1 and tp=2 on the same cores.

    python benchmarks/tp_scaling.py [--dtype bfloat16] [--tp 1 2]

Each tp runs as its own Engine (tp worker processes, each pinned to cores/tp cores); decode at batch 1
and 16 after a 32-token prompt, prefill of 512 tokens, and the share of a decode step rank 0 spends
in collectives (gloo all_reduce / all_gather, timed in the worker).
"""
from __future__ import annotations

import argparse
import os
import random
import sys

from dsserve.bench.bench_model import ensure_bench_model
from dsserve.bench.common import format_table, machine_summary, run_engine_batch, source_version
from dsserve.bench.step_profile import collective_seconds, time_collectives
from dsserve.core.engine import Engine
from dsserve.core.sampling_params import SamplingParams

DECODE_TOKENS, PROMPT, PREFILL = 48, 32, 512


def measure(path: str, dtype: str, tp: int) -> list:
    rows = []
    rng = random.Random(0)
    with Engine(model_path=path, dtype=dtype, tp_size=tp, max_total_tokens=16384) as engine:
        engine.run_on_worker(time_collectives)

        def run(batch: int, prompt: int, out: int):
            prompts = [[rng.randrange(20, 4000) for _ in range(prompt)] for _ in range(batch)]
            params = [SamplingParams(max_new_tokens=out, temperature=0, ignore_eos=True)] * batch
            engine.flush_cache()
            return run_engine_batch(engine, prompts, params)

        for batch in (1, 16):
            run(batch, PROMPT, 4)
            engine.run_on_worker(collective_seconds)
            timing = run(batch, PROMPT, DECODE_TOKENS)
            spent = sum(engine.run_on_worker(collective_seconds).values())
            total = timing.end - timing.submitted
            rows.append([tp, f"decode batch {batch}", timing.decode_tokens_per_s(), spent / total])
        run(1, PREFILL, 1)
        engine.run_on_worker(collective_seconds)
        timing = run(1, PREFILL, 1)
        spent = sum(engine.run_on_worker(collective_seconds).values())
        elapsed = timing.step_times()[0] - timing.submitted
        rows.append([tp, f"prefill {PREFILL}", PREFILL / elapsed, spent / elapsed])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ns = parser.parse_args()
    os.environ.pop("OMP_NUM_THREADS", None)  # each rank takes its own share of the cores
    load = os.getloadavg()[0]
    path = str(ensure_bench_model(log=lambda m: print(m, file=sys.stderr)))
    rows = [row for tp in ns.tp for row in measure(path, ns.dtype, tp)]
    print(format_table(["tp", "measure", "tok/s", "in collectives (rank 0)"], rows,
                       title=f"dsserve tp scaling: bench model, {ns.dtype}, {os.cpu_count()} CPUs; {source_version()}\n"
                             f"{machine_summary()}\nload average before {load:.2f}, after {os.getloadavg()[0]:.2f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
