"""Decode speed of an Engine whose caller ran (or did not run) a parallel torch op on its own thread first.

    python benchmarks/caller_threads.py clean [--model-worker thread]
    python benchmarks/caller_threads.py caller-ops [--model-worker thread]

Run them alternately (the machine is noisy). See docs/benchmarks.md ("Why a caller's torch op slows
the engine"): libgomp throttles every team's spinning once a process holds more OpenMP threads than
CPUs, so a model worker on the engine thread (--model-worker thread) sleeps between parallel regions
after its caller's torch op; the default worker, in its own process, does not share its teams.
"""
from __future__ import annotations

import argparse
import random
import sys
import time

import torch

from dsserve.bench.bench_model import ensure_bench_model
from dsserve.core.engine import Engine
from dsserve.core.sampling_params import SamplingParams

NEW_TOKENS = 48


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["clean", "caller-ops"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model-worker", choices=["process", "thread"], default="process")
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    if ns.mode == "caller-ops":
        a = torch.randn(512, 512)
        (a @ a).sum()  # this thread now owns an OpenMP team too
    path = ensure_bench_model(log=lambda m: print(m, file=sys.stderr))
    rng = random.Random(0)

    def prompt() -> list[list[int]]:
        return [[rng.randrange(100, 30000) for _ in range(32)]]

    with Engine(model_path=str(path), dtype="bfloat16", max_total_tokens=16384, model_worker=ns.model_worker) as engine:
        engine.generate(input_ids=prompt(), sampling_params=SamplingParams(max_new_tokens=4, temperature=0,
                                                                         ignore_eos=True))  # warm-up
        t = time.perf_counter()
        engine.generate(input_ids=prompt(), sampling_params=SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0,
                                                                         ignore_eos=True))
        print(f"{ns.mode}, worker in a {ns.model_worker}: {NEW_TOKENS / (time.perf_counter() - t):.1f} tok/s (batch 1, prefill included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
