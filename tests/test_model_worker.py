"""The model worker in its own process (the default) against the worker on the engine thread: the
same tokens and log-probs, load errors raised as they were, calls into the worker, and what a
dead worker does to the engine and to the server (errors for the requests in flight, 503s after,
no orphaned process when the engine's process dies)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import types

import httpx
import pytest
from server_util import running_server, wait_for

from dsserve import Engine, SamplingParams
from dsserve.core.errors import EngineUnavailable
from dsserve.models.loader import CheckpointError


def _mixed_requests(engine: Engine) -> list:
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], list(range(20, 60))]
    params = [
        SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3, frequency_penalty=0.5, logprobs=True,
                       top_logprobs=2),
        SamplingParams(max_new_tokens=9, temperature=1.2, top_k=40, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(max_new_tokens=6, temperature=0, presence_penalty=1.0, top_logprobs=3, logprobs=True),
    ]
    handles = [engine.add_request(input_ids=p, sampling_params=s, return_prompt_logprobs=(i == 2))
               for i, (p, s) in enumerate(zip(prompts, params))]
    return [h.result() for h in handles]


def test_process_and_thread_workers_give_the_same_outputs():
    outputs = {}
    for mode in ("process", "thread"):
        with Engine(dtype="float32", max_total_tokens=2048, model_worker=mode, seed=11) as engine:
            outputs[mode] = _mixed_requests(engine)
    for p, t in zip(outputs["process"], outputs["thread"]):
        assert p.token_ids == t.token_ids and p.text == t.text
        assert p.logprobs == t.logprobs and p.top_logprobs == t.top_logprobs
        assert p.prompt_logprobs == t.prompt_logprobs and p.prompt_top_logprobs == t.prompt_top_logprobs
    third = outputs["process"][2]
    assert len(third.prompt_logprobs) == 40 and third.prompt_logprobs[0] is None and len(third.top_logprobs[0]) == 3


def test_load_errors_are_raised_in_the_caller_as_the_worker_raised_them(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        Engine(model_path=str(tmp_path))


def _layer_count(runner, extra: int) -> int:
    return len(runner.model.layers) + extra


def _raise(runner):
    raise KeyError("asked to fail")


def _unimportable():
    """A function pickled by reference to a module that exists only in this process."""
    module = types.ModuleType("dsserve_test_only_in_this_process")
    exec("def here(runner):\n    return 1\n", module.__dict__)
    sys.modules[module.__name__] = module
    module.here.__module__ = module.__name__
    return module.here


def test_run_on_worker_returns_results_and_raises_errors():
    with Engine(dtype="float32", max_total_tokens=256) as engine:
        assert engine.run_on_worker(_layer_count, 100) == 103   # dsserve-tiny has 3 layers
        with pytest.raises(KeyError, match="asked to fail"):
            engine.run_on_worker(_raise)
        with pytest.raises(RuntimeError, match="cannot unpickle"):   # the worker cannot import it: it lives on
            engine.run_on_worker(_unimportable())
        with pytest.raises(AttributeError, match="pickle"):         # nor pickle a local function at all
            engine.run_on_worker(lambda runner: 1)
        assert engine.generate(input_ids=[1, 2, 3], sampling_params=SamplingParams(max_new_tokens=2))[0].token_ids


def test_a_dead_worker_ends_requests_in_flight_and_the_server_answers_503():
    with running_server(model_worker="process") as (engine, server):
        handle = engine.add_request(input_ids=[5, 6, 7],
                                    sampling_params=SamplingParams(max_new_tokens=4000, ignore_eos=True))
        first = next(iter(handle))
        assert first.token_ids and not first.finished
        engine.executor.process.kill()
        last = handle.result()
        assert last.finish_reason == "error" and "model worker" in last.error and "exited" in last.error
        wait_for(lambda: not engine.alive)
        with pytest.raises(EngineUnavailable, match="model worker"):
            engine.add_request(input_ids=[1, 2])
        assert httpx.get(server.url + "/health").status_code == 503
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and "model worker" in r.json()["error"]["message"]


def test_the_worker_exits_when_its_engine_process_dies(tmp_path):
    script = textwrap.dedent("""
        import os, sys
        from dsserve import Engine
        engine = Engine(dtype="float32", max_total_tokens=256)
        print(engine.executor.process.pid, flush=True)
        os._exit(0)   # no shutdown: as if the process were killed
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    pid = int(out.stdout.split()[-1])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _running(pid):
        time.sleep(0.1)
    assert not _running(pid), f"model worker {pid} outlived its engine"


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"   # a zombie has exited
    except FileNotFoundError:
        return False
