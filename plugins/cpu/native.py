"""The cpu plugin's C++ kernels (csrc/): compiled on first use, picked per CPU at run time.

One build serves every x86 CPU: each kernel is compiled for AVX2, AVX-512, AVX-512-BF16/VNNI and AMX
with per-function target attributes, and the caller passes the ISA to use (`isa()`: the best this CPU
has). The build goes to torch's extension cache (`$TORCH_EXTENSIONS_DIR`, else
~/.cache/torch_extensions) under a name that hashes the sources, their folder and the torch version,
so a changed source or torch rebuilds and an unchanged one loads in a second; a build that was killed
leaves nothing that blocks the next one (`_builder_lock`). Where no compiler is present (or the
build fails) `kernels()` is None, one log line says why, and the torch reference serves those ops.
"""
from __future__ import annotations

import ctypes
import enum
import hashlib
import logging
import platform
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

from .device import cpu_flags

log = logging.getLogger("dsserve")

CSRC = Path(__file__).parent / "csrc"


class Isa(enum.IntEnum):
    """The kernel variants, as csrc/block_gemm.h numbers them."""

    AVX2 = 0
    AVX512 = 1
    AVX512_BF16 = 2
    AMX_BF16 = 3  # AVX512_BF16, with bfloat16 GEMMs of enough rows on AMX tiles


def isa(flags: frozenset[str] | None = None) -> Isa | None:
    """The best kernel variant this CPU runs (None: below AVX2 + FMA, the kernels are not used)."""
    flags = cpu_flags() if flags is None else flags
    if {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"} <= flags and amx_permitted():
        return Isa.AMX_BF16
    if {"avx512f", "avx512_bf16"} <= flags:
        return Isa.AVX512_BF16
    if "avx512f" in flags:
        return Isa.AVX512
    if {"avx2", "fma"} <= flags:
        return Isa.AVX2
    return None


class Int8Isa(enum.IntEnum):
    """The int8 kernel variants, as csrc/int8_gemm.h numbers them."""

    AVX2 = 0
    AVX512_VNNI = 1
    AMX = 2  # AVX512_VNNI, with GEMMs of enough rows on AMX-INT8 tiles


def int8_isa(flags: frozenset[str] | None = None) -> Int8Isa | None:
    """The best int8 (W8A8) kernel variant this CPU runs; None below AVX2 + FMA."""
    flags = cpu_flags() if flags is None else flags
    vnni = {"avx512f", "avx512bw", "avx512_vnni"} <= flags
    if vnni and {"amx_tile", "amx_int8"} <= flags and amx_permitted():
        return Int8Isa.AMX
    if vnni:
        return Int8Isa.AVX512_VNNI
    if {"avx2", "fma"} <= flags:
        return Int8Isa.AVX2
    return None


@lru_cache(maxsize=1)
def amx_permitted() -> bool:
    """Whether this process may use AMX tiles: Linux grants the tile state only on request
    (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, kernel 5.16+; without it the first tile
    instruction kills the process with SIGILL). Asks once; the grant covers every thread."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        sys_arch_prctl, req_xcomp_perm, xtiledata = 158, 0x1023, 18
        granted = libc.syscall(sys_arch_prctl, req_xcomp_perm, xtiledata) == 0
    except (OSError, AttributeError):
        granted = False
    if not granted:
        log.info("cpu: the CPU has AMX but the kernel did not grant this process its tile state: AVX-512 "
                 "kernels serve instead")
    return granted


def fp8_vbmi(flags: frozenset[str] | None = None) -> bool:
    """Whether the FP8 kernels widen e4m3 by AVX512-VBMI table lookups (on top of AVX512-BF16)."""
    flags = cpu_flags() if flags is None else flags
    return (isa(flags) or Isa.AVX2) >= Isa.AVX512_BF16 and "avx512vbmi" in flags  # /proc/cpuinfo spells it so


def build_name() -> str:
    # the folder too: the build's ninja file names the sources by path, so two checkouts sharing one
    # name would rebuild each other's copy in turn
    digest = hashlib.sha256(torch.__version__.encode() + str(CSRC).encode())
    for path in sorted(CSRC.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return f"dsserve_cpu_kernels_{digest.hexdigest()[:12]}"


@contextmanager
def _builder_lock(build_dir: Path):
    """Hold an flock while torch builds or loads the extension, and clear torch's own `lock` file when
    it is stale. torch waits forever on that file, and a build that was killed (Ctrl-C during the
    first start) leaves it behind: every later start would hang. The flock dies with its process, so
    holding it proves no live process is building, and a `lock` found then is a dead build's."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock only
        yield
        return
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "dsserve.flock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # waits while another live process builds the same kernels
        stale = build_dir / "lock"
        if stale.exists():
            log.warning("cpu: removing %s, left by a build of the C++ kernels that did not finish", stale)
            stale.unlink()
        yield


@lru_cache(maxsize=1)
def kernels():
    """The compiled extension module, or None (logged once) where it cannot be had."""
    if isa() is None:
        log.info("cpu: no AVX2/FMA on this CPU: the torch reference serves the ops of the C++ kernels")
        return None
    name = build_name()
    log.info("cpu: loading the C++ kernels (%s; built on first use, about two minutes on 2 cores)", name)
    try:
        from torch.utils import cpp_extension

        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        with _builder_lock(build_dir):
            return cpp_extension.load(
                name=name, sources=[str(p) for p in sorted(CSRC.glob("*.cpp"))],
                extra_cflags=["-O3", "-std=c++17", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # noqa: BLE001 -- no compiler, no ninja, a failed build: fall back, say so
        # a build error's message is the whole compiler log: its first error line says what failed
        lines = str(e).splitlines()
        detail = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "")[:300]
        log.warning("cpu: C++ kernels unavailable (%s: %s); the torch reference serves their ops",
                    type(e).__name__, detail)
        return None
