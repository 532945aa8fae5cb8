"""`dsserve` / `dsserve serve` as users run it: flags (grouped help, SGLang spellings, invalid values
rejected at start, one warning per accepted-but-inactive flag), the ready line, and graceful
shutdown on SIGTERM / SIGINT with exit status 0."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from dsserve.cli import main

DSSERVE = str(Path(sys.executable).parent / "dsserve")


def test_serve_help_groups_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for group in ("model:", "memory:", "http server:", "openai api:", "parallelism:", "quantization:", "kernels:",
                  "speculative decoding:", "disaggregation:"):
        assert f"\n{group}\n" in text, group
    for flag in ("--model-path", "--model", "--tp-size", "--tp", "--dp", "--nnodes", "--node-rank", "--dist-init-addr",
                 "--api-key", "--served-model-name", "--max-queued-requests", "--graceful-shutdown-timeout",
                 "--reasoning-parser", "--tool-call-parser", "--chat-template", "--enable-metrics",
                 "--cuda-graph-bs", "--enable-torch-compile", "--speculative-algorithm", "--disaggregation-mode"):
        assert f" {flag} " in text or f" {flag}," in text or f" {flag}\n" in text, flag


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--tp", "0"], "--tp-size must be >= 1"),
    (["--nnodes", "2", "--node-rank", "2", "--tp", "2"], "--node-rank must be in 0..1"),
    (["--dist-init-addr", "nohost"], "--dist-init-addr must be HOST:PORT"),
    (["--model-loader-extra-config", "{oops"], "--model-loader-extra-config is not valid JSON"),
    (["--max-queued-requests", "0"], "--max-queued-requests must be >= 1"),
    (["--graceful-shutdown-timeout", "-1"], "--graceful-shutdown-timeout must be >= 0"),
    (["--chat-template", "/no/such/template.jinja"], "--chat-template '/no/such/template.jinja': no such file"),
    (["--cuda-graph-bs", "1,two"], "takes batch sizes"),
])
def test_invalid_values_are_rejected_at_start(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsserve: ") and message in err


def test_unknown_choice_and_busy_port(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--quantization", "bogus"])
    assert e.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["--port", str(port), "--device", "cpu"]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


class Served:
    """`dsserve` in a subprocess; waits for its ready line."""

    def __init__(self, tmp_path: Path, *flags: str, own_process_group: bool = False):
        self.stderr_path = tmp_path / "stderr.txt"
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen([DSSERVE, "--port", "0", "--dtype", "float32", "--max-total-tokens", "8192",
                                          *flags], stdout=subprocess.PIPE, stderr=stderr, text=True,
                                         start_new_session=own_process_group)
        self.ready = self._read_ready_line()
        self.url = self.ready.split()[2]

    def _read_ready_line(self, timeout: float = 120.0) -> str:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not lines or not lines[0]:
            self.proc.kill()
            raise AssertionError(f"no ready line; stderr:\n{self.stderr_path.read_text()}")
        return lines[0].rstrip("\n")

    def stream(self, body: dict, after_first=None) -> list:
        """A streamed completion; `after_first()` runs once the first chunk arrived."""
        events = []
        with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 1 and after_first:
                        after_first()
        return events

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()


# --tp 2, --dist-timeout and speculative decoding (EAGLE, 3 steps) act: no warning for them; a draft tree's
# shape (topk 4, 8 draft tokens) does not (dsserve drafts a chain)
INACTIVE = ["--tp", "2", "--dp", "2", "--enable-dp-attention", "--enable-torch-compile", "--torch-compile-max-bs", "8",
            "--cuda-graph-bs", "1,2,4", "--disable-overlap-schedule", "--speculative-algorithm", "EAGLE",
            "--speculative-num-steps", "3", "--speculative-eagle-topk", "4", "--speculative-num-draft-tokens", "8",
            "--disaggregation-mode", "prefill", "--attention-backend", "flashinfer",
            "--dist-timeout", "3600", "--model-loader-extra-config", '{"enable_multithread_load": true}']


def test_start_warnings_ready_line_and_sigterm_drains(tmp_path):
    served = Served(tmp_path, *INACTIVE, "--trust-remote", "--max-total-token", "8192", "--served-model-name",
                    "my-model", "--enable-metrics", "--reasoning-parser", "deepseek-r1", "--tool-call-parser",
                    "deepseekv3", "--mem-fraction-static", "0.8", "--max-running-requests", "8", "--device", "cpu")
    try:
        assert served.ready.startswith("dsserve ready: http://127.0.0.1:") and served.ready.endswith("(model my-model)")
        assert httpx.get(served.url + "/v1/models").json()["data"][0]["id"] == "my-model"
        # SIGTERM while a request streams: it finishes, then the server exits 0.
        events = served.stream({"prompt": "hi", "max_tokens": 40, "stream": True},
                               after_first=lambda: served.proc.send_signal(signal.SIGTERM))
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        assert served.wait() == 0
    finally:
        if served.proc.poll() is None:
            served.proc.kill()
    err = served.stderr
    for flag in ("--dp 2", "--enable-dp-attention", "--enable-torch-compile", "--torch-compile-max-bs 8",
                 "--cuda-graph-bs 1,2,4", "--disable-overlap-schedule", "--speculative-eagle-topk 4",
                 "--speculative-num-draft-tokens 8", "--disaggregation-mode prefill", "--attention-backend flashinfer",
                 "--model-loader-extra-config"):
        assert err.count(f"warning: {flag} is accepted but has no effect") == 1, (flag, err)
    assert err.count("is accepted but has no effect") == 11
    assert "tensor-parallel rank 0 of 2" in err
    assert "speculative decoding: the MTP layer drafts 3 token(s) a step" in err
    assert "SIGTERM" in err and "dsserve stopped" in err


def test_sigint_aborts_after_the_graceful_timeout(tmp_path):
    served = Served(tmp_path, "--graceful-shutdown-timeout", "1")
    try:
        started = time.monotonic()
        events = served.stream({"prompt": "hi", "max_tokens": 3000, "stream": True},
                               after_first=lambda: served.proc.send_signal(signal.SIGINT))
        assert time.monotonic() - started < 20
        # it could not finish within the second: aborted, and told so
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"
        assert served.wait() == 0
    finally:
        if served.proc.poll() is None:
            served.proc.kill()
    assert "is accepted but has no effect" not in served.stderr


def _children(pid: int) -> list[int]:
    """Child processes of every thread of `pid` (the engine thread starts the workers)."""
    return sorted(int(child) for task in Path(f"/proc/{pid}/task").iterdir()
                  for child in (task / "children").read_text().split())


def test_a_killed_rank_stops_the_server_naming_it(tmp_path):
    """--tp 2: SIGKILL one rank; the server exits 1 within a bounded time, its log names the rank and
    the status, and no worker process is left."""
    served = Served(tmp_path, "--tp", "2")
    try:
        ranks = _children(served.proc.pid)
        assert len(ranks) == 2
        os.kill(ranks[1], signal.SIGKILL)
        assert served.wait(timeout=60) == 1
    finally:
        if served.proc.poll() is None:
            served.proc.kill()
    assert "the model worker rank 1 of 2" in served.stderr and "exited with status -9" in served.stderr
    for pid in ranks:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]


def test_sigterm_to_the_whole_process_group_still_drains(tmp_path):
    """systemd (and `timeout`) signal every process of the group: the model worker must not die
    before the server has drained its requests."""
    served = Served(tmp_path, own_process_group=True)
    try:
        events = served.stream({"prompt": "hi", "max_tokens": 40, "stream": True},
                               after_first=lambda: os.killpg(served.proc.pid, signal.SIGTERM))
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        assert served.wait() == 0
    finally:
        if served.proc.poll() is None:
            os.killpg(served.proc.pid, signal.SIGKILL)
    assert "exited with status" not in served.stderr

