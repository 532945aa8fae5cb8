"""The OpenAI-compatible server through the official `openai` client, against a real uvicorn server
on 127.0.0.1 serving dsserve-tiny (float32) with the deepseek-r1 reasoning parser and the
deepseekv3 tool-call parser."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from server_util import metric, scripted_output, server_fixtures, sse_events, wait_for

MODEL = "dsserve-tiny"
USER = [{"role": "user", "content": "What is 2 + 2?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}
CALL_WEATHER = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
                '{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')


server, engine, url = server_fixtures(reasoning_parser="deepseek-r1", tool_call_parser="deepseekv3")


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def greedy_chat(client, **kw):
    kw.setdefault("max_tokens", 8)
    return client.chat.completions.create(model=MODEL, messages=kw.pop("messages", USER), temperature=0, **kw)


# ------------------------------------------------------------------------------------ basics
def test_models_health_and_openapi(client, url):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/health_generate", timeout=60).status_code == 200
    assert "/v1/chat/completions" in httpx.get(url + "/openapi.json").json()["paths"]


def test_chat_plain_and_streamed_agree(client, url):
    plain = greedy_chat(client, extra_body={"separate_reasoning": False})
    choice = plain.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    prompt_ids = httpx.post(url + "/v1/tokenize", json={"messages": USER}).json()["tokens"]
    assert plain.usage.prompt_tokens == len(prompt_ids)
    assert plain.usage.completion_tokens == 8 and plain.usage.total_tokens == len(prompt_ids) + 8

    chunks = list(greedy_chat(client, stream=True, stream_options={"include_usage": True},
                              extra_body={"separate_reasoning": False}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_logprobs(client):
    resp = greedy_chat(client, logprobs=True, top_logprobs=3, max_tokens=5)
    content = resp.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
        assert entry.bytes == list(entry.token.encode())


def test_completions_echo_and_prompt_logprobs(client, url):
    resp = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=3, temperature=0,
                                      echo=True, logprobs=2)
    choice = resp.choices[0]
    prompt_ids = httpx.post(url + "/v1/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    lp = choice.logprobs
    assert choice.text.startswith("Hello world") and len(choice.text) > len("Hello world")
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == len(prompt_ids) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)
    for got, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert 1 <= len(top) <= 2 and max(top.values()) >= got - 1e-5
    for got, top in zip(lp.token_logprobs[-3:], lp.top_logprobs[-3:]):   # greedy tokens: the top ones
        assert got == pytest.approx(max(top.values()), abs=1e-5)
    assert resp.usage.prompt_tokens == len(prompt_ids) and resp.usage.completion_tokens == 3

    # A prompt token's echoed log-prob is the log-prob the model gives it when generating it.
    first = client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=1, temperature=0, logprobs=1)
    next_id = httpx.post(url + "/v1/tokenize", json={"prompt": first.choices[0].text,
                                                     "add_special_tokens": False}).json()["tokens"]
    echoed = client.completions.create(model=MODEL, prompt=prompt_ids + next_id, max_tokens=1, temperature=0,
                                       echo=True, logprobs=1)
    assert echoed.choices[0].logprobs.token_logprobs[len(prompt_ids)] == pytest.approx(
        first.choices[0].logprobs.token_logprobs[0], abs=1e-4)


def test_completions_streamed_echo(client):
    plain = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=6, temperature=0, echo=True)
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon", max_tokens=6, temperature=0,
                                            echo=True, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].usage.completion_tokens == 6


def test_n2(client):
    resp = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, n=2, temperature=1.0, seed=7)
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.usage.completion_tokens == 12
    texts = [c.message.reasoning_content for c in resp.choices]
    assert texts[0] != texts[1]          # choice i uses seed + i
    chunks = list(client.completions.create(model=MODEL, prompt="abc", max_tokens=4, n=2, stream=True, seed=3))
    assert {c.choices[0].index for c in chunks} == {0, 1}


def test_stop(client):
    full = client.completions.create(model=MODEL, prompt="The weather", max_tokens=16, temperature=0).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip()
    cut = full[: full.index(stop)]
    resp = client.completions.create(model=MODEL, prompt="The weather", max_tokens=16, temperature=0, stop=[stop])
    assert resp.choices[0].text == cut and resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].model_extra["matched_stop"] == stop
    chunks = list(client.completions.create(model=MODEL, prompt="The weather", max_tokens=16, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut


def test_seed_reproducibility(client):
    def run(seed):
        return client.completions.create(model=MODEL, prompt="Seeds", max_tokens=10, temperature=1.0,
                                         seed=seed).choices[0].text
    assert run(1234) == run(1234)
    assert run(1234) != run(4321)


def test_usage_reports_cached_tokens(client):
    prompt = "A long shared prefix that spans several KV pages of sixteen tokens each, " * 3
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens > 32
    assert second.usage.prompt_tokens_details.cached_tokens >= 16


# ------------------------------------------------------------------------------------ reasoning
def test_reasoning_content(client, engine):
    with scripted_output(engine, "I add two and two.\n</think>\n\nIt is 4."):
        resp = greedy_chat(client, max_tokens=40)
        message = resp.choices[0].message
        assert message.reasoning_content == "I add two and two." and message.content == "It is 4."
        assert resp.choices[0].finish_reason == "stop"
        chunks = list(greedy_chat(client, max_tokens=40, stream=True))
        deltas = [c.choices[0].delta for c in chunks]
        reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
        assert reasoning == "I add two and two."
        assert "".join(d.content or "" for d in deltas) == "It is 4."
        # separate_reasoning off: the raw text
        raw = greedy_chat(client, max_tokens=40, extra_body={"separate_reasoning": False}).choices[0].message
        assert raw.content == "I add two and two.\n</think>\n\nIt is 4."


def test_reasoning_without_closing_tag_is_all_reasoning(client):
    message = greedy_chat(client).choices[0].message
    assert message.reasoning_content and message.content == ""


def test_thinking_budget_closes_the_thinking(client, url):
    free = greedy_chat(client, max_tokens=3, extra_body={"separate_reasoning": False}).choices[0].message.content
    resp = greedy_chat(client, max_tokens=12, extra_body={"thinking_budget": 3})
    message = resp.choices[0].message
    assert message.reasoning_content == free.strip()
    assert message.content      # the answer goes on after the forced </think>
    resp = greedy_chat(client, max_tokens=12, extra_body={"custom_params": {"thinking_budget": 0}})
    assert resp.choices[0].message.reasoning_content is None and resp.choices[0].message.content


# ------------------------------------------------------------------------------------ tools
def test_tools_auto(client, engine, url):
    plain = greedy_chat(client, max_tokens=1).usage.prompt_tokens
    with scripted_output(engine, "Need the weather.\n</think>\n\nLet me check." + CALL_WEATHER):
        resp = greedy_chat(client, max_tokens=60, tools=[WEATHER], tool_choice="auto")
        choice = resp.choices[0]
        assert resp.usage.prompt_tokens > plain + 20          # the tools were described to the model
        assert choice.finish_reason == "tool_calls"
        assert choice.message.reasoning_content == "Need the weather."
        assert choice.message.content == "Let me check."
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

        chunks = list(greedy_chat(client, max_tokens=60, tools=[WEATHER], stream=True))
        calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
        assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Let me check."
        assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tools_none(client, engine):
    plain = greedy_chat(client, max_tokens=1).usage.prompt_tokens
    with scripted_output(engine, "ok\n</think>\n\n" + CALL_WEATHER):
        resp = greedy_chat(client, max_tokens=60, tools=[WEATHER], tool_choice="none")
    assert resp.usage.prompt_tokens == plain               # the model is not told about the tools
    assert resp.choices[0].message.tool_calls is None and resp.choices[0].finish_reason == "stop"


def test_tools_required_and_named(client, engine):
    rest = '{"zone": "UTC"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
    with scripted_output(engine, "get_time\n```json\n" + rest):
        resp = greedy_chat(client, max_tokens=40, tools=[WEATHER, TIME], tool_choice="required")
    (call,) = resp.choices[0].message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == {"zone": "UTC"}
    assert resp.choices[0].message.reasoning_content is None and resp.choices[0].finish_reason == "tool_calls"

    named = {"type": "function", "function": {"name": "get_weather"}}
    with scripted_output(engine, '{"city": "Oslo"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'):
        resp = greedy_chat(client, max_tokens=40, tools=[WEATHER, TIME], tool_choice=named)
        chunks = list(greedy_chat(client, max_tokens=40, tools=[WEATHER, TIME], tool_choice=named, stream=True))
    (call,) = resp.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo"}
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [c.function.name for c in calls] == ["get_weather"]

    # The unscripted random model writes no valid JSON: returned as content, never a 500.
    resp = greedy_chat(client, max_tokens=10, tools=[WEATHER], tool_choice="required")
    assert resp.choices[0].message.tool_calls is None and resp.choices[0].message.content


def test_tool_history_renders(client):
    messages = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    resp = greedy_chat(client, messages=messages, tools=[WEATHER], max_tokens=2)
    assert resp.usage.prompt_tokens > 20


# ------------------------------------------------------------------------------------ native and misc
def test_generate_tokenize_detokenize(url):
    out = httpx.post(url + "/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 4,
                                                                                 "temperature": 0}}).json()
    assert len(out["output_ids"]) == 4 and out["meta_info"]["finish_reason"] == {"type": "length", "length": 4}
    batch = httpx.post(url + "/generate", json={"input_ids": [[5, 6, 7], [8, 9]], "return_logprob": True,
                                                "sampling_params": {"max_new_tokens": 2}}).json()
    assert len(batch) == 2 and len(batch[1]["meta_info"]["output_token_logprobs"]) == 2
    with httpx.stream("POST", url + "/generate", json={"text": "Hi", "stream": True,
                                                        "sampling_params": {"max_new_tokens": 4,
                                                                            "temperature": 0}}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]" and events[-2]["text"] == out["text"]
    ids = httpx.post(url + "/v1/tokenize", json={"prompt": "round trip"}).json()["tokens"]
    text = httpx.post(url + "/v1/detokenize", json={"tokens": ids, "skip_special_tokens": True}).json()["text"]
    assert text == "round trip"
    assert httpx.post(url + "/flush_cache").status_code == 200


def test_metrics_endpoint(client, url):
    greedy_chat(client, max_tokens=3)
    text = httpx.get(url + "/metrics").text
    assert metric(text, "dsserve_time_to_first_token_seconds_count") >= 1
    assert metric(text, "dsserve_inter_token_latency_seconds_count") >= 2
    assert metric(text, "dsserve_generation_tokens_total") >= 3
    assert metric(text, "dsserve_requests_finished_total", 'reason="length"') >= 1
    assert metric(text, "dsserve_http_requests_total",
                  'method="POST",route="/v1/chat/completions",status="200"') >= 1
    for name in ("dsserve_num_running_requests", "dsserve_num_queued_requests", "dsserve_kv_cache_usage",
                 "dsserve_prefix_cache_hit_rate", "dsserve_prompt_tokens_total"):
        metric(text, name)


def test_disconnect_aborts_and_frees_kv(url, engine):
    def scrape():
        return httpx.get(url + "/metrics").text

    idle = metric(scrape(), "dsserve_kv_cache_usage")
    aborted = engine.metrics.requests_finished.get("abort", 0)
    body = {"model": MODEL, "messages": USER, "max_tokens": 3000, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()     # kept referenced: dropping it would close the connection early
        for _ in range(6):
            next(lines)
        assert metric(scrape(), "dsserve_kv_cache_usage") > idle
        assert metric(scrape(), "dsserve_num_running_requests") == 1
    wait_for(lambda: engine.metrics.requests_finished.get("abort", 0) == aborted + 1)
    wait_for(lambda: metric(scrape(), "dsserve_kv_cache_usage") == idle
             and metric(scrape(), "dsserve_num_running_requests") == 0)


def test_64_concurrent_streams_match_solo(url, client):
    prompts = [f"Request number {i}: " + "word " * (i % 7) for i in range(16)]
    solo = [client.completions.create(model=MODEL, prompt=p, max_tokens=10, temperature=0).choices[0].text
            for p in prompts]

    async def main():
        aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        async def one(prompt):
            stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                                      stream=True)
            return "".join([c.choices[0].text async for c in stream])

        try:
            return await asyncio.gather(*(one(prompts[i % 16]) for i in range(64)))
        finally:
            await aclient.close()

    texts = asyncio.run(main())
    assert texts == [solo[i % 16] for i in range(64)]


def test_disconnect_before_a_non_streamed_answer_aborts(url, engine):
    aborted = engine.metrics.requests_finished.get("abort", 0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 3000}, timeout=1.0)
    wait_for(lambda: engine.metrics.requests_finished.get("abort", 0) == aborted + 1)
    wait_for(lambda: engine.metrics.num_running == 0 and engine.metrics.kv_usage == 0.0)
