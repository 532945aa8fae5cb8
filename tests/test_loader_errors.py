"""Broken checkpoint folders give one line a user can act on; sharded and MTP-carrying ones load.

Each test copies a good small checkpoint built with transformers (tests/hf_checkpoints.py), breaks it
the way real downloads break (a tensor missing, an extra tensor, a wrong shape or dtype, NaN weights, a
shard missing, no config.json or one with a bad field, an unsupported architecture, a truncated or
missing tokenizer file, no folder at all), and checks that ``Engine(model_path=..., device="cpu")``
raises CheckpointError (TokenizerError for the tokenizer's files) whose message is a single line
naming the file, the field or tensor, and the problem.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_checkpoints import build, copy_tiny_tokenizer, read_tensors, shard, write_tensors

from dsserve.core.tokenizer import TokenizerError
from dsserve.models.loader import CheckpointError, has_nonfinite

SUPPORTED = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM")
ARCHS = ("deepseek_v3", "llama")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    """Good checkpoints, built once; tests work on copies."""
    root = tmp_path_factory.mktemp("pristine")
    return {name: build(name, root / name).path for name in ARCHS}


@pytest.fixture
def copy_of(pristine, tmp_path):
    def make(name: str) -> Path:
        dst = tmp_path / f"{name}-copy"
        shutil.copytree(pristine[name], dst)
        return dst

    return make


def _load_error(path: Path, error: type[Exception] = CheckpointError) -> str:
    from dsserve import Engine

    with pytest.raises(error) as info:
        Engine(model_path=str(path), device="cpu")
    msg = str(info.value)
    assert msg.strip(), "empty CheckpointError message"
    assert "\n" not in msg.strip(), f"message is not one line: {msg!r}"
    return msg


def _greedy(path: Path, prompts: list[list[int]], n: int = 8) -> list[tuple[list[int], list[float]]]:
    from dsserve import Engine, SamplingParams

    engine = Engine(model_path=str(path), device="cpu", dtype="float32")
    try:
        params = SamplingParams(max_new_tokens=n, temperature=0.0, logprobs=True, ignore_eos=True)
        outs = engine.generate(input_ids=prompts, sampling_params=params)
    finally:
        engine.shutdown()
    return [(list(o.token_ids), list(o.logprobs)) for o in outs]


PROMPTS = [[5, 9, 17, 3, 250, 42, 7], [3, 4]]


# --------------------------------------------------------------------------------------------------
# the folder and config.json


def test_missing_folder_names_the_path(tmp_path):
    path = tmp_path / "no-such-model"
    msg = _load_error(path)
    assert str(path) in msg


def test_missing_config_json(copy_of):
    path = copy_of("deepseek_v3")
    (path / "config.json").unlink()
    msg = _load_error(path)
    assert "config.json" in msg


def test_unsupported_architecture_lists_the_supported_ones(copy_of):
    path = copy_of("llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["MixtralForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    msg = _load_error(path)
    assert "MixtralForCausalLM" in msg
    for arch in SUPPORTED:
        assert arch in msg, f"supported architecture {arch} not listed in: {msg}"


CONFIG_FIELDS = [
    # (what config.json holds, what the message must name besides the file)
    ([{"architectures": ["LlamaForCausalLM"]}], "JSON object"),
    ({"num_hidden_layers": 0}, "'num_hidden_layers' must be >= 1, got 0"),
    ({"hidden_size": "64"}, "'hidden_size' must be an integer"),
    ({"rms_norm_eps": "small"}, "'rms_norm_eps' must be a number"),
    ({"vocab_size": None}, "'vocab_size' is required"),
]


@pytest.mark.parametrize("content,named", CONFIG_FIELDS, ids=[n for _, n in CONFIG_FIELDS])
def test_bad_config_field_is_named(copy_of, content, named):
    path = copy_of("llama")
    config = path / "config.json"
    if isinstance(content, dict):
        content = {**json.loads(config.read_text()), **content}
    config.write_text(json.dumps(content))
    msg = _load_error(path)
    assert str(config) in msg and named in msg


# --------------------------------------------------------------------------------------------------
# the tokenizer and generation_config.json


@pytest.fixture
def with_tokenizer(copy_of):
    path = copy_of("llama")
    if not copy_tiny_tokenizer(path):
        pytest.skip("the embedded tokenizer files are not there")
    return path


def test_truncated_tokenizer_json_is_named(with_tokenizer):
    tokenizer_json = with_tokenizer / "tokenizer.json"
    tokenizer_json.write_text(tokenizer_json.read_text()[:500])
    msg = _load_error(with_tokenizer, TokenizerError)
    assert str(tokenizer_json) in msg and "not valid JSON" in msg


def test_tokenizer_config_without_tokenizer_json_names_both(with_tokenizer):
    (with_tokenizer / "tokenizer.json").unlink()
    msg = _load_error(with_tokenizer, TokenizerError)
    assert str(with_tokenizer / "tokenizer_config.json") in msg
    assert "tokenizer_class" in msg and "tokenizer.json, which is missing" in msg


@pytest.mark.parametrize("content,named", [("{\"eos_token_id\": [1,", "not valid JSON"),
                                           ('{"eos_token_id": "1"}', "'eos_token_id'")],
                         ids=["truncated", "eos-id-a-string"])
def test_bad_generation_config_is_refused(with_tokenizer, content, named):
    """Refused, not ignored: its eos_token_id decides where generation stops."""
    generation_config = with_tokenizer / "generation_config.json"
    generation_config.write_text(content)
    msg = _load_error(with_tokenizer, TokenizerError)
    assert str(generation_config) in msg and named in msg


# --------------------------------------------------------------------------------------------------
# tensors


MISSING = [
    ("deepseek_v3", "model.layers.1.self_attn.kv_b_proj.weight"),
    ("deepseek_v3", "model.layers.2.mlp.experts.5.up_proj.weight"),  # one expert of a stacked group
    ("deepseek_v3", "model.layers.1.mlp.gate.e_score_correction_bias"),
    ("llama", "model.layers.1.self_attn.k_proj.weight"),
    ("llama", "lm_head.weight"),  # untied: the head must come from the file
]


@pytest.mark.parametrize("arch,tensor", MISSING, ids=[t for _, t in MISSING])
def test_missing_tensor_is_named(copy_of, arch, tensor):
    path = copy_of(arch)
    tensors = read_tensors(path)
    assert tensor in tensors, f"test bug: {tensor} is not in the {arch} checkpoint"
    del tensors[tensor]
    write_tensors(path, tensors)
    msg = _load_error(path)
    assert tensor in msg
    assert str(path) in msg


EXTRA = [
    ("deepseek_v3", "model.layers.0.self_attn.extra_proj.weight"),
    ("llama", "model.layers.1.mlp.extra_proj.weight"),
]


@pytest.mark.parametrize("arch,tensor", EXTRA, ids=[t for _, t in EXTRA])
def test_unexpected_tensor_is_named(copy_of, arch, tensor):
    path = copy_of(arch)
    tensors = read_tensors(path)
    tensors[tensor] = torch.zeros(8, 8)
    write_tensors(path, tensors)
    msg = _load_error(path)
    assert tensor in msg
    assert str(path) in msg


SHAPES = [
    # (arch, tensor, shape written to the checkpoint, shape the model expects)
    ("deepseek_v3", "model.layers.1.mlp.experts.0.down_proj.weight", (64, 48), (64, 32)),
    ("deepseek_v3", "model.layers.0.self_attn.o_proj.weight", (64, 80), (64, 96)),
    ("llama", "model.layers.0.self_attn.q_proj.weight", (96, 48), (96, 64)),
]


@pytest.mark.parametrize("arch,tensor,bad,good", SHAPES, ids=[t for _, t, _, _ in SHAPES])
def test_shape_mismatch_names_tensor_and_both_shapes(copy_of, arch, tensor, bad, good):
    path = copy_of(arch)
    tensors = read_tensors(path)
    assert tuple(tensors[tensor].shape) == good, f"test bug: {tensor} is {tuple(tensors[tensor].shape)}"
    tensors[tensor] = torch.randn(*bad)
    write_tensors(path, tensors)
    msg = _load_error(path)
    assert tensor in msg
    assert str(bad) in msg, f"checkpoint shape {bad} not in: {msg}"
    assert str(good) in msg, f"expected shape {good} not in: {msg}"


def test_integer_tensor_in_a_float_slot_names_the_expected_dtype(copy_of):
    path = copy_of("llama")
    tensors = read_tensors(path)
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].long()
    write_tensors(path, tensors)
    msg = _load_error(path)
    assert str(path / "model.safetensors") in msg and "'model.embed_tokens.weight' is I64" in msg
    assert "expected a float type" in msg


NONFINITE_TENSOR = "model.layers.1.mlp.down_proj.weight"


def _with_nonfinite_weight(path: Path, value: float) -> None:
    tensors = read_tensors(path)
    tensors[NONFINITE_TENSOR].view(-1)[7] = value
    write_tensors(path, tensors)


@pytest.mark.parametrize("value", [float("nan"), float("-inf")], ids=["nan", "-inf"])
def test_nonfinite_weight_is_refused_naming_the_tensor(copy_of, value):
    path = copy_of("llama")
    _with_nonfinite_weight(path, value)
    msg = _load_error(path)
    assert str(path / "model.safetensors") in msg and f"'{NONFINITE_TENSOR}' holds NaN or inf" in msg
    assert "--allow-nonfinite-weights" in msg


def test_nonfinite_weight_loads_with_the_flag(copy_of):
    from dsserve import Engine

    path = copy_of("llama")
    _with_nonfinite_weight(path, float("nan"))
    Engine(model_path=str(path), device="cpu", allow_nonfinite_weights=True, model_worker="thread").shutdown()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_has_nonfinite_finds_nan_and_inf_anywhere(dtype):
    t = torch.randn(3, 5).to(dtype)
    assert not has_nonfinite(t) and not has_nonfinite(t[:, 1:3])
    for value in (float("nan"), float("inf"), float("-inf")):
        bad = t.clone()
        bad[2, 4] = value
        assert has_nonfinite(bad)
    assert not has_nonfinite(torch.full((4,), 7, dtype=torch.int32)), "integer (quantized) tensors are numbers"


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_has_nonfinite_reads_every_fp8_code(dtype):
    """8-bit floats are checked through their bytes; each of the 256 codes must agree with isfinite."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    finite = torch.isfinite(codes.view(dtype).float())
    for code, is_finite in zip(codes, finite):
        assert has_nonfinite(code.reshape(1).view(dtype)) == (not is_finite), f"code {int(code):#04x}"
    assert has_nonfinite(codes.view(dtype)) and not has_nonfinite(codes[finite].view(dtype))


# --------------------------------------------------------------------------------------------------
# sharded checkpoints


def test_missing_shard_is_named(copy_of):
    path = copy_of("deepseek_v3")
    files = shard(path, 2)
    (path / files[1]).unlink()
    msg = _load_error(path)
    assert files[1] in msg


@pytest.mark.parametrize("arch", ARCHS)
def test_sharded_checkpoint_generates_like_the_single_file(pristine, copy_of, arch):
    path = copy_of(arch)
    files = shard(path, 2)
    assert not (path / "model.safetensors").exists() and all((path / f).exists() for f in files)
    want = _greedy(pristine[arch], PROMPTS)
    got = _greedy(path, PROMPTS)
    for (wt, wl), (gt, gl) in zip(want, got):
        assert gt == wt
        assert max(abs(a - b) for a, b in zip(gl, wl)) < 1e-6


def test_progress_off_a_terminal_is_log_lines_not_a_bar(copy_of, monkeypatch, caplog):
    """A bar's carriage returns would stay in a log file: off a terminal, one line per tenth of the files."""
    from dsserve import Engine

    path = copy_of("llama")
    shard(path, 2)
    stderr = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", stderr)
    with caplog.at_level(logging.INFO, logger="dsserve.loader"):
        Engine(model_path=str(path), device="cpu", model_worker="thread").shutdown()
    assert "\r" not in stderr.getvalue() and "Loading weights" not in stderr.getvalue()
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("loading weights")] == [
        "loading weights: 1 of 2 files", "loading weights: 2 of 2 files"]


def test_mtp_layer_tensors_are_skipped(pristine, copy_of):
    """DeepSeek-V3 checkpoints store the multi-token-prediction module as layer num_hidden_layers
    (with enorm/hnorm/eh_proj/shared_head besides a decoder layer); it must load and not change the
    main model's output."""
    path = copy_of("deepseek_v3")
    cfg = json.loads((path / "config.json").read_text())
    n, hidden, vocab = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
    tensors = read_tensors(path)
    last = f"model.layers.{n - 1}."
    mtp = f"model.layers.{n}."
    for name in [k for k in tensors if k.startswith(last)]:
        tensors[mtp + name[len(last):]] = tensors[name].clone()
    tensors[mtp + "enorm.weight"] = torch.ones(hidden)
    tensors[mtp + "hnorm.weight"] = torch.ones(hidden)
    tensors[mtp + "eh_proj.weight"] = torch.randn(hidden, 2 * hidden)
    tensors[mtp + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors[mtp + "shared_head.norm.weight"] = torch.ones(hidden)
    tensors[mtp + "shared_head.head.weight"] = torch.randn(vocab, hidden)
    write_tensors(path, tensors)
    assert _greedy(path, PROMPTS) == _greedy(pristine["deepseek_v3"], PROMPTS)
