"""`dsserve bench serving`: load an OpenAI-compatible server and measure what its clients see.

Like SGLang's bench_serving with its random dataset: --num-prompts prompts of random lengths (input
uniform in [--random-input-len * --random-range-ratio, --random-input-len], output likewise), sent
with Poisson arrivals at --request-rate per second (inf: all at once), at most --max-concurrency in
flight, each streamed. Per request it measures time to first token (TTFT), the gaps between
streamed chunks (inter-token latency, ITL), time per output token after the first (TPOT) and the
end-to-end latency (E2E); it prints them (mean, median, p99) with request and token throughput, and
writes everything, per-request figures included, as JSON.

Prompts are text built from a tokenizer (random token ids decoded, so their length in the server's
tokens is close to, not exactly, the length asked for), or with --tokenize-prompt token-id lists sent
to the completions endpoint (exact lengths). The tokenizer is read from a local folder only: --tokenizer,
else --model when it is a folder, else dsserve-tiny's (the default served model's). Output lengths
are exact when the server honours `ignore_eos` (dsserve and SGLang do; --disable-ignore-eos drops it).
Output token counts come from the stream's usage. A server may send no chunk for a token without
text (dsserve does): TTFT and ITL then time visible text; --request-logprobs makes every token show
up (the benchmark model needs it: its ids past the 4000-token tokenizer decode to nothing).

It talks to --base-url only.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from .common import format_table, mean, percentile, random_lengths


def add_parser(sub) -> None:
    p = sub.add_parser("serving", help="load an OpenAI-compatible server; TTFT, ITL, E2E and throughput",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["openai-completions", "openai-chat"], default="openai-completions",
                   help="endpoint: /v1/completions or /v1/chat/completions")
    p.add_argument("--base-url", default=None, help="server root URL (default http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--model", default=None, help="model name to request (default: the first of /v1/models)")
    p.add_argument("--tokenizer", default=None,
                   help="local tokenizer folder or tokenizer.json for building prompts (default: --model "
                        "when it is a folder, else dsserve-tiny's)")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths are uniform in [len * ratio, len]; 1 makes them all equal")
    p.add_argument("--tokenize-prompt", action="store_true",
                   help="send token-id prompts (openai-completions only): exact input lengths")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second, Poisson arrivals; inf sends all at once")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--disable-ignore-eos", action="store_true", help="do not send ignore_eos")
    p.add_argument("--disable-stream", action="store_true", help="non-streamed requests (no TTFT/ITL)")
    p.add_argument("--request-logprobs", action="store_true",
                   help="ask for the chosen tokens' logprobs so that every token is seen and timed, also "
                        "tokens without text (a server may send no chunk for those; the benchmark model's "
                        "ids past its 4000-token tokenizer decode to nothing)")
    p.add_argument("--warmup-requests", type=int, default=1, help="requests sent first and not measured")
    p.add_argument("--flush-cache", action="store_true",
                   help="POST /flush_cache (dsserve, SGLang) after the warm-up, so that no prompt is served from "
                        "the prefix cache of an earlier run")
    p.add_argument("--request-timeout", type=float, default=3600.0, help="seconds per request")
    p.add_argument("--output-file", default=None,
                   help="JSON results (default bench-serving-<backend>-<time>.json in the current folder)")
    p.add_argument("--plot", nargs="?", const="", default=None, metavar="PNG",
                   help="write a PNG of latency over time (default name: the JSON's with .png); needs matplotlib")
    p.set_defaults(func=run)


@dataclass
class RequestResult:
    index: int
    prompt_len: int
    output_len_requested: int
    success: bool = False
    error: str = ""
    start: float = 0.0              # seconds after the benchmark started
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    chunks: int = 0                 # streamed chunks that carried output (ITL has one gap fewer)
    generated_text: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def run(ns: argparse.Namespace) -> int:
    try:
        import httpx  # noqa: F401
    except ImportError:
        raise ValueError("dsserve bench serving needs httpx: pip install 'dsserve[bench]'") from None
    if ns.tokenize_prompt and ns.backend != "openai-completions":
        raise ValueError("--tokenize-prompt needs --backend openai-completions (chat takes text)")
    if ns.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    if ns.request_rate <= 0:
        raise ValueError("--request-rate must be > 0 (inf: all at once)")
    if ns.max_concurrency is not None and ns.max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    if ns.plot is not None:
        _require_matplotlib()
    base = (ns.base_url or f"http://{ns.host}:{ns.port}").rstrip("/")
    summary = asyncio.run(_bench(ns, base))
    print(render(summary))
    out = ns.output_file or f"bench-serving-{ns.backend}-{datetime.now():%Y%m%d-%H%M%S}.json"
    Path(out).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"results written to {out}")
    if ns.plot is not None:
        png = ns.plot or str(Path(out).with_suffix(".png"))
        plot(summary, png)
        print(f"plot written to {png}")
    return 0 if summary["completed"] else 1


# ------------------------------------------------------------------------------------------ prompts
class _PromptTokenizer:
    """encode/decode over a local tokenizer.json (fast) or, failing that, transformers (local only)."""

    def __init__(self, source: str | None):
        path = _tokenizer_source(source)
        self.name = str(path)
        tok_file = path / "tokenizer.json" if path.is_dir() else path
        if tok_file.is_file() and tok_file.suffix == ".json":
            from tokenizers import Tokenizer

            t = Tokenizer.from_file(str(tok_file))
            self.vocab_size = t.get_vocab_size(with_added_tokens=True)
            self.special = {a.content for a in t.get_added_tokens_decoder().values() if a.special} \
                if hasattr(t, "get_added_tokens_decoder") else set()
            self.special_ids = {t.token_to_id(s) for s in self.special}
            self.encode = lambda text: t.encode(text, add_special_tokens=False).ids
            self.decode = lambda ids: t.decode(ids, skip_special_tokens=True)
        else:
            from transformers import AutoTokenizer

            t = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.vocab_size = len(t)
            self.special_ids = set(t.all_special_ids)
            self.encode = lambda text: t.encode(text, add_special_tokens=False)
            self.decode = lambda ids: t.decode(ids, skip_special_tokens=True)


def _tokenizer_source(source: str | None) -> Path:
    if source:
        path = Path(source).expanduser()
        if not path.exists():
            raise ValueError(f"--tokenizer {source}: no such local file or folder (only local tokenizers are read)")
        return path
    from importlib import resources

    try:
        return Path(str(resources.files("dsserve.models").joinpath("tiny_tokenizer")))
    except (ModuleNotFoundError, TypeError):
        return Path(__file__).resolve().parents[2] / "models" / "tiny_tokenizer"


def build_prompts(ns: argparse.Namespace, tokenizer: _PromptTokenizer | None, vocab_high: int):
    """[(prompt: str | list[int], prompt_len, output_len)], seeded by --seed."""
    rng = random.Random(ns.seed)
    in_lens = random_lengths(rng, ns.num_prompts, ns.random_input_len, ns.random_range_ratio)
    out_lens = random_lengths(rng, ns.num_prompts, ns.random_output_len, ns.random_range_ratio)
    if tokenizer is not None:
        allowed = [i for i in range(min(vocab_high, tokenizer.vocab_size)) if i not in tokenizer.special_ids]
    else:
        allowed = list(range(20, vocab_high))
    prompts = []
    for n_in, n_out in zip(in_lens, out_lens):
        ids = [rng.choice(allowed) for _ in range(n_in)]
        if ns.tokenize_prompt:
            prompts.append((ids, n_in, n_out))
            continue
        text = tokenizer.decode(ids)
        # Decoding then encoding again can merge or split tokens: trim or pad to the length asked.
        for _ in range(4):
            again = tokenizer.encode(text)
            if len(again) == n_in:
                break
            ids = again[:n_in] if len(again) > n_in else again + [rng.choice(allowed) for _ in range(n_in - len(again))]
            text = tokenizer.decode(ids)
        prompts.append((text, len(tokenizer.encode(text)), n_out))
    return prompts


# ------------------------------------------------------------------------------------------ requests
def _payload(ns: argparse.Namespace, model: str, prompt, out_len: int) -> tuple[str, dict]:
    body: dict = {"model": model, "max_tokens": out_len, "temperature": 0.0, "stream": not ns.disable_stream}
    if not ns.disable_stream:
        body["stream_options"] = {"include_usage": True}
    if not ns.disable_ignore_eos:
        body["ignore_eos"] = True
    if ns.backend == "openai-chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        if ns.request_logprobs:
            body["logprobs"] = True
        return "/v1/chat/completions", body
    if ns.request_logprobs:
        body["logprobs"] = 1
    body["prompt"] = prompt
    return "/v1/completions", body


def _delta_text(backend: str, choice: dict) -> str:
    if backend == "openai-chat":
        delta = choice.get("delta") or choice.get("message") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""


def _chunk_tokens(backend: str, choice: dict, text: str) -> int:
    """Tokens a streamed choice carries: counted from its logprobs when asked for, else 1 if it has text."""
    lp = choice.get("logprobs")
    if isinstance(lp, dict):
        items = lp.get("content") if backend == "openai-chat" else lp.get("tokens")
        if isinstance(items, list):
            return len(items)
    return 1 if text else 0


async def _send(client, ns, base: str, model: str, prompt, res: RequestResult, t0: float) -> None:
    route, body = _payload(ns, model, prompt, res.output_len_requested)
    start = time.perf_counter()
    res.start = start - t0
    chunks, seen, last, usage_tokens, texts = 0, 0, start, None, []
    try:
        if ns.disable_stream:
            r = await client.post(base + route, json=body)
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {r.text[:500]}"
                return
            data = r.json()
            texts.append(_delta_text(ns.backend, (data.get("choices") or [{}])[0]))
            usage_tokens = (data.get("usage") or {}).get("completion_tokens")
            res.ttft = time.perf_counter() - start
        else:
            async with client.stream("POST", base + route, json=body) as r:
                if r.status_code != 200:
                    res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:500]}"
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        res.error = str(event["error"])[:500]
                        return
                    if event.get("usage") and event["usage"].get("completion_tokens") is not None:
                        usage_tokens = event["usage"]["completion_tokens"]
                    choices = event.get("choices") or []
                    text = "".join(_delta_text(ns.backend, c) for c in choices)
                    n_tokens = sum(_chunk_tokens(ns.backend, c, _delta_text(ns.backend, c)) for c in choices)
                    if not n_tokens:
                        continue
                    now = time.perf_counter()
                    if seen == 0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    chunks += 1
                    seen += n_tokens
                    texts.append(text)
        res.e2e = time.perf_counter() - start
        res.generated_text = "".join(texts)
        res.output_tokens = usage_tokens if usage_tokens is not None else seen
        res.chunks = chunks
        res.success = True
    except Exception as e:  # noqa: BLE001 - a refused connection, a broken stream: the request failed, the run goes on
        res.error = f"{type(e).__name__}: {e}"[:500]


def _arrival_gaps(ns: argparse.Namespace, n: int) -> list[float]:
    if ns.request_rate == float("inf"):
        return [0.0] * n
    rng = random.Random(ns.seed + 1)
    return [rng.expovariate(ns.request_rate) for _ in range(n)]


async def _bench(ns: argparse.Namespace, base: str) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(ns.request_timeout, connect=30.0), headers=headers,
                                 limits=limits, trust_env=False) as client:
        model = ns.model or await _first_model(client, base)
        tok_source = ns.tokenizer or (ns.model if ns.model and Path(ns.model).expanduser().is_dir() else None)
        tokenizer = _PromptTokenizer(tok_source)
        prompts = build_prompts(ns, tokenizer, tokenizer.vocab_size)
        for i in range(ns.warmup_requests):
            warm = RequestResult(-1, 0, min(16, ns.random_output_len))
            await _send(client, ns, base, model, prompts[i % len(prompts)][0], warm, time.perf_counter())
            if not warm.success:
                raise ValueError(f"the warm-up request to {base} failed: {warm.error}")
        if ns.flush_cache:
            r = await client.post(base + "/flush_cache")
            if r.status_code >= 400:
                print(f"warning: POST {base}/flush_cache answered {r.status_code}; the prefix cache may serve "
                      "prompts of earlier runs", file=sys.stderr)
        results = [RequestResult(i, n_in, n_out) for i, (_, n_in, n_out) in enumerate(prompts)]
        limit = asyncio.Semaphore(ns.max_concurrency) if ns.max_concurrency else None

        async def one(i: int) -> None:
            if limit is None:
                return await _send(client, ns, base, model, prompts[i][0], results[i], t0)
            async with limit:
                await _send(client, ns, base, model, prompts[i][0], results[i], t0)

        tasks = []
        t0 = time.perf_counter()
        for i, gap in enumerate(_arrival_gaps(ns, len(prompts))):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    return summarize(ns, base, model, tokenizer.name, results, duration)


async def _first_model(client, base: str) -> str:
    try:
        r = await client.get(base + "/v1/models")
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except Exception as e:  # noqa: BLE001 - refused, HTTP error, unexpected body: one message for all
        raise ValueError(f"cannot list the models of {base} ({type(e).__name__}: {e}); is the server up? "
                         "Pass --model NAME to skip this") from None


# ------------------------------------------------------------------------------------------ report
def summarize(ns: argparse.Namespace, base: str, model: str, tokenizer: str, results: list[RequestResult],
              duration: float) -> dict:
    ok = [r for r in results if r.success]
    ttft = [r.ttft for r in ok]
    e2e = [r.e2e for r in ok]
    itl = [x for r in ok for x in r.itl]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)

    def stats(values, scale=1000.0):
        return {"mean": mean(values) * scale, "median": percentile(values, 50) * scale,
                "p99": percentile(values, 99) * scale}

    errors = [r.error for r in results if not r.success]
    streamed = [r for r in ok if r.chunks]
    chunk_ratio = (sum(r.output_tokens for r in streamed) / sum(r.chunks for r in streamed)) if streamed else None
    return {
        "backend": ns.backend, "base_url": base, "model": model, "tokenizer": tokenizer,
        "date": datetime.now().isoformat(timespec="seconds"),
        "num_prompts": len(results),
        "request_rate": "inf" if ns.request_rate == float("inf") else ns.request_rate, "max_concurrency": ns.max_concurrency,
        "random_input_len": ns.random_input_len, "random_output_len": ns.random_output_len,
        "random_range_ratio": ns.random_range_ratio, "seed": ns.seed, "tokenize_prompt": ns.tokenize_prompt,
        "stream": not ns.disable_stream,
        "completed": len(ok), "failed": len(results) - len(ok), "first_error": errors[0] if errors else None,
        "duration_s": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "input_throughput": in_tokens / duration,
        "output_throughput": out_tokens / duration, "total_throughput": (in_tokens + out_tokens) / duration,
        "concurrency": sum(e2e) / duration,
        "tokens_per_chunk": chunk_ratio, "request_logprobs": ns.request_logprobs,
        "ttft_ms": stats(ttft), "itl_ms": stats(itl), "tpot_ms": stats(tpot), "e2e_ms": stats(e2e),
        "requests": [{k: v for k, v in asdict(r).items() if k != "generated_text"} for r in results],
    }


def render(s: dict) -> str:
    rate = s["request_rate"] if s["request_rate"] == "inf" else f"{s['request_rate']:g}/s"
    head = format_table(["", "value"], [
        ["backend", s["backend"]], ["base URL", s["base_url"]], ["model", s["model"]],
        ["request rate", rate], ["max concurrency", s["max_concurrency"] or "none"],
        ["successful requests", s["completed"]], ["failed requests", s["failed"]],
        ["duration (s)", s["duration_s"]], ["total input tokens", s["total_input_tokens"]],
        ["total output tokens", s["total_output_tokens"]], ["request throughput (req/s)", s["request_throughput"]],
        ["input throughput (tok/s)", s["input_throughput"]], ["output throughput (tok/s)", s["output_throughput"]],
        ["total throughput (tok/s)", s["total_throughput"]], ["concurrency", s["concurrency"]],
    ], title="dsserve bench serving")
    lat = format_table(["latency (ms)", "mean", "median", "p99"], [
        [name, s[key]["mean"], s[key]["median"], s[key]["p99"]]
        for name, key in (("TTFT", "ttft_ms"), ("ITL", "itl_ms"), ("TPOT", "tpot_ms"), ("E2E", "e2e_ms"))
    ])
    text = head + "\n\n" + lat
    ratio = s.get("tokens_per_chunk")
    if ratio and ratio > 1.2:
        text += (f"\n\nnote: {ratio:.1f} output tokens per streamed chunk: the server sent several tokens per "
                 "chunk or none for tokens without text, so TTFT and ITL are those of visible text"
                 + ("" if s.get("request_logprobs") else "; --request-logprobs times every token"))
    if s["failed"]:
        text += f"\n\nfirst error: {s['first_error']}"
    return text


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("--plot needs matplotlib, which is not installed: pip install 'dsserve[bench]' "
                         "(or pip install matplotlib)") from None


def plot(summary: dict, path: str) -> None:
    """Per request, against when it was sent: E2E latency and TTFT; below, every ITL sample."""
    _require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reqs = [r for r in summary["requests"] if r["success"]]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.scatter([r["start"] for r in reqs], [r["e2e"] for r in reqs], s=10, label="E2E")
    top.scatter([r["start"] for r in reqs], [r["ttft"] for r in reqs], s=10, label="TTFT")
    top.set_ylabel("seconds")
    top.legend()
    xs, ys = [], []
    for r in reqs:
        t = r["start"] + r["ttft"]
        for gap in r["itl"]:
            t += gap
            xs.append(t)
            ys.append(gap * 1000)
    bottom.scatter(xs, ys, s=4, color="tab:green")
    bottom.set_ylabel("ITL (ms)")
    bottom.set_xlabel("seconds since the first request")
    rate = summary["request_rate"] if summary["request_rate"] == "inf" else f"{summary['request_rate']:g}/s"
    fig.suptitle(f"{summary['model']} at {summary['base_url']}: {summary['num_prompts']} requests, rate {rate}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run it as `dsserve bench serving`")
