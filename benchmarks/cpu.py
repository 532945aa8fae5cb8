"""CPU decode and prefill of the bench model against the floors this machine sets, in one run.

For each compute dtype the CPU serves (float32 always; bfloat16 where it has bf16 dot products), and
for each quantized format asked for (`--quantization`: w8a8_int8 and fp8 quantized at load, awq from a
`dsserve quantize` copy of the bench model; computed in the default dtype), an Engine on the bench
model runs: decode at batch 1 and batch 16 (prompt 32, greedy, ignore_eos) and the prefill of one
512-token prompt, and reports the bytes its weights hold. In the same run it measures the machine's read bandwidth
(`tensor.sum()` over 1 GiB) and its GEMM peak in that dtype (oneDNN, 2048^3), and prints each figure
beside its floor: decode tok/s <= bandwidth / weight bytes read per token (batch 16 reads the experts
that 16 tokens pick, expected count), prefill tok/s <= GEMM peak / (2 x active parameters). Ratios
computed in one run survive a noisy shared machine better than absolute figures; the load average is
printed before and after.

    python benchmarks/cpu.py --threads 2 [--dtype float32 bfloat16] [--decode-tokens 64]
                             [--quantization w8a8_int8 fp8 awq] [--quantized-decode-tokens 64] [--rounds 2]
                             [--deterministic]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import sys
import time

import torch

from dsserve.bench.bench_model import ensure_bench_model
from dsserve.bench.common import (
    describe_backends,
    format_table,
    machine_summary,
    resident_bytes,
    run_engine_batch,
    set_threads,
    source_version,
    weight_bytes,
)
from dsserve.bench.one_batch import prompt_id_range
from dsserve.core.engine import Engine
from dsserve.core.sampling_params import SamplingParams
from dsserve.models.quantize import quantize_checkpoint
from dsserve.plugins.cpu import native, onednn
from dsserve.plugins.cpu.device import cpu_flags

GEMM_SIZE = 2048
PREFILL_TOKENS = 512
DECODE_PROMPT = 32


def read_bandwidth(repeats: int = 5) -> float:
    """Bytes per second of `sum()` over a 1 GiB float32 tensor, best of `repeats`."""
    x = torch.ones(1 << 28)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def gemm_peak(dtype: torch.dtype, repeats: int = 5) -> float:
    """FLOP/s of one GEMM^3 through oneDNN on a reordered weight (the path linear layers take), or
    torch.matmul where oneDNN's reordered kernels do not run this dtype on this CPU."""
    x, w = torch.randn(GEMM_SIZE, GEMM_SIZE).to(dtype), torch.randn(GEMM_SIZE, GEMM_SIZE).to(dtype)
    if onednn.serves(dtype, cpu_flags()):
        packed = torch.ops.mkldnn._reorder_linear_weight(w, GEMM_SIZE)
        gemm = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")  # noqa: E731
    else:
        wt = w.t().contiguous()
        gemm = lambda: torch.matmul(x, wt)  # noqa: E731
    gemm()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        gemm()
        best = min(best, time.perf_counter() - t)
    return 2 * GEMM_SIZE ** 3 / best


def bench_checkpoint(quantization: str | None) -> str:
    """The bench model's folder; AWQ (which dsserve does not make at load) from a cached
    `dsserve quantize --method awq` copy."""
    path = ensure_bench_model(log=lambda m: print(m, file=sys.stderr))
    if quantization != "awq":
        return str(path)
    awq = path.parent / f"{path.name}-awq"
    if not (awq / "config.json").exists():
        print(f"writing {awq} (dsserve quantize --method awq)", file=sys.stderr)
        quantize_checkpoint(path, awq, "awq")
    return str(awq)


def measure(dtype: str, quantization: str | None, threads: int, decode_tokens: int, deterministic: bool) -> dict:
    """One configuration's figures, in a process of its own (the last one's memory goes back to the
    OS before the next starts)."""
    set_threads(threads)
    path = bench_checkpoint(quantization)
    results = {}
    flag = None if quantization == "awq" else quantization  # awq: the checkpoint says so
    with Engine(model_path=path, dtype=dtype, quantization=flag, max_total_tokens=16384,
                enable_deterministic_inference=deterministic) as engine:
        low, high = prompt_id_range(engine)
        rng = random.Random(0)
        print(f"[{quantization or dtype}] backends: {describe_backends(engine)}", file=sys.stderr)

        def run(batch: int, prompt: int, out: int):
            prompts = [[rng.randrange(low, high) for _ in range(prompt)] for _ in range(batch)]
            params = [SamplingParams(max_new_tokens=out, temperature=0, ignore_eos=True) for _ in range(batch)]
            engine.flush_cache()
            return run_engine_batch(engine, prompts, params)

        for batch in (1, 16):
            run(batch, DECODE_PROMPT, 2)  # warm-up
            results[batch] = run(batch, DECODE_PROMPT, decode_tokens).decode_tokens_per_s()
        run(1, PREFILL_TOKENS, 1)  # warm-up
        timing = run(1, PREFILL_TOKENS, 1)
        results["prefill"] = PREFILL_TOKENS / (timing.step_times()[0] - timing.submitted)
        steps = {batch: engine.run_on_worker(weight_bytes, batch) for batch in (1, 16)}
        resident = engine.run_on_worker(resident_bytes)
        compute_dtype = getattr(torch, engine.info.dtype)
    return {"results": results, "steps": steps, "resident": resident, "peak": gemm_peak(compute_dtype)}


def best_of(a: dict | None, b: dict) -> dict:
    """The higher tok/s of two measurements of one configuration, figure by figure."""
    if a is None:
        return b
    return {**b, "results": {key: max(a["results"][key], b["results"][key]) for key in b["results"]}}


def rows_for(label: str, measured: dict, bandwidth: float, active: float) -> list[list]:
    """`active`: parameters per token, counted on an unquantized run (a packed int32 of AWQ holds 8)."""
    results, steps = measured["results"], measured["steps"]
    resident = f"{measured['resident'] / 2**30:.2f}"
    rows = []
    for batch in (1, 16):
        step_bytes = steps[batch][0]
        floor = batch * bandwidth / step_bytes
        rows.append([label, resident, f"decode batch {batch}", results[batch], floor, results[batch] / floor,
                     f"{step_bytes / 1e6:.0f} MB of weights a step at {bandwidth / 1e9:.1f} GB/s"])
    peak = measured["peak"]
    ceiling = peak / (2 * active)
    rows.append([label, resident, f"prefill {PREFILL_TOKENS}", results["prefill"], ceiling,
                 results["prefill"] / ceiling, f"{active / 1e6:.0f} M active params at {peak / 1e9:.0f} GFLOP/s"])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per usable core)")
    parser.add_argument("--dtype", nargs="+", default=None,
                        help="float32 and/or bfloat16 (default: both where the CPU has bf16 units)")
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens generated per decode measurement")
    parser.add_argument("--quantization", nargs="*", default=[], choices=["w8a8_int8", "fp8", "awq"],
                        help="quantized formats to measure too, in the default dtype")
    parser.add_argument("--quantized-decode-tokens", type=int, default=64,
                        help="tokens per decode measurement of a quantized format")
    parser.add_argument("--deterministic", action="store_true",
                        help="each dtype also with --enable-deterministic-inference (what batch invariance costs)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every configuration this many times, alternating, and keep each figure's "
                             "best (a shared machine's load drifts by minutes: 2 or 3 make ratios trustworthy)")
    ns = parser.parse_args()
    threads = set_threads(ns.threads)
    flags = cpu_flags()
    has_bf16 = bool({"avx512_bf16", "amx_bf16"} & flags)
    dtypes = ns.dtype or (["float32", "bfloat16"] if has_bf16 else ["float32"])
    default = "bfloat16" if has_bf16 else "float32"
    configs = [(dtype, dtype, None, ns.decode_tokens, False) for dtype in dtypes]
    configs += [(f"{dtype} deterministic", dtype, None, ns.decode_tokens, True) for dtype in dtypes if ns.deterministic]
    configs += [(f"{q} ({default})", default, q, ns.quantized_decode_tokens, False) for q in ns.quantization]
    isa = native.isa()
    load_before = os.getloadavg()
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        measured: dict[str, dict] = {}
        for _ in range(ns.rounds):
            for label, dtype, quantization, tokens, deterministic in configs:
                measured[label] = best_of(measured.get(label),
                                          pool.apply(measure, (dtype, quantization, threads, tokens, deterministic)))
    # the machine's bandwidth, here, where no engine runs: before the floors, the best of two rounds
    bandwidth = max(read_bandwidth(), read_bandwidth())
    active = measured[dtypes[0]]["steps"][1][1]
    rows = [row for label in measured for row in rows_for(label, measured[label], bandwidth, active)]
    load_after = os.getloadavg()
    m = machine_summary()
    shown = sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "avx_vnni", "fma")))
    print(format_table(
        ["weights", "GiB", "measure", "tok/s", "floor tok/s", "of floor", "floor from"], rows,
        title=(f"dsserve CPU benchmark: bench model, {threads} threads, best of {ns.rounds} alternated round(s); "
               f"{source_version()}\n"
               f"{m['cpu']}, {m['cpus']} CPUs; kernels: {isa.name if isa is not None else 'none'}; flags: {' '.join(shown)}\n"
               f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
