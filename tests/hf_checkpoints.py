"""Small random Hugging Face checkpoints, built with transformers itself, for parity and loader tests.

Every builder writes an ordinary checkpoint folder (config.json, generation_config.json,
model.safetensors, all float32) with ``save_pretrained`` and returns a :class:`Checkpoint` that also
holds the in-memory transformers model the folder was saved from, ready to serve as the oracle.

The configs are chosen so that a default value cannot hide a bug: RoPE theta, RMSNorm eps,
routed_scaling_factor, YaRN factor/mscale/beta are all non-default, v_head_dim differs from
qk_nope_head_dim, Llama's head_dim differs from hidden_size // num_attention_heads, and every parameter
that transformers initialises to zeros or ones (RMSNorm weights, biases, the noaux_tc correction bias)
is randomised. Weights use a larger initializer_range than transformers' 0.02 and the LM head is
scaled up, so that attention patterns and routing are far from uniform and the next token has a clear
winner (greedy decoding never hinges on float rounding); the projections feeding MLA's latent norms
are scaled down so that those norms' eps shows at the 1e-4 level.

config.json is left in transformers 5's own form (``rope_parameters``; DeepSeek-V3 with no
``topk_method``/``scoring_func``) for some checkpoints and rewritten into the published form
(``rope_scaling`` + ``rope_theta``, DeepSeek's ``topk_method``/``scoring_func``, only the keys the
published configs carry) for others, so the loader is tested on both.

Usage::

    from hf_checkpoints import build
    ckpt = build("deepseek_v3", tmp_path / "v3")
    ckpt.path, ckpt.model, ckpt.vocab_size
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CASES",
    "Checkpoint",
    "build",
    "build_deepseek_v2_group_limited",
    "build_deepseek_v2_softmax",
    "build_deepseek_v3",
    "build_llama",
    "build_llama_tied",
    "build_qwen2",
    "copy_tiny_tokenizer",
    "read_tensors",
    "shard",
    "write_tensors",
]

# The key sets of the published config.json files (see shared/reference/), used when a test checkpoint
# is rewritten into the published form. Values always come from the checkpoint actually built.
_PUBLISHED_KEYS = {
    "deepseek_v2": [
        "architectures", "attention_bias", "attention_dropout", "aux_loss_alpha", "bos_token_id",
        "eos_token_id", "first_k_dense_replace", "hidden_act", "hidden_size", "initializer_range",
        "intermediate_size", "kv_lora_rank", "max_position_embeddings", "model_type",
        "moe_intermediate_size", "moe_layer_freq", "n_group", "n_routed_experts", "n_shared_experts",
        "norm_topk_prob", "num_attention_heads", "num_experts_per_tok", "num_hidden_layers",
        "num_key_value_heads", "pretraining_tp", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
        "rms_norm_eps", "routed_scaling_factor", "seq_aux", "tie_word_embeddings", "topk_group",
        "use_cache", "v_head_dim", "vocab_size",
    ],
    "llama": [
        "architectures", "attention_bias", "attention_dropout", "bos_token_id", "eos_token_id",
        "head_dim", "hidden_act", "hidden_size", "initializer_range", "intermediate_size",
        "max_position_embeddings", "mlp_bias", "model_type", "num_attention_heads", "num_hidden_layers",
        "num_key_value_heads", "pretraining_tp", "rms_norm_eps", "tie_word_embeddings", "use_cache",
        "vocab_size",
    ],
    "qwen2": [
        "architectures", "attention_dropout", "bos_token_id", "eos_token_id", "hidden_act",
        "hidden_size", "initializer_range", "intermediate_size", "max_position_embeddings",
        "max_window_layers", "model_type", "num_attention_heads", "num_hidden_layers",
        "num_key_value_heads", "rms_norm_eps", "sliding_window", "tie_word_embeddings", "use_cache",
        "use_mrope", "use_sliding_window", "vocab_size",
    ],
}
# Keys of the published DeepSeek configs that transformers does not keep; written with these values.
_PUBLISHED_DEFAULTS = {"aux_loss_alpha": 0.001, "seq_aux": True, "moe_layer_freq": 1, "use_mrope": False}

TINY_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "models" / "tiny_tokenizer"


@dataclass
class Checkpoint:
    """A checkpoint folder on disk and the transformers model it was saved from."""

    name: str
    path: Path
    model: Any  # transformers PreTrainedModel, float32, eval mode, eager attention
    config: dict  # the config.json as written to disk
    published_form: bool  # True when config.json was rewritten into the published form

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])


# --------------------------------------------------------------------------------------------------
# randomisation


def _randomise(model: torch.nn.Module, *, bias_std: float = 0.1, correction_bias_std: float = 0.1) -> None:
    """Give every parameter that transformers initialises to a constant a random value.

    RMSNorm weights (ones) become 1 + 0.1 * randn, Linear biases (zeros) become bias_std * randn,
    DeepSeek-V3's e_score_correction_bias (zeros) becomes correction_bias_std * randn. Draws come from the
    global torch generator, which the caller has seeded.
    """
    with torch.no_grad():
        for mod_name, module in model.named_modules():
            cls = type(module).__name__
            if cls.endswith("RMSNorm"):
                module.weight.copy_(1.0 + 0.1 * torch.randn_like(module.weight))
            elif isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.copy_(bias_std * torch.randn_like(module.bias))
            bias = getattr(module, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(correction_bias_std * torch.randn_like(bias))


def _shrink_mla_latents(model: torch.nn.Module, scale: float = 0.1) -> None:
    """Scale down the projections that feed MLA's q_a_layernorm and kv_a_layernorm (the latent part of
    kv_a_proj_with_mqa, not its RoPE key) so that those norms' eps matters at the 1e-4 level: DeepSeek's
    code uses a fixed 1e-6 there, not config.rms_norm_eps, and the test checkpoints use another eps.
    The norms that follow undo the scale, so nothing else changes."""
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "kv_a_proj_with_mqa"):
                module.kv_a_proj_with_mqa.weight[: module.kv_lora_rank].mul_(scale)
                if module.kv_a_proj_with_mqa.bias is not None:
                    module.kv_a_proj_with_mqa.bias[: module.kv_lora_rank].mul_(scale)
                if getattr(module, "q_a_proj", None) is not None:
                    module.q_a_proj.weight.mul_(scale)


def _sharpen_logits(model: torch.nn.Module, scale: float) -> None:
    """Scale the output projection so the next-token distribution has clear winners: greedy decoding
    then never hinges on a near-tie that float rounding could flip (tied models scale the shared
    embedding, which the first RMSNorm makes harmless for the input side)."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)


def _make_model(config) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model.float().eval()


def _save(model, folder: Path) -> dict:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return json.loads((folder / "config.json").read_text())


def _write_config(folder: Path, cfg: dict) -> None:
    (Path(folder) / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _to_published_form(folder: Path, family: str, extra: dict | None = None) -> dict:
    """Rewrite config.json the way the published checkpoints spell it.

    ``rope_parameters`` becomes ``rope_theta`` plus ``rope_scaling`` (DeepSeek: ``{"type": "yarn", ...}``;
    Llama: ``{"rope_type": "llama3", ...}``; none for default RoPE); only keys that the published configs
    carry are kept (no ``head_dim``/``qk_head_dim`` for DeepSeek, no ``dtype``); ``extra`` adds keys such
    as DeepSeek's ``topk_method`` and ``scoring_func``.
    """
    saved = json.loads((Path(folder) / "config.json").read_text())
    out = {}
    for key in _PUBLISHED_KEYS[family]:
        if key in saved:
            out[key] = saved[key]
        elif key in _PUBLISHED_DEFAULTS:
            out[key] = _PUBLISHED_DEFAULTS[key]
    rope = dict(saved["rope_parameters"])
    out["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type", "default")
    if rope_type != "default":
        key = "type" if family.startswith("deepseek") else "rope_type"
        out["rope_scaling"] = {key: rope_type, **rope}
    out["torch_dtype"] = "float32"
    out["transformers_version"] = saved.get("transformers_version")
    out.update(extra or {})
    _write_config(folder, out)
    return out


def _finish(name: str, model, folder: Path, published: tuple[str, dict] | None,
            logit_scale: float = 3.0) -> Checkpoint:
    _shrink_mla_latents(model)
    _sharpen_logits(model, logit_scale)
    cfg = _save(model, folder)
    if published is not None:
        cfg = _to_published_form(folder, published[0], published[1])
    return Checkpoint(name=name, path=Path(folder), model=model, config=cfg, published_form=published is not None)


# --------------------------------------------------------------------------------------------------
# builders


def build_deepseek_v3(folder, seed: int = 0, vocab_size: int = 256, initializer_range: float = 0.1,
                      **overrides) -> Checkpoint:
    """DeepSeek-V3: q-LoRA, noaux_tc/sigmoid routing in 4 groups (top-2 groups), 16 experts top-4,
    2 shared experts, a dense first layer, YaRN with mscale != mscale_all_dim, v_head_dim != qk_nope.

    config.json stays in transformers 5's form: ``rope_parameters`` and no ``topk_method``/``scoring_func``
    (which, for DeepseekV3ForCausalLM, means noaux_tc with sigmoid scoring).
    """
    from transformers import DeepseekV3Config

    torch.manual_seed(seed)
    kw = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24,
        n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=2,
        first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=1.7,
        rms_norm_eps=1e-5, initializer_range=initializer_range,
        max_position_embeddings=2048,
        rope_parameters={
            "rope_type": "yarn", "rope_theta": 5000.0, "factor": 8.0,
            "original_max_position_embeddings": 256, "beta_fast": 24, "beta_slow": 2,
            "mscale": 0.9, "mscale_all_dim": 0.7,
        },
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    )
    kw.update(overrides)
    model = _make_model(DeepseekV3Config(**kw))
    _randomise(model)
    return _finish("deepseek_v3", model, folder, None)


def build_deepseek_v2_softmax(folder, seed: int = 1, vocab_size: int = 256, initializer_range: float = 0.1,
                              **overrides) -> Checkpoint:
    """DeepSeek-V2(-Lite) style: no q-LoRA, softmax scoring with plain greedy top-k, norm_topk_prob off,
    routed_scaling_factor 1.3, YaRN factor 40 with mscale == mscale_all_dim == 0.707.

    config.json is rewritten into the published form (``rope_scaling: {"type": "yarn", ...}``,
    ``rope_theta``, ``topk_method``, ``scoring_func``), as in DeepSeek-V2-Lite's own config.
    """
    from transformers import DeepseekV2Config

    torch.manual_seed(seed)
    kw = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=112, moe_intermediate_size=24,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=None, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=20,
        n_routed_experts=8, num_experts_per_tok=3, n_group=1, topk_group=1, n_shared_experts=2,
        first_k_dense_replace=1, norm_topk_prob=False, routed_scaling_factor=1.3, topk_method="greedy",
        rms_norm_eps=2e-6, initializer_range=initializer_range,
        max_position_embeddings=512 * 40,
        rope_parameters={
            "rope_type": "yarn", "rope_theta": 20000.0, "factor": 40.0,
            "original_max_position_embeddings": 512, "beta_fast": 32, "beta_slow": 1,
            "mscale": 0.707, "mscale_all_dim": 0.707,
        },
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    )
    kw.update(overrides)
    model = _make_model(DeepseekV2Config(**kw))
    _randomise(model)
    extra = {"topk_method": "greedy", "scoring_func": "softmax", "moe_layer_freq": 1}
    return _finish("deepseek_v2_softmax", model, folder, ("deepseek_v2", extra))


def build_deepseek_v2_group_limited(folder, seed: int = 2, vocab_size: int = 256,
                                    initializer_range: float = 0.1, **overrides) -> Checkpoint:
    """DeepSeek-V2 (the 236B's routing): q-LoRA, softmax scoring with group_limited_greedy in 4 groups
    (top-2 groups), every layer MoE (first_k_dense_replace 0), YaRN with mscale == mscale_all_dim.

    config.json in the published form, as DeepSeek-V2's own.
    """
    from transformers import DeepseekV2Config

    torch.manual_seed(seed)
    kw = dict(
        vocab_size=vocab_size, hidden_size=48, intermediate_size=80, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=3,
        q_lora_rank=40, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=12, num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=1,
        first_k_dense_replace=0, norm_topk_prob=False, routed_scaling_factor=0.8,
        topk_method="group_limited_greedy",
        rms_norm_eps=3e-6, initializer_range=initializer_range,
        max_position_embeddings=128 * 16,
        rope_parameters={
            "rope_type": "yarn", "rope_theta": 8000.0, "factor": 16.0,
            "original_max_position_embeddings": 128, "beta_fast": 16, "beta_slow": 2,
            "mscale": 0.8, "mscale_all_dim": 0.8,
        },
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    )
    kw.update(overrides)
    model = _make_model(DeepseekV2Config(**kw))
    _randomise(model)
    extra = {"topk_method": "group_limited_greedy", "scoring_func": "softmax", "moe_layer_freq": 1}
    return _finish("deepseek_v2_group_limited", model, folder, ("deepseek_v2", extra))


_LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
}


def build_llama(folder, seed: int = 3, vocab_size: int = 256, initializer_range: float = 0.1,
                **overrides) -> Checkpoint:
    """R1-Distill-Llama style: llama3 RoPE scaling (original_max_position_embeddings 64, so the scaling
    matters at short lengths), GQA 4 query heads / 2 KV heads, head_dim 24 != hidden_size / heads,
    rope_theta 500000, eps 1e-5, untied lm_head. config.json in the published form (``rope_scaling``)."""
    from transformers import LlamaConfig

    torch.manual_seed(seed)
    kw = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-5,
        initializer_range=initializer_range, max_position_embeddings=1024,
        rope_parameters=dict(_LLAMA3_ROPE), attention_bias=False, mlp_bias=False,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    )
    kw.update(overrides)
    model = _make_model(LlamaConfig(**kw))
    _randomise(model)
    return _finish("llama", model, folder, ("llama", None))


def build_llama_tied(folder, seed: int = 4, vocab_size: int = 256, initializer_range: float = 0.1,
                     **overrides) -> Checkpoint:
    """Llama with tie_word_embeddings (no lm_head.weight in the file), llama3 RoPE, GQA, default head_dim.
    config.json in transformers 5's form (``rope_parameters``)."""
    from transformers import LlamaConfig

    torch.manual_seed(seed)
    kw = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        initializer_range=initializer_range, max_position_embeddings=1024,
        rope_parameters=dict(_LLAMA3_ROPE), bos_token_id=0, eos_token_id=1, tie_word_embeddings=True,
    )
    kw.update(overrides)
    model = _make_model(LlamaConfig(**kw))
    _randomise(model)
    return _finish("llama_tied", model, folder, None)


def build_qwen2(folder, seed: int = 5, vocab_size: int = 256, initializer_range: float = 0.1,
                **overrides) -> Checkpoint:
    """R1-Distill-Qwen style: q/k/v biases (random), GQA 4/2, rope_theta 1e6, eps 1e-6, untied lm_head.
    config.json in the published form (``rope_theta`` at top level, no ``rope_scaling``)."""
    from transformers import Qwen2Config

    torch.manual_seed(seed)
    kw = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
        initializer_range=initializer_range, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False, sliding_window=4096, max_window_layers=3,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    )
    kw.update(overrides)
    model = _make_model(Qwen2Config(**kw))
    _randomise(model, bias_std=0.3)
    return _finish("qwen2", model, folder, ("qwen2", None))


CASES: dict[str, Callable[..., Checkpoint]] = {
    "deepseek_v3": build_deepseek_v3,
    "deepseek_v2_softmax": build_deepseek_v2_softmax,
    "deepseek_v2_group_limited": build_deepseek_v2_group_limited,
    "llama": build_llama,
    "llama_tied": build_llama_tied,
    "qwen2": build_qwen2,
}


def build(name: str, folder, **kwargs) -> Checkpoint:
    """Build the checkpoint called ``name`` (a key of CASES) into ``folder``."""
    try:
        builder = CASES[name]
    except KeyError:
        raise ValueError(f"unknown checkpoint {name!r}; known: {', '.join(CASES)}") from None
    return builder(folder, **kwargs)


# --------------------------------------------------------------------------------------------------
# editing checkpoints on disk


def read_tensors(folder) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (single file or sharded), by name."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(folder / f)))
    return out


def write_tensors(folder, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the weights of a checkpoint folder with ``tensors``, as one model.safetensors."""
    from safetensors.torch import save_file

    folder = Path(folder)
    for p in folder.glob("model*.safetensors*"):
        p.unlink()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


def shard(folder, num_shards: int = 2) -> list[str]:
    """Split model.safetensors into ``model-0000i-of-0000n.safetensors`` files plus the
    ``model.safetensors.index.json`` that maps each tensor to its file, as save_pretrained does for
    large models. Returns the shard file names."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = read_tensors(folder)
    names = sorted(tensors)
    per = -(-len(names) // num_shards)
    files, weight_map, total = [], {}, 0
    for i in range(num_shards):
        fname = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = {n: tensors[n].contiguous() for n in names[i * per:(i + 1) * per]}
        save_file(chunk, str(folder / fname), metadata={"format": "pt"})
        files.append(fname)
        for n, t in chunk.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    (folder / "model.safetensors").unlink()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files


def copy_tiny_tokenizer(folder) -> bool:
    """Copy the embedded tiny tokenizer's files into ``folder`` when they exist (models/tiny_tokenizer/).
    Returns whether anything was copied. The checkpoint's vocab_size must cover the tokenizer's."""
    if not TINY_TOKENIZER_DIR.is_dir():
        return False
    copied = False
    for p in TINY_TOKENIZER_DIR.iterdir():
        if p.is_file() and p.suffix == ".json":
            shutil.copy2(p, Path(folder) / p.name)
            copied = True
    return copied


if __name__ == "__main__":  # python tests/hf_checkpoints.py OUT_DIR: build every case, for inspection
    import sys

    root = Path(sys.argv[1] if len(sys.argv) > 1 else "hf_checkpoints_out")
    for case in CASES:
        ck = build(case, root / case)
        n = sum(p.numel() for p in ck.model.parameters())
        print(f"{case:28s} {n:>9,d} params  published_form={ck.published_form}  {ck.path}")


def add_mtp_layer(folder) -> None:
    """Append an MTP layer in DeepSeek-V3's published names, with no embedding or head copy: a decoder
    layer drawn like the last one (each tensor with its mean and std), enorm, hnorm, eh_proj and
    shared_head.norm."""
    cfg = json.loads((folder / "config.json").read_text())
    n, dim = cfg["num_hidden_layers"], cfg["hidden_size"]
    folder = Path(folder)
    gen = torch.Generator().manual_seed(61)
    tensors = read_tensors(folder)
    last, mtp = f"model.layers.{n - 1}.", f"model.layers.{n}."
    for name in [k for k in tensors if k.startswith(last)]:
        t = tensors[name]
        tensors[mtp + name[len(last):]] = t.mean() + t.std() * torch.randn(t.shape, generator=gen)
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        tensors[f"{mtp}{norm}.weight"] = 1 + 0.1 * torch.randn(dim, generator=gen)
    tensors[mtp + "eh_proj.weight"] = torch.randn(dim, 2 * dim, generator=gen) / (2 * dim) ** 0.5
    write_tensors(folder, tensors)
