"""The continuous-batching engine: batching, retraction, chunked prefill and the prefix cache must
never change what a request generates."""
import random

import pytest

from dsserve import Engine, SamplingParams
from dsserve.core.errors import RequestError
from hf_checkpoints import build


def _requests(vocab: int, n: int = 16, seed: int = 0, shared_prefix: int = 0):
    rng = random.Random(seed)
    prefix = [rng.randrange(20, vocab) for _ in range(shared_prefix)]
    prompts = [prefix + [rng.randrange(20, vocab) for _ in range(rng.randint(1, 40))] for _ in range(n)]
    params = [SamplingParams(max_new_tokens=rng.randint(1, 24), temperature=0, ignore_eos=True) for _ in range(n)]
    return prompts, params


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return str(build("llama", tmp_path_factory.mktemp("llama")).path)


@pytest.fixture(scope="module", params=["tiny", "llama"])
def model(request, llama_path):
    path = None if request.param == "tiny" else llama_path
    with Engine(model_path=path, device="cpu", dtype="float32", max_total_tokens=4096) as eng:
        yield path, eng


def _alone(eng, prompts, params):
    return [eng.generate(input_ids=[p], sampling_params=sp)[0].token_ids for p, sp in zip(prompts, params)]


@pytest.mark.parametrize("shared_prefix", [0, 37])
def test_batched_greedy_equals_alone(model, shared_prefix):
    _, eng = model
    prompts, params = _requests(eng.info.vocab_size, shared_prefix=shared_prefix)
    together = [o.token_ids for o in eng.generate(input_ids=prompts, sampling_params=params)]
    assert [len(t) for t in together] == [p.max_new_tokens for p in params]
    assert together == _alone(eng, prompts, params)


@pytest.mark.parametrize("options", [
    dict(max_total_tokens=160, page_size=4),                         # tiny pool: retraction must happen
    dict(chunked_prefill_size=7),
    dict(disable_radix_cache=True),
    dict(chunked_prefill_size=7, page_size=1, max_total_tokens=300),
])
def test_memory_pressure_and_chunking_keep_outputs(model, options):
    path, ref = model
    prompts, params = _requests(ref.info.vocab_size, seed=1, shared_prefix=20)
    expected = [o.token_ids for o in ref.generate(input_ids=prompts, sampling_params=params)]
    with Engine(model_path=path, device="cpu", dtype="float32", **options) as eng:
        got = [o.token_ids for o in eng.generate(input_ids=prompts, sampling_params=params)]
        if options.get("max_total_tokens") == 160:
            assert eng.scheduler.num_retractions > 0
        if options.get("disable_radix_cache"):
            assert all(o.cached_tokens == 0 for o in eng.generate(input_ids=prompts[:2], sampling_params=params[:2]))
    assert got == expected


def test_prefix_cache_reports_cached_tokens(model):
    _, eng = model
    prompt = list(range(30, 30 + 64))
    sp = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    first = eng.generate(input_ids=[prompt], sampling_params=sp)[0]
    second = eng.generate(input_ids=[prompt], sampling_params=sp)[0]
    assert second.token_ids == first.token_ids
    page = eng.info.page_size
    assert second.cached_tokens == (len(prompt) - 1) // page * page > 0


def test_seeded_sampling_is_batch_independent(model):
    _, eng = model
    prompts, _ = _requests(eng.info.vocab_size, n=6, seed=2)
    params = [SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=100 + i, ignore_eos=True)
              for i in range(6)]
    together = [o.token_ids for o in eng.generate(input_ids=prompts, sampling_params=params)]
    assert together == _alone(eng, prompts, params)
    unseeded = [SamplingParams(max_new_tokens=12, temperature=0.9, ignore_eos=True) for _ in range(6)]
    assert [o.token_ids for o in eng.generate(input_ids=prompts, sampling_params=unseeded)] != together


def test_top_k_one_equals_greedy(model):
    _, eng = model
    prompts, _ = _requests(eng.info.vocab_size, n=4, seed=3)
    greedy = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    top1 = SamplingParams(max_new_tokens=10, temperature=1.3, top_k=1, ignore_eos=True)
    assert ([o.token_ids for o in eng.generate(input_ids=prompts, sampling_params=greedy)]
            == [o.token_ids for o in eng.generate(input_ids=prompts, sampling_params=top1)])


def test_abort_frees_every_page(model):
    _, eng = model
    allocator = eng.scheduler.allocator
    eng.flush_cache()
    start = allocator.num_free
    sp = SamplingParams(max_new_tokens=500, temperature=0, ignore_eos=True)
    handles = [eng.add_request(input_ids=list(range(40, 40 + 50 + i)), sampling_params=sp) for i in range(4)]
    for h in handles:
        next(iter(h))                      # running: it has produced a token
    for h in handles:
        h.abort()
    finals = [list(h)[-1] for h in handles]
    assert all(f.finished and f.finish_reason == "abort" for f in finals)
    eng.flush_cache()
    assert allocator.num_free == start


def test_too_long_request_is_rejected_and_others_are_served(model):
    _, eng = model
    limit = eng.info.max_context
    with pytest.raises(RequestError, match="maximum context"):
        eng.add_request(input_ids=[7] * limit, sampling_params=SamplingParams(max_new_tokens=1))
    out = eng.generate(input_ids=[[7, 8, 9]], sampling_params=SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert len(out[0].token_ids) == 3


def test_stop_string_across_token_boundary():
    with Engine(device="cpu", dtype="float32") as eng:
        tok = eng.tokenizer
        sp = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
        out = eng.generate(prompts=["The quick brown fox"], sampling_params=sp)[0]
        ids = out.token_ids
        bounds = [len(tok.decode(ids[:k])) for k in range(1, len(ids))]
        cut = next(b for b in bounds if 2 <= b <= len(out.text) - 2 and out.text[b - 2:b + 2].isprintable())
        stop = out.text[cut - 2: cut + 2]
        stopped = eng.generate(prompts=["The quick brown fox"],
                               sampling_params=SamplingParams(max_new_tokens=40, temperature=0, stop=[stop],
                                                              ignore_eos=True))[0]
        assert stopped.finish_reason == "stop" and stopped.matched_stop == stop
        assert stopped.text == out.text[: out.text.find(stop)]
        # streamed increments never show any part of the stop string
        h = eng.add_request(prompt="The quick brown fox",
                            sampling_params=SamplingParams(max_new_tokens=40, temperature=0, stop=[stop],
                                                           ignore_eos=True))
        assert "".join(o.text for o in h) == stopped.text
