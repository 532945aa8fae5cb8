"""Load: 200 requests, 32 at a time, over chat and completions, streamed and not, while a fifth of
the clients go away mid-stream. Nothing is lost (every other request completes with exactly the
tokens it asked for), and afterwards nothing is left behind: no request running or queued, each
leaver aborted, and the KV cache holding only the prefix cache's pages (all read from /metrics)."""
from __future__ import annotations

import asyncio

import httpx
import pytest
from server_util import metric, running_server, wait_for

REQUESTS = 200
CONCURRENCY = 32
MAX_TOKENS = 4
LEAVER_TOKENS = 200    # far more than arrive before its client leaves, after the first chunk
KINDS = [("/v1/chat/completions", False), ("/v1/chat/completions", True), ("/v1/completions", False),
         ("/v1/completions", True)]


@pytest.fixture(scope="module")
def url():
    with running_server(context_length=512) as (_, server):
        yield server.url


def request_body(path: str, i: int, max_tokens: int, stream: bool) -> dict:
    # ten prompts: their shared pages stay in the prefix cache
    text = f"Load test prompt {i % 10}: tell me something"
    prompt = {"messages": [{"role": "user", "content": text}]} if "chat" in path else {"prompt": text}
    return {**prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {})}


async def completed_tokens(client: httpx.AsyncClient, path: str, body: dict) -> int:
    """completion_tokens of a request read to its end (the usage chunk of a stream, after [DONE])."""
    if not body["stream"]:
        r = await client.post(path, json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] == "length"
        return r.json()["usage"]["completion_tokens"]
    async with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        events = [line[len("data: "):] async for line in r.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return httpx.Response(200, content=events[-2]).json()["usage"]["completion_tokens"]


async def leave_after_first_chunk(client: httpx.AsyncClient, path: str, body: dict) -> None:
    async with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                return   # leaving the block closes the connection with the rest unread


async def run_load(url: str) -> tuple[list[int], int]:
    """Every finishing request's completion_tokens, and how many clients left."""
    slots = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def one(i: int):
            path, stream = KINDS[i % len(KINDS)]
            async with slots:
                if i % 5 == 4:
                    return await leave_after_first_chunk(client, path, request_body(path, i, LEAVER_TOKENS, True))
                return await completed_tokens(client, path, request_body(path, i, MAX_TOKENS, stream))

        results = await asyncio.gather(*(one(i) for i in range(REQUESTS)))
    return [r for r in results if r is not None], sum(r is None for r in results)


def test_load_with_leavers_loses_nothing_and_leaves_nothing(url):
    def scrape() -> str:
        return httpx.get(url + "/metrics").text

    tokens, left = asyncio.run(run_load(url))
    assert left == REQUESTS // 5 and len(tokens) == REQUESTS - left
    assert tokens == [MAX_TOKENS] * len(tokens)
    wait_for(lambda: metric(scrape(), "dsserve_num_running_requests") == 0
             and metric(scrape(), "dsserve_num_queued_requests") == 0, timeout=30)
    text = scrape()     # this module's server served nothing else
    assert metric(text, "dsserve_requests_finished_total", 'reason="length"') == len(tokens)
    assert metric(text, "dsserve_requests_finished_total", 'reason="abort"') == left
    assert metric(text, "dsserve_prefix_cache_pages") > 0
    assert metric(text, "dsserve_kv_pages_used") == metric(text, "dsserve_prefix_cache_pages")
    assert metric(text, "dsserve_kv_cache_usage") == 0
