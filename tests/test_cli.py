"""The `dsserve` command as a user meets it on a fresh machine."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from dsserve import Engine, __version__, hookimpl
from dsserve.core.backends import Device
from dsserve.core.plugins import PluginRegistry
from dsserve.models.loader import CheckpointError


def dsserve(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "dsserve.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_generate_with_no_model_builds_tiny_in_a_fresh_cache(tmp_path):
    cache = tmp_path / "fresh-cache"
    r = dsserve("generate", "--prompt", "Hello", "--max-new-tokens", "8", "--dtype", "float32",
                env={"DSSERVE_CACHE_DIR": str(cache)})
    assert r.returncode == 0, r.stderr
    assert (cache / "dsserve-tiny-v1" / "model.safetensors").exists()
    assert "dtype float32" in r.stderr          # the startup log names the device and dtype
    assert "KV cache:" in r.stderr
    assert "\r" not in r.stderr, "a progress bar drawn into a pipe (a log file) leaves its redraws there"


def test_unavailable_device_is_one_line_and_exit_code_2():
    r = dsserve("--device", "rocm")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "rocm" in lines[0] and "unavailable" in lines[0]


def test_unknown_device_lists_known_ones():
    r = dsserve("generate", "--prompt", "x", "--device", "tpu")
    assert r.returncode == 2 and "unknown device 'tpu'" in r.stderr and "cpu" in r.stderr


def test_invalid_flag_value_is_rejected():
    r = dsserve("generate", "--prompt", "x", "--mem-fraction-static", "1.5")
    assert r.returncode == 2 and "--mem-fraction-static" in r.stderr


def test_version_names_dsserve_and_torch():
    r = dsserve("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"dsserve {__version__} (torch {torch.__version__})"


def test_generate_help_lists_engine_flags_not_http_ones():
    r = dsserve("generate", "--help")
    assert r.returncode == 0
    for engine_flag in ("--model-path", "--device", "--max-new-tokens", "--allow-nonfinite-weights"):
        assert engine_flag in r.stdout
    for http_flag in ("--host", "--port", "--api-key"):
        assert not re.search(rf"(^|\s){http_flag}\b", r.stdout), f"{http_flag} is an HTTP server flag"


def test_generate_checks_its_flags_before_loading_the_model(tmp_path):
    """The model folder does not exist: had it been loaded first, the error would name it."""
    r = dsserve("generate", "--prompt", "x", "--max-new-tokens", "0", "--model-path", str(tmp_path / "nothing"))
    assert r.returncode == 2
    assert r.stderr.strip() == "dsserve: --max-new-tokens must be >= 1"


def _break_tokenizer(folder):
    (folder / "tokenizer.json").write_text((folder / "tokenizer.json").read_text()[:300])
    return "tokenizer.json: not valid JSON"


def _nan_in_a_weight(folder):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, folder / "model.safetensors")
    return "model.safetensors: tensor 'model.norm.weight' holds NaN or inf"


@pytest.mark.parametrize("breakage", [_break_tokenizer, _nan_in_a_weight], ids=["tokenizer", "nan-weight"])
def test_broken_checkpoint_is_one_line_and_exit_code_2(tmp_path, breakage):
    from dsserve.models.tiny import ensure_tiny_model

    folder = tmp_path / "tiny"
    shutil.copytree(ensure_tiny_model(), folder)
    named = breakage(folder)
    r = dsserve("generate", "--prompt", "x", "--max-new-tokens", "1", "--model-path", str(folder))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"dsserve: {folder / named}")


def test_unknown_plugin_in_disable_list_warns_naming_the_installed_ones():
    r = dsserve("plugins", env={"DSSERVE_DISABLE_PLUGINS": "nosuch"})
    assert r.returncode == 0
    assert "no installed plugin is named 'nosuch'" in r.stderr
    assert all(name in r.stderr.split("installed plugins:")[1] for name in ("reference", "cpu", "cuda"))


def test_plugins_lists_every_builtin_plugin():
    r = dsserve("plugins")
    assert r.returncode == 0
    for name in ("reference", "cpu", "cuda", "rocm", "npu"):
        assert name in r.stdout


def test_hub_id_offline_fails_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as err:
        Engine(model_path="deepseek-ai/not-a-real-model-for-tests", device="cpu")
    assert "\n" not in str(err.value) and "not-a-real-model-for-tests" in str(err.value)


class _SmallMemoryDevice(Device):
    """A CPU with 1 MiB of memory: the tiny model's weights cannot fit."""

    name, torch_type, dist_backend = "smallmem", "cpu", "gloo"

    def is_available(self):
        return True, ""

    def default_dtype(self):
        return torch.float32

    def memory_info(self):
        return 2**20, 2**20


class _SmallMemoryPlugin:
    @hookimpl
    def dsserve_devices(self):
        return [_SmallMemoryDevice()]


def test_weights_larger_than_device_memory_say_how_much_is_needed(monkeypatch):
    registry = PluginRegistry()
    registry.register(_SmallMemoryPlugin(), name="smallmem")
    monkeypatch.setattr("dsserve.core.model_runner.default_registry", lambda: registry)
    with pytest.raises(CheckpointError, match=r"need \d+\.\d+ GiB .* only 0\.00 GiB is free on smallmem"):
        Engine(device="smallmem", model_worker="thread")   # the plugin is registered in this process
