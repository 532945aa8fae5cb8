"""The benchmark checkpoint every performance figure of the project is taken on.

`../shared/reference/bench-model.config.json` (beside the repository) describes a DeepSeek-V3-shaped
model of 488.6 M parameters. Its weights are random: torch seed 0, then transformers'
`DeepseekV3ForCausalLM(config)` in float32, saved with `save_pretrained`. Every engine (dsserve,
transformers, vLLM, llama.cpp after conversion) is measured on that same checkpoint, so figures
compare across engines.

The folder also gets dsserve-tiny's tokenizer files so text benchmarks work. That tokenizer has 4000
tokens while the model's vocabulary is 32000: text maps onto ids below 4000 only, and random
token-id prompts are drawn below 4000 too. The model does not care (its weights are random).

    path = ensure_bench_model()          # builds once into <cache>/bench-model, then reuses it

Built at `$DSSERVE_CACHE_DIR/bench-model` (else `$XDG_CACHE_HOME/dsserve/bench-model`, else
`~/.cache/dsserve/bench-model`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

BENCH_MODEL_DIRNAME = "bench-model"
BENCH_CONFIG_NAME = "bench-model.config.json"
EXPECTED_PARAMS_M = 488.6          # what shared/README.md states for the shared config
SEED = 0
STAMP_FILE = "dsserve-bench-model.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# The token ids a random prompt may use: above dsserve-tiny's special tokens (0-18), below its size.
PROMPT_ID_LOW = 20
TOKENIZER_VOCAB = 4000


class BenchModelError(ValueError):
    """The benchmark model cannot be found or built; the message says what to do."""


def _candidate_config_paths() -> list[Path]:
    repo_root = Path(__file__).resolve().parents[1]   # bench/bench_model.py -> the repository
    found = [repo_root.parent / "shared" / "reference" / BENCH_CONFIG_NAME,
             Path.cwd().parent / "shared" / "reference" / BENCH_CONFIG_NAME]
    return list(dict.fromkeys(p.resolve() for p in found))


def bench_config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The config to build from: `explicit`, else $DSSERVE_BENCH_CONFIG, else ../shared/reference/."""
    chosen = explicit or os.environ.get("DSSERVE_BENCH_CONFIG")
    if chosen:
        path = Path(chosen).expanduser()
        if not path.is_file():
            raise BenchModelError(f"bench-model config {path} does not exist")
        return path
    candidates = _candidate_config_paths()
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise BenchModelError(
        f"the benchmark model's config ({BENCH_CONFIG_NAME}) was not found; looked in: {looked}. "
        "It lives in the project's shared folder, ../shared/reference/ beside the repository. "
        "Pass --bench-config PATH or set DSSERVE_BENCH_CONFIG to use a copy, or --model-path for "
        "another checkpoint.")


def bench_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    from dsserve.models.tiny import default_cache_dir

    return (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / BENCH_MODEL_DIRNAME


def _config_digest(raw: bytes) -> str:
    return hashlib.sha256(json.dumps(json.loads(raw), sort_keys=True).encode()).hexdigest()


def _tokenizer_file(name: str) -> bytes:
    from dsserve.models.tiny import _tokenizer_bytes

    return _tokenizer_bytes(name)


def _is_complete(folder: Path, digest: str) -> bool:
    stamp = folder / STAMP_FILE
    if not stamp.is_file():
        return False
    try:
        info = json.loads(stamp.read_text())
    except ValueError:
        return False
    weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    tokenizer = all((folder / n).is_file() for n in _TOKENIZER_FILES)
    return info.get("config_sha256") == digest and weights and tokenizer and (folder / "config.json").is_file()


def read_stamp(folder: str | os.PathLike[str]) -> dict:
    """What the build recorded: parameter count, seed, torch/transformers versions, source config."""
    return json.loads((Path(folder) / STAMP_FILE).read_text())


def ensure_bench_model(config: str | os.PathLike[str] | None = None,
                       cache_dir: str | os.PathLike[str] | None = None,
                       log: Callable[[str], None] = print,
                       check_size: bool | None = None) -> Path:
    """The benchmark checkpoint folder, built first when missing or built from another config.

    `check_size` (default: on for the shared config, off for one passed in) fails the build when the
    parameter count is not the 488.6 M that shared/README.md states.
    """
    config_path = bench_config_path(config)
    raw = config_path.read_bytes()
    digest = _config_digest(raw)
    folder = bench_model_dir(cache_dir)
    if _is_complete(folder, digest):
        return folder
    if check_size is None:
        check_size = config is None and not os.environ.get("DSSERVE_BENCH_CONFIG")
    log(f"building the benchmark model from {config_path} into {folder} (torch seed {SEED}, float32; "
        "takes a minute and 1.9 GB of disk)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{BENCH_MODEL_DIRNAME}.tmp-", dir=folder.parent))
    try:
        os.chmod(tmp, 0o755)
        params = _build_into(tmp, json.loads(raw))
        if check_size and round(params / 1e6, 1) != EXPECTED_PARAMS_M:
            raise BenchModelError(
                f"the benchmark model built from {config_path} has {params / 1e6:.1f} M parameters, "
                f"not the {EXPECTED_PARAMS_M} M that shared/README.md states: the config or transformers' "
                "DeepseekV3ForCausalLM changed; figures would not compare with the recorded ones")
        _write_stamp(tmp, config_path, digest, params)
        if folder.exists():
            shutil.rmtree(folder)     # built from another config: replace it
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"benchmark model ready: {folder} ({params / 1e6:.1f} M parameters)")
    return folder


def _build_into(folder: Path, cfg: dict) -> int:
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config.from_dict(cfg)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(SEED)
        model = DeepseekV3ForCausalLM(config).to(torch.float32)
    finally:
        torch.random.set_rng_state(state)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    del model
    for name in _TOKENIZER_FILES:
        (folder / name).write_bytes(_tokenizer_file(name))
    for path in folder.iterdir():
        os.chmod(path, 0o644)
    return params


def _write_stamp(folder: Path, config_path: Path, digest: str, params: int) -> None:
    import torch
    import transformers

    info = {
        "source_config": str(config_path),
        "config_sha256": digest,
        "seed": SEED,
        "dtype": "float32",
        "parameters": params,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizer": f"dsserve-tiny's ({TOKENIZER_VOCAB} tokens; the model's vocabulary is larger: "
                     f"prompts use ids {PROMPT_ID_LOW}..{TOKENIZER_VOCAB - 1})",
    }
    (folder / STAMP_FILE).write_text(json.dumps(info, indent=2) + "\n")
