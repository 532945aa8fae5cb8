"""The plugin system: entry-point discovery, device selection, hook precedence, blocking, the listing,
and the built-in device plugins' own behaviour (availability reasons, CPU dtype and threads)."""
from __future__ import annotations

import importlib.util
import io
import logging
import os
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
import torch

import dsserve
from dsserve.core.backends import AttentionSpec, Device, LinearSpec, MoESpec
from dsserve.core.hookspecs import hookimpl
from dsserve.core.plugin_report import render_plugins
from dsserve.core.plugins import DISABLE_ENV, OVERRIDES_ENV, DeviceError, PluginRegistry
from dsserve.core.reference import (
    ReferenceMLAAttention,
    ReferenceMoE,
    SingleProcessCommunicator,
    UnquantizedLinear,
)
from dsserve.plugins.cpu import CpuDevice

BUILTIN = ("cpu", "cuda", "rocm", "npu")
GPU_LIKE = ("cuda", "rocm", "npu")


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    monkeypatch.delenv(OVERRIDES_ENV, raising=False)
    return PluginRegistry()


def _device(registry: PluginRegistry, name: str) -> Device:
    return next(d for d, _ in registry.devices() if d.name == name)


def _expected_available(name: str) -> bool:
    """What this machine's torch says, independently of the plugins."""
    if name == "cpu":
        return True
    if name == "cuda":
        return bool(torch.version.cuda) and torch.cuda.is_available()
    if name == "rocm":
        return bool(torch.version.hip) and torch.cuda.is_available()
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch_npu  # noqa: F401

    return torch.npu.is_available()


def _cpu_moe() -> type:
    """The cpu plugin's MoE backend: its fused C++ kernel where that builds here, else the reference."""
    from dsserve.plugins.cpu import native
    from dsserve.plugins.cpu.moe import CpuFusedMoE

    return CpuFusedMoE if native.kernels() is not None else ReferenceMoE


def _moe_spec() -> MoESpec:
    return MoESpec(num_experts=8, top_k=2, hidden_size=16, intermediate_size=32, scoring_func="sigmoid",
                   topk_method="noaux_tc", n_group=4, topk_group=2, norm_topk_prob=True,
                   routed_scaling_factor=2.5, dtype=torch.float32)


# ------------------------------------------------------------------------------ (a) discovery


def test_entry_points_list_builtin_plugins(registry):
    infos = {i.name: i for i in registry.plugins()}
    assert set(BUILTIN) <= set(infos)
    assert "reference" in infos
    for name in BUILTIN:
        assert infos[name].source == f"built-in, dsserve {dsserve.__version__}"
        assert "devices" in infos[name].hooks
        assert [d.name for d in infos[name].devices] == [name]
    # cpu, cuda and rocm answer the four backend families themselves (for their own device only);
    # the cpu plugin fuses the layer ops too
    for name in ("cpu", "cuda", "rocm"):
        assert {"devices", "attention", "moe", "linear", "communicator"} <= set(infos[name].hooks), name
    assert "layer-ops" in infos["cpu"].hooks


def test_device_availability_and_reasons(registry):
    for name in BUILTIN:
        ok, reason = _device(registry, name).is_available()
        assert ok == _expected_available(name), (name, reason)
        if ok:
            assert reason == ""
        else:
            assert reason.strip() and "\n" not in reason, (name, reason)
    assert _device(registry, "cpu").is_available() == (True, "")


def test_device_attributes(registry):
    expect = {"cpu": ("cpu", "gloo", 0), "cuda": ("cuda", "nccl", 100), "rocm": ("cuda", "nccl", 100),
              "npu": ("npu", "hccl", 100)}
    for name, (torch_type, dist_backend, priority) in expect.items():
        d = _device(registry, name)
        assert (d.torch_type, d.dist_backend, d.priority) == (torch_type, dist_backend, priority)
    for name in GPU_LIKE:
        assert _device(registry, name).default_dtype() == torch.bfloat16


def test_importing_device_plugins_imports_no_device_library():
    code = (
        "import sys, dsserve.plugins.cuda, dsserve.plugins.rocm, dsserve.plugins.npu\n"
        "for m in ('torch_npu', 'triton', 'intel_extension_for_pytorch'):\n"
        "    assert m not in sys.modules, m\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_unavailable_reasons_are_actionable(monkeypatch):
    from dsserve.plugins.cuda import CudaDevice
    from dsserve.plugins.npu import NpuDevice
    from dsserve.plugins.rocm import RocmDevice

    # a CPU-only build
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    ok, reason = CudaDevice().is_available()
    assert not ok and "CPU-only build" in reason and "install a CUDA build of torch" in reason
    ok, reason = RocmDevice().is_available()
    assert not ok and "CPU-only build" in reason and "ROCm build" in reason
    # a HIP build asked for cuda, and the other way round
    monkeypatch.setattr(torch.version, "hip", "6.2.0")
    ok, reason = CudaDevice().is_available()
    assert not ok and reason == "this torch is a HIP (ROCm) build; use --device rocm"
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    ok, reason = RocmDevice().is_available()
    assert not ok and "use --device cuda" in reason
    # a CUDA build on a machine without a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    ok, reason = CudaDevice().is_available()
    assert not ok and reason == "no NVIDIA GPU visible (torch.cuda.device_count() == 0)"
    # torch_npu missing
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    ok, reason = NpuDevice().is_available()
    release = torch.__version__.split("+")[0]
    assert not ok and reason == f"torch_npu is not installed (pip install torch-npu matching torch {release})"


# ------------------------------------------------------------------------ (b) device selection


def test_select_device_auto(registry):
    chosen = registry.select_device(None)
    others = [n for n in GPU_LIKE if _expected_available(n)]
    if not others:
        assert chosen.name == "cpu"
    else:
        assert chosen.name in others and chosen.priority == 100
    assert registry.select_device("auto").name == chosen.name


def test_select_unavailable_device_names_plugin_and_reason(registry):
    rocm = _device(registry, "rocm")
    ok, reason = rocm.is_available()
    if ok:
        pytest.skip("rocm is available on this machine")
    with pytest.raises(DeviceError) as err:
        registry.select_device("rocm")
    message = str(err.value)
    assert "plugin 'rocm'" in message and reason in message
    assert "\n" not in message


def test_select_unknown_device_lists_known(registry):
    with pytest.raises(DeviceError) as err:
        registry.select_device("tpu")
    message = str(err.value)
    assert "'tpu'" in message
    for name in BUILTIN:
        assert name in message


# ------------------------------------------------------------------- (c) hook precedence, blocking


class RecordingMoE(ReferenceMoE):
    def __init__(self, spec, calls):
        super().__init__(spec)
        self.calls = calls

    def select_experts(self, router_logits, correction_bias):
        self.calls.append("select_experts")
        return super().select_experts(router_logits, correction_bias)

    def compute_experts(self, hidden, topk_weights, topk_ids, w13, w2):
        self.calls.append("compute_experts")
        return super().compute_experts(hidden, topk_weights, topk_ids, w13, w2)


class RecordingPlugin:
    def __init__(self):
        self.calls: list[str] = []

    @hookimpl(tryfirst=True)
    def dsserve_moe_backend(self, device, spec):
        return RecordingMoE(spec, self.calls)


def test_tryfirst_plugin_overrides_one_hook_then_block_restores(registry):
    cpu = registry.select_device("cpu")
    spec = _moe_spec()
    before = type(registry.moe_backend(cpu, spec))
    assert before is _cpu_moe()  # the cpu plugin's, whatever else is installed
    plugin = RecordingPlugin()
    registry.register(plugin, name="recording-moe")
    assert "recording-moe" in [i.name for i in registry.plugins()]
    # it provides no cpu device: installed, it changes nothing for cpu until the user lets it
    assert type(registry.moe_backend(cpu, spec)) is before
    registry.allow_override("recording-moe", "cpu")

    backend = registry.moe_backend(cpu, spec)
    assert isinstance(backend, RecordingMoE)
    torch.manual_seed(0)
    logits, bias = torch.randn(5, 8), torch.randn(8)
    hidden = torch.randn(5, 16)
    w13, w2 = torch.randn(8, 64, 16), torch.randn(8, 16, 32)
    weights, ids = backend.select_experts(logits, bias)
    out = backend.compute_experts(hidden, weights, ids, w13, w2)
    assert plugin.calls == ["select_experts", "compute_experts"]
    # the other families are untouched: cpu still answers them
    assert isinstance(registry.linear_method(cpu, LinearSpec(16, 8, False, torch.float32)), UnquantizedLinear)

    registry.block("recording-moe")
    assert "recording-moe" not in [i.name for i in registry.plugins()]
    assert type(registry.moe_backend(cpu, spec)) is before
    reference = ReferenceMoE(spec)  # what RecordingMoE computes
    ref_weights, ref_ids = reference.select_experts(logits, bias)
    assert torch.equal(ref_ids, ids) and torch.equal(ref_weights, weights)
    assert torch.equal(reference.compute_experts(hidden, weights, ids, w13, w2), out)
    assert plugin.calls == ["select_experts", "compute_experts"]


class _RecordingDevicePlugin:
    """Provides device `name` and records every MoE hook call it gets."""

    def __init__(self, name: str):
        self.name, self.asked = name, []

    @hookimpl
    def dsserve_devices(self):
        return [type("Dev", (CpuDevice,), {"name": self.name})()]

    @hookimpl(tryfirst=True)
    def dsserve_moe_backend(self, device, spec):
        self.asked.append(device.name)
        return None


def test_a_device_hooks_are_asked_only_of_its_plugins(registry):
    """Per-device registration: a plugin is never asked for another plugin's device unless the user
    enables that override (DSSERVE_PLUGIN_OVERRIDES=plugin:device)."""
    plugin = _RecordingDevicePlugin("recording-device")
    registry.register(plugin, name="recording")
    cpu, own = _device(registry, "cpu"), _device(registry, "recording-device")
    registry.moe_backend(cpu, _moe_spec())
    assert plugin.asked == []
    assert type(registry.moe_backend(own, _moe_spec())) is ReferenceMoE  # it declined; the reference answers
    assert plugin.asked == ["recording-device"]
    registry.allow_override("recording", "cpu")
    registry.moe_backend(cpu, _moe_spec())
    assert plugin.asked == ["recording-device", "cpu"]


def test_plugin_overrides_from_the_environment(monkeypatch):
    monkeypatch.setenv(OVERRIDES_ENV, "recording:cpu, other:npu")
    assert PluginRegistry(load_entry_points=False).overrides == {("recording", "cpu"), ("other", "npu")}
    monkeypatch.setenv(OVERRIDES_ENV, "recording")
    with pytest.raises(DeviceError, match="'recording' is not PLUGIN:DEVICE"):
        PluginRegistry(load_entry_points=False)


def test_cpu_plugin_answers(registry):
    import dsserve.plugins.cpu as cpu_plugin

    cpu, other = _device(registry, "cpu"), _device(registry, "cuda")
    mla = AttentionSpec(kind="mla", num_heads=4, num_kv_heads=1, head_dim=24, v_head_dim=16, scale=0.2,
                        dtype=torch.float32, kv_lora_rank=32, qk_rope_head_dim=8)
    linear = LinearSpec(16, 8, False, torch.float32)
    assert isinstance(cpu_plugin.dsserve_attention_backend(device=cpu, spec=mla), ReferenceMLAAttention)
    assert type(cpu_plugin.dsserve_moe_backend(device=cpu, spec=_moe_spec())) is _cpu_moe()
    assert isinstance(cpu_plugin.dsserve_linear_method(device=cpu, spec=linear), UnquantizedLinear)
    comm = cpu_plugin.dsserve_communicator(device=cpu, group=None, rank=0, world_size=1)
    assert isinstance(comm, SingleProcessCommunicator) and comm.world_size == 1
    # a scheme the cpu plugin does not name is left to the reference
    fp8 = LinearSpec(16, 8, False, torch.float32, quant="fp8_block", weight_block_size=(128, 128))
    assert cpu_plugin.dsserve_linear_method(device=cpu, spec=fp8) is None
    # the cuda plugin answers for cuda itself (its Triton MoE), and the reference answers the hooks
    # for a device whose plugin has no kernels
    expected = "TritonMoE" if importlib.util.find_spec("triton") else "ReferenceMoE"
    assert type(registry.moe_backend(other, _moe_spec())).__name__ == expected

    class KernelLess(CpuDevice):
        name = "kernel-less"

    assert type(registry.moe_backend(KernelLess(), _moe_spec())) is ReferenceMoE


# ---------------------------------------------------------------------- (d) disabling by env


def test_disable_plugins_env(monkeypatch):
    monkeypatch.setenv(DISABLE_ENV, "npu")
    registry = PluginRegistry()
    names = [i.name for i in registry.plugins()]
    assert "npu" not in names
    assert {"cpu", "cuda", "rocm", "reference"} <= set(names)
    assert "npu" not in [d.name for d, _ in registry.devices()]
    with pytest.raises(DeviceError, match="unknown device 'npu'"):
        registry.select_device("npu")
    assert "npu" not in render_plugins(registry).split()


# ------------------------------------------------------------------------------ (e) the listing


def test_render_plugins(registry):
    text = render_plugins(registry)
    flat = " ".join(text.split())
    for info in registry.plugins():
        assert info.name in text
        assert " ".join(info.source.split()) in flat
    assert f"built-in, dsserve {dsserve.__version__}" in text
    for device, _ in registry.devices():
        ok, reason = device.is_available()
        if not ok:
            assert f"no: {reason}" in flat
    assert all(len(line) <= 100 for line in text.splitlines())
    header = next(line for line in text.splitlines() if line.startswith("DEVICE"))
    assert header.split() == ["DEVICE", "PLUGIN", "DTYPE", "AVAILABLE"]
    cpu_row = next(line for line in text.splitlines() if line.split()[:2] == ["cpu", "cpu"])
    assert cpu_row.split()[2:] == [str(CpuDevice().default_dtype()).removeprefix("torch."), "yes"]


def test_render_survives_a_broken_device(registry):
    class BrokenDevice(Device):
        name = "broken"
        torch_type = "cpu"
        dist_backend = "gloo"

        def is_available(self):
            raise OSError("driver exploded")

        def default_dtype(self):
            return torch.float16

        def memory_info(self):
            return 0, 0

    class BrokenPlugin:
        @hookimpl
        def dsserve_devices(self):
            return [BrokenDevice()]

    registry.register(BrokenPlugin(), name="broken-plugin")
    text = render_plugins(registry)
    assert "registered in-process" in text
    assert "no: is_available() raised OSError: driver exploded" in text


def test_plugin_report_names_no_device():
    """The core knows no device: no identifier or string literal in the listing names one."""
    source = Path(render_plugins.__code__.co_filename).read_text()
    banned = ("cuda", "nccl", "triton", "hip", "npu")
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.NAME, tokenize.STRING):
            assert not any(b in tok.string.lower() for b in banned), tok


# ------------------------------------------------------------------------------ (f) the CPU device


def _cpuinfo_has_bf16() -> bool:
    if not sys.platform.startswith("linux") or not os.path.exists("/proc/cpuinfo"):
        return False
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith(("flags", "Features")):
                return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[1].split()))
    return False


def test_cpu_default_dtype_follows_cpuinfo():
    device = CpuDevice()
    has_bf16 = _cpuinfo_has_bf16()
    assert device.default_dtype() == (torch.bfloat16 if has_bf16 else torch.float32)
    text = device.describe()
    assert "\n" not in text
    if has_bf16:
        assert "bfloat16" in text
    else:
        assert "no AVX512-BF16/AMX: float32" in text
    # the start-up line says which variant of the C++ kernels serves this CPU
    from dsserve.plugins.cpu import native

    variant = native.isa()
    assert (f"C++ kernels {variant.name} variant" if variant is not None else "C++ kernels unused") in text


def test_cpu_memory_info():
    available, total = CpuDevice().memory_info()
    assert 0 < available <= total
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            mem_total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
        assert total <= mem_total


def test_cpu_setup_threads(monkeypatch, caplog):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(1)
        with caplog.at_level(logging.INFO, logger="dsserve.plugins.cpu"):
            CpuDevice().setup()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        assert torch.get_num_threads() == cores
        assert f"{cores} torch threads" in caplog.text

        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        CpuDevice().setup()
        assert torch.get_num_threads() == 1  # the user's setting is left alone
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(importlib.util.find_spec("dsserve_plugin_example") is None,
                    reason="dsserve-plugin-example is not installed (.ci/run installs it)")
def test_installed_example_plugin_overrides_cpu_only_when_asked(monkeypatch):
    """Installing a plugin does not change what `cpu` runs for everyone; the user opts in per device."""
    from dsserve_plugin_example import ReverseOrderMoE

    monkeypatch.delenv(DISABLE_ENV, raising=False)
    monkeypatch.delenv(OVERRIDES_ENV, raising=False)
    registry = PluginRegistry()
    cpu, example = _device(registry, "cpu"), _device(registry, "example-cpu")
    assert type(registry.moe_backend(cpu, _moe_spec())) is _cpu_moe()
    assert type(registry.moe_backend(example, _moe_spec())) is ReverseOrderMoE
    assert "overrides of other plugins' devices: none" in render_plugins(registry)
    monkeypatch.setenv(OVERRIDES_ENV, "example:cpu")
    enabled = PluginRegistry()
    assert type(enabled.moe_backend(cpu, _moe_spec())) is ReverseOrderMoE
    assert "overrides of other plugins' devices: example:cpu" in render_plugins(enabled)
