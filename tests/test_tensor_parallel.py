"""Tensor and expert parallelism over worker processes (127.0.0.1, float32): every rank loads its
shard, the collectives go through the communicator hook, and the output equals one process's —
greedy tokens identical, chosen-token log-probs within 1e-5 — for MLA + MoE models, a Llama whose KV
heads are replicated on groups of ranks, and an FP8 block-quantized checkpoint. A rank that dies
stops the engine with an error naming it."""
from __future__ import annotations

import pytest
from hf_checkpoints import build

from dsserve import Engine, SamplingParams
from dsserve.core.errors import EngineUnavailable

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], list(range(20, 60))]
PARAMS = SamplingParams(max_new_tokens=8, temperature=0, logprobs=True, ignore_eos=True)


def _generate(model_path, tp: int, ep: int = 1, **kwargs):
    with Engine(model_path=model_path, dtype="float32", max_total_tokens=1024, tp_size=tp, ep_size=ep,
                **kwargs) as engine:
        outs = engine.generate(input_ids=[[t % engine.info.vocab_size for t in p] for p in PROMPTS],
                               sampling_params=PARAMS)
    return [(o.token_ids, o.logprobs) for o in outs]


def _assert_same(got, want):
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(got, want):
        assert tokens == want_tokens
        # float32 sums split over ranks and threads in another order: a few ulps of the logits, which
        # reach ~1e-5 in a logprob after 8 steps; a wrong shard is off by orders of magnitude more
        assert max(abs(a - b) for a, b in zip(logprobs, want_logprobs)) < 5e-5


@pytest.mark.parametrize("name,tp", [("tiny", 2), ("deepseek_v2_softmax", 2), ("deepseek_v3", 2), ("llama", 2),
                                     ("llama", 4)])
def test_tensor_parallel_output_equals_one_process(tmp_path, name, tp):
    """llama has 2 KV heads: at tp=4 each is replicated on two ranks."""
    path = None if name == "tiny" else str(build(name, tmp_path).path)
    _assert_same(_generate(path, tp), _generate(path, 1))


@pytest.mark.parametrize("name", ["tiny", "deepseek_v2_softmax", "deepseek_v3"])
def test_expert_parallel_output_equals_one_process(tmp_path, name):
    """--ep-size 2: each rank holds half the experts whole (the other half's tensors are not read)."""
    path = None if name == "tiny" else str(build(name, tmp_path).path)
    _assert_same(_generate(path, 2, ep=2), _generate(path, 1))


def test_fp8_block_checkpoint_at_tp2(tmp_path):
    from dsserve.models.loader import resolve_model_path
    from dsserve.models.quantize import quantize_checkpoint

    # 16x16 blocks: dsserve-tiny's shards at tp=2 (16 expert rows, say) hold whole blocks
    quantize_checkpoint(resolve_model_path(None), tmp_path / "fp8", "fp8", block=(16, 16))
    path = str(tmp_path / "fp8")
    one = _generate(path, 1)
    _assert_same(_generate(path, 2), one)
    _assert_same(_generate(path, 2, ep=2), one)


def test_a_dead_rank_stops_the_engine_and_is_named():
    with Engine(dtype="float32", max_total_tokens=1024, tp_size=2) as engine:
        handle = engine.add_request(input_ids=[5, 6, 7],
                                    sampling_params=SamplingParams(max_new_tokens=1000, ignore_eos=True))
        assert not next(iter(handle)).finished
        engine.executor.processes[1].kill()
        out = handle.result()
        assert out.finish_reason == "error" and "rank 1 of 2" in out.error and "exited" in out.error
        with pytest.raises(EngineUnavailable, match="rank 1"):
            engine.add_request(input_ids=[1, 2])
        assert all(p.poll() is not None for p in engine.executor.processes)   # no rank left behind


def test_tp_with_a_thread_worker_is_refused():
    with pytest.raises(ValueError, match="worker process per rank"):
        Engine(dtype="float32", tp_size=2, model_worker="thread")


def test_ep_other_than_tp_is_refused():
    with pytest.raises(ValueError, match="--ep-size must be 1 or --tp-size"):
        Engine(dtype="float32", tp_size=2, ep_size=4)
