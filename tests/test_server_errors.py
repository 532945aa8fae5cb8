"""Every error the API documents, with its status code and OpenAI's body
`{"error": {"message", "type", "param", "code"}}`, against a server with --api-key,
--max-running-requests 1, --max-queued-requests 1 and --context-length 256."""
from __future__ import annotations

import httpx
import openai
import pytest
from server_util import fail_forward, restore_forward, running_server, sse_events, wait_for

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def server():
    with running_server(api_key=KEY, max_running_requests=1, max_queued_requests=1, context_length=256) as s:
        yield s


@pytest.fixture(scope="module")
def url(server):
    return server[1].url


def error_of(response: httpx.Response, status: int, param=None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["param"] == param
    return err


def post(url, path, body, headers=AUTH):
    return httpx.post(url + path, json=body, headers=headers, timeout=60)


# ------------------------------------------------------------------------------------ api key
def test_api_key_required_everywhere_but_health(url):
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.head(url + "/health").status_code == 200
    for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/chat/completions"),
                         ("GET", "/health_generate"), ("POST", "/generate"), ("GET", "/openapi.json"),
                         ("GET", "/no/such/route")]:
        err = error_of(httpx.request(method, url + path, json={}), 401)
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
    err = error_of(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert "incorrect" in err["message"]
    assert httpx.get(url + "/v1/models", headers=AUTH).status_code == 200


def test_openapi_documents_the_key(url):
    doc = httpx.get(url + "/openapi.json", headers=AUTH).json()
    assert doc["components"]["securitySchemes"] == {"bearerAuth": {"type": "http", "scheme": "bearer"}}
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            guarded = path != "/health"
            assert ("401" in op["responses"]) == guarded, (method, path)
            assert ("security" in op) == guarded, (method, path)


def test_api_key_with_openai_client(url):
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    resp = client.chat.completions.create(model="dsserve-tiny", messages=USER, max_tokens=2)
    assert resp.usage.completion_tokens == 2


# ------------------------------------------------------------------------------------ 400s
@pytest.mark.parametrize("change, param", [
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": -3}, "max_completion_tokens"),
    ({"n": 2}, "n"),                               # over --max-running-requests 1
    ({"n": 0}, "n"),
    ({"model": "gpt-4o"}, "model"),
    ({"temperature": "hot"}, "temperature"),       # wrong types
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"stream": "yes please"}, "stream"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"tool_choice": "sometimes", "tools": [TOOL]}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),    # no tools
    ({"tool_choice": {"type": "function", "function": {"name": "g"}}, "tools": [TOOL]}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"max_tokens": 255}, "max_tokens"),             # prompt + max_tokens over the 256-token context
])
def test_chat_400(url, change, param):
    body = {"model": "dsserve-tiny", "messages": USER, "max_tokens": 2, **change}
    err = error_of(post(url, "/v1/chat/completions", body), 400, param)
    assert err["type"] == "invalid_request_error"


def test_prompt_longer_than_context(url):
    long = [{"role": "user", "content": "many words " * 400}]
    err = error_of(post(url, "/v1/chat/completions", {"messages": long, "max_tokens": 1}), 400, "messages")
    assert err["code"] == "context_length_exceeded" and "256" in err["message"]
    err = error_of(post(url, "/v1/completions", {"prompt": list(range(10, 400)), "max_tokens": 1}), 400, "prompt")
    assert err["code"] == "context_length_exceeded"


@pytest.mark.parametrize("change, param", [
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, 2, 99999]}, "prompt"),
    ({"prompt": {"text": "x"}}, "prompt"),
    ({"logprobs": 30}, "logprobs"),
    ({"best_of": 3}, "best_of"),
    ({"temperature": -1}, "temperature"),
])
def test_completions_400(url, change, param):
    error_of(post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2, **change}), 400, param)


def test_malformed_json_and_non_object_body(url):
    for raw in (b"{not json", b'{"messages": [', b""):
        r = httpx.post(url + "/v1/chat/completions", content=raw,
                       headers={**AUTH, "Content-Type": "application/json"})
        assert error_of(r, 400)["code"] == "invalid_json"
    error_of(post(url, "/v1/completions", [1, 2, 3]), 400)
    error_of(post(url, "/generate", {"sampling_params": {"max_new_tokens": 1}}), 400, "text")
    error_of(post(url, "/v1/detokenize", {"tokens": [-1]}), 400, "tokens")


def test_unknown_route_and_method(url):
    err = error_of(httpx.post(url + "/v1/engines/foo", headers=AUTH, json={}), 404)
    assert "/v1/engines/foo" in err["message"]
    error_of(httpx.delete(url + "/v1/models", headers=AUTH), 405)
    error_of(httpx.get(url + "/v1/models/gpt-4", headers=AUTH), 404, "model")


# ------------------------------------------------------------------------------------ 503
def test_queue_full_is_503_with_retry_after(url, server):
    engine = server[0]
    long = {"model": "dsserve-tiny", "messages": USER, "max_tokens": 200, "stream": True}
    with httpx.Client(headers=AUTH, timeout=60) as a, httpx.Client(headers=AUTH, timeout=60) as b, \
            a.stream("POST", url + "/v1/chat/completions", json=long) as running:
        lines = running.iter_lines()
        next(lines)                                           # running: the only slot
        with b.stream("POST", url + "/v1/chat/completions", json=long) as waiting:
            wait_for(lambda: engine.queue_depth() == 1)        # waiting: the queue is full
            r = post(url, "/v1/chat/completions", {"messages": USER, "max_tokens": 2})
            err = error_of(r, 503)
            assert r.headers["Retry-After"] == "1" and err["type"] == "server_error"
            error_of(post(url, "/v1/completions", {"prompt": "x", "max_tokens": 2}), 503)
            assert waiting.status_code == 200
    wait_for(lambda: engine.queue_depth() == 0 and engine.metrics.num_running == 0)
    # with the queue empty again, requests are served
    assert post(url, "/v1/completions", {"prompt": "x", "max_tokens": 2}).status_code == 200


def test_engine_failure_is_a_500_and_the_server_survives(url, server):
    engine = server[0]
    engine.run_on_worker(fail_forward, "simulated device failure")
    try:
        r = post(url, "/v1/completions", {"prompt": "x", "max_tokens": 2})
        err = error_of(r, 500)
        assert "simulated device failure" in err["message"] and err["type"] == "server_error"
        assert r.headers["connection"] == "close"
        with httpx.stream("POST", url + "/v1/chat/completions", headers=AUTH,
                          json={"messages": USER, "max_tokens": 2, "stream": True}) as r:
            events = sse_events(r)
        assert "simulated device failure" in events[-1]["error"]["message"]
    finally:
        engine.run_on_worker(restore_forward)
    assert post(url, "/v1/completions", {"prompt": "x", "max_tokens": 2}).status_code == 200
