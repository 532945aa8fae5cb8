"""Where a decode step of the bench model goes on this CPU: C++ kernels, other torch ops, Python.

    python benchmarks/step_overhead.py [--threads 2] [--dtype bfloat16] [--batch 1 16]

The issue's target is Python and framework overhead under 10% of a batch-1 step; this prints the
forward's median time, the share of it inside the C++ kernels and the rest (torch's small ops,
dispatcher, Python), with the number of top-level torch ops a step runs (dsserve/bench/step_profile.py).
"""
from __future__ import annotations

import argparse
import os
import sys

from dsserve.bench.bench_model import ensure_bench_model
from dsserve.bench.common import format_table, machine_summary, set_threads, source_version
from dsserve.bench.step_profile import decode_step_profile
from dsserve.core.engine import Engine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=40)
    ns = parser.parse_args()
    threads = set_threads(ns.threads)
    load_before = os.getloadavg()
    path = ensure_bench_model(log=lambda m: print(m, file=sys.stderr))
    rows = []
    with Engine(model_path=str(path), dtype=ns.dtype, max_total_tokens=16384) as engine:
        for batch in ns.batch:
            p = engine.run_on_worker(decode_step_profile, batch, ns.steps)
            fwd, kern = p["forward_s"], p["kernels_s"]
            split = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in p["kernel_split"].items())
            rows.append([batch, fwd * 1e3, kern * 1e3, kern / fwd, (fwd - kern) * 1e3, (fwd - kern) / fwd,
                         p["torch_op_count"], split])
    print(format_table(
        ["batch", "forward ms", "C++ kernels ms", "share", "torch ops + Python ms", "share", "torch ops",
         "kernels (ms)"], rows,
        title=f"dsserve decode step split: bench model, {ns.dtype}, {threads} threads; {source_version()}\n"
              f"{machine_summary()}\nload average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
