"""The batched sampler on hand-made logits: greedy, seeded reproducibility, the top-k / top-p / min-p
filters, the sampled distribution, penalties, forced tokens, log-probs, SamplingParams validation,
and sample_step's mapping of a pass's logits rows (the worker's side) to tokens and prompt log-probs."""
import pytest
import torch

from dsserve.core.batch import BatchItem
from dsserve.core.errors import RequestError
from dsserve.core.request import Request
from dsserve.core.sampling import SequenceSampling, _apply_penalties, sample, sample_step
from dsserve.core.sampling_params import SamplingParams
from dsserve.core.worker_protocol import StepInput

V = 32


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand_logits(rows, vocab=V, seed=0):
    return torch.randn(rows, vocab, generator=gen(seed)) * 2


def draws(logits_row, params, n, seed=0):
    """n independent draws from one row (n rows sharing one generator, each drawing in turn)."""
    out = sample(logits_row.expand(n, -1).contiguous(), [params] * n, [gen(seed)] * n)
    return torch.tensor(out.token_ids)


# -------------------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(temperature=1.5, top_k=1)])
def test_greedy_picks_the_argmax(params):
    logits = rand_logits(6)
    out = sample(logits, [params] * 6, [gen(i) for i in range(6)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs is None and out.top_logprobs is None     # nobody asked


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch():
    target, p = rand_logits(1, seed=1)[0], SamplingParams(temperature=0.8, top_p=0.95)
    others = rand_logits(3, seed=2)
    other_params = [SamplingParams(temperature=0), SamplingParams(temperature=1.3, top_k=5),
                    SamplingParams(temperature=1.0, repetition_penalty=1.3, frequency_penalty=0.5)]

    def alone(seed):
        g = gen(seed)
        return [sample(target[None], [p], [g]).token_ids[0] for _ in range(40)]

    g, gs = gen(7), [gen(100 + i) for i in range(3)]
    together = []
    for _ in range(40):   # the target sits between other requests with their own parameters and seeds
        logits = torch.cat([others[:1], target[None], others[1:]])
        out = sample(logits, [other_params[0], p, *other_params[1:]], [gs[0], g, *gs[1:]],
                     histories=[([1, 2], [3])] * 4)
        together.append(out.token_ids[1])
        assert out.token_ids[0] == others[0].argmax().item()
    assert alone(7) == alone(7) == together
    assert alone(8) != alone(7)                                  # the seed matters


# ------------------------------------------------------------------------------------- filters
PROBS = [0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.01, 0.01]
PERM = [5, 2, 7, 0, 3, 6, 1, 4]                                  # rank r lives at token PERM[r]


def ranked_logits():
    logits = torch.empty(len(PROBS))
    logits[PERM] = torch.tensor(PROBS).log()
    return logits


@pytest.mark.parametrize("params,ranks", [
    (SamplingParams(top_k=2), 2),
    (SamplingParams(top_p=0.7), 3),                  # mass before rank 2 is 0.65 < 0.7, before rank 3 0.8
    (SamplingParams(min_p=0.2), 4),                  # p >= 0.2 * 0.4 = 0.08
    (SamplingParams(top_p=0.01), 1),                 # the top token survives any top_p
    (SamplingParams(min_p=0.5, top_k=3), 2),         # the filters combine
    (SamplingParams(), 8),
])
def test_filters_restrict_the_support(params, ranks):
    seen = set(draws(ranked_logits(), params, 3000).tolist())
    assert seen == set(PERM[:ranks])                  # every allowed token appears, nothing else


def chi_square(tokens, probs):
    n = len(tokens)
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    expected = probs.double() * n
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampled_distribution_matches_the_tempered_softmax(temperature):
    logits = rand_logits(1, vocab=8, seed=3)[0]
    tokens = draws(logits, SamplingParams(temperature=temperature), 4000, seed=4)
    # 7 degrees of freedom: 24.3 is the 0.1% tail; the draws are seeded, so this is deterministic.
    assert chi_square(tokens, torch.softmax(logits / temperature, -1)) < 24.3


def test_top_p_renormalizes_over_the_kept_tokens():
    tokens = draws(ranked_logits(), SamplingParams(top_p=0.7), 4000, seed=5)
    kept = torch.zeros(len(PROBS))
    kept[PERM[:3]] = torch.tensor(PROBS[:3]) / sum(PROBS[:3])
    tokens_kept = torch.tensor([PERM[:3].index(t) for t in tokens.tolist()])
    assert chi_square(tokens_kept, kept[PERM[:3]]) < 13.8   # 2 degrees of freedom, 0.1% tail


# ----------------------------------------------------------------------------------- penalties
RAW = [2.0, -1.0, 0.5, -0.5, 3.0, 0.0]
PROMPT, OUTPUT = [0, 1], [2, 2, 3]                  # token 2 twice and 3 once in the output


@pytest.mark.parametrize("params,expected", [
    # Repetition: over prompt and output, positive logits divided, negative ones multiplied.
    (SamplingParams(repetition_penalty=2.0), [1.0, -2.0, 0.25, -1.0, 3.0, 0.0]),
    # Frequency: minus penalty * count in the output (the prompt does not count).
    (SamplingParams(frequency_penalty=0.5), [2.0, -1.0, -0.5, -1.0, 3.0, 0.0]),
    # Presence: minus penalty once per token present in the output.
    (SamplingParams(presence_penalty=0.5), [2.0, -1.0, 0.0, -1.0, 3.0, 0.0]),
    # Negative values reward instead.
    (SamplingParams(frequency_penalty=-1.0), [2.0, -1.0, 2.5, 0.5, 3.0, 0.0]),
    # All three: repetition first, then frequency and presence.
    (SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.5),
     [1.0, -2.0, -1.25, -2.0, 3.0, 0.0]),
])
def test_penalties_change_logits_as_documented(params, expected):
    logits = torch.tensor([RAW, RAW])
    out = _apply_penalties(logits, [params, SamplingParams()], [(PROMPT, OUTPUT), (PROMPT, OUTPUT)])
    assert out[0].tolist() == pytest.approx(expected)
    assert out[1].tolist() == RAW                                # a row without penalties is untouched


def test_penalties_steer_greedy_choice_but_not_the_reported_logprobs():
    raw = torch.tensor([RAW])
    out = sample(raw, [SamplingParams(temperature=0, presence_penalty=2.0, logprobs=True)], [gen(0)],
                 histories=[([9], [4])])
    # Token 4 (logit 3.0) drops to 1.0 and token 0 (2.0) wins; the log-prob is of the raw distribution.
    assert out.token_ids == [0]
    assert out.logprobs[0] == pytest.approx(torch.log_softmax(raw, -1)[0, 0].item())
    assert raw[0].tolist() == RAW                                # the caller's logits are not modified


# ------------------------------------------------------------------------------ forced tokens
def test_forced_token_replaces_the_choice_and_the_generator_still_advances():
    logits, p = rand_logits(1, seed=6), SamplingParams(temperature=1.0, logprobs=True)
    g = gen(11)
    free = [sample(logits, [p], [g]).token_ids[0] for _ in range(3)]
    forced_token = next(t for t in range(V) if t != free[0])
    g = gen(11)
    out = sample(logits, [p], [g], forced=[forced_token])
    assert out.token_ids == [forced_token]
    assert out.logprobs[0] == pytest.approx(torch.log_softmax(logits, -1)[0, forced_token].item())
    # The forced step still consumed its draw: the following tokens are those of the unforced run.
    assert [sample(logits, [p], [g]).token_ids[0] for _ in range(2)] == free[1:]


def test_forced_applies_only_to_its_row():
    logits = rand_logits(3, seed=7)
    out = sample(logits, [SamplingParams(temperature=0)] * 3, [gen(0)] * 3, forced=[None, 5, None])
    expected = logits.argmax(-1).tolist()
    expected[1] = 5
    assert out.token_ids == expected


# ----------------------------------------------------------------------------------- log-probs
def test_logprobs_come_from_the_raw_distribution_with_top_k_per_row():
    logits = rand_logits(4, seed=8)
    params = [SamplingParams(temperature=0.7, logprobs=True),
              SamplingParams(temperature=1.2, top_k=4, top_logprobs=3),
              SamplingParams(temperature=0, repetition_penalty=1.5, top_logprobs=5),
              SamplingParams(temperature=1.0)]
    out = sample(logits, params, [gen(i) for i in range(4)], histories=[([1, 2, 3], [4, 5])] * 4)
    logp = torch.log_softmax(logits, -1)
    assert out.logprobs == pytest.approx([logp[i, t].item() for i, t in enumerate(out.token_ids)])
    assert [len(t) for t in out.top_logprobs] == [0, 3, 5, 0]
    for i, top in enumerate(out.top_logprobs):
        vals, ids = logp[i].topk(len(top))
        assert [t for t, _ in top] == ids.tolist()
        assert [lp for _, lp in top] == pytest.approx(vals.tolist())
    # The request-facing view of each row.
    assert out.row(1) == (out.token_ids[1], out.logprobs[1], out.top_logprobs[1])


# --------------------------------------------------------------------------- SamplingParams
@pytest.mark.parametrize("field,value", [
    ("max_new_tokens", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.01), ("min_p", -0.1),
    ("min_p", 1.5), ("repetition_penalty", 0.0), ("frequency_penalty", 2.5), ("frequency_penalty", -2.5),
    ("presence_penalty", 2.1), ("presence_penalty", -2.1), ("top_logprobs", -1),
])
def test_bad_sampling_params_raise_a_request_error_naming_the_field(field, value):
    with pytest.raises(RequestError) as info:
        SamplingParams(**{field: value})
    e = info.value
    assert e.param == field and str(e).startswith(field + " must ")
    renamed = e.message_for("other")                # a server's own name for the field
    assert renamed.startswith("other must ") and field not in renamed
    assert isinstance(e, ValueError)


def test_sampling_params_boundaries_are_accepted_and_stops_normalized():
    SamplingParams(max_new_tokens=1, temperature=0, top_p=1.0, min_p=1.0, repetition_penalty=0.01,
                   frequency_penalty=-2, presence_penalty=2, top_logprobs=0)
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(stop=["", "ab"]).stop == ["ab"]
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy
    assert not SamplingParams(temperature=0.5, top_k=2).greedy
    assert not SamplingParams().has_penalties and SamplingParams(presence_penalty=0.1).has_penalties


# ------------------------------------------------------------------------------ sample_step
def sequence(prompt, output=(), **params):
    return SequenceSampling(SamplingParams(temperature=0, **params), gen(0), list(prompt), list(output))


def step_input(items, rids, completes, forced=None):
    n = sum(completes)
    return StepInput(items, rids, completes, forced or [None] * n)


def request(prompt, want_prompt_logprobs=True, **params):
    """The engine's side of a request, as Engine.add_request makes it (the first prompt token has no log-prob)."""
    r = Request("a", list(prompt), SamplingParams(temperature=0, **params), 0, None,
                want_prompt_logprobs=want_prompt_logprobs)
    r.prompt_logprobs = [None]
    r.prompt_top_logprobs = [None] if r.params.top_logprobs else []
    return r


def test_sample_step_maps_rows_scores_prompts_and_samples_completing_requests():
    seqs = {"a": sequence([3, 1, 4, 1, 5], top_logprobs=2), "b": sequence([2, 7, 1], output=[8]),
            "c": sequence(range(10))}
    items = [BatchItem([3, 1, 4, 1, 5], 0, [], "all"), BatchItem([8], 3, [], "last"),      # a prefill, a decode
             BatchItem(list(range(4)), 0, [], "none")]                                   # a partial chunk
    logits = rand_logits(6, vocab=10, seed=9)                            # 5 rows for A, 1 for B, 0 for C
    out = sample_step(step_input(items, ["a", "b", "c"], [True, True, False]), logits, seqs)
    assert out.sampled.token_ids == [logits[4].argmax().item(), logits[5].argmax().item()]
    assert seqs["a"].output_ids == [logits[4].argmax().item()] and seqs["b"].output_ids[-1] == out.sampled.token_ids[1]
    assert seqs["c"].output_ids == []
    logp = torch.log_softmax(logits, -1)
    # Row j scores prompt token j + 1; the last row predicts the next token and is not a prompt log-prob.
    scored = out.prompt_logprobs["a"]
    assert [e.position for e in scored] == [1, 2, 3, 4] and set(out.prompt_logprobs) == {"a"}
    assert [e.logprob for e in scored] == pytest.approx([logp[j, [3, 1, 4, 1, 5][j + 1]].item() for j in range(4)])
    assert [t for t, _ in scored[1].top] == logp[1].topk(2).indices.tolist()
    a = request([3, 1, 4, 1, 5], top_logprobs=2)
    a.record_prompt_logprobs(scored)
    assert a.prompt_logprobs[0] is None and a.prompt_logprobs[1:] == [e.logprob for e in scored]
    assert len(a.prompt_top_logprobs) == 5 and a.prompt_top_logprobs[2] == scored[1].top
    recorded = list(a.prompt_logprobs)
    replay = sample_step(step_input(items, ["a", "b", "c"], [True, True, False]),
                         logits + 1.5 * torch.randn(6, 10, generator=gen(1)), seqs)   # a replay of the same pass
    a.record_prompt_logprobs(replay.prompt_logprobs["a"])
    assert a.prompt_logprobs == recorded                                      # is recorded once


def test_prompt_logprobs_over_chunks_and_after_a_retraction():
    prompt = [5, 6, 7, 8, 9]
    seqs, a = {"a": sequence(prompt)}, request(prompt)
    logits = rand_logits(5, vocab=10, seed=10)
    first = sample_step(step_input([BatchItem(prompt[:3], 0, [], "all")], ["a"], [False]), logits[:3], seqs)
    assert first.sampled.token_ids == []                                 # the prompt is not done: no token
    a.record_prompt_logprobs(first.prompt_logprobs["a"])
    second = sample_step(step_input([BatchItem(prompt[3:], 3, [], "all")], ["a"], [True]), logits[3:], seqs)
    assert second.sampled.token_ids == [logits[4].argmax().item()]
    a.record_prompt_logprobs(second.prompt_logprobs["a"])
    logp = torch.log_softmax(logits, -1)
    expected = [None] + [logp[j, prompt[j + 1]].item() for j in range(4)]
    assert a.prompt_logprobs[0] is None and a.prompt_logprobs[1:] == pytest.approx(expected[1:])
    # Retracted, A is prefilled again from scratch (prompt + output): nothing is recorded twice.
    again = sample_step(step_input([BatchItem(prompt + [1], 0, [], "all")], ["a"], [True]),
                        rand_logits(6, vocab=10, seed=11), seqs)
    a.record_prompt_logprobs(again.prompt_logprobs["a"])
    assert a.prompt_logprobs == pytest.approx(expected[:1] + expected[1:]) and len(a.prompt_logprobs) == 5


def test_sample_step_applies_forced_tokens_and_keeps_them_in_the_history():
    seqs = {"b": sequence([2, 7, 1], output=[8], frequency_penalty=2.0)}
    out = sample_step(step_input([BatchItem([8], 3, [], "last")], ["b"], [True], forced=[9]),
                      rand_logits(1, vocab=10), seqs)
    assert out.sampled.token_ids == [9] and seqs["b"].output_ids == [8, 9]
