"""What the cuda and rocm plugins share: torch's "cuda" device API, the GPU targets they claim, and
the Triton kernels.

HIP builds of torch keep the "cuda" device type, torch.cuda.* and the "nccl" backend name (RCCL
behind it), so the device probing and the Triton backend selection are the same for both; each
plugin adds its own libraries (FlashMLA and DeepGEMM, or the e4m3fnuz conversion).

The claims table (`TARGETS`): for each GPU target, which dtypes and weight/cache formats the Triton
kernels serve there (`GpuTarget.claims`, checked by the hooks through `claim_problem`), how 8-bit
floats reach tl.dot and in which format, and which of DeepSeek's libraries take over a part.
tests/test_triton_aot.py compiles every kernel for every claim of every target with Triton's own
compiler and checks shared memory and register spills; docs/gpu.md lists the results. A GPU that no
target covers, and a dtype or format a target does not claim, are served by the torch reference.
Importing this module imports torch only (the Triton kernels are imported inside `triton_kernels`).
"""
from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from dsserve.core.backends import AttentionBackend, AttentionSpec, Device, MoEBackend, MoESpec

log = logging.getLogger("dsserve.plugins")
_said: set[str] = set()

KiB = 1024
E4M3, E4M3FNUZ, E5M2 = torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2

#: The compute dtypes (activations, queries, outputs) claimed on every target. Not float32: no
#: float32 launch is compile-checked (its tiles are twice the bytes), so the reference serves it.
DTYPES = (torch.bfloat16, torch.float16)

#: The Triton kernels that serve each hook, on every target (a target's `libraries` may take a part).
KERNELS = {
    "mla": ("_paged_attn_fwd", "_merge_splits"),  # decode (split-K, then the merge) and short extends
    "mha": ("_paged_attn_fwd", "_merge_splits"),  # decode and extend
    "moe": ("_moe_gemm_w13_silu", "_moe_gemm_w2"),  # routed experts; routing by the reference's torch ops
    "linear": ("_fp8_block_gemm",),  # fp8_block linears; unquantized ones are F.linear (cuBLAS, hipBLASLt)
}


@dataclass(frozen=True)
class Claim:
    """One thing the Triton kernels serve on a target."""

    hook: str  # a key of KERNELS
    dtype: torch.dtype  # the spec's dtype: the compute dtype, or for attention the KV cache's
    scheme: str = "none"  # the weights' format: "none" or "fp8_block"

    def __str__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        what = f"{self.hook} with a {dtype} cache" if self.hook in ("mla", "mha") else f"{self.hook} in {dtype}"
        return what if self.scheme == "none" else f"{what} with {self.scheme} weights"


@dataclass(frozen=True)
class GpuTarget:
    """A GPU target the cuda or rocm plugin claims, and how the Triton kernels run there."""

    name: str  # as logs and docs/gpu.md name it
    covers: tuple[str, ...]  # arch-name prefixes of the GPUs that run this target's code
    backend: Literal["cuda", "hip"]  # Triton's backend
    arch: int | str  # Triton's GPUTarget arch: a compute capability or a gfx name
    warp_size: int
    shared_memory: int  # bytes of shared memory (LDS) one program may use
    # how 8-bit float operands reach tl.dot: "native", or "upcast" (their bytes widened to float16
    # by integer ops, exact: no 8-bit float type enters the kernel)
    fp8_dot: Literal["native", "upcast"]
    fp8_dtype: torch.dtype  # the 8-bit float FP8 weights and activations compute in
    fp8_caches: tuple[torch.dtype, ...]  # the 8-bit MLA caches the kernels read (queries in DTYPES)
    libraries: tuple[str, ...] = ()  # preferred when installed: flash_mla (MLA decode), deep_gemm (fp8_block)

    def claims(self) -> tuple[Claim, ...]:
        return (*(Claim(hook, dtype) for hook in ("mla", "mha", "moe") for dtype in DTYPES),
                *(Claim("mla", cache) for cache in self.fp8_caches),
                *(Claim(hook, dtype, "fp8_block") for hook in ("moe", "linear") for dtype in DTYPES))

    def unclaimed(self, claim: Claim) -> str | None:
        """Why `claim` is not served on this target, or None when it is."""
        return None if claim in self.claims() else f"{claim} is not claimed on {self.name} (docs/gpu.md)"


TARGETS = (
    # FP8 by the byte upcast: Triton refuses e4m3 (fp8e4nv) pointers below sm_89, so no e4m3 KV
    # cache either (the MLA kernel loads the cache as stored); e5m2 it compiles.
    GpuTarget("sm_80", ("sm_8",), "cuda", 80, 32, 164 * KiB, "upcast", E4M3, (E5M2,)),
    GpuTarget("sm_90", ("sm_9",), "cuda", 90, 32, 227 * KiB, "native", E4M3, (E4M3, E5M2),
              libraries=("flash_mla", "deep_gemm")),
    # MI200 has no 8-bit float MFMA: the upcast, as on sm_80
    GpuTarget("gfx90a", ("gfx90a",), "hip", "gfx90a", 64, 64 * KiB, "upcast", E4M3, (E4M3, E5M2)),
    # MI300's 8-bit MFMA reads e4m3fnuz only: FP8 weights are converted after loading (rocm/fp8.py)
    GpuTarget("gfx942", ("gfx94",), "hip", "gfx942", 64, 64 * KiB, "native", E4M3FNUZ, (E4M3, E5M2)),
)


def target_of(arch: str) -> GpuTarget | None:
    """The claimed target whose code a GPU of `arch` ("sm_86", "gfx942:sramecc+:xnack-") runs, or None."""
    base = arch.split(":")[0]
    return next((t for t in TARGETS if base.startswith(t.covers)), None)


@functools.cache
def _arch_of(index: int) -> str:
    if torch.version.hip:
        return torch.cuda.get_device_properties(index).gcnArchName.split(":")[0]
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def device_arch(device: torch.device | None = None) -> str | None:
    """The arch of a GPU device ("sm_90", "gfx942"; default: the current one); None off GPU."""
    device = torch.device("cuda") if device is None else device
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return _arch_of(torch.cuda.current_device() if device.index is None else device.index)


def device_target(device: torch.device) -> GpuTarget | None:
    """The claimed target of a GPU device; None off GPU (the interpreter) or for a GPU none covers."""
    arch = device_arch(device)
    return target_of(arch) if arch else None


def claim_problem(claim: Claim) -> str | None:
    """Why the current GPU's target does not serve `claim`, or None. Without a visible GPU (tests ask
    the hooks on machines without one) the target is unknown and only the kernels' own checks apply."""
    arch = device_arch()
    if arch is None:
        return None
    target = target_of(arch)
    if target is None:
        return f"{arch} is not a claimed target ({', '.join(t.name for t in TARGETS)}; docs/gpu.md)"
    return target.unclaimed(claim)


def library_problem(library: str) -> str | None:
    """Why `library` does not serve the current GPU, by the claims table, or None."""
    arch = device_arch()
    target = target_of(arch) if arch else None
    if target is None or library not in target.libraries:
        used_on = ", ".join(t.name for t in TARGETS if library in t.libraries)
        return f"the GPU is {arch or 'not visible'}; {library} is used on {used_on}"
    return None


def say_once(message: str) -> None:
    """Log a backend choice once per process, not once per layer."""
    if message not in _said:
        _said.add(message)
        log.info(message)


class TorchGpuDevice(Device):
    """A GPU reached through torch.cuda; subclasses say which build of torch they need."""

    torch_type = "cuda"
    dist_backend = "nccl"
    priority = 100
    vendor = "GPU"

    def build_problem(self) -> str | None:
        """Why this torch build cannot drive the device, or None."""
        raise NotImplementedError

    def is_available(self) -> tuple[bool, str]:
        problem = self.build_problem()
        if problem:
            return False, problem
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            usable = torch.cuda.is_available()
            count = torch.cuda.device_count() if usable else 0
        if usable and count > 0:
            return True, ""
        # torch warns with the driver's own explanation (driver too old, no device node, ...).
        detail = next((str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()), "")
        if detail:
            return False, f"{self.name} cannot start: {detail}"
        return False, f"no {self.vendor} GPU visible (torch.cuda.device_count() == 0)"

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def memory_info(self) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(torch.cuda.current_device())
        return int(free), int(total)

    def setup(self, local_rank: int = 0, ranks_on_node: int = 1) -> None:
        torch.cuda.set_device(local_rank)


def triton_kernels(device_name: str):
    """The shared Triton kernels, or None (said once) when triton cannot be imported."""
    try:
        import dsserve.plugins.triton_kernels as kernels
    except ImportError as e:
        say_once(f"{device_name}: triton is not importable ({e}); the torch reference serves attention, MoE, FP8")
        return None
    return kernels


def triton_attention(device_name: str, spec: AttentionSpec) -> AttentionBackend | None:
    """The Triton attention backend for spec, or None (said once) when the kernels do not fit it."""
    kernels = triton_kernels(device_name)
    if kernels is None or spec.kind not in ("mla", "mha"):
        return None
    cls = kernels.TritonMLAAttention if spec.kind == "mla" else kernels.TritonMHAAttention
    why = cls.unsupported(spec) or claim_problem(Claim(spec.kind, spec.dtype))
    if why:
        say_once(f"{device_name}: {spec.kind} attention by the torch reference (Triton kernels: {why})")
        return None
    return cls(spec)


def triton_moe(device_name: str, spec: MoESpec) -> MoEBackend | None:
    kernels = triton_kernels(device_name)
    if kernels is None:
        return None
    why = kernels.TritonMoE.unsupported(spec) or claim_problem(Claim("moe", spec.dtype, spec.quant))
    if why:
        say_once(f"{device_name}: MoE experts by the torch reference (Triton fused MoE: {why})")
        return None
    return kernels.TritonMoE(spec)

