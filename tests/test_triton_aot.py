"""Every Triton kernel the cuda and rocm plugins launch, compiled ahead of time with Triton's own
compiler (no GPU is needed to compile) for every claim of every target in the plugins' claims table
(`dsserve.plugins.gpu.TARGETS`): what an A100 or an MI300X would refuse at its first request fails
here instead, and so does a kernel whose shared memory (LDS) exceeds the target's or that spills
registers.

The launches are the plugins' own: their launchers (`fp8_block_gemm`, `fused_moe`,
`mla_decode_attention`, ...) run on meta tensors (shapes, strides and dtypes, no data) at DeepSeek-V3,
V2-Lite and R1-Distill (Llama-8B, Qwen-7B) shapes, with each kernel replaced by a recorder, so the
tiles, warps, stages and split counts are the ones the launch code picks. Each recorded launch is
specialised by the target's Triton backend as its JIT would (16-byte alignment, integers equal to 1,
AMD's 32-bit buffer offsets), identical launches are compiled once, and the compiles share the CPUs.

The suite runs Triton in its interpreter (conftest sets TRITON_INTERPRET=1, which makes every
`@triton.jit` an interpreted function), so the compiles run in a child interpreter without it: this
file, run as a script, prints what each target made of each launch as JSON.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import io
import json
import math
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import pytest
import torch

from dsserve.plugins.gpu import DTYPES, E4M3, KERNELS, TARGETS, Claim, GpuTarget

PACKAGE = "dsserve.plugins.triton_kernels"
MLA_MODELS = {"V3": {"heads": 128, "rank": 512, "rope": 64},
              "V2-Lite": {"heads": 16, "rank": 512, "rope": 64}}
MHA_MODELS = {"R1-Distill-Llama-8B": {"heads": 32, "kv_heads": 8, "head_dim": 128},
              "R1-Distill-Qwen-7B": {"heads": 28, "kv_heads": 4, "head_dim": 128}}
MOE_MODELS = {"V3": {"hidden": 7168, "experts": 256, "top_k": 8, "inter": 2048},
              "V2-Lite": {"hidden": 2048, "experts": 64, "top_k": 6, "inter": 1408}}
LINEAR_MODELS = {"V3": {"in": 7168, "out": 18432}}  # the dense layers' up projection; FP8 is V3/R1's format
MODELS = {"mla": MLA_MODELS, "mha": MHA_MODELS, "moe": MOE_MODELS, "linear": LINEAR_MODELS}
PAGE = 64
FP8_BLOCK = (128, 128)
CACHE_PAGES = 1 << 17  # a KV cache of 8M tokens: past 2 GiB, as a real one is (AMD's buffer offsets)
# The SMs (CUs) of each target's reference GPU: A100, H100, MI210, MI300X; the decode split counts
# depend on them.
NUM_SMS = {"sm_80": 108, "sm_90": 132, "gfx90a": 104, "gfx942": 304}


@dataclass(frozen=True)
class Batch:
    """The sequences of one forward pass."""

    name: str
    seqs: int
    new: int  # tokens per sequence in this pass (1: decode)
    context: int  # tokens per sequence after it

    @property
    def tokens(self) -> int:
        return self.seqs * self.new


# One long decode (split-K and the merge), a wide decode, and a prefill chunk of 2048 tokens whose
# 256 per sequence the MLA backend still attends in latent form (its absorb_extend_max_tokens); the
# token counts cover the GEMM's three row tiles and the fused MoE's two configurations.
LONG_DECODE, WIDE_DECODE, PREFILL = (Batch("decode 1x32K", 1, 1, 32768), Batch("decode 64x4K", 64, 1, 4096),
                                     Batch("prefill 8x256", 8, 256, 256))


def compiled_at(claim: Claim) -> list[tuple[str, dict, Batch]]:
    """(model, its shapes, batch) at which a claim is compiled, the number of compiles bounded:
    bfloat16, the GPU devices' dtype, at every batch (so every launch configuration the launchers
    pick: row tiles, MoE configuration, split-K or not, decode or extend) at the hook's first model;
    float16, whose code differs from bfloat16's in element types only, at the prefill (the largest
    tiles: MoE's and the GEMM's largest, the extends') at the hook's last model; the 8-bit caches,
    converted tile by tile in registers, at the long decode and the prefill at that model."""
    models = list(MODELS[claim.hook].items())
    if claim.dtype == torch.bfloat16:
        return [(*models[0], batch) for batch in (LONG_DECODE, WIDE_DECODE, PREFILL)]
    if claim.dtype in DTYPES:
        return [(*models[-1], PREFILL)]
    return [(*models[-1], batch) for batch in (LONG_DECODE, PREFILL)]


def claim_id(claim: Claim) -> str:
    return f"{claim.hook}-{str(claim.dtype).removeprefix('torch.')}-{claim.scheme}"


CASES = {f"{target.name}-{claim_id(claim)}": (target, claim) for target in TARGETS for claim in target.claims()}


# ------------------------------------------------------------------ the launches (in the child)


def _meta(*shape: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _sequences(batch: Batch) -> dict:
    """The page table and per-sequence lengths a pass of `batch` hands the attention launchers."""
    return {"page_table": _meta(batch.seqs, math.ceil(batch.context / PAGE)), "seq_lens": _meta(batch.seqs)}


def _launch_mla(target: GpuTarget, claim: Claim, shape: dict, batch: Batch) -> None:
    from dsserve.plugins.triton_kernels.mla_decode import mla_decode_attention, mla_extend_attention
    from dsserve.plugins.triton_kernels.paged_attention import num_decode_splits

    # an 8-bit cache is read by bfloat16 queries, the GPU devices' default dtype
    dtype = claim.dtype if claim.dtype in DTYPES else torch.bfloat16
    heads, rank, rope = shape["heads"], shape["rank"], shape["rope"]
    cache = _meta(CACHE_PAGES, PAGE, rank + rope, dtype=claim.dtype)
    q, q_pe = _meta(batch.tokens, heads, rank, dtype=dtype), _meta(batch.tokens, heads, rope, dtype=dtype)
    seqs = _sequences(batch)
    if batch.new == 1:
        splits = num_decode_splits(batch.seqs, heads, 1, batch.context, num_sms=NUM_SMS[target.name])
        mla_decode_attention(q, q_pe, cache, seqs["page_table"], seqs["seq_lens"], 0.1, num_splits=splits)
    else:  # the latent output stays float32 until w_vc is applied (TritonMLAAttention.forward_extend)
        latent_out = _meta(batch.tokens, heads, rank, dtype=torch.float32)
        mla_extend_attention(q, q_pe, cache, seqs["page_table"], seqs["seq_lens"], _meta(batch.seqs),
                             _meta(batch.seqs), batch.new, 0.1, out=latent_out)


def _launch_mha(target: GpuTarget, claim: Claim, shape: dict, batch: Batch) -> None:
    from dsserve.plugins.triton_kernels.mha_attention import mha_decode_attention, mha_extend_attention
    from dsserve.plugins.triton_kernels.paged_attention import num_decode_splits

    heads, kv_heads, dim = shape["heads"], shape["kv_heads"], shape["head_dim"]
    k_cache, v_cache = (_meta(CACHE_PAGES, PAGE, kv_heads, dim, dtype=claim.dtype) for _ in range(2))
    q = _meta(batch.tokens, heads, dim, dtype=claim.dtype)
    seqs = _sequences(batch)
    if batch.new == 1:
        splits = num_decode_splits(batch.seqs, heads, kv_heads, batch.context, num_sms=NUM_SMS[target.name])
        mha_decode_attention(q, k_cache, v_cache, seqs["page_table"], seqs["seq_lens"], 0.1, num_splits=splits)
    else:
        mha_extend_attention(q, k_cache, v_cache, seqs["page_table"], seqs["seq_lens"], _meta(batch.seqs),
                             _meta(batch.seqs), batch.new, 0.1, target=target)


def _fp8_weight(target: GpuTarget, *shape: int) -> dict:
    """An FP8 block-scaled weight as the plugins keep it on `target` (e4m3fnuz on MI300)."""
    scales = (*shape[:-2], math.ceil(shape[-2] / FP8_BLOCK[0]), math.ceil(shape[-1] / FP8_BLOCK[1]))
    return {"weight": _meta(*shape, dtype=target.fp8_dtype), "weight_scale_inv": _meta(*scales, dtype=torch.float32)}


def _launch_moe(target: GpuTarget, claim: Claim, shape: dict, batch: Batch) -> None:
    from dsserve.plugins.triton_kernels.fused_moe import fused_moe

    experts, top_k, hidden, inter = shape["experts"], shape["top_k"], shape["hidden"], shape["inter"]
    x = _meta(batch.tokens, hidden, dtype=claim.dtype)
    routing = _meta(batch.tokens, top_k, dtype=torch.float32), _meta(batch.tokens, top_k, dtype=torch.int64)
    if claim.scheme == "fp8_block":
        fused_moe(x, _fp8_weight(target, experts, 2 * inter, hidden), _fp8_weight(target, experts, hidden, inter),
                  *routing, block=FP8_BLOCK, upcast=target.fp8_dot == "upcast", target=target)
    else:
        w13, w2 = _meta(experts, 2 * inter, hidden, dtype=claim.dtype), _meta(experts, hidden, inter, dtype=claim.dtype)
        fused_moe(x, w13, w2, *routing, target=target)


def _launch_linear(target: GpuTarget, claim: Claim, shape: dict, batch: Batch) -> None:
    from dsserve.plugins.triton_kernels.fp8_gemm import fp8_block_gemm

    weight = _fp8_weight(target, shape["out"], shape["in"])
    # the activations, quantized per token per 128 features
    xq = _meta(batch.tokens, shape["in"], dtype=target.fp8_dtype)
    x_scale = _meta(batch.tokens, math.ceil(shape["in"] / FP8_BLOCK[1]), dtype=torch.float32)
    fp8_block_gemm(xq, x_scale, weight["weight"], weight["weight_scale_inv"], block=FP8_BLOCK, out_dtype=claim.dtype,
                   upcast=target.fp8_dot == "upcast", target=target)


LAUNCHERS = {"mla": _launch_mla, "mha": _launch_mha, "moe": _launch_moe, "linear": _launch_linear}


def target_named(name: str) -> GpuTarget:
    return next(target for target in TARGETS if target.name == name)


# What the compiler refuses, which is why sm_80's row reads "upcast" and lists no e4m3 cache.
REFUSALS = {
    "sm_80 e4m3 GEMM operands": (dataclasses.replace(target_named("sm_80"), fp8_dot="native"),
                                 Claim("linear", torch.bfloat16, "fp8_block")),
    "sm_80 e4m3 MLA cache": (target_named("sm_80"), Claim("mla", E4M3)),
}


@dataclass
class Launch:
    kernel: object  # the JITFunction
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch instead."""

    def __init__(self, kernel, launches: list[Launch]):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(Launch(self.kernel, args, kwargs))


def _kernel_modules() -> list:
    package = importlib.import_module(PACKAGE)
    return [importlib.import_module(f"{PACKAGE}.{m.name}") for m in pkgutil.iter_modules(package.__path__)]


def _jit_functions() -> dict:
    """Every @triton.jit function of the package, by name."""
    from triton.runtime.jit import JITFunction

    return {value.__name__: value for module in _kernel_modules() for value in vars(module).values()
            if isinstance(value, JITFunction)}


@contextlib.contextmanager
def _recording():
    """The launched kernels (KERNELS' names) replaced by recorders; yields the recorded launches."""
    launched = {name for names in KERNELS.values() for name in names}
    patched = [(module, name, kernel) for module in _kernel_modules()
               for name, kernel in vars(module).items() if name in launched]
    launches: list[Launch] = []
    for module, name, kernel in patched:
        setattr(module, name, _Recorder(kernel, launches))
    try:
        yield launches
    finally:
        for module, name, kernel in patched:
            setattr(module, name, kernel)


def _launches(target: GpuTarget, claim: Claim, sites: list[tuple[str, dict, Batch]]) -> list[tuple[str, Launch]]:
    """(where, launch) for every launch the plugin makes for `claim` at each (model, shapes, batch)."""
    found = []
    for model, shape, batch in sites:
        with _recording() as launches:
            LAUNCHERS[claim.hook](target, claim, shape, batch)
        found += [(f"{model}, {batch.name}", launch) for launch in launches]
    return found


# ------------------------------------------------------------------ compiling (in the child)


def _triton_target(target: GpuTarget):
    from triton.backends.compiler import GPUTarget

    return GPUTarget(target.backend, target.arch, target.warp_size)


def _specialize(launch: Launch, target: GpuTarget) -> dict:
    """What Triton's JIT would compile for `launch` on `target`: signature, constexprs, attributes
    (by the target backend's own specializer) and options. Plain data, so a worker can take it."""
    from triton.compiler import make_backend
    from triton.runtime.jit import native_specialize_impl

    kernel = launch.kernel
    backend = make_backend(_triton_target(target))
    values = {**dict(zip(kernel.arg_names, launch.args)), **launch.kwargs}
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        value = values[param.name]
        kind, attr = ("constexpr", None) if param.is_constexpr else \
            native_specialize_impl(backend, value, False, True, True)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = value
        elif attr:
            attrs[(index,)] = backend.parse_attr(attr)
    options = {k: v for k, v in launch.kwargs.items() if k not in kernel.arg_names}
    return {"kernel": kernel.__name__, "target": target.name, "signature": signature, "constexprs": constexprs,
            "attrs": attrs, "options": options}


def _key(spec: dict) -> str:
    return repr(sorted(spec.items()))


def _amd_registers(amdgcn: str) -> dict:
    """From the code object's metadata: VGPRs, and registers spilled (VGPRs to scratch memory, SGPRs
    to VGPR lanes)."""
    def field(name: str) -> int:
        return int(re.search(rf"\.{name}:\s+(\d+)", amdgcn).group(1))

    return {"registers": field("vgpr_count"), "spills": field("vgpr_spill_count") + field("sgpr_spill_count")}


def _ptxas_registers(log: str) -> dict:
    """From ptxas's report: registers, and bytes spilled (stored plus loaded). Triton's metadata gets
    n_spills only when a driver loads the binary."""
    stores, loads = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups()
    return {"registers": int(re.search(r"Used (\d+) registers", log).group(1)), "spills": int(stores) + int(loads)}


def _compile(spec: dict) -> dict:
    """Compile one specialised launch: whether it compiled, its shared memory, registers and spills,
    or the compiler's error."""
    import triton
    from triton.compiler import ASTSource

    source = ASTSource(_jit_functions()[spec["kernel"]], spec["signature"], spec["constexprs"], spec["attrs"])
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # where ptxas's report goes (knobs.nvidia.dump_ptxas_log)
            compiled = triton.compile(source, target=_triton_target(target_named(spec["target"])),
                                      options=spec["options"])
    except Exception as exc:  # noqa: BLE001 -- what the compiler says is the result
        return {"ok": False, "error": str(exc)[-400:]}
    registers = _amd_registers(compiled.asm["amdgcn"]) if "amdgcn" in compiled.asm else _ptxas_registers(log.getvalue())
    return {"ok": True, "shared": compiled.metadata.shared, **registers}


def _compile_all(specs: list[dict]) -> dict:
    """Each distinct launch compiled once, on the CPUs this process may use (at most 8: a compile
    holds a few hundred MB); results by `_key`."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    unique = {_key(spec): spec for spec in specs}
    workers = min(8, len(os.sched_getaffinity(0)), len(unique))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return dict(zip(unique, pool.map(_compile, unique.values())))


def _described(target: GpuTarget, claim: Claim, sites: list[tuple[str, dict, Batch]]) -> list[tuple[str, dict]]:
    """(what, compile spec) of each launch for `claim` at `sites`."""
    return [(f"{launch.kernel.__name__} ({where})", _specialize(launch, target))
            for where, launch in _launches(target, claim, sites)]


def _device_functions(jit: dict) -> list[str]:
    """The @triton.jit functions another one calls (`name(` in its source): never launched."""
    return sorted(name for name, fn in jit.items() if any(f"{name}(" in other.src for other in jit.values()
                                                          if other is not fn))


def main() -> dict:
    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True  # ptxas's register and spill report, printed as it compiles
    started = time.monotonic()
    groups = {"cases": {case: (target, claim, compiled_at(claim)) for case, (target, claim) in CASES.items()},
              "refusals": {name: (target, claim, compiled_at(claim)[-1:])  # the prefill: one launch, reading e4m3
                           for name, (target, claim) in REFUSALS.items()}}
    described = {group: {name: _described(*how) for name, how in entries.items()} for group, entries in groups.items()}
    specs = [spec for entries in described.values() for launches in entries.values() for _, spec in launches]
    results = _compile_all(specs)
    report = {group: {name: [{"launch": what, **results[_key(spec)]} for what, spec in launches]
                      for name, launches in entries.items()}
              for group, entries in described.items()}
    jit = _jit_functions()
    return {**report, "defined": sorted(jit), "device_functions": _device_functions(jit),
            "launched": sorted({spec["kernel"] for spec in specs}), "compiles": len(results),
            "seconds": round(time.monotonic() - started)}


# ------------------------------------------------------------------ the tests (in pytest)


@pytest.fixture(scope="module")
def compiled() -> dict:
    pytest.importorskip("triton")
    with tempfile.TemporaryDirectory() as cache:
        # a fresh cache: a cached kernel would skip ptxas and so its register report
        env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "TRITON_CACHE_DIR": cache}
        run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _problems(target: GpuTarget, results: list[dict]) -> list[str]:
    problems = []
    for r in results:
        if not r["ok"]:
            problems.append(f"{r['launch']}: does not compile: {r['error']}")
        elif r["shared"] > target.shared_memory:
            problems.append(f"{r['launch']}: {r['shared']} bytes of shared memory, past {target.name}'s "
                            f"{target.shared_memory}")
        elif r["spills"]:
            problems.append(f"{r['launch']}: spills registers ({r['spills']})")
    return problems


@pytest.mark.parametrize("case", CASES)
def test_every_claim_compiles_within_the_targets_resources(compiled, case):
    target, claim = CASES[case]
    results = compiled["cases"][case]
    assert results, f"no launch recorded for {claim} on {target.name}"
    assert {r["launch"].split(" ")[0] for r in results} <= set(KERNELS[claim.hook])
    assert not _problems(target, results), "\n".join(_problems(target, results))


def test_the_table_names_every_launched_kernel(compiled):
    """A new @triton.jit kernel must enter the claims table (and so this check) to be launched."""
    assert set(compiled["launched"]) == {name for names in KERNELS.values() for name in names}
    assert set(compiled["launched"]) | set(compiled["device_functions"]) == set(compiled["defined"])


@pytest.mark.parametrize("refusal", REFUSALS)
def test_the_compiler_refuses_what_the_table_leaves_out(compiled, refusal):
    """Triton has no e4m3 (fp8e4nv) pointers below sm_89: hence the byte upcast for FP8 GEMMs on
    A100, and no e4m3 KV cache there (the attention kernel loads the cache as stored)."""
    results = compiled["refusals"][refusal]
    assert results and all(not r["ok"] and "fp8e4nv not supported" in r["error"] for r in results), results


# ------------------------------------------------------------------ the plugins read the table


@pytest.mark.parametrize("arch,name", [("sm_80", "sm_80"), ("sm_86", "sm_80"), ("sm_90", "sm_90"), ("sm_75", None),
                                       ("sm_100", None), ("gfx90a", "gfx90a"), ("gfx942:sramecc+:xnack-", "gfx942"),
                                       ("gfx950", None)])
def test_a_gpu_runs_its_familys_target(arch, name):
    from dsserve.plugins.gpu import target_of

    target = target_of(arch)
    assert (target.name if target else None) == name


def _mla_spec(cache: torch.dtype):
    from dsserve.core.backends import AttentionSpec

    return AttentionSpec(kind="mla", num_heads=16, num_kv_heads=1, head_dim=192, v_head_dim=128, scale=0.1,
                         dtype=cache, kv_lora_rank=512, qk_rope_head_dim=64)


def _moe_spec(dtype: torch.dtype, quant: str):
    from dsserve.core.backends import MoESpec

    return MoESpec(num_experts=64, top_k=6, hidden_size=2048, intermediate_size=1408, scoring_func="softmax",
                   topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
                   dtype=dtype, quant=quant, weight_block_size=(128, 128) if quant == "fp8_block" else None)


ASKED = [*(Claim("mla", dtype) for dtype in (*DTYPES, E4M3, torch.float8_e5m2, torch.float32)),
         *(Claim("moe", dtype, quant) for dtype in (*DTYPES, torch.float32) for quant in ("none", "fp8_block")),
         *(Claim("linear", dtype, "fp8_block") for dtype in (*DTYPES, torch.float32))]


def _backend(plugin, claim: Claim):
    """What the plugin's hook answers for a spec of `claim` (None: the reference serves it)."""
    from dsserve.core.backends import LinearSpec

    device = plugin.dsserve_devices()[0]
    if claim.hook == "mla":
        return plugin.dsserve_attention_backend(device=device, spec=_mla_spec(claim.dtype))
    if claim.hook == "moe":
        return plugin.dsserve_moe_backend(device=device, spec=_moe_spec(claim.dtype, claim.scheme))
    spec = LinearSpec(256, 128, False, claim.dtype, quant=claim.scheme, weight_block_size=(128, 128))
    return plugin.dsserve_linear_method(device=device, spec=spec)


@pytest.mark.parametrize("plugin_name,arch", [("cuda", "sm_80"), ("cuda", "sm_90"), ("cuda", "sm_100"),
                                              ("rocm", "gfx90a"), ("rocm", "gfx942"), ("rocm", "gfx950")])
def test_the_hooks_serve_what_the_table_claims(monkeypatch, plugin_name, arch):
    """With a GPU of `arch` in use: the Triton kernels for each claimed spec, the reference (None)
    for the others; FP8 linears in e4m3fnuz where the table says so."""
    pytest.importorskip("triton")
    if importlib.util.find_spec("flash_mla") or importlib.util.find_spec("deep_gemm"):
        pytest.skip("GPU libraries installed: the choice depends on the GPU")
    import dsserve.plugins.gpu as gpu

    plugin = importlib.import_module(f"dsserve.plugins.{plugin_name}")
    for module in (gpu, plugin):  # the rocm plugin imports device_arch by name
        if hasattr(module, "device_arch"):
            monkeypatch.setattr(module, "device_arch", lambda device=None: arch)
    target = gpu.target_of(arch)
    for claim in ASKED:
        backend = _backend(plugin, claim)
        assert (backend is not None) == (target is not None and claim in target.claims()), claim
        if claim.hook == "linear" and backend is not None:
            assert backend.fp8_dtype == target.fp8_dtype, claim


if __name__ == "__main__":
    print(json.dumps(main()))
