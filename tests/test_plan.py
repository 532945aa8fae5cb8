"""`dsserve plan`: per-rank weights, KV bytes per token and the longest context, from config.json
alone (the model built on the meta device), on the full-size published configs; and `dsserve serve`
refusing, before it reads a weight, a model that cannot fit."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dsserve.core.config import EngineArgs
from dsserve.models.loader import CheckpointError
from dsserve.models.plan import make_plan

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
V3 = REFERENCE / "deepseek-v3.config.json"
LLAMA_8B = REFERENCE / "deepseek-r1-distill-llama-8b.config.json"

needs_configs = pytest.mark.skipif(not V3.exists(), reason=f"the published configs are not at {REFERENCE}")


def plan(path, tp=1, **kwargs):
    # bfloat16 as these models are served, whatever this CPU's own default (float32 without bf16 units)
    return make_plan(EngineArgs(model_path=path and str(path), tp_size=tp, device="cpu", dtype="bfloat16", **kwargs))


@needs_configs
def test_deepseek_v3_fp8_and_bf16_weights_and_their_shards(tmp_path):
    fp8 = plan(V3)
    # 671 B parameters without the MTP layer (not served yet): 1 byte each for the FP8 linears and
    # experts, plus their float32 128x128 block scales and the bf16 embeddings, norms and gates
    assert 0.66e12 < fp8.weights_total < 0.70e12 and fp8.weights_format == "fp8_block"
    assert fp8.kv_bytes_per_token == 61 * (512 + 64) * 2      # MLA's latent, bf16, every layer
    per_rank = {tp: plan(V3, tp).weights_per_rank for tp in (8, 16)}
    for tp, size in per_rank.items():
        # an even share, plus what every rank keeps whole (embeddings, q_a/kv_a projections, norms, gates)
        assert fp8.weights_total / tp < size < fp8.weights_total / tp + 6e9, (tp, size)
    assert per_rank[8] > per_rank[16]
    # at tp=32 a rank's 576 rows of the dense MLP would cut FP8's 128-row scale blocks: refused, named
    with pytest.raises(CheckpointError, match="gate_proj: the 576 rows of one tensor-parallel shard .of 32. split"):
        plan(V3, 32)
    config = json.loads(V3.read_text())
    del config["quantization_config"]  # the bf16 conversion of the same model (how A100s serve it at tp=32)
    (tmp_path / "config.json").write_text(json.dumps(config))
    bf16 = plan(tmp_path / "config.json")
    assert 1.30e12 < bf16.weights_total < 1.37e12 and bf16.weights_format == "bfloat16"
    at32 = plan(tmp_path / "config.json", 32).weights_per_rank
    assert bf16.weights_total / 32 < at32 < bf16.weights_total / 32 + 6e9


@needs_configs
def test_llama_kv_heads_split_then_replicated():
    # 32 layers, 8 KV heads of 128: split over 4 ranks, then one replica per rank at tp=16
    assert plan(LLAMA_8B, 4).kv_bytes_per_token == 32 * 2 * 128 * 2 * 2
    assert plan(LLAMA_8B, 16).kv_bytes_per_token == 32 * 1 * 128 * 2 * 2


def test_the_longest_context_follows_the_memory_left():
    small = plan(None)
    assert small.fits and small.longest_context == small.max_context
    tight = plan(None, mem_fraction_static=1e-6)
    assert tight.longest_context == tight.kv_tokens < small.longest_context


@needs_configs
def test_cli_says_when_a_model_does_not_fit(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dsserve.cli", "plan", "--model-path", str(V3), "--tp", "8",
                          "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "the weights do not fit" in out.stdout, out
    # serve refuses before loading: this folder has no weights at all
    (tmp_path / "config.json").write_text(V3.read_text())
    out = subprocess.run([sys.executable, "-m", "dsserve.cli", "--model-path", str(tmp_path), "--port", "0"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "does not fit" in out.stderr and "raise --tp, or quantize" in out.stderr, out
