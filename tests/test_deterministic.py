"""--enable-deterministic-inference: in bfloat16, where one rounding step apart flips a sampled token,
a sequence's logits are the same bits alone or batched, prefilled whole or in chunks, decoded or
recomputed by one prefill (what retraction does); so a seeded request samples the same tokens with
the same log-probs. (Without the flag the first test fails on dsserve-tiny: decode and the prefill
that recomputes it differ by ~0.08 in a logit.)"""
import random

import pytest
import torch

from dsserve import Engine, SamplingParams
from dsserve.core.batch import BatchItem
from dsserve.core.config import EngineArgs
from dsserve.core.model_runner import ModelRunner
from hf_checkpoints import build


@pytest.fixture(scope="module", params=["tiny", "llama"])
def runner(request, tmp_path_factory):
    """A bfloat16 model in deterministic mode: dsserve-tiny (MLA, routed experts) or a Llama (GQA)."""
    path = None if request.param == "tiny" else str(build("llama", tmp_path_factory.mktemp("llama")).path)
    args = EngineArgs.from_kwargs(model_path=path, device="cpu", dtype="bfloat16", max_total_tokens=16384,
                                  enable_deterministic_inference=True)
    return ModelRunner(args)


class _Pages:
    """Fresh pages for every sequence, so that no two passes share cache rows."""

    def __init__(self, page_size: int):
        self.page_size, self.next = page_size, 1

    def take(self, tokens: int) -> list[int]:
        n = -(-tokens // self.page_size)
        self.next += n
        return list(range(self.next - n, self.next))


def _prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(n)] for n in lengths]


def test_a_sequences_logits_do_not_depend_on_its_batch_or_its_passes(runner):
    vocab = runner.config.vocab_size
    target, *others = _prompts(vocab, [300] + [20 + 23 * i for i in range(15)], seed=0)  # past one 256-token KV chunk
    pages = _Pages(runner.kv.page_size)

    def prefill_then_decode(with_others: bool) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = [target] + (others if with_others else [])
        tables = [pages.take(len(s) + 1) for s in seqs]
        prefill = runner.forward([BatchItem(s, 0, t) for s, t in zip(seqs, tables)])[0]
        decode = runner.forward([BatchItem([5], len(s), t) for s, t in zip(seqs, tables)])[0]
        return prefill, decode

    prefill_alone, decode_alone = prefill_then_decode(with_others=False)
    prefill_batched, decode_batched = prefill_then_decode(with_others=True)
    assert torch.equal(prefill_alone, prefill_batched)
    assert torch.equal(decode_alone, decode_batched)

    table = pages.take(len(target) + 1)  # retraction recomputes the generated token in one prefill
    assert torch.equal(runner.forward([BatchItem(target + [5], 0, table)])[0], decode_alone)

    table = pages.take(len(target))  # chunked prefill, and the prefix cache's second half alone
    runner.forward([BatchItem(target[:128], 0, table, logits="none")])
    assert torch.equal(runner.forward([BatchItem(target[128:], 128, table)])[0], prefill_alone)


def test_a_seeded_request_samples_the_same_tokens_alone_batched_and_after_retraction():
    prompts = _prompts(4000, [220, 180, 260] + [60 + 20 * i for i in range(15)], seed=1)
    targets, others = prompts[:3], prompts[3:]

    def params(seed: int, tokens: int = 16) -> SamplingParams:
        return SamplingParams(max_new_tokens=tokens, temperature=0.8, seed=seed, ignore_eos=True, logprobs=True)

    def sampled(out) -> tuple[list[int], list[float]]:  # the log-probs show a difference no token shows yet
        return out.token_ids, out.logprobs

    common = dict(device="cpu", dtype="bfloat16", enable_deterministic_inference=True)
    with Engine(max_total_tokens=8192, **common) as eng:
        alone = [sampled(eng.generate(input_ids=[p], sampling_params=params(i))[0]) for i, p in enumerate(targets)]
        for i, p in enumerate(targets):
            batched = eng.generate(input_ids=[p] + others, sampling_params=[params(i)] + [params(99)] * 15)
            assert sampled(batched[0]) == alone[i]
    # a pool that holds every prompt but not the others' long outputs: retraction
    with Engine(max_total_tokens=1000, page_size=4, **common) as eng:
        outs = eng.generate(input_ids=targets + others,
                            sampling_params=[params(i) for i in range(3)] + [params(99, tokens=64)] * 15)
        assert eng.scheduler.num_retractions > 0
    assert [sampled(o) for o in outs[:3]] == alone
