"""The host CPU as a dsserve device: thread setup, dtype choice, memory capacity.

Everything here reads the operating system (/proc, cgroups, sched affinity); nothing imports an
optional library at import time.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import platform
import sys
from functools import lru_cache
from pathlib import Path

import torch

from dsserve.core.backends import Device

log = logging.getLogger(__name__)

# CPU flags (as /proc/cpuinfo spells them) that give native bf16 dot products.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
IPEX_MODULE = "intel_extension_for_pytorch"
IPEX_DIST = "intel-extension-for-pytorch"


# ------------------------------------------------------------------------------------ /proc readers


@lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields from /proc/cpuinfo (lower-case keys); {} where there is none."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break  # end of the first processor's block
                    continue
                key, sep, value = line.partition(":")
                if sep:
                    fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        return {}
    return fields


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags (x86 "flags", ARM "features"); empty off Linux."""
    info = _cpuinfo()
    return frozenset((info.get("flags") or info.get("features") or "").split())


def cpu_model() -> str:
    """A human name for the CPU model."""
    info = _cpuinfo()
    for key in ("model name", "cpu model", "hardware", "processor"):
        value = info.get(key, "")
        if value and not value.isdigit():  # x86 "processor" is just the index
            return value
    return platform.processor() or platform.machine() or "unknown CPU"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask: taskset, cgroup cpusets, numactl)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def rank_cores(local_rank: int, ranks_on_node: int, allowed: set[int] | None = None,
               numa: list[set[int]] | None = None) -> list[int]:
    """The cores of rank `local_rank` of `ranks_on_node`, within this process's affinity mask.

    With as many NUMA nodes (holding allowed cores) as ranks, rank r takes node r's cores: one rank
    per socket keeps each rank's weights in its own node's memory. Otherwise an even, contiguous
    share of the allowed cores (ranks share a core only when there are more ranks than cores).
    """
    allowed = set(os.sched_getaffinity(0)) if allowed is None else allowed
    nodes = [sorted(n & allowed) for n in (numa_nodes() if numa is None else numa)]
    nodes = [n for n in nodes if n]
    if len(nodes) == ranks_on_node > 1:
        return nodes[local_rank]
    cores = sorted(allowed)
    per = len(cores) // ranks_on_node
    if per == 0:
        return [cores[local_rank % len(cores)]]
    return cores[local_rank * per:(local_rank + 1) * per]


def numa_nodes() -> list[set[int]]:
    """The CPUs of each NUMA node (Linux sysfs; [] where it cannot be read)."""
    nodes = []
    for path in sorted(Path("/sys/devices/system/node").glob("node[0-9]*/cpulist"),
                       key=lambda p: int(p.parent.name[4:])):
        try:
            nodes.append(_cpu_list(path.read_text()))
        except (OSError, ValueError):
            return []
    return nodes


def _cpu_list(text: str) -> set[int]:
    """'0-3,8,10-11' -> {0, 1, 2, 3, 8, 10, 11}."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for "no limit"


def _cgroup_limit() -> tuple[int, int] | None:
    """(limit, usage not counting reclaimable page cache) of this container's memory cgroup."""
    for limit_file, usage_file, stat_file, cache_key in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat",
         "inactive_file"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
         "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"),
    ):
        limit = _read_int(limit_file)
        if limit is None or limit >= 1 << 60:  # absent, "max", or v1's "unlimited" near 2**63
            continue
        usage = _read_int(usage_file) or 0
        try:
            with open(stat_file, encoding="ascii") as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == cache_key and value.strip().isdigit():
                        usage -= int(value)
                        break
        except OSError:
            pass
        return limit, max(0, usage)
    return None


def _meminfo() -> tuple[int, int] | None:
    """(MemAvailable, MemTotal) in bytes from /proc/meminfo."""
    values: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if key in ("MemAvailable", "MemTotal") and parts and parts[0].isdigit():
                    unit = 1024 if parts[1:2] == ["kB"] else 1
                    values[key] = int(parts[0]) * unit
    except OSError:
        return None
    if "MemTotal" not in values:
        return None
    return values.get("MemAvailable", values["MemTotal"]), values["MemTotal"]


def _portable_meminfo() -> tuple[int, int] | None:
    """(available, total) bytes where there is no /proc: psutil when installed, else sysconf."""
    if importlib.util.find_spec("psutil") is not None:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = page * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    try:
        available = page * os.sysconf("SC_AVPHYS_PAGES")  # free pages only: an underestimate
    except (ValueError, OSError):
        available = total
    return available, total


# -------------------------------------------------------------------------------------------- IPEX


def ipex_status() -> tuple[str, bool] | None:
    """(installed version, matches this torch) for intel-extension-for-pytorch, without importing it;
    None when it is not installed."""
    if importlib.util.find_spec(IPEX_MODULE) is None:
        return None
    try:
        version = importlib.metadata.version(IPEX_DIST)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    # IPEX is built per torch minor release: 2.5.0+cpu goes with torch 2.5.x.
    matches = version.split("+")[0].split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]
    return version, matches


# ------------------------------------------------------------------------------------------ device


class CpuDevice(Device):
    """The host CPU: torch's "cpu" tensors, gloo for process groups."""

    name = "cpu"
    torch_type = "cpu"
    dist_backend = "gloo"
    priority = 0
    memory_per_node = True

    def is_available(self) -> tuple[bool, str]:
        return True, ""

    def native_bf16(self) -> bool:
        """Whether the CPU has bf16 dot-product units (AVX512-BF16 or AMX); False off Linux."""
        return sys.platform.startswith("linux") and any(f in cpu_flags() for f in BF16_FLAGS)

    def default_dtype(self) -> torch.dtype:
        # Without native units torch emulates bf16 GEMMs through fp32 conversions, far slower than
        # plain fp32; with them bf16 is the faster one (about 4x on a Zen 4 with avx512_bf16).
        return torch.bfloat16 if self.native_bf16() else torch.float32

    def dtype_reason(self) -> str:
        if self.native_bf16():
            found = "/".join(f.upper().replace("_", "-") for f in BF16_FLAGS if f in cpu_flags())
            return f"{found} present: bfloat16"
        if not sys.platform.startswith("linux"):
            return "bf16 units not detectable off Linux: float32"
        return "no AVX512-BF16/AMX: float32 (bf16 GEMM is emulated here, many times slower)"

    def memory_info(self) -> tuple[int, int]:
        found = _meminfo() or _portable_meminfo()
        if found is None:
            raise RuntimeError("cannot read the host's memory size on this platform; pip install psutil")
        available, total = found
        cgroup = _cgroup_limit()
        if cgroup is not None:  # a container's limit is the real ceiling, not the host's RAM
            limit, used = cgroup
            total = min(total, limit)
            available = min(available, max(0, limit - used))
        return available, total

    def setup(self, local_rank: int = 0, ranks_on_node: int = 1) -> None:
        if ranks_on_node > 1:
            # Ranks on one host get disjoint cores: two ranks' OpenMP teams on the same cores would
            # take turns at every parallel region.
            cores = rank_cores(local_rank, ranks_on_node)
            os.sched_setaffinity(0, cores)
            threads = min(len(cores), int(os.environ.get("OMP_NUM_THREADS") or len(cores)))
            torch.set_num_threads(threads)
            log.info("cpu: rank %d of %d on this host: cores %s, %d torch threads", local_rank, ranks_on_node,
                     ",".join(map(str, cores)), threads)
            return
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        if env:
            log.info("cpu: %d torch threads (OMP_NUM_THREADS=%s)", torch.get_num_threads(), env)
            return
        cores = usable_cores()
        torch.set_num_threads(cores)
        log.info("cpu: %d torch threads, one per core this process may use (set OMP_NUM_THREADS to "
                 "override)", cores)

    def describe(self) -> str:
        from .native import Isa, fp8_vbmi, int8_isa, isa

        kernels, int8 = isa(), int8_isa()
        text = (f"cpu: {cpu_model()}, {usable_cores()} usable cores; {self.dtype_reason()}; C++ kernels "
                + (f"{kernels.name} variant (MLA decode, fused MoE, linear, RMSNorm, RoPE"
                   f"{'; linear layers and experts on AMX tiles' if kernels >= Isa.AMX_BF16 else ''}; fp8 weight-only widened to "
                   f"{'bfloat16' if kernels >= Isa.AVX512_BF16 else 'float32'}"
                   f"{' by VBMI lookups' if fp8_vbmi() else ''}), {int8.name} for int8 W8A8 (linear, fused MoE)"
                   if kernels is not None else "unused (no AVX2/FMA)"))
        ipex = ipex_status()
        if ipex is not None:
            version, matches = ipex
            if matches:
                text += f"; intel-extension-for-pytorch {version} installed (its kernels are not used yet)"
            else:
                text += (f"; intel-extension-for-pytorch {version} ignored: built for another torch "
                         f"than {torch.__version__}")
        return text
