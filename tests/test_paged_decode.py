"""Decode through the paged cache equals recomputing the whole sequence (the KV cache holds the truth)."""
import pytest
import torch

from dsserve.core.config import EngineArgs
from dsserve.core.kv_cache import PageAllocator
from dsserve.core.batch import BatchItem
from dsserve.core.model_runner import ModelRunner
from hf_checkpoints import build


@pytest.fixture(scope="module", params=["deepseek_v3", "llama"])
def checkpoint(request, tmp_path_factory):
    return build(request.param, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("page_size", [1, 16])
def test_decode_after_prefill_equals_recompute(checkpoint, page_size):
    runner = ModelRunner(EngineArgs(model_path=str(checkpoint.path), device="cpu", dtype="float32",
                                    max_total_tokens=512, page_size=page_size))
    torch.manual_seed(0)
    tokens = torch.randint(3, checkpoint.vocab_size, (40,)).tolist()
    prompt, rest = tokens[:25], tokens[25:]

    def run(new, prefix, pages, logits="last"):
        return runner.forward([BatchItem(new, prefix, pages, logits)])

    allocator = PageAllocator(runner.kv.num_pages, runner.kv.page_size)
    whole_pages = allocator.alloc(allocator.pages_for(len(tokens)))
    recomputed = run(tokens, 0, whole_pages, logits="all")         # [40, V]
    allocator.free(whole_pages)

    pages = allocator.alloc(allocator.pages_for(len(tokens)))
    # a prefill in two chunks (the second sees the first through the cache), then one token at a time
    stepwise = [run(prompt[:11], 0, pages, logits="all"), run(prompt[11:], 11, pages, logits="all")]
    for i, tok in enumerate(rest):
        stepwise.append(run([tok], len(prompt) + i, pages))
    stepwise = torch.cat(stepwise)
    assert stepwise.shape == recomputed.shape
    torch.testing.assert_close(stepwise, recomputed, atol=1e-5, rtol=1e-5)
