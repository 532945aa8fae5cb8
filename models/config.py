"""ModelConfig: a checkpoint's config.json, normalised across its published and transformers-5 forms."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """config.json is missing, unreadable or describes an unsupported model."""


# The config.json fields the graph's sizes come from, with the least value each may take. A string,
# a float or a 0 there would crash deep inside torch (or build an empty model) with no word of the field.
_SIZE_FIELDS = {
    "vocab_size": 1, "hidden_size": 1, "intermediate_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1,
    "num_key_value_heads": 1, "head_dim": 1, "max_position_embeddings": 1,
    # MLA
    "q_lora_rank": 1, "kv_lora_rank": 1, "qk_nope_head_dim": 1, "qk_rope_head_dim": 1, "v_head_dim": 1,
    # MoE (0: no routed experts)
    "n_routed_experts": 0, "n_shared_experts": 0, "num_experts_per_tok": 0, "moe_intermediate_size": 0,
    "first_k_dense_replace": 0, "moe_layer_freq": 1, "n_group": 1, "topk_group": 1, "num_nextn_predict_layers": 0,
}
# The sizes read without a default; the others may be absent or null.
_REQUIRED_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_REQUIRED_MLA_SIZES = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
_NUMBER_FIELDS = ("rms_norm_eps", "rope_theta", "routed_scaling_factor")
_MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


@dataclass
class ModelConfig:
    """config.json normalised across its published and transformers-5 forms.

    Published DeepSeek configs carry `rope_scaling`, `rope_theta`, `topk_method` and `scoring_func`;
    transformers 5 writes `rope_parameters` (theta and scaling together) and drops
    `topk_method`/`scoring_func` for DeepSeek-V3, meaning noaux_tc + sigmoid.
    """

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_theta: float
    rope_scaling: dict | None
    attention_bias: bool = False
    qkv_bias: bool = False
    # MLA
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = True
    # MoE
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    num_nextn_predict_layers: int = 0
    quantization_config: dict | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str | None = None
    raw: dict = field(default_factory=dict, repr=False)

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        try:
            return cls.from_dict(raw)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        if not isinstance(raw, dict):
            raise ValueError(f"must hold a JSON object {{...}}, got {_json_kind(raw)}")
        _check_fields(raw)
        archs = raw.get("architectures") or []
        if not archs:
            raise ValueError("no 'architectures' entry")
        model_type = raw.get("model_type", "")
        heads = raw["num_attention_heads"]
        hidden = raw["hidden_size"]
        rope_params = dict(raw.get("rope_parameters") or {})
        rope_theta = float(rope_params.get("rope_theta", raw.get("rope_theta", 10000.0)))
        scaling = raw.get("rope_scaling") or rope_params
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"} if scaling else {}
        rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
        scaling.pop("type", None)
        rope_scaling = None if rope_type == "default" else {"rope_type": rope_type, **scaling}
        eos = raw.get("eos_token_id")
        is_v3 = model_type == "deepseek_v3"
        mla = {}
        if model_type in _MLA_MODEL_TYPES:
            mla = dict(
                q_lora_rank=raw.get("q_lora_rank"),
                kv_lora_rank=raw["kv_lora_rank"],
                qk_nope_head_dim=raw["qk_nope_head_dim"],
                qk_rope_head_dim=raw["qk_rope_head_dim"],
                v_head_dim=raw["v_head_dim"],
                rope_interleave=bool(raw.get("rope_interleave", True)),
                n_routed_experts=raw.get("n_routed_experts") or 0,
                n_shared_experts=raw.get("n_shared_experts") or 0,
                num_experts_per_tok=raw.get("num_experts_per_tok") or 0,
                moe_intermediate_size=raw.get("moe_intermediate_size") or 0,
                first_k_dense_replace=raw.get("first_k_dense_replace", 0),
                moe_layer_freq=raw.get("moe_layer_freq", 1),
                n_group=raw.get("n_group") or 1,
                topk_group=raw.get("topk_group") or 1,
                topk_method=raw.get("topk_method") or ("noaux_tc" if is_v3 else "greedy"),
                scoring_func=raw.get("scoring_func") or ("sigmoid" if is_v3 else "softmax"),
                norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
                routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
                num_nextn_predict_layers=raw.get("num_nextn_predict_layers", 0),
            )
        return cls(
            architecture=archs[0],
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or hidden // heads,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            attention_bias=bool(raw.get("attention_bias", False)),
            # Qwen2 always has q/k/v biases and no o_proj bias.
            qkv_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
            quantization_config=raw.get("quantization_config"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            raw=raw,
            **mla,
        )


def _check_fields(raw: dict[str, Any]) -> None:
    """Refuse, naming the field, a size that is missing, not an integer or too small, and a
    non-numeric float field."""
    required = _REQUIRED_SIZES + (_REQUIRED_MLA_SIZES if raw.get("model_type") in _MLA_MODEL_TYPES else ())
    for key, least in _SIZE_FIELDS.items():
        value = raw.get(key)
        if value is None:
            if key in required:
                raise ValueError(f"field '{key}' is required (missing or null)")
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"field '{key}' must be an integer, got {_json_kind(value)} {json.dumps(value)}")
        if value < least:
            raise ValueError(f"field '{key}' must be >= {least}, got {value}")
    for key in _NUMBER_FIELDS:
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"field '{key}' must be a number, got {_json_kind(value)} {json.dumps(value)}")


def _json_kind(value: Any) -> str:
    """What a JSON value is, as its reader would say it."""
    if isinstance(value, bool):
        return "a boolean"
    kinds = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number"}
    return kinds.get(type(value), "null")
