"""The benchmarks run and report: `dsserve bench one-batch`, `dsserve bench serving` (against a real
dsserve server and a scripted OpenAI-style one), benchmarks/offline_throughput.py, and the bench-model
builder."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest
from dsserve.cli import main

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ one-batch
def test_one_batch_prints_its_table(capsys, tmp_path):
    out_file = tmp_path / "one.json"
    # with speculative decoding: every configuration without it, then with it
    rc = main(["bench", "one-batch", "--dtype", "float32", "--device", "cpu", "--batch-size", "1", "3",
               "--input-len", "9", "--output-len", "5", "--log-level", "warning", "--result-file", str(out_file),
               "--speculative-algorithm", "EAGLE"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "dsserve bench one-batch: dsserve-tiny" in text
    assert "prefill tok/s" in text and "decode tok/s" in text and "accept length" in text
    rows = [line.split("|") for line in text.splitlines() if line.startswith("|") and line.split("|")[2].strip().isdigit()]
    assert [(r[1].strip(), r[2].strip()) for r in rows] == [("off", "1"), ("off", "3"), ("EAGLE 1", "1"), ("EAGLE 1", "3")]
    results = json.loads(out_file.read_text())["results"]
    assert [(r["speculative"], r["batch_size"], r["input_len"], r["output_len"]) for r in results] == [
        ("off", 1, 9, 5), ("off", 3, 9, 5), ("EAGLE 1", 1, 9, 5), ("EAGLE 1", 3, 9, 5)]
    assert all(r["prefill_s"] > 0 and r["decode_tok_s"] > 0 for r in results)
    accept = [r["accept_length"] for r in results]
    assert all(a != a for a in accept[:2]) and all(1 <= a <= 2 for a in accept[2:])   # nan without speculation


# ------------------------------------------------------------------------------------------ serving
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: dict | None = None, timeout: float = 5.0):
    with httpx.Client(trust_env=False, timeout=timeout) as c:
        return c.request(method, url, json=body)


@pytest.fixture(scope="module")
def dsserve_server(tmp_path_factory):
    """`dsserve --port P --dtype float32` on 127.0.0.1; skipped while the HTTP server is not built."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w+")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen([sys.executable, "-m", "dsserve.cli", "--host", "127.0.0.1", "--port", str(port),
                             "--dtype", "float32", "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "NO_PROXY": "127.0.0.1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 45
        while True:
            if proc.poll() is not None:
                log.seek(0)
                output = log.read()
                if "not built yet" in output:
                    pytest.skip(f"the HTTP server is not built yet (dsserve serve said: {output.strip()[-200:]})")
                pytest.fail(f"dsserve exited with {proc.returncode} before serving:\n{output[-3000:]}")
            try:
                if _http("GET", base + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass  # not listening, or not answering yet
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"dsserve did not answer /health within 45 s:\n{log.read()[-3000:]}")
            time.sleep(0.2)
        probe = _http("POST", base + "/v1/completions", {"prompt": "hi", "max_tokens": 1}, timeout=30)
        if probe.status_code in (404, 405):
            pytest.skip("the server has no /v1/completions yet")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.parametrize("backend,extra", [
    ("openai-completions", ["--flush-cache"]),
    ("openai-completions", ["--tokenize-prompt", "--request-logprobs", "--max-concurrency", "2"]),
    ("openai-chat", ["--request-logprobs", "--request-rate", "50"]),
])
def test_serving_against_a_real_server(dsserve_server, backend, extra, tmp_path, capsys):
    out = tmp_path / "serving.json"
    rc = main(["bench", "serving", "--base-url", dsserve_server, "--backend", backend, "--num-prompts", "6",
               "--random-input-len", "24", "--random-output-len", "6", "--random-range-ratio", "0.5",
               "--output-file", str(out), *extra])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "successful requests" in text and "TTFT" in text and "ITL" in text and "E2E" in text
    s = json.loads(out.read_text())
    assert s["completed"] == 6 and s["failed"] == 0, s["first_error"]
    # Exact when the server honours ignore_eos (an SGLang extension the bench sends); never more.
    assert 0 < s["total_output_tokens"] <= sum(r["output_len_requested"] for r in s["requests"])
    assert s["ttft_ms"]["mean"] > 0 and s["e2e_ms"]["p99"] > 0 and s["output_throughput"] > 0
    if "--request-logprobs" in extra:       # every token seen: one chunk each, when ignore_eos is honoured
        assert all(r["chunks"] <= r["output_tokens"] for r in s["requests"])


class _FakeOpenAI(BaseHTTPRequestHandler):
    """Streams max_tokens chunks of 'tok ' one millisecond apart, then usage and [DONE]."""

    bodies: ClassVar[list[dict]] = []
    silent_every = 0      # when > 0, every silent_every-th token has no text (sent only with logprobs)

    def log_message(self, *args):
        pass

    def _json(self, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/v1/models":
            return self._json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
        self._json(404, {"error": {"message": "not found"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append({"path": self.path, **body})
        chat = self.path == "/v1/chat/completions"
        if self.path not in ("/v1/completions", "/v1/chat/completions"):
            return self._json(404, {"error": {"message": "not found"}})
        n = body["max_tokens"]
        if not body.get("stream"):
            choice = {"message": {"role": "assistant", "content": "tok " * n}} if chat else {"text": "tok " * n}
            return self._json(200, {"choices": [choice], "usage": {"completion_tokens": n}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()

        def event(obj):
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        if chat:
            event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        for i in range(n):
            time.sleep(0.001)
            text = "" if self.silent_every and i % self.silent_every == 1 else "tok "
            if not text and not body.get("logprobs"):
                continue                      # as dsserve: no chunk for a token without text
            if chat:
                choice = {"index": 0, "delta": {"content": text}}
                if body.get("logprobs"):
                    choice["logprobs"] = {"content": [{"token": text, "logprob": -1.0}]}
            else:
                choice = {"index": 0, "text": text}
                if body.get("logprobs"):
                    choice["logprobs"] = {"tokens": [text], "token_logprobs": [-1.0]}
            event({"choices": [choice]})
        event({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": n}})
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def fake_server():
    _FakeOpenAI.bodies = []
    _FakeOpenAI.silent_every = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("backend,extra", [
    ("openai-completions", ["--tokenize-prompt", "--request-rate", "200", "--max-concurrency", "3"]),
    ("openai-chat", []),
])
def test_serving_measures_a_streaming_server(fake_server, backend, extra, tmp_path, capsys):
    out = tmp_path / "fake.json"
    rc = main(["bench", "serving", "--base-url", fake_server, "--backend", backend, "--num-prompts", "7",
               "--random-input-len", "30", "--random-output-len", "5", "--random-range-ratio", "0.4",
               "--seed", "3", "--output-file", str(out), *extra])
    text = capsys.readouterr().out
    assert rc == 0, text
    s = json.loads(out.read_text())
    assert s["model"] == "fake-model" and s["completed"] == 7 and s["failed"] == 0
    reqs = s["requests"]
    assert s["total_output_tokens"] == sum(r["output_len_requested"] for r in reqs)
    assert all(len(r["itl"]) == r["output_len_requested"] - 1 for r in reqs)
    assert all(0 < r["ttft"] <= r["e2e"] for r in reqs)
    assert all(2 <= r["output_len_requested"] <= 5 and 10 <= r["prompt_len"] <= 32 for r in reqs)
    sent = [b for b in _FakeOpenAI.bodies][1:]           # the first is the warm-up
    assert len(sent) == 7 and all(b["ignore_eos"] and b["stream"] and b["temperature"] == 0 for b in sent)
    if "--tokenize-prompt" in extra:
        assert sorted(len(b["prompt"]) for b in sent) == sorted(r["prompt_len"] for r in reqs)
        assert all(isinstance(t, int) for b in sent for t in b["prompt"])
    else:
        assert all(isinstance(b["messages"][0]["content"], str) for b in sent)
    for label in ("TTFT", "ITL", "TPOT", "E2E", "request throughput", "output throughput"):
        assert label in text
    # The same seed gives the same workload.
    rc = main(["bench", "serving", "--base-url", fake_server, "--backend", backend, "--num-prompts", "7",
               "--random-input-len", "30", "--random-output-len", "5", "--random-range-ratio", "0.4",
               "--seed", "3", "--output-file", str(tmp_path / "again.json"), *extra])
    again = json.loads((tmp_path / "again.json").read_text())["requests"]
    assert [(r["prompt_len"], r["output_len_requested"]) for r in again] == \
        [(r["prompt_len"], r["output_len_requested"]) for r in reqs]


@pytest.mark.parametrize("backend", ["openai-completions", "openai-chat"])
def test_serving_times_tokens_without_text_with_logprobs(fake_server, backend, tmp_path, capsys):
    _FakeOpenAI.silent_every = 2
    args = ["bench", "serving", "--base-url", fake_server, "--backend", backend, "--num-prompts", "3",
            "--random-input-len", "8", "--random-output-len", "6", "--random-range-ratio", "1"]
    assert main([*args, "--output-file", str(tmp_path / "text.json")]) == 0
    text = capsys.readouterr().out
    s = json.loads((tmp_path / "text.json").read_text())
    assert s["total_output_tokens"] == 18 and all(r["chunks"] == 3 for r in s["requests"])
    assert "--request-logprobs times every token" in text
    assert main([*args, "--request-logprobs", "--output-file", str(tmp_path / "lp.json")]) == 0
    assert "note:" not in capsys.readouterr().out
    s = json.loads((tmp_path / "lp.json").read_text())
    assert all(r["chunks"] == 6 and len(r["itl"]) == 5 for r in s["requests"])
    assert all(b["logprobs"] for b in _FakeOpenAI.bodies[-3:])


def test_serving_plot(fake_server, tmp_path, capsys):
    args = ["bench", "serving", "--base-url", fake_server, "--num-prompts", "3", "--random-input-len", "8",
            "--random-output-len", "3", "--output-file", str(tmp_path / "p.json"), "--plot"]
    if importlib.util.find_spec("matplotlib") is None:
        assert main(args) == 2
        assert "--plot needs matplotlib" in capsys.readouterr().err
    else:
        assert main(args) == 0
        assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_serving_reports_an_unreachable_server(capsys):
    port = _free_port()
    rc = main(["bench", "serving", "--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "2"])
    assert rc == 2
    assert f"cannot list the models of http://127.0.0.1:{port}" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ offline
def _offline_module():
    spec = importlib.util.spec_from_file_location("offline_throughput", ROOT / "benchmarks" / "offline_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_offline_throughput_runs_both_engines(capsys, tmp_path):
    bench = _offline_module()
    out = tmp_path / "offline.json"
    assert bench.main(["--num-prompts", "3", "--input-len", "10", "--output-len", "4", "--mode", "all",
                       "--result-file", str(out)]) == 0
    text = capsys.readouterr().out
    assert "dsserve / transformers" in text and "output tok/s" in text
    # Same float32 greedy work: dsserve-tiny's tokens equal transformers'.
    assert "identical to transformers' for 3 of 3 requests" in text
    rows = json.loads(out.read_text())["throughput"]
    assert {(r["engine"], r["mode"]) for r in rows} == {(e, m) for e in ("dsserve", "transformers")
                                                        for m in ("batch", "batch1")}
    assert len({r["output_tokens"] for r in rows}) == 1

    assert bench.main(["--decode-bench", "--decode-batch-sizes", "1", "2", "--decode-input-len", "6",
                       "--decode-output-len", "4", "--repeat", "2", "--result-file", str(out)]) == 0
    text = capsys.readouterr().out
    engines = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")]
    assert "steady-state decode" in text
    assert engines.count("dsserve") == 2 and engines.count("transformers") == 2
    rows = json.loads(out.read_text())["decode"]
    assert all(len(r["runs"]) == 2 and r["decode_tok_s"] == max(r["runs"]) for r in rows)


# ------------------------------------------------------------------------------------------ bench model
def test_bench_model_config_missing_is_a_clear_error(tmp_path, monkeypatch):
    from dsserve.bench import bench_model

    monkeypatch.delenv("DSSERVE_BENCH_CONFIG", raising=False)
    monkeypatch.setattr(bench_model, "_candidate_config_paths", lambda: [tmp_path / "nowhere" / "x.json"])
    with pytest.raises(bench_model.BenchModelError, match=r"\.\./shared/reference/.*--bench-config"):
        bench_model.ensure_bench_model(cache_dir=tmp_path)
    with pytest.raises(bench_model.BenchModelError, match="does not exist"):
        bench_model.bench_config_path(tmp_path / "missing.json")


def test_bench_model_is_built_from_seed_0_and_reused(tmp_path):
    """The builder on a shrunken copy of the shared config: seeded, loadable by dsserve, reused."""
    import torch
    from dsserve.bench import bench_model
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    shared = Path(__file__).resolve().parents[2] / "shared" / "reference" / bench_model.BENCH_CONFIG_NAME
    cfg = json.loads(shared.read_text()) if shared.is_file() else {}
    if not cfg:
        pytest.skip("../shared/reference/bench-model.config.json is not beside the repository")
    cfg.update(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
               n_routed_experts=8, kv_lora_rank=32, q_lora_rank=48, num_attention_heads=4,
               num_key_value_heads=4, vocab_size=4000)
    path = tmp_path / "small.json"
    path.write_text(json.dumps(cfg))
    folder = bench_model.ensure_bench_model(path, cache_dir=tmp_path / "cache", log=lambda m: None)
    stamp = bench_model.read_stamp(folder)
    torch.manual_seed(0)
    expected = DeepseekV3ForCausalLM(DeepseekV3Config.from_dict(cfg))
    assert stamp["parameters"] == sum(p.numel() for p in expected.parameters()) and stamp["seed"] == 0
    from safetensors.torch import load_file

    saved = load_file(str(folder / "model.safetensors"))
    assert torch.equal(saved["model.embed_tokens.weight"], expected.model.embed_tokens.weight)
    assert (folder / "tokenizer.json").is_file()
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert bench_model.ensure_bench_model(path, cache_dir=tmp_path / "cache", log=lambda m: None) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime

    from dsserve import Engine, SamplingParams

    with Engine(model_path=str(folder), device="cpu", dtype="float32", max_total_tokens=256,
                log_level="warning") as eng:
        out = eng.generate(input_ids=[[30, 31, 32]], sampling_params=SamplingParams(max_new_tokens=3, temperature=0,
                                                                                   ignore_eos=True))
        assert len(out[0].token_ids) == 3
