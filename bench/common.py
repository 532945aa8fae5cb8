"""Pieces the benchmarks share: seeded random workloads, tables, percentiles, thread setup, timing."""
from __future__ import annotations

import asyncio
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def random_lengths(rng: random.Random, n: int, length: int, range_ratio: float) -> list[int]:
    """n lengths uniform in [length * range_ratio, length] (SGLang's random dataset; ratio 1: all equal)."""
    if not 0.0 <= range_ratio <= 1.0:
        raise ValueError(f"range ratio must be in [0, 1], got {range_ratio}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    low = max(1, int(length * range_ratio))
    return [rng.randint(low, length) for _ in range(n)]


def random_token_prompts(rng: random.Random, lengths: Sequence[int], low: int, high: int) -> list[list[int]]:
    """One prompt of random token ids in [low, high) per length."""
    return [[rng.randrange(low, high) for _ in range(n)] for n in lengths]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between ranks as numpy's default; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """A Markdown table (right-aligned numbers), readable in a terminal and pasteable into docs."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    # A column is numeric (right-aligned) when every non-empty cell is a number.
    numeric = [any(_is_number(row[i]) for row in rows) and all(_is_number(row[i]) or row[i] in ("", None)
                                                                for row in rows) for i in range(len(headers))]

    def line(values):
        return "| " + " | ".join(v.rjust(w) if num else v.ljust(w)
                                 for v, w, num in zip(values, widths, numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                          for w, num in zip(widths, numeric)) + "|"
    out = [line(headers), rule, *(line(r) for r in cells)]
    if title:
        out.insert(0, title)
    return "\n".join(out)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        a = abs(v)
        return f"{v:.0f}" if a >= 1000 else f"{v:.1f}" if a >= 100 else f"{v:.2f}" if a >= 1 else f"{v:.3f}"
    return str(v)


def set_threads(threads: int | None) -> int:
    """Use `threads` torch threads for everything after this (dsserve's CPU device included)."""
    import torch

    if threads:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        # The CPU device plugin keeps OMP_NUM_THREADS when set and otherwise picks one per core.
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def machine_summary() -> dict[str, Any]:
    """CPU model, logical CPUs this process may use, RAM (Linux; best effort elsewhere)."""
    info: dict[str, Any] = {"cpu": "unknown", "cpus": os.cpu_count(), "ram_gib": None, "load_average": None}
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        pass
    try:
        info["cpus"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                               "unknown")
        with open("/proc/meminfo", encoding="utf-8") as f:
            kib = next((int(line.split()[1]) for line in f if line.startswith("MemTotal:")), None)
            info["ram_gib"] = round(kib / 2**20, 1) if kib else None
    except OSError:
        pass
    return info


def source_version() -> str:
    """dsserve's version and, in a git checkout, its commit and whether the tree has changes."""
    import subprocess
    from pathlib import Path

    import dsserve

    text = f"dsserve {dsserve.__version__}"
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return text
    if commit:
        text += f" at {commit}" + (" with uncommitted changes" if dirty else "")
    return text


def describe_backends(engine) -> str:
    """The implementations the engine's model runs on, e.g. `attention: cpu.TorchMLA; moe: ...`.

    A third-party plugin may override one op of a built-in device (with tryfirst): a benchmark must
    say what it measured. Set DSSERVE_DISABLE_PLUGINS=name to leave one out.
    """
    return engine.run_on_worker(backends_of)


def backends_of(runner) -> str:
    """describe_backends, where the model lives."""
    found: dict[str, set[str]] = {}
    for module in runner.model.modules():
        for attr, kind in (("backend", None), ("method", "linear")):
            impl = getattr(module, attr, None)
            if impl is None or isinstance(impl, (str, int, float)):
                continue
            cls = type(impl)
            if kind is None:
                kind = "moe" if "moe" in (cls.__name__ + type(module).__name__).lower() or \
                    "experts" in type(module).__name__.lower() else "attention"
            found.setdefault(kind, set()).add(f"{cls.__module__.replace('dsserve.', '')}.{cls.__name__}")
    text = "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in sorted(found.items()))
    foreign = sorted({impl.split(".")[0] for impls in found.values() for impl in impls
                      if not impl.startswith(("core.", "plugins.", "models."))})
    if foreign:
        text += (f"  [NOTE: from outside dsserve: {', '.join(foreign)}; "
                 "DSSERVE_DISABLE_PLUGINS=<plugin name> measures the built-in ones]")
    return text


@dataclass
class BatchTiming:
    """When each token of each request of one engine batch arrived (perf_counter seconds)."""

    submitted: float
    token_times: list[list[float]] = field(default_factory=list)    # per request, one per token
    token_ids: list[list[int]] = field(default_factory=list)

    @property
    def end(self) -> float:
        return max(t[-1] for t in self.token_times)

    def step_times(self) -> list[float]:
        """Step k ends when the last request receives its k-th token (requests of equal length)."""
        n = min(len(t) for t in self.token_times)
        return [max(t[k] for t in self.token_times) for k in range(n)]

    @property
    def first_token_all(self) -> float:
        """When every request had its first token: prefill of the whole batch is over."""
        return max(t[0] for t in self.token_times)

    def decode_tokens_per_s(self) -> float:
        """Tokens after each request's first, over the time from the end of prefill to the end."""
        tokens = sum(len(t) - 1 for t in self.token_times)
        span = self.end - self.first_token_all
        return tokens / span if span > 0 else float("nan")


def run_engine_batch(engine, prompts: list[list[int]], params: list) -> BatchTiming:
    """Submit every prompt at once to a dsserve Engine; time each token as it streams back."""
    return asyncio.run(_run_engine_batch(engine, prompts, params))


async def _run_engine_batch(engine, prompts, params) -> BatchTiming:
    timing = BatchTiming(submitted=time.perf_counter())
    handles = [engine.add_request(input_ids=p, sampling_params=sp) for p, sp in zip(prompts, params)]

    async def consume(handle):
        times, ids = [], []
        async for out in handle:
            now = time.perf_counter()
            if out.error:
                raise RuntimeError(f"request {handle.rid} failed: {out.error}")
            times.extend([now] * len(out.token_ids))
            ids.extend(out.token_ids)
        return times, ids

    for times, ids in await asyncio.gather(*(consume(h) for h in handles)):
        timing.token_times.append(times)
        timing.token_ids.append(ids)
    return timing


def weight_bytes(runner, batch: int) -> tuple[float, float]:
    """(bytes of weights one decode step of `batch` tokens reads, active parameters per token), where
    the model lives (`engine.run_on_worker(weight_bytes, batch)`)."""
    from dsserve.models.layers import Embedding, RoutedExperts

    model = runner.model
    experts = {id(p): m.spec for m in model.modules() if isinstance(m, RoutedExperts)
               for n, p in m.named_parameters() if n.startswith(("w13", "w2"))}
    embeddings = {id(p) for m in model.modules() if isinstance(m, Embedding) for p in m.parameters()}
    step_bytes = active = 0.0
    for p in model.parameters():
        if id(p) in embeddings:
            continue  # one row per token
        size, count = p.numel() * p.element_size(), p.numel()
        spec = experts.get(id(p))
        if spec is not None:
            # the experts that `batch` tokens pick at least once, if the router picks uniformly
            e, k = spec.num_experts, spec.top_k
            size *= (1 - (1 - k / e) ** batch)
            count *= k / e
        step_bytes += size
        active += count
    return step_bytes, active


def resident_bytes(runner) -> int:
    """Bytes of the model's parameters as they sit in memory (`engine.run_on_worker(resident_bytes)`)."""
    return sum(p.numel() * p.element_size() for p in runner.model.parameters())
