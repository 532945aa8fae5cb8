"""The conformance suite (`dsserve.conformance`): it passes for cpu and for the example plugin's device,
it can fail (deliberately broken implementations registered here make it fail with a message naming
the hook and the case, and a device with nothing of its own fails it too), and it names no device
itself."""
from __future__ import annotations

import importlib.metadata
import io
import re
import subprocess
import sys
import tokenize
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dsserve.conformance import run_conformance
from dsserve.conformance.runner import PACKAGE_DIR
from dsserve.cli import main as dsserve_main
from dsserve.core.hookspecs import hookimpl
from dsserve.core.plugin_report import render_plugins
from dsserve.core.plugins import DISABLE_ENV, OVERRIDES_ENV, PluginRegistry
from dsserve.plugins.cpu import native
from dsserve.core.reference import ReferenceMHAAttention, ReferenceMLAAttention, ReferenceMoE, ReferenceQuantizedLinear
from dsserve.plugins.cpu import CpuDevice

EXAMPLE_DIST = "dsserve-plugin-example"
EXAMPLE_DEVICE = "example-cpu"
FAMILY_ROWS = ("attention", "moe", "linear", "layer-ops", "communicator", "paged-kv", "end-to-end")


def _dsserve(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`dsserve ARGS` in a fresh interpreter (the console script's entry function)."""
    code = "import sys; from dsserve.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def _rows(table: str, family: str) -> list[list[str]]:
    return [line.split() for line in table.splitlines() if line.split()[:1] == [family]]


def _table(out: str, column: str) -> str:
    """The table in a report whose header's second column starts with `column` ("IMPLEMENTATION": the
    per-implementation table; "DEVICE'S": the per-family counts), up to the blank line after it."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("HOOK FAMILY") and line.split()[2] == column)
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return "\n".join(lines[start:end])


def _family_counts(out: str) -> dict[str, tuple[int, int, str]]:
    """family -> (cases on the device's own implementations, cases on the reference alone, not run)."""
    rows = [line.split() for line in _table(out, "DEVICE'S").splitlines()[1:]]
    return {r[0]: (int(r[1]), int(r[2]), " ".join(r[3:])) for r in rows}


@pytest.fixture(autouse=True)
def _all_plugins(monkeypatch):
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    monkeypatch.delenv(OVERRIDES_ENV, raising=False)


# ------------------------------------------------------------------------------ passing devices


def test_cpu_passes(capsys):
    """The whole suite for cpu through `dsserve conformance --device cpu`, in-process."""
    threads = torch.get_num_threads()
    rc = dsserve_main(["conformance", "--device", "cpu"])
    out = capsys.readouterr().out
    assert torch.get_num_threads() == threads  # the run's one host thread is not left behind
    assert rc == 0, out
    assert "conformance PASSED for device 'cpu'" in out
    assert not [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
    table = _table(out, "IMPLEMENTATION")
    assert table.splitlines()[0].split()[:4] == ["HOOK", "FAMILY", "IMPLEMENTATION", "RUN"]
    for family in FAMILY_ROWS:
        assert _rows(table, family), f"no row for {family}"
    # implementation classes are named module.qualname. Cases the core's reference classes serve
    # (float16 MLA, fp8 linear, the communicators) are not run
    mla = next(r for r in _rows(table, "attention") if r[1].endswith("ReferenceMLAAttention"))
    assert mla[2] == "0" and "reference" in mla
    awq = next(r for r in _rows(table, "linear") if r[1].endswith("ReferenceQuantizedLinear"))
    assert awq[2] == "0" and "reference" in awq
    own_linear = [r for r in _rows(table, "linear") if r[1].startswith("dsserve.plugins.cpu.")]
    assert all(int(r[2]) > 0 for r in own_linear)  # the C++ block GEMM (or oneDNN on AMX CPUs), int8 W8A8
    # per family: what cpu's own code served (oneDNN linear, and the model end to end through it) and
    # what fell to the reference
    counts = _family_counts(out)
    assert list(counts) == list(FAMILY_ROWS)
    reference_linear = [r for r in _rows(table, "linear") if ".core.reference." in r[1]]
    assert counts["linear"][:2] == (sum(int(r[2]) for r in own_linear), sum(int(r[-2]) for r in reference_linear))
    assert counts["end-to-end"][0] > 0
    # cpu's own MLA decode and fused MoE (C++, where they build); the two-rank case runs its shared-memory
    # communicator, the single-rank ones the reference's identity
    kernels = native.kernels() is not None
    for family in ("attention", "paged-kv", "moe", "layer-ops"):
        assert (counts[family][0] > 0) == kernels, (family, counts[family])
    assert counts["communicator"][:2] == (1, 3), counts["communicator"]
    assert _rows(table, "communicator")[-1][1] == "dsserve.plugins.cpu.shm_communicator.SharedMemoryCommunicator"
    own = sum(c[0] for c in counts.values())
    assert re.search(rf"conformance PASSED for device 'cpu': \d+ cases run \({own} on the device's own "
                     r"implementations\)", out), out
    assert "no case ran on" not in out


def _pyargs(tmp_path, keyword: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "--pyargs", "dsserve.conformance", "--dsserve-device", "cpu",
         "-q", "-k", keyword],
        capture_output=True, text=True, cwd=tmp_path, timeout=600)


def test_pytest_pyargs_entry(tmp_path):
    """`pytest --pyargs dsserve.conformance --dsserve-device cpu`, from a folder outside the project."""
    proc = _pyargs(tmp_path, "unquantized and float32")  # cpu's own oneDNN linear
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dsserve conformance: device cpu" in proc.stdout
    assert "3 passed" in proc.stdout
    # cases that all fell to the reference fail the pytest run as they fail `dsserve conformance`
    proc = _pyargs(tmp_path, "awq and float32")  # no cpu kernel for AWQ's 4-bit format yet
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "dsserve conformance: no case ran on device 'cpu''s own implementations" in proc.stdout


def test_support_lists_families_and_dtypes(capsys):
    assert dsserve_main(["conformance", "--device", "cpu", "--support"]) == 0
    out = capsys.readouterr().out
    for family in ("attention", "moe", "linear", "communicator"):
        assert _rows(out, family), family
    # one row per (case, answering implementation): cpu's own MLA for float32/bfloat16 (where its
    # kernels build), the reference for float16
    mla = [r for r in _rows(out, "attention") if r[1:3] == ["mla", "page_size=1"]]
    dtypes = {d: r[-1] for r in mla for d in r[3:-2]}
    assert set(dtypes) == {"float32", "bfloat16", "float16"}
    assert dtypes["float16"].endswith("ReferenceMLAAttention")
    if native.kernels() is not None:
        assert dtypes["bfloat16"].endswith("CpuMLAAttention")
    awq = next(r for r in _rows(out, "linear") if "quant=awq" in r)
    assert "reference" in awq


def test_unknown_device_is_a_usage_error(capsys):
    assert dsserve_main(["conformance", "--device", "no-such-device"]) == 2
    assert "unknown device 'no-such-device'" in capsys.readouterr().err


def _example_installed() -> bool:
    try:
        importlib.metadata.distribution(EXAMPLE_DIST)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_example = pytest.mark.skipif(
    not _example_installed(),
    reason=f"{EXAMPLE_DIST} is not installed (pip install -e examples/dsserve-plugin-example; .ci/run does)")


@needs_example
def test_example_plugin_device_passes(tmp_path):
    """What CI runs for the example: `dsserve conformance --device example-cpu`."""
    proc = _dsserve("conformance", "--device", EXAMPLE_DEVICE, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"conformance PASSED for device '{EXAMPLE_DEVICE}'" in out
    table = _table(out, "IMPLEMENTATION")
    moe = next(r for r in _rows(table, "moe") if r[1] == "dsserve_plugin_example.moe.ReverseOrderMoE")
    assert int(moe[2]) > 0 and moe[3] == "0"
    # everything else on example-cpu is the reference's: nothing of the device's to run there
    for r in _rows(table, "attention") + _rows(table, "linear"):
        assert r[2] == "0" and "reference" in r
    assert int(_rows(table, "end-to-end")[0][2]) >= 1
    counts = _family_counts(out)
    assert counts["moe"][0] == int(moe[2]) and counts["end-to-end"][0] >= 1
    assert all(counts[f][0] == 0 for f in ("attention", "linear", "communicator", "paged-kv"))


@needs_example
def test_example_plugin_is_listed_with_its_package():
    registry = PluginRegistry()
    info = next(i for i in registry.plugins() if i.name == "example")
    assert info.source == f"{EXAMPLE_DIST} 0.1.0"
    assert info.hooks == ["devices", "moe"]
    assert [d.name for d in info.devices] == [EXAMPLE_DEVICE]
    assert f"{EXAMPLE_DIST} 0.1.0" in render_plugins(registry)
    # installed, it leaves cpu alone; enabled for cpu, it overrides cpu's MoE (tryfirst) and only that
    cpu = registry.select_device("cpu")
    from dsserve.core.backends import MoESpec

    spec = MoESpec(8, 2, 16, 8, "sigmoid", "noaux_tc", 4, 2, True, 2.5, torch.float32)
    assert type(registry.moe_backend(cpu, spec)).__name__ == "ReferenceMoE"
    registry.allow_override("example", "cpu")
    assert type(registry.moe_backend(cpu, spec)).__name__ == "ReverseOrderMoE"
    assert registry.select_device(None).name != EXAMPLE_DEVICE  # priority -1: not the default


# ------------------------------------------------------------------- the suite can fail
# Each broken implementation is served by an in-process plugin for a host device of its own, in a
# registry given to run_conformance; the run is narrowed to the cases that exercise it.


def _registry_with(name: str, **hooks) -> PluginRegistry:
    """Every installed plugin, and plugin `name` providing a host device also named `name` (its own
    device, so that its hooks are asked however the registry routes them), for which it answers
    `hooks` (hook name -> factory(spec) -> implementation) and nothing else."""
    registry = PluginRegistry()
    device_class = type("InProcessDevice", (CpuDevice,), {"name": name, "priority": -1})

    class Plugin:
        @hookimpl
        def dsserve_devices(self):
            return [device_class()]

    plugin = Plugin()
    for hook, factory in hooks.items():
        def answer(device, spec, _factory=factory):
            return _factory(spec) if device.name == name else None

        setattr(plugin, hook, hookimpl(tryfirst=True)(answer))
    registry.register(plugin, name=name)
    return registry


def test_device_with_nothing_of_its_own_fails():
    """A device whose plugin answers no backend hook: every case falls to the reference, and the run
    fails with one line saying that nothing of the device's was checked."""
    registry = _registry_with("reference-only")
    result = run_conformance("reference-only", registry)
    assert not result.failures and not result.errors  # nothing failed...
    assert result.exit_code != 0 and not result.ok  # ...and yet nothing of the device's passed
    report = result.report()
    line = ("dsserve conformance: no case ran on device 'reference-only''s own implementations "
            r"\(\d+ of \d+ cases fell to the torch-native reference(, \d+ did not run)?\): nothing of the "
            "device's was checked")
    assert len([ln for ln in report.splitlines() if re.fullmatch(line, ln)]) == 1, report
    assert "conformance FAILED for device 'reference-only'" in report
    counts = _family_counts(report)
    assert list(counts) == list(FAMILY_ROWS)
    assert all(own == 0 for own, _, _ in counts.values())
    assert all(ref > 0 for f, (_, ref, _) in counts.items() if f != "communicator"), counts


def _failures(result) -> str:
    assert result.exit_code != 0
    assert not result.ok
    return "\n".join(f.message for f in result.failures)


class WrongScaleMHA(ReferenceMHAAttention):
    """Ignores spec.scale and uses head_dim ** -0.5."""

    def __init__(self, spec):
        super().__init__(replace(spec, scale=spec.head_dim ** -0.5))


def test_wrong_softmax_scale_fails():
    registry = _registry_with("broken-scale", dsserve_attention_backend=lambda s: (
        WrongScaleMHA(s) if s.kind == "mha" else None))
    result = run_conformance("broken-scale", registry, families=["attention"],
                             keyword="mha and decode and page16 and float32")
    text = _failures(result)
    assert len(result.failures) == sum(r.ran for r in result.results) > 0  # every case run caught it
    assert re.search(r"attention mha decode page_size=16 dtype=float32 batch=ragged shape=gqa: "
                     r"normalised error \S+ > 1e-10", text), text
    assert "WrongScaleMHA" in result.table()
    assert "conformance FAILED for device 'broken-scale'" in result.report()


class OffByOnePageMLA(ReferenceMLAAttention):
    """Decode reads each sequence's pages one entry later in the page table (writes are right)."""

    def forward_decode(self, q_latent, q_pe, latent, cache, meta):
        shifted = replace(meta, page_table=torch.roll(meta.page_table, -1, dims=1))
        return super().forward_decode(q_latent, q_pe, latent, cache, shifted)


def test_off_by_one_page_index_fails():
    registry = _registry_with("broken-page", dsserve_attention_backend=lambda s: (
        OffByOnePageMLA(s) if s.kind == "mla" else None))
    result = run_conformance("broken-page", registry, families=["attention"],
                             keyword="mla and decode and page16 and bfloat16")
    text = _failures(result)
    assert re.search(r"attention mla decode page_size=16 dtype=bfloat16 batch=ragged shape=small: "
                     r"normalised error \S+ > 1e-04", text), text


class WritesNextPageMLA(ReferenceMLAAttention):
    """Extend also writes each sequence's last new token into the page after its last page."""

    def forward_extend(self, q_nope, q_pe, latent, cache, meta, w_kc, w_vc):
        out = super().forward_extend(q_nope, q_pe, latent, cache, meta, w_kc, w_vc)
        flat = cache.view(-1, cache.shape[-1])
        ps = meta.page_size
        for i, n in enumerate(meta.seq_lens_cpu):
            last_page = int(meta.page_table[i, (n - 1) // ps])
            row = meta.extend_start[i] + meta.extend_lens[i] - 1
            flat[(last_page + 1) * ps] = latent[row].to(flat.dtype)
        return out


def test_write_into_the_next_page_fails():
    registry = _registry_with("broken-oob", dsserve_attention_backend=lambda s: (
        WritesNextPageMLA(s) if s.kind == "mla" else None))
    result = run_conformance("broken-oob", registry, families=["attention"],
                             keyword="mla and extend and page16 and float32 and prefill")
    text = _failures(result)
    assert re.search(r"attention mla extend page_size=16 dtype=float32 batch=prefill-ragged shape=small: "
                     r"wrote latent outside the new tokens' slots: \d+ slots changed, first slot \d+ "
                     r"\(guard page \d+ offset 0", text), text


class Fp8CacheMLA(ReferenceMLAAttention):
    """The reference's code as a device's own backend (defined outside dsserve.core.reference)."""


class Fp8CacheMHA(ReferenceMHAAttention):
    pass


def _fp8_only(mla, mha):
    return lambda s: (mla(s) if s.kind == "mla" else mha(s)) if s.fp8_cache else None


def test_fp8_cache_cases_run_where_a_backend_takes_them():
    """A device whose backend takes e4m3 caches runs the 8-bit cache cases (float32 and bfloat16
    queries, kv_scale 1 and 0.5, MLA and MHA, extend and decode) and passes them."""
    registry = _registry_with("fp8-cache", dsserve_attention_backend=_fp8_only(Fp8CacheMLA, Fp8CacheMHA))
    result = run_conformance("fp8-cache", registry, families=["attention"], keyword="fp8_cache")
    assert result.ok, result.report()
    ran = [r for r in result.results if r.ran]
    assert len(ran) == len(result.results) == 40
    labels = {r.label for r in ran}
    assert ("attention mla decode page_size=64 dtype=bfloat16 kv_cache=float8_e4m3fn kv_scale=0.5 batch=ragged "
            "shape=small") in labels
    assert "attention mha extend page_size=64 dtype=float32 kv_cache=float8_e4m3fn batch=mixed shape=gqa" in labels
    assert all(r.bound == 5e-3 for r in ran)


class IgnoresKvScaleMHA(ReferenceMHAAttention):
    """Writes stored = real / kv_scale, as it should, but reads the stored values back unscaled."""

    def _read(self, flat, slots, dtype):
        return flat.index_select(0, slots).to(dtype)


def test_ignoring_kv_scale_fails():
    registry = _registry_with("broken-kv-scale", dsserve_attention_backend=_fp8_only(Fp8CacheMLA, IgnoresKvScaleMHA))
    result = run_conformance("broken-kv-scale", registry, families=["attention"],
                             keyword="fp8_cache and mha and decode and scale0.5")
    text = _failures(result)
    assert re.search(r"attention mha decode page_size=64 dtype=float32 kv_cache=float8_e4m3fn kv_scale=0.5 "
                     r"batch=ragged shape=gqa: normalised error \S+ > 5e-03", text), text


class WritesPastHiddenMoE(ReferenceMoE):
    """compute_experts is right but also writes one row just past the end of `hidden`."""

    def compute_experts(self, hidden, topk_weights, topk_ids, w13, w2):
        out = super().compute_experts(hidden, topk_weights, topk_ids, w13, w2)
        width = hidden.shape[1]
        past = hidden.as_strided((1, width), (width, 1), hidden.storage_offset() + hidden.numel())
        past.copy_(out[-1:])
        return out


def test_write_past_a_buffer_fails():
    registry = _registry_with("broken-past-end", dsserve_moe_backend=WritesPastHiddenMoE)
    result = run_conformance("broken-past-end", registry, families=["moe"],
                             keyword="compute_experts and t37")
    text = _failures(result)
    assert re.search(r"moe compute_experts shape=t37-e16 dtype=float32: wrote \d+ elements past the end "
                     r"of input 'hidden'", text), text


def test_routing_must_pick_the_same_experts():
    class SecondBest(ReferenceMoE):
        def select_experts(self, router_logits, correction_bias):
            weights, ids = super().select_experts(router_logits, correction_bias)
            return weights, (ids + 1) % self.spec.num_experts

    registry = _registry_with("broken-routing", dsserve_moe_backend=SecondBest)
    result = run_conformance("broken-routing", registry, families=["moe"],
                             keyword="select_experts and e8-k2 and softmax-greedy")
    text = _failures(result)
    assert re.search(r"moe select_experts scoring=softmax method=greedy norm_topk_prob=\w+ shape=e8-k2 "
                     r"dtype=\w+: chose other experts than the reference", text), text


# --------------------------------------------------------------------------- device neutrality


def test_conformance_names_no_device():
    """The suite is device-neutral: no identifier or string literal in it names a device or a
    device library (the device comes from the user)."""
    banned = {"cpu", "cuda", "rocm", "hip", "npu", "xpu", "mps", "nccl", "rccl", "hccl", "gloo", "triton"}
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if tok.type in (tokenize.NAME, tokenize.STRING):
                words = set(re.findall(r"[a-z0-9]+", tok.string.lower()))
                assert not words & banned, f"{path.name}:{tok.start[0]}: {tok.string}"


def test_suite_ships_with_the_package():
    """Test files, conftest and the pytest.ini (package data) are inside dsserve.conformance."""
    names = {p.name for p in PACKAGE_DIR.iterdir()}
    assert {"conftest.py", "pytest.ini", "cli.py", "runner.py"} <= names
    assert sum(n.startswith("test_") for n in names) >= 6


# ------------------------------------------------------------------------ quantized formats


class PluginQuantizedLinear(ReferenceQuantizedLinear):
    """The reference's arithmetic in a plugin's own class, so the suite runs the quantized cases."""


class PluginQuantizedMoE(ReferenceMoE):
    pass


class ShiftedBlocksLinear(ReferenceQuantizedLinear):
    """Applies each row of blocks the scales of the next one (an off-by-one in the block grid)."""

    def apply(self, params, x):
        return super().apply({**params, "weight_scale_inv": params["weight_scale_inv"].roll(1, dims=0)}, x)


class NibbleOrderMoE(ReferenceMoE):
    """Reads AWQ's packed nibbles in plain order, not AutoAWQ's interleaved one."""

    def compute_experts(self, hidden, topk_weights, topk_ids, w13, w2):
        def plain(packed):  # reorder the nibbles of each int32 as if column c were at nibble c
            p = packed.to(torch.int64) & 0xFFFFFFFF
            out = torch.zeros_like(p)
            for c, nibble in enumerate((0, 4, 1, 5, 2, 6, 3, 7)):
                out |= ((p >> (4 * c)) & 0xF) << (4 * nibble)
            return (out - ((out >> 31) << 32)).to(torch.int32)

        w13 = {**w13, "qweight": plain(w13["qweight"])}
        return super().compute_experts(hidden, topk_weights, topk_ids, w13, w2)


def test_every_quantized_format_runs_and_passes():
    """A plugin answering every format with the reference's arithmetic: the linear and MoE cases of
    all four formats run (the suite's float64 oracle agrees with the core's formats) and pass."""
    quantized = lambda factory: lambda s: factory(s) if s.quant != "none" else None  # noqa: E731
    registry = _registry_with("quant-plugin", dsserve_linear_method=quantized(PluginQuantizedLinear),
                              dsserve_moe_backend=quantized(PluginQuantizedMoE))
    result = run_conformance("quant-plugin", registry, families=["linear", "moe"], keyword="quant and float32")
    assert result.ok, result.report()
    names = [r.label for r in result.results if r.ran]
    for fmt in ("fp8_block", "int8_block", "int8_channel", "awq"):
        assert any(f"linear quant={fmt}" in n for n in names) and any(f"compute_experts quant={fmt}" in n
                                                                      for n in names), fmt


def test_scales_on_the_wrong_blocks_fail():
    registry = _registry_with("broken-blocks", dsserve_linear_method=lambda s: (
        ShiftedBlocksLinear(s) if s.quant in ("fp8_block", "int8_block") else None))
    result = run_conformance("broken-blocks", registry, families=["linear"], keyword="quant and m3x4 and float32")
    text = _failures(result)
    assert re.search(r"linear quant=int8_block block=128x128 shape=m3x4 .*normalised error \S+ > 1e-03", text), text


def test_awq_nibbles_out_of_order_fail():
    registry = _registry_with("broken-awq", dsserve_moe_backend=lambda s: NibbleOrderMoE(s) if s.quant == "awq" else None)
    result = run_conformance("broken-awq", registry, families=["moe"], keyword="quant and float32")
    text = _failures(result)
    assert re.search(r"moe compute_experts quant=awq shape=t1-e8 dtype=float32: .*normalised error", text), text
