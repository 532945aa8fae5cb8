"""Speculative decoding with the MTP layer, end to end through the engine (float32, CPU).

Two checkpoints with an MTP layer: dsserve-tiny and a random DeepSeek-V3 in the published layout
(tests/hf_checkpoints.py). Greedy output must be the same as without speculation over many prompts,
batch mixes, chunked prefill, the prefix cache and retraction, with 1 and 3 draft steps. Random
weights accept almost no draft, so the accept path is driven too by an oracle drafter (the MTP layer
still runs and keeps its cache; its guesses are then replaced by the true continuation, one in three
spoiled): runs of several tokens are committed, stops and max_tokens cut them exactly, log-probs are
the target's, and the KV pool and prefix cache end as they end without speculation.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_checkpoints import add_mtp_layer, build

from server_util import metric, running_server

from dsserve.core.engine import Engine
from dsserve.core.sampling_params import SamplingParams
from dsserve.core.speculative import MTPSpeculator

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMMON = dict(dtype="float32", model_worker="thread", max_total_tokens=2048, log_level="warning")


@pytest.fixture(scope="module")
def v3_folder(tmp_path_factory) -> Path:
    folder = build("deepseek_v3", tmp_path_factory.mktemp("deepseek_v3")).path
    add_mtp_layer(folder)
    return folder


def _prompts(vocab: int, n: int, seed: int) -> list[list[int]]:
    """Prompts of 1..40 tokens, half of them sharing one of two prefixes (the prefix cache serves them)."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, vocab) for _ in range(20)] for _ in range(2)]
    out = []
    for i in range(n):
        head = rng.choice(prefixes)[: rng.randint(4, 20)] if i % 2 else []
        out.append(head + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 20))])
    return out


def _generate(engine: Engine, prompts, params, together=True):
    if together:
        return engine.generate(input_ids=prompts, sampling_params=params)
    return [engine.generate(input_ids=[p], sampling_params=params)[0] for p in prompts]


GREEDY = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)


@pytest.mark.parametrize("model", ["dsserve-tiny", "deepseek_v3"])
def test_greedy_output_is_unchanged(model, v3_folder):
    path = None if model == "dsserve-tiny" else str(v3_folder)
    with Engine(path, **COMMON) as plain:
        prompts = _prompts(plain.info.vocab_size, 12, seed=1)
        want = [o.token_ids for o in _generate(plain, prompts, GREEDY)]
    setups = [  # (engine options, requests together or one by one)
        (dict(speculative_num_steps=1), True),
        (dict(speculative_num_steps=3, chunked_prefill_size=16), True),   # prompts prefilled in chunks
        (dict(speculative_num_steps=2), False),
        # a pool of 96 tokens: requests are retracted and resume
        (dict(speculative_num_steps=2, max_total_tokens=96, page_size=4), True),
    ]
    for options, together in setups:
        with Engine(path, **{**COMMON, **options}, speculative_algorithm="EAGLE") as spec:
            got = [o.token_ids for o in _generate(spec, prompts, GREEDY, together)]
            assert got == want, options
            assert spec.metrics.spec_verifications > 0
            retracted = spec.scheduler.num_retractions
        if "max_total_tokens" in options:
            assert retracted > 0


@pytest.fixture
def oracle(monkeypatch):
    """Makes every speculating engine's drafts the true continuation of `oracle.want` (by prompt),
    each guess spoiled (+1) with probability 1/3, after the MTP layer drafted as usual."""

    class Oracle:
        want: dict[tuple, list[int]] = {}
        rng = random.Random(0)

    real = MTPSpeculator._draft

    def draft(self, step, hidden, runs, sequences):
        drafts = real(self, step, hidden, runs, sequences)
        for i, guesses in drafts.items():
            seq = sequences[step.rids[i]]
            truth = Oracle.want[tuple(seq.prompt_ids)][len(seq.output_ids):]
            drafts[i] = [t + (Oracle.rng.random() < 1 / 3) for t in truth[: len(guesses)]]
        return drafts

    monkeypatch.setattr(MTPSpeculator, "_draft", draft)
    return Oracle


def _pool_state(engine: Engine):
    return engine.scheduler.allocator.num_free, engine.tree.cached_pages


def test_accepted_runs_commit_the_same_tokens_and_leave_the_cache_as_without_speculation(oracle):
    params = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True, logprobs=True, top_logprobs=2)
    with Engine(**COMMON) as plain:
        prompts = _prompts(plain.info.vocab_size, 8, seed=2)
        base = _generate(plain, prompts, params)
        plain_pool = _pool_state(plain)
    oracle.want = {tuple(p): o.token_ids for p, o in zip(prompts, base)}
    with Engine(**COMMON, speculative_algorithm="NEXTN", speculative_num_steps=3) as spec:
        got = _generate(spec, prompts, params)
        assert _pool_state(spec) == plain_pool
        accept = spec.metrics.spec_accept_length
    assert accept > 1.8     # 3 drafts, each right with probability 2/3
    for g, b in zip(got, base):
        assert g.token_ids == b.token_ids and g.completion_tokens == 24
        assert g.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert [[t for t, _ in top] for top in g.top_logprobs] == [[t for t, _ in top] for top in b.top_logprobs]


def test_stops_and_max_tokens_cut_an_accepted_run_exactly(oracle):
    with Engine(**COMMON) as plain:
        prompts = _prompts(plain.info.vocab_size, 4, seed=3)
        long = [o.token_ids for o in _generate(plain, prompts, SamplingParams(temperature=0, max_new_tokens=30,
                                                                                ignore_eos=True))]
        # per request: a stop token in the middle of the output, a stop string, and a short max_tokens
        stop_tokens = [SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True, stop_token_ids=[out[9]])
                       for out in long]
        texts = [plain.tokenizer.decode(out) for out in long]
        stop_strings = [SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True, stop=[text[12:15]])
                        for text in texts]
        short = SamplingParams(temperature=0, max_new_tokens=7, ignore_eos=True)
        want = [[_strip(o) for o in (plain.generate(input_ids=[p], sampling_params=a)[0],
                                     plain.generate(input_ids=[p], sampling_params=b)[0],
                                     plain.generate(input_ids=[p], sampling_params=short)[0])]
                for p, a, b in zip(prompts, stop_tokens, stop_strings)]
        plain_pool = _pool_state(plain)
    oracle.want = {tuple(p): out for p, out in zip(prompts, long)}
    with Engine(**COMMON, speculative_algorithm="EAGLE", speculative_num_steps=3) as spec:
        assert [o.token_ids for o in _generate(spec, prompts, SamplingParams(temperature=0, max_new_tokens=30,
                                                                               ignore_eos=True))] == long
        got = [[_strip(o) for o in (spec.generate(input_ids=[p], sampling_params=a)[0],
                                    spec.generate(input_ids=[p], sampling_params=b)[0],
                                    spec.generate(input_ids=[p], sampling_params=short)[0])]
               for p, a, b in zip(prompts, stop_tokens, stop_strings)]
        assert _pool_state(spec) == plain_pool
    assert got == want


def _strip(out):
    """What a client sees of a finished request."""
    return out.token_ids, out.text, out.finish_reason, out.matched_stop, out.completion_tokens


def test_seeded_sampling_reproduces(oracle):
    # A low temperature keeps sampled output near the greedy one, where the oracle's drafts are right.
    params = [SamplingParams(temperature=0.1, top_p=0.95, seed=s, max_new_tokens=16, ignore_eos=True)
              for s in range(4)]
    runs = []
    with Engine(**COMMON) as plain:
        prompts = _prompts(plain.info.vocab_size, 4, seed=4)
        oracle.want = {tuple(p): o.token_ids for p, o in zip(prompts, _generate(plain, prompts, GREEDY))}
    for _ in range(2):   # the same drafts each time (drafts decide how the random stream is used)
        oracle.rng = random.Random(0)
        with Engine(**COMMON, speculative_algorithm="EAGLE", speculative_num_steps=2) as spec:
            runs.append([o.token_ids for o in spec.generate(input_ids=prompts, sampling_params=params)])
            assert spec.metrics.spec_accept_length > 1.0
    assert runs[0] == runs[1]


def test_an_mtp_less_model_is_refused_with_the_reason(tmp_path):
    folder = build("llama", tmp_path / "llama").path
    with pytest.raises(Exception, match="speculative-algorithm EAGLE.*MTP layer.*num_nextn_predict_layers"):
        Engine(str(folder), **COMMON, speculative_algorithm="EAGLE")


def test_drafts_are_what_the_mtp_layer_computes_from_scratch(monkeypatch):
    # The MTP layer's cache is caught up piecewise (prefill chunks, after each verify, with rejected
    # drafts' rows overwritten); its drafts must be those of one pass over the whole committed sequence.
    # (Without the prefix cache: a cached page's last row pairs it with the next token of the sequence
    # that cached it, which only the drafts' quality notices.)
    seen = []
    real = MTPSpeculator._draft

    def draft(self, step, hidden, runs, sequences):
        drafts = real(self, step, hidden, runs, sequences)
        for i, guesses in drafts.items():
            seq = sequences[step.rids[i]]
            seen.append((seq.prompt_ids + seq.output_ids, list(guesses)))
        return drafts

    monkeypatch.setattr(MTPSpeculator, "_draft", draft)
    with Engine(**COMMON, speculative_algorithm="EAGLE", speculative_num_steps=3, chunked_prefill_size=16,
                disable_radix_cache=True) as spec:
        prompts = _prompts(spec.info.vocab_size, 6, seed=5)
        spec.generate(input_ids=prompts, sampling_params=GREEDY)
        runner = spec.executor.runner
        pages = spec.scheduler.allocator.alloc(spec.scheduler.allocator.num_free)
        checked = [(tokens, guesses) for tokens, guesses in seen[::7] if len(guesses) == 3]
        assert len(checked) >= 5
        for tokens, guesses in checked:
            assert _scratch_drafts(runner, tokens, 3, pages) == guesses


def _scratch_drafts(runner, tokens, steps, pages):
    from dsserve.core.batch import BatchItem

    n = len(tokens)
    _, hidden = runner.forward_hidden([BatchItem(tokens[:-1], 0, pages, "last")])
    logits, out = runner.draft([BatchItem(tokens[1:], 0, pages, "last")], hidden)
    drafts = [int(logits.argmax())]
    for j in range(1, steps):
        logits, out = runner.draft([BatchItem([drafts[-1]], n - 2 + j, pages, "last")], out)
        drafts.append(int(logits.argmax()))
    return drafts


def test_the_server_counts_committed_tokens_and_reports_the_accept_length(oracle):
    import httpx

    with Engine(**COMMON) as plain:
        prompts = _prompts(plain.info.vocab_size, 2, seed=6)
        oracle.want = {tuple(p): o.token_ids for p, o in zip(prompts, _generate(plain, prompts, GREEDY))}
    with running_server(model_worker="thread", speculative_algorithm="EAGLE", speculative_num_steps=3,
                        log_level="warning") as (engine, server):
        body = {"model": "dsserve-tiny", "prompt": prompts[0], "max_tokens": 11, "temperature": 0, "ignore_eos": True}
        plain_resp = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
        stop_at = oracle.want[tuple(prompts[1])][6]
        stopped = httpx.post(server.url + "/v1/completions", timeout=60, json={
            **body, "prompt": prompts[1], "stop_token_ids": [stop_at], "logprobs": 1}).json()
        text = httpx.get(server.url + "/metrics").text
    # runs of up to 4 tokens a step, yet usage counts exactly what was committed and sent
    assert plain_resp["usage"]["completion_tokens"] == 11 and plain_resp["choices"][0]["finish_reason"] == "length"
    want = oracle.want[tuple(prompts[1])]
    n = want.index(stop_at) + 1
    assert stopped["usage"]["completion_tokens"] == n and stopped["choices"][0]["finish_reason"] == "stop"
    assert len(stopped["choices"][0]["logprobs"]["tokens"]) == n
    assert metric(text, "dsserve_spec_accept_length") > 1.5
    assert metric(text, "dsserve_spec_verified_tokens_total") > metric(text, "dsserve_spec_verifications_total")


def test_the_decode_log_line_gives_throughput_and_accept_length(caplog):
    import logging

    from dsserve.core.metrics import DecodeLog, Metrics

    m, line = Metrics(num_running=3, kv_usage=0.25), DecodeLog(interval=2)
    with caplog.at_level(logging.INFO, logger="dsserve"):
        for tokens, seconds, verified in [(6, 0.1, (4, 6)), (9, 0.2, (10, 15)), (4, 0.1, (12, 18)), (4, 0.1, (13, 22))]:
            m.spec_verifications, m.spec_verified_tokens = verified
            line.observe(tokens, seconds, m)
    # a line every 2 decode passes, each about its own passes: 15 tokens in 0.3 s, 15 of 10 verify
    # passes; then 8 tokens in 0.2 s, 7 of 3
    assert [r.getMessage() for r in caplog.records] == [
        "decode: 3 running, 0 queued, KV cache 25% used, 50.0 tok/s, accept length 1.50",
        "decode: 3 running, 0 queued, KV cache 25% used, 40.0 tok/s, accept length 2.33"]
