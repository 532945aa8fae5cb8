"""The embedded default model, dsserve-tiny (dsserve.models.tiny)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
from dsserve.models import tiny
from dsserve.models.tiny import TINY_MODEL_NAME, default_cache_dir, ensure_tiny_model

FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "README.md",
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def _no_real_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Whatever happens, never touch the user's real cache.
    monkeypatch.setenv("DSSERVE_CACHE_DIR", str(tmp_path / "env-cache"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def hf_model(model_dir: Path):
    import torch
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    model, info = DeepseekV3ForCausalLM.from_pretrained(str(model_dir), output_loading_info=True)
    model.eval()
    return model, info


def test_name() -> None:
    assert TINY_MODEL_NAME == "dsserve-tiny"


def test_folder_layout(model_dir: Path) -> None:
    assert model_dir.name == "dsserve-tiny-v1"
    for name in FILES:
        assert (model_dir / name).is_file(), name
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    assert "random" in (model_dir / "README.md").read_text().lower()
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.6, "top_p": 0.95}
    pkg_tok = Path(tiny.__file__).resolve().parent / "tiny_tokenizer"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (model_dir / name).read_bytes() == (pkg_tok / name).read_bytes()


def test_config_is_published_deepseek_v3_form(model_dir: Path) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    ref_path = Path("/work/shared/reference/deepseek-v3.config.json")
    if ref_path.is_file():
        ref = json.loads(ref_path.read_text())
        # Same keys as DeepSeek-V3's published config, less fp8 quantization and the version stamp.
        assert set(ref) - set(cfg) <= {"quantization_config", "transformers_version"}
        assert set(cfg) <= set(ref)
    assert "rope_parameters" not in cfg
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["model_type"] == "deepseek_v3"
    want = {
        "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 3,
        "first_k_dense_replace": 1, "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 48,
        "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
        "routed_scaling_factor": 2.5, "num_nextn_predict_layers": 1, "tie_word_embeddings": False,
        "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "float32", "max_position_embeddings": 4096,
    }  # fmt: skip
    assert {k: cfg[k] for k in want} == want
    assert cfg["rope_scaling"]["type"] == "yarn" and cfg["rope_scaling"]["factor"] == 4.0
    from tokenizers import Tokenizer as HFTok

    assert cfg["vocab_size"] == HFTok.from_file(str(model_dir / "tokenizer.json")).get_vocab_size()


def test_tensor_names_and_mtp_layer(model_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
        bias = f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias")
        norm = f.get_tensor("model.layers.0.input_layernorm.weight")
        assert f.get_tensor("model.layers.3.embed_tokens.weight").equal(f.get_tensor("model.embed_tokens.weight"))
        assert f.get_tensor("model.layers.3.shared_head.head.weight").equal(f.get_tensor("lm_head.weight"))
    cfg = json.loads((model_dir / "config.json").read_text())
    vocab, h = cfg["vocab_size"], 64
    assert shapes["model.embed_tokens.weight"] == (vocab, h)
    assert shapes["lm_head.weight"] == (vocab, h)
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (128, h)
    assert "model.layers.0.mlp.gate.weight" not in shapes  # first layer is dense
    assert shapes["model.layers.0.self_attn.q_b_proj.weight"] == (4 * 24, 48)
    assert shapes["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == (32 + 8, h)
    assert shapes["model.layers.0.self_attn.kv_b_proj.weight"] == (4 * 32, 32)
    for i in (1, 2, 3):
        assert shapes[f"model.layers.{i}.mlp.gate.weight"] == (8, h)
        assert shapes[f"model.layers.{i}.mlp.gate.e_score_correction_bias"] == (8,)
        for j in range(8):
            assert shapes[f"model.layers.{i}.mlp.experts.{j}.down_proj.weight"] == (h, 32)
        assert shapes[f"model.layers.{i}.mlp.shared_experts.up_proj.weight"] == (32, h)
    mtp = {
        "model.layers.3.enorm.weight": (h,),
        "model.layers.3.hnorm.weight": (h,),
        "model.layers.3.eh_proj.weight": (h, 2 * h),
        "model.layers.3.shared_head.norm.weight": (h,),
        "model.layers.3.shared_head.head.weight": (vocab, h),
        "model.layers.3.embed_tokens.weight": (vocab, h),
        "model.layers.3.self_attn.q_a_proj.weight": (48, h),
        "model.layers.3.input_layernorm.weight": (h,),
    }
    assert {k: shapes[k] for k in mtp} == mtp
    assert not any(k.startswith("model.layers.4.") for k in shapes)
    assert bias.abs().max() > 0  # not zeros
    assert 0.8 < float(norm.mean()) < 1.2 and float(norm.std()) > 0


def test_build_is_deterministic(tmp_path: Path, model_dir: Path) -> None:
    other = ensure_tiny_model(tmp_path / "second")
    assert other != model_dir
    for name in FILES:
        assert _sha256(other / name) == _sha256(model_dir / name), name


def test_second_call_reuses_folder(tmp_path: Path) -> None:
    path = ensure_tiny_model(str(tmp_path))
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_damaged_folder_is_rebuilt(tmp_path: Path, model_dir: Path) -> None:
    broken = tmp_path / "dsserve-tiny-v1"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    path = ensure_tiny_model(tmp_path)
    assert path == broken
    assert _sha256(path / "model.safetensors") == _sha256(model_dir / "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dsserve-tiny-v1"]


def test_concurrent_builds_agree(tmp_path: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(ensure_tiny_model(tmp_path))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dsserve-tiny-v1"]
    assert all((results[0] / name).is_file() for name in FILES)


def test_default_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DSSERVE_CACHE_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("DSSERVE_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "x" / "dsserve"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "dsserve"
    monkeypatch.setenv("DSSERVE_CACHE_DIR", str(tmp_path / "env"))
    assert ensure_tiny_model() == tmp_path / "env" / "dsserve-tiny-v1"


def test_loads_in_transformers(hf_model, model_dir: Path) -> None:
    model, info = hf_model
    assert not info["missing_keys"]
    assert not info["mismatched_keys"]
    unexpected = set(info["unexpected_keys"])
    assert unexpected and all(k.startswith("model.layers.3.") for k in unexpected)
    assert model.config.rope_parameters["rope_type"] == "yarn"
    assert model.config.vocab_size == json.loads((model_dir / "config.json").read_text())["vocab_size"]


def test_greedy_output_is_not_degenerate(hf_model, model_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    model, _ = hf_model
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    for prompt in ("Hello, world", "The quick brown fox", "日本語 🙂"):
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
            # Activations stay O(1) through the layers.
            for hs in out.hidden_states:
                assert 0.3 < float(hs.std()) < 10.0
            assert torch.isfinite(out.logits).all()
            gen = model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=1)[
                0, ids.shape[1] :
            ].tolist()
        assert len(gen) == 32
        assert len(set(gen)) >= 8, gen


def test_env_var_not_used_when_cache_dir_given(tmp_path: Path) -> None:
    path = ensure_tiny_model(tmp_path / "explicit")
    assert path.parent == tmp_path / "explicit"
    assert not Path(os.environ["DSSERVE_CACHE_DIR"]).exists()
