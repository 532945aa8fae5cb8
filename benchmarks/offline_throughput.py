#!/usr/bin/env python
"""Offline throughput: dsserve's Engine against Hugging Face transformers `generate`, same workload.

Workload (seeded): --num-prompts requests, prompt lengths uniform in [input_len * range_ratio,
input_len], output lengths likewise; prompts are random token ids (from 20, past the special tokens,
to below the tokenizer's size: 4000 on the benchmark model, whose vocabulary is 32000). Greedy, and
every request generates exactly its output length (dsserve: ignore_eos; transformers:
min_new_tokens = max_new_tokens).

Modes (--mode):
  batch   dsserve gets every request at once (Engine.generate); transformers gets them as one
          left-padded batch (--hf-batch-size to split it) generating the longest output length of
          the batch, as vLLM's and SGLang's HF baselines do. Only the tokens each request asked for
          count in the throughput of either engine.
  batch1  each request alone, one after another, in both engines.
  all     both.
--decode-bench instead measures steady-state decode: batch 1 and 16, 32-token prompts, 128 output
tokens; tokens after the first of each sequence over the time from the end of prefill to the end.
Both engines are loaded side by side and measured in turn, --repeat times (best and median shown):
on a machine shared with other work the best run is the least disturbed one.

transformers runs with eager attention, use_cache, the same dtype and the same torch threads.

    python benchmarks/offline_throughput.py --bench-model                  # the recorded figures
    python benchmarks/offline_throughput.py --bench-model --decode-bench
    python benchmarks/offline_throughput.py --model-path PATH --num-prompts 32 --mode all
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from datetime import datetime

from dsserve.bench.common import (
    describe_backends,
    format_table,
    machine_summary,
    percentile,
    random_lengths,
    random_token_prompts,
    run_engine_batch,
    set_threads,
    source_version,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model-path", default=None, help="checkpoint folder (default: dsserve-tiny)")
    m.add_argument("--bench-model", action="store_true", help="the shared benchmark model (built on first use)")
    m.add_argument("--bench-config", default=None, help="bench-model config (default: ../shared/reference/)")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    m.add_argument("--threads", type=int, default=None, help="torch threads (default: one per usable core)")
    m.add_argument("--device", default="cpu", help="dsserve's device; transformers runs on the same torch device")
    w = p.add_argument_group("workload")
    w.add_argument("--num-prompts", type=int, default=16)
    w.add_argument("--input-len", type=int, default=256)
    w.add_argument("--output-len", type=int, default=128)
    w.add_argument("--range-ratio", type=float, default=0.5, help="lengths uniform in [len * ratio, len]")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--mode", choices=["batch", "batch1", "all"], default="batch")
    w.add_argument("--hf-batch-size", type=int, default=0, help="transformers batch size (0: all at once)")
    d = p.add_argument_group("decode benchmark")
    d.add_argument("--decode-bench", action="store_true", help="steady-state decode tok/s instead")
    d.add_argument("--decode-batch-sizes", type=int, nargs="+", default=[1, 16])
    d.add_argument("--decode-input-len", type=int, default=32)
    d.add_argument("--decode-output-len", type=int, default=128)
    d.add_argument("--repeat", type=int, default=3, help="runs per engine and batch size (best and median shown)")
    e = p.add_argument_group("engine")
    e.add_argument("--max-total-tokens", type=int, default=None, help="dsserve KV pool (default: sized to the workload)")
    e.add_argument("--chunked-prefill-size", type=int, default=None)
    e.add_argument("--max-running-requests", type=int, default=None)
    e.add_argument("--skip-hf", action="store_true", help="dsserve only")
    e.add_argument("--skip-dsserve", action="store_true", help="transformers only")
    e.add_argument("--result-file", default=None, help="also write every figure as JSON here")
    ns = p.parse_args(argv)
    for name in ("num_prompts", "input_len", "output_len", "decode_input_len", "decode_output_len", "repeat"):
        if getattr(ns, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if ns.bench_model and ns.model_path:
        p.error("give --bench-model or --model-path, not both")
    return ns


# ------------------------------------------------------------------------------------------ dsserve
BACKENDS: dict[str, str] = {}


class DsserveRunner:
    def __init__(self, ns: argparse.Namespace, model_path: str | None, max_tokens: int):
        from dsserve import Engine

        extra = {k: getattr(ns, k) for k in ("chunked_prefill_size", "max_running_requests") if getattr(ns, k)}
        self.engine = Engine(model_path=model_path, device=ns.device, dtype=ns.dtype,
                             max_total_tokens=ns.max_total_tokens or max_tokens, log_level="warning", **extra)
        from dsserve.bench.one_batch import prompt_id_range

        self.id_range = prompt_id_range(self.engine)
        self.backends = describe_backends(self.engine)
        print(f"# dsserve backends: {self.backends}")
        BACKENDS["dsserve"] = self.backends

    def params(self, n: int):
        from dsserve import SamplingParams

        return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)

    def batch(self, prompts, out_lens):
        t = time.perf_counter()
        outs = self.engine.generate(input_ids=prompts, sampling_params=[self.params(n) for n in out_lens])
        return time.perf_counter() - t, [o.token_ids for o in outs]

    def one_by_one(self, prompts, out_lens):
        t = time.perf_counter()
        outs = [self.engine.generate(input_ids=[p], sampling_params=self.params(n))[0].token_ids
                for p, n in zip(prompts, out_lens)]
        return time.perf_counter() - t, outs

    def decode(self, prompts, n_out):
        timing = run_engine_batch(self.engine, prompts, [self.params(n_out)] * len(prompts))
        return timing.first_token_all - timing.submitted, timing.decode_tokens_per_s()

    def warmup(self, prompts):
        self.engine.generate(input_ids=prompts, sampling_params=self.params(4))
        self.engine.flush_cache()

    def close(self):
        self.engine.shutdown()


# ------------------------------------------------------------------------------------------ transformers
class HFRunner:
    def __init__(self, path: str, dtype: str, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()    # no load report for the MTP layer transformers does not build
        self.torch = torch
        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                          attn_implementation="eager").to(device).eval()
        cfg = self.model.config
        self.pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        eos = cfg.eos_token_id
        self.eos = eos if eos is not None else self.model.generation_config.eos_token_id

    def generate(self, prompts, n_new, step_times: list | None = None):
        """Left-padded batch, greedy, exactly n_new new tokens; the new tokens per row."""
        torch = self.torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1

        class StepClock(StoppingCriteria):   # called once per generated token: records when
            def __call__(self, input_ids, scores, **kwargs):
                if step_times is not None:
                    step_times.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=n_new, min_new_tokens=n_new,
                do_sample=False, temperature=None, top_p=None, top_k=None, use_cache=True,
                pad_token_id=self.pad, eos_token_id=self.eos, stopping_criteria=StoppingCriteriaList([StepClock()]))
        return [row[width:].tolist() for row in out]

    def batch(self, prompts, out_lens, batch_size: int):
        """Groups of batch_size (all: 0), each generating its longest requested length."""
        size = batch_size or len(prompts)
        t = time.perf_counter()
        outs = []
        for s in range(0, len(prompts), size):
            group, lens = prompts[s:s + size], out_lens[s:s + size]
            rows = self.generate(group, max(lens))
            outs += [r[:n] for r, n in zip(rows, lens)]
        return time.perf_counter() - t, outs

    def one_by_one(self, prompts, out_lens):
        t = time.perf_counter()
        outs = [self.generate([p], n)[0] for p, n in zip(prompts, out_lens)]
        return time.perf_counter() - t, outs

    def decode(self, prompts, n_out):
        steps: list[float] = []
        t = time.perf_counter()
        self.generate(prompts, n_out, steps)
        tokens = len(prompts) * (len(steps) - 1)
        return steps[0] - t, tokens / (steps[-1] - steps[0])

    def warmup(self, prompts):
        self.generate(prompts, 2)


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ns = parse_args(argv)
    threads = set_threads(ns.threads or machine_summary()["cpus"])
    model_path = ns.model_path
    if ns.bench_model:
        from dsserve.bench.bench_model import BenchModelError, ensure_bench_model

        try:
            model_path = str(ensure_bench_model(ns.bench_config))
        except BenchModelError as e:
            print(f"offline_throughput: {e}", file=sys.stderr)
            return 2
    mach = machine_summary()
    print(f"# {datetime.now():%Y-%m-%d %H:%M}  {mach['cpu']}, {mach['cpus']} CPUs, {mach['ram_gib']} GiB RAM; "
          f"{threads} torch threads; {ns.dtype}; load average {mach['load_average']}")
    print(f"# {source_version()}")
    print("# python benchmarks/offline_throughput.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    results = {"date": datetime.now().isoformat(timespec="seconds"), "version": source_version(),
               "machine": mach, "threads": threads,
               "args": vars(ns)}
    if ns.decode_bench:
        results["decode"] = decode_bench(ns, model_path)
    else:
        results["throughput"] = throughput_bench(ns, model_path)
    results["backends"] = BACKENDS
    results["load_average_after"] = machine_summary()["load_average"]
    print(f"# load average after: {results['load_average_after']} (other work on the machine skews the figures)")
    if ns.result_file:
        with open(ns.result_file, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


def _resolve(model_path):
    from dsserve.models.loader import resolve_model_path

    return str(resolve_model_path(model_path))


def throughput_bench(ns, model_path) -> list[dict]:
    rng = random.Random(ns.seed)
    in_lens = random_lengths(rng, ns.num_prompts, ns.input_len, ns.range_ratio)
    out_lens = random_lengths(rng, ns.num_prompts, ns.output_len, ns.range_ratio)
    pool = sum(in_lens) + sum(out_lens) + 64 * ns.num_prompts
    modes = ["batch", "batch1"] if ns.mode == "all" else [ns.mode]
    rows, outputs = [], {}

    def record(engine, mode, seconds, tokens):
        n_in, n_out = sum(in_lens), sum(out_lens)
        got = sum(len(t) for t in tokens)
        if got != n_out:
            raise RuntimeError(f"{engine} {mode}: generated {got} tokens, the workload asks for {n_out}")
        print(f"# {engine} {mode}: {seconds:.1f} s", file=sys.stderr, flush=True)
        rows.append({"engine": engine, "mode": mode, "requests": len(in_lens), "input_tokens": n_in,
                     "output_tokens": n_out, "seconds": seconds, "requests_per_s": len(in_lens) / seconds,
                     "output_tok_s": n_out / seconds, "total_tok_s": (n_in + n_out) / seconds})
        outputs[(engine, mode)] = tokens

    id_range, hf_device = None, "cpu"
    if not ns.skip_dsserve:
        ds = DsserveRunner(ns, model_path, pool)
        id_range = ds.id_range
        prompts = random_token_prompts(random.Random(ns.seed + 1), in_lens, *id_range)
        ds.warmup(prompts[:2])
        for mode in modes:
            seconds, toks = ds.batch(prompts, out_lens) if mode == "batch" else ds.one_by_one(prompts, out_lens)
            ds.engine.flush_cache()
            record("dsserve", mode, seconds, toks)
        model_path, hf_device = ds.engine.info.model_path, ds.engine.info.torch_device
        ds.close()
        del ds
    if not ns.skip_hf:
        hf = HFRunner(_resolve(model_path), ns.dtype, hf_device)
        if id_range is None:
            id_range = (20, min(hf.model.config.vocab_size, _tokenizer_size(_resolve(model_path))))
        prompts = random_token_prompts(random.Random(ns.seed + 1), in_lens, *id_range)
        hf.warmup(prompts[:2])
        for mode in modes:
            if mode == "batch":
                seconds, toks = hf.batch(prompts, out_lens, ns.hf_batch_size)
            else:
                seconds, toks = hf.one_by_one(prompts, out_lens)
            record("transformers", mode, seconds, toks)
    table = [[r["engine"], _mode_label(r["mode"], ns), r["requests"], r["input_tokens"], r["output_tokens"],
              r["seconds"], r["requests_per_s"], r["output_tok_s"], r["total_tok_s"]] for r in rows]
    for mode in modes:
        a = next((r for r in rows if r["engine"] == "dsserve" and r["mode"] == mode), None)
        b = next((r for r in rows if r["engine"] == "transformers" and r["mode"] == mode), None)
        if a and b:
            table.append(["dsserve / transformers", _mode_label(mode, ns), "", "", "", "",
                          a["requests_per_s"] / b["requests_per_s"], a["output_tok_s"] / b["output_tok_s"],
                          a["total_tok_s"] / b["total_tok_s"]])
            same = sum(x == y for x, y in zip(outputs[("dsserve", mode)], outputs[("transformers", mode)]))
            print(f"# {mode}: greedy output identical to transformers' for {same} of {len(in_lens)} requests")
    print(format_table(["engine", "mode", "requests", "input tok", "output tok", "seconds", "req/s",
                        "output tok/s", "total tok/s"], table,
                       title=f"offline throughput: {_name(model_path)}, {ns.dtype}, input {ns.input_len} / "
                             f"output {ns.output_len}, range ratio {ns.range_ratio}, seed {ns.seed}"))
    return rows


def decode_bench(ns, model_path) -> list[dict]:
    """Both engines loaded side by side and measured in turn (dsserve, transformers, per batch size,
    --repeat times), so that other load on the machine hits both alike; best and median reported."""
    rng = random.Random(ns.seed)
    biggest = max(ns.decode_batch_sizes)
    runners: dict[str, object] = {}
    id_range, hf_device = None, "cpu"
    if not ns.skip_dsserve:
        ds = DsserveRunner(ns, model_path, biggest * (ns.decode_input_len + ns.decode_output_len + 64))
        id_range = ds.id_range
        model_path, hf_device = ds.engine.info.model_path, ds.engine.info.torch_device
        runners["dsserve"] = ds
    if not ns.skip_hf:
        hf = HFRunner(_resolve(model_path), ns.dtype, hf_device)
        if id_range is None:
            id_range = (20, min(hf.model.config.vocab_size, _tokenizer_size(_resolve(model_path))))
        runners["transformers"] = hf
    for runner in runners.values():
        runner.warmup(random_token_prompts(rng, [ns.decode_input_len] * 2, *id_range))
    samples: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for rep in range(ns.repeat):
        for bs in ns.decode_batch_sizes:
            prompts = random_token_prompts(rng, [ns.decode_input_len] * bs, *id_range)
            for name, runner in runners.items():
                prefill, tok_s = runner.decode(prompts, ns.decode_output_len)
                if name == "dsserve":
                    runner.engine.flush_cache()
                samples.setdefault((name, bs), []).append((prefill, tok_s))
                print(f"# run {rep + 1}/{ns.repeat}: {name} decode batch {bs}: {tok_s:.2f} tok/s",
                      file=sys.stderr, flush=True)
    if "dsserve" in runners:
        runners["dsserve"].close()
    rows = []
    for (name, bs), runs in samples.items():
        rates = [r for _, r in runs]
        rows.append({"engine": name, "batch": bs, "prefill_s": min(p for p, _ in runs),
                     "decode_tok_s": max(rates), "decode_tok_s_median": percentile(rates, 50), "runs": rates})
    rows.sort(key=lambda r: (r["engine"] != "dsserve", r["batch"]))
    table = [[r["engine"], r["batch"], r["prefill_s"], r["decode_tok_s"], r["decode_tok_s_median"],
              r["decode_tok_s"] / r["batch"]] for r in rows]
    for bs in ns.decode_batch_sizes:
        a = next((r for r in rows if r["engine"] == "dsserve" and r["batch"] == bs), None)
        b = next((r for r in rows if r["engine"] == "transformers" and r["batch"] == bs), None)
        if a and b:
            table.append(["dsserve / transformers", bs, "", a["decode_tok_s"] / b["decode_tok_s"],
                          a["decode_tok_s_median"] / b["decode_tok_s_median"], ""])
    print(format_table(["engine", "batch", "prefill s", f"decode tok/s (best of {ns.repeat})", "decode tok/s (median)",
                        "best tok/s per sequence"], table,
                       title=f"steady-state decode: {_name(model_path)}, {ns.dtype}, prompt {ns.decode_input_len}, "
                             f"output {ns.decode_output_len} tokens, all sequences together"))
    return rows


def _mode_label(mode: str, ns) -> str:
    if mode == "batch1":
        return "one at a time"
    return f"all at once (hf batch {ns.hf_batch_size or ns.num_prompts})"


def _name(path) -> str:
    from pathlib import Path

    return Path(path).name if path else "dsserve-tiny"


def _tokenizer_size(path: str) -> int:
    from pathlib import Path

    tok = Path(path) / "tokenizer.json"
    if not tok.is_file():
        return 1 << 30
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok)).get_vocab_size(with_added_tokens=True)


if __name__ == "__main__":
    sys.exit(main())
