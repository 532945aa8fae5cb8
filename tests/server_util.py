"""Helpers for the server tests: a real uvicorn server on 127.0.0.1 (free port) in a background
thread over an in-process dsserve-tiny engine, and scripted model output.

dsserve-tiny's text is random, so a test that needs the model to *say* something specific (a tool
call, a `</think>`) scripts the tokens through the engine's `token_override` hook: everything else
(template, prompt, engine, detokenization, parsers, HTTP) runs as in production.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time

import httpx
import pytest
from dsserve.core.engine import Engine
from dsserve.server.args import ServerArgs
from dsserve.server.launch import ServerThread


@contextlib.contextmanager
def running_server(**kwargs):
    """An engine and a server over it; `kwargs` are any `dsserve serve` options (ServerArgs fields)."""
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("max_total_tokens", 32768)
    args = ServerArgs.from_kwargs(**kwargs)
    engine = Engine.from_args(args)
    server = ServerThread(engine, args)
    try:
        server.start()
        yield engine, server
    finally:
        server.stop()
        engine.shutdown()


def server_fixtures(**options):
    """Module-scoped `server` (engine, server thread), `engine` and `url` fixtures over
    running_server(**options); a test module binds them: `server, engine, url = server_fixtures(...)`."""

    @pytest.fixture(scope="module")
    def server():
        with running_server(**options) as pair:
            yield pair

    @pytest.fixture(scope="module")
    def engine(server):
        return server[0]

    @pytest.fixture(scope="module")
    def url(server):
        return server[1].url

    return server, engine, url


@contextlib.contextmanager
def scripted_output(engine, text: str, end_with_eos: bool = True):
    """Every request added while this is active emits exactly the tokens of `text` (then EOS)."""
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    if end_with_eos:
        ids.append(engine.tokenizer.eos_token_id)
    original = engine.add_request

    def add_request(*args, token_override=None, **kwargs):
        def override(output_ids):
            if token_override is not None:
                token_override(output_ids)
            return ids[len(output_ids)] if len(output_ids) < len(ids) else None

        return original(*args, token_override=override, **kwargs)

    engine.add_request = add_request
    try:
        yield ids
    finally:
        del engine.add_request


@contextlib.contextmanager
def first_token_stops(engine):
    """Every request added while this is active stops at its first token (an EOS it must emit and stop
    on), whatever its max_tokens or ignore_eos: for tests of the answers' shape, not their text, that
    cannot wait for long generations on a slow CPU. Requests are checked as they are without this."""
    eos = engine.tokenizer.eos_token_id
    original = engine.add_request

    def add_request(*args, sampling_params, token_override=None, **kwargs):
        def override(output_ids):
            if token_override is not None:
                token_override(output_ids)
            return eos

        params = dataclasses.replace(sampling_params, stop_token_ids=[*sampling_params.stop_token_ids, eos])
        return original(*args, sampling_params=params, token_override=override, **kwargs)

    engine.add_request = add_request
    try:
        yield
    finally:
        del engine.add_request


def fail_forward(runner, message: str) -> None:
    """Make every forward pass raise RuntimeError(message), where the model lives (pass it to
    `engine.run_on_worker`; a worker process imports this module by name)."""
    def broken(*args, **kwargs):
        raise RuntimeError(message)

    runner.forward = broken


def restore_forward(runner) -> None:
    del runner.forward   # the instance attribute fail_forward set; the class's method shows again


def sse_events(response: httpx.Response) -> list:
    """The JSON payloads of an SSE response, and "[DONE]" as a string."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample's value from Prometheus text (`labels` like 'reason="abort"')."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    raise KeyError(key)
