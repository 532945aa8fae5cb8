"""Speculative decoding's verification rule (core/speculative.verify) on hand-made logits: greedy runs
stop at the first draft the target disagrees with; sampled runs keep the target's distribution (a
chi-square test per position, drafts likely and unlikely); penalties see the drafts before each row;
log-probs are the target's at each committed row; a forced token wins; seeds reproduce."""
import pytest
import torch

from dsserve.core.sampling import SequenceSampling, _filtered_probs
from dsserve.core.sampling_params import SamplingParams
from dsserve.core.speculative import verify

V = 8
# chi-square critical values at p = 0.001 by degrees of freedom (a fixed-seed test: no flakiness,
# and a wrong rule lands far beyond them)
CHI2_999 = {6: 22.46, 7: 24.32}


def seq(params, seed=0, prompt=(1, 2), output=()):
    return SequenceSampling(params, torch.Generator().manual_seed(seed), list(prompt), list(output))


def rows(n, seed=0, vocab=V):
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 1.5


def test_greedy_commits_the_matching_drafts_then_the_targets_token():
    logits = rows(4)
    best = logits.argmax(-1).tolist()
    greedy = SamplingParams(temperature=0)
    cases = [
        ([best[0], best[1], best[2]], best[:4]),                            # all accepted: 3 drafts + bonus
        ([best[0], (best[1] + 1) % V, best[2]], [best[0], best[1]]),        # second rejected: its row's argmax
        ([(best[0] + 1) % V, best[1], best[2]], [best[0]]),                 # first rejected: one token
    ]
    for drafts, want in cases:
        out, counts = verify(logits, [range(4)], [drafts], [seq(greedy)], [None])
        assert out.token_ids == want and counts == [len(want)]


def test_rows_of_several_sequences_are_their_own():
    logits = rows(5, seed=3)
    best = logits.argmax(-1).tolist()
    greedy = SamplingParams(temperature=0)
    # sequence A: rows 0-1 (one draft, right); B: row 2 (no draft); C: rows 3-4 (one draft, wrong)
    out, counts = verify(logits, [range(0, 2), range(2, 3), range(3, 5)],
                         [[best[0]], [], [(best[3] + 1) % V]], [seq(greedy)] * 3, [None] * 3)
    assert counts == [2, 1, 1] and out.token_ids == [best[0], best[1], best[2], best[3]]


def test_log_probs_are_the_targets_at_each_committed_row():
    logits = rows(3, seed=5)
    best = logits.argmax(-1).tolist()
    params = SamplingParams(temperature=0, logprobs=True, top_logprobs=2)
    out, _ = verify(logits, [range(3)], [[best[0], best[1]]], [seq(params)], [None])
    logp = torch.log_softmax(logits, -1)
    assert out.token_ids == best
    assert out.logprobs == pytest.approx([logp[i, best[i]].item() for i in range(3)], abs=1e-6)
    assert [t[0][0] for t in out.top_logprobs] == best and all(len(t) == 2 for t in out.top_logprobs)


def test_penalties_see_the_drafts_before_each_row():
    # Row 1 comes after draft 5: a frequency penalty there counts it, as a non-speculative step would.
    logits = torch.zeros(2, V)
    logits[:, 5] = 3.0
    logits[:, 6] = 2.5
    params = SamplingParams(temperature=0, frequency_penalty=1.0)
    out, _ = verify(logits, [range(2)], [[5]], [seq(params)], [None])
    assert out.token_ids == [5, 6]


def test_a_forced_token_is_committed_alone():
    logits = rows(1)
    out, counts = verify(logits, [range(1)], [[]], [seq(SamplingParams(temperature=1.0))], [3])
    assert out.token_ids == [3] and counts == [1]


def _empirical(logits, drafts, params, trials, position):
    """How often each token is the committed token at `position` (over the trials that reach it)."""
    counts = torch.zeros(V)
    for t in range(trials):
        out, _ = verify(logits, [range(len(drafts) + 1)], [drafts], [seq(params, seed=t)], [None])
        if len(out.token_ids) > position:
            counts[out.token_ids[position]] += 1
    return counts


def _chi_square(counts, probs):
    expected = counts.sum() * probs
    keep = expected > 0
    assert counts[~keep].sum() == 0          # nothing outside the support (top-k) is ever committed
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    return stat, int(keep.sum()) - 1


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8), SamplingParams(temperature=1.3, top_k=7)],
                         ids=["temperature", "top_k"])
@pytest.mark.parametrize("draft_rank", [0, 4], ids=["likely_draft", "unlikely_draft"])
def test_sampled_first_token_keeps_the_targets_distribution(params, draft_rank):
    logits = rows(2, seed=11)
    p0 = _filtered_probs(logits[:1], [params])[0]
    draft = int(p0.argsort(descending=True)[draft_rank])
    counts = _empirical(logits, [draft], params, trials=3000, position=0)
    stat, df = _chi_square(counts, p0)
    assert stat < CHI2_999[df], (stat, counts.tolist(), p0.tolist())
    # and the draft is accepted as often as the target gives it (rate p0[draft])
    assert abs(counts[draft].item() / 3000 - p0[draft].item()) < 0.04


def test_sampled_token_after_an_accepted_draft_keeps_the_targets_distribution():
    # Given the first token came out as the draft, the second is distributed as row 1 says.
    params = SamplingParams(temperature=1.0)
    logits = rows(3, seed=12)
    p = _filtered_probs(logits, [params] * 3)
    drafts = [int(p[0].argmax()), int(p[1].argsort(descending=True)[2])]
    counts = torch.zeros(V)
    for t in range(5000):
        out, _ = verify(logits, [range(3)], [drafts], [seq(params, seed=t)], [None])
        if out.token_ids[0] == drafts[0]:
            counts[out.token_ids[1]] += 1
    stat, df = _chi_square(counts, p[1])
    assert stat < CHI2_999[df], (stat, counts.tolist(), p[1].tolist())


def test_seeded_verification_reproduces():
    logits = rows(3, seed=2)
    params = SamplingParams(temperature=1.0, seed=9)
    drafts = [[int(logits[0].argmax()), int(logits[1].argmax())]]
    runs = [verify(logits, [range(3)], drafts, [seq(params, seed=9)], [None])[0].token_ids for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]
