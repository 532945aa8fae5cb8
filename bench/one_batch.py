"""`dsserve bench one-batch`: prefill and decode time of one batch on a local Engine.

For every (batch size, input length, output length) asked for, it submits one batch of random
token-id prompts at once (greedy, ignore_eos) after a warm-up batch, and times each token as it
streams back. Prefill time runs from submission until every request has its first token (a batch
larger than --chunked-prefill-size is prefilled over several steps); a decode step ends when the
last request of the batch receives its next token. The prefix cache is flushed between runs, and
prompts are fresh each run, so nothing is served from the cache.

With --speculative-algorithm, every configuration runs twice, on an engine without speculation and
on one with it (the same prompts), and the table adds the accept length: tokens a request commits
per verify pass. Decode tok/s then counts the tokens a request receives, several per step.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import random
import sys
from pathlib import Path

from dsserve.core.config import EngineArgs
from .common import (
    describe_backends,
    format_table,
    machine_summary,
    mean,
    percentile,
    run_engine_batch,
    set_threads,
    source_version,
)


def add_parser(sub) -> None:
    p = sub.add_parser("one-batch", help="prefill and decode time of one batch on a local engine",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    EngineArgs.add_cli_args(p)
    g = p.add_argument_group("benchmark")
    g.add_argument("--batch-size", type=int, nargs="+", default=[1], help="one or more batch sizes")
    g.add_argument("--input-len", type=int, nargs="+", default=[256], help="prompt tokens (one or more)")
    g.add_argument("--output-len", type=int, nargs="+", default=[16], help="generated tokens (one or more)")
    g.add_argument("--bench-model", action="store_true",
                   help="run on the shared benchmark model (built on first use), not --model-path")
    g.add_argument("--bench-config", default=None, help="bench-model config (default: ../shared/reference/)")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: one per usable core)")
    g.add_argument("--warmup-output-len", type=int, default=4, help="tokens of the warm-up batch")
    g.add_argument("--result-file", default=None, help="also write the results as JSON here")
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from dsserve.core.engine import Engine
    from dsserve.core.sampling_params import SamplingParams

    for name in ("batch_size", "input_len", "output_len"):
        if any(v < 1 for v in getattr(ns, name)):
            raise ValueError(f"--{name.replace('_', '-')} values must be >= 1")
    if ns.bench_model:
        from .bench_model import ensure_bench_model

        ns.model_path = str(ensure_bench_model(ns.bench_config, log=lambda m: print(m, file=sys.stderr)))
    threads = set_threads(ns.threads)
    args = EngineArgs.from_cli_args(ns)
    variants = [args]
    if args.speculative_steps:  # the same runs without speculation first, for the comparison
        variants.insert(0, dataclasses.replace(args, speculative_algorithm=None, speculative_num_steps=None,
                                               speculative_eagle_topk=None, speculative_num_draft_tokens=None))
    configs = list(itertools.product(ns.batch_size, ns.input_len, ns.output_len))
    results = []
    for variant in variants:
        rng = random.Random(args.seed)   # the same prompts for every variant
        with Engine.from_args(variant) as engine:
            low, high = prompt_id_range(engine)
            name = Path(engine.info.model_path).name
            backends = describe_backends(engine)
            spec = f"{variant.speculative_algorithm} {variant.speculative_steps}" if variant.speculative_steps else "off"

            def batch(bs: int, ilen: int, olen: int):
                prompts = [[rng.randrange(low, high) for _ in range(ilen)] for _ in range(bs)]
                params = [SamplingParams(max_new_tokens=olen, temperature=0, ignore_eos=True) for _ in range(bs)]
                return run_engine_batch(engine, prompts, params)

            for bs, ilen, olen in configs:
                batch(bs, ilen, ns.warmup_output_len)     # warm-up: first-call costs, allocator growth
                engine.flush_cache()
                verified = (engine.metrics.spec_verifications, engine.metrics.spec_verified_tokens)
                t = batch(bs, ilen, olen)
                engine.flush_cache()
                results.append({"speculative": spec, "batch_size": bs, "input_len": ilen, "output_len": olen,
                                **_timings(t, bs, ilen, olen), "accept_length": _accept_length(engine, *verified)})
    rows = [[r["speculative"], r["batch_size"], r["input_len"], r["output_len"], r["prefill_s"], r["prefill_tok_s"],
             r["decode_step_median_ms"], r["decode_step_mean_ms"], r["decode_tok_s"], r["accept_length"],
             r["total_s"], r["total_tok_s"]]
            for r in results]
    print(format_table(
        ["speculative", "batch", "input", "output", "prefill s", "prefill tok/s", "decode step ms (median)",
         "decode step ms (mean)", "decode tok/s", "accept length", "total s", "total tok/s"], rows,
        title=f"dsserve bench one-batch: {name}, {engine.info.device}, "
              f"{engine.info.dtype}, {threads} threads\nbackends: {backends}\n{source_version()}; {_machine()}"))
    if ns.result_file:
        with open(ns.result_file, "w", encoding="utf-8") as f:
            json.dump({"model": name, "threads": threads, "backends": backends, "results": results}, f, indent=2)
    return 0


def _timings(t, bs: int, ilen: int, olen: int) -> dict:
    steps = t.step_times()
    prefill = steps[0] - t.submitted
    decode = [b - a for a, b in itertools.pairwise(steps)]
    total = t.end - t.submitted
    return {
        "prefill_s": prefill, "prefill_tok_s": bs * ilen / prefill,
        "decode_step_median_ms": percentile(decode, 50) * 1e3 if decode else float("nan"),
        "decode_step_mean_ms": mean(decode) * 1e3 if decode else float("nan"),
        "decode_tok_s": t.decode_tokens_per_s() if decode else float("nan"),
        "total_s": total, "total_tok_s": bs * (ilen + olen) / total,
    }


def _accept_length(engine, verifications: int, tokens: int) -> float:
    """Tokens committed per verify pass since the counts (verifications, tokens) were read; nan without
    speculation."""
    m = engine.metrics
    done = m.spec_verifications - verifications
    return (m.spec_verified_tokens - tokens) / done if done else float("nan")


def prompt_id_range(engine) -> tuple[int, int]:
    """Token ids a random prompt may use: past the usual special tokens, within model and tokenizer."""
    high = engine.info.vocab_size
    if engine.tokenizer is not None:
        high = min(high, engine.tokenizer.vocab_size)
    low = 20 if high > 40 else 0
    return low, high


def _machine() -> str:
    m = machine_summary()
    return f"{m['cpu']}, {m['cpus']} CPUs, {m['ram_gib']} GiB RAM, load average {m['load_average']}"
