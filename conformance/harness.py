"""What every conformance check shares: the device context, per-case recording, error bounds,
guarded buffers, paged-KV layouts with guard pages, and timing.

The suite names no device: it asks the registry for the device the user named and for the backends
that device's plugins return, and compares them with the core's torch-native reference classes,
which it builds directly (they are the oracle).
"""
from __future__ import annotations

import statistics
import time
import zlib
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from dsserve.core import reference as reference_package
from dsserve.core.backends import Device
from dsserve.core.forward_batch import AttentionMetadata
from dsserve.core.plugins import DeviceError, PluginRegistry

# The oracle runs on the host, in float64. (The default device of a plain torch process is the host;
# the suite never changes it.)
HOST = torch.empty(0).device
ORACLE_DTYPE = torch.float64

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Bounds on the normalised squared error ||out - ref||^2 / ||ref||^2 against the float64 oracle.
# Rounding one value to the dtype costs up to (eps/2)^2 relative, squared: float32 ~3.6e-15,
# bfloat16 ~1.5e-5 (worst case; ~2e-6 typical), float16 ~2.4e-7 (~4e-8 typical). The bounds leave
# room for the few roundings a kernel does between input and output (intermediates kept in the
# dtype, different summation orders) and are still far below what a wrong scale, a wrong index or a
# dropped term costs (1e-3 and up).
BOUNDS = {torch.float32: 1e-10, torch.bfloat16: 1e-4, torch.float16: 1e-5}

# Written into every cache slot no page table maps to a live token (guard pages, the unused tail of
# a sequence's last page) and into the margins around every tensor handed to a backend. Finite, so
# that a kernel that reads a padding slot and masks it still gets a finite product, exact in every
# float format down to 8-bit e4m3, and large enough that attending to it wrecks the output.
SENTINEL = 96.0
INT_SENTINEL = -7
MARGIN = 256  # elements of sentinel before and after every guarded tensor
REPEATS = 3  # the fewest timed calls per implementation and case (the median is kept)
MAX_REPEATS = 7

FAMILIES = ("attention", "moe", "linear", "layer-ops", "communicator", "paged-kv", "end-to-end")
PROPERTY = "dsserve_conformance"  # the key of the per-case record in a test report's user_properties


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def class_path(obj: object) -> str:
    """`module.qualname` of an object's class."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def is_reference(path: str) -> bool:
    """Whether a class path (see `class_path`) names one of the core's torch-native reference
    implementations, i.e. a class defined in dsserve.core.reference or one of its modules.

    Decided by the class alone, not by which plugin returned it: a device plugin handing out the
    reference's classes checks no more of the device's than the registry falling back to them."""
    return path.startswith(reference_package.__name__ + ".")


def seed_of(label: str) -> int:
    """A fixed seed per case, so a failure reproduces."""
    return zlib.crc32(label.encode())


def normalised_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref||^2 / ||ref||^2, computed in float64 on the host."""
    diff = out.detach().to(HOST, ORACLE_DTYPE) - ref.to(HOST, ORACLE_DTYPE)
    denom = float((ref.to(HOST, ORACLE_DTYPE) ** 2).sum())
    return float((diff * diff).sum()) / max(denom, 1e-300)


def synchronize(device: torch.device) -> None:
    """Wait for queued work on `device` (for timing); a no-op where torch has nothing to wait for."""
    module = getattr(torch, device.type, None)
    sync = getattr(module, "synchronize", None)
    if callable(sync):
        sync()


def _timed_call(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def median_times(impl_fn: Callable[[], object], ref_fn: Callable[[], object] | None,
                 device: torch.device) -> tuple[float, float | None]:
    """Median wall times (seconds) of the implementation and the reference doing the same work.

    Called after the checked call (which warmed the implementation up); the reference is warmed up
    once, then both are called alternately, at least REPEATS times each and more while a call is
    short (up to MAX_REPEATS, about 10 ms of calls each), so that drift hits both alike.
    """
    first = _timed_call(ref_fn, device) if ref_fn is not None else _timed_call(impl_fn, device)
    rounds = max(REPEATS, min(MAX_REPEATS, int(0.01 / max(first, 1e-6))))
    impl_times, ref_times = [], []
    for _ in range(rounds):
        impl_times.append(_timed_call(impl_fn, device))
        if ref_fn is not None:
            ref_times.append(_timed_call(ref_fn, device))
    return statistics.median(impl_times), (statistics.median(ref_times) if ref_times else None)


def one_line(text: object) -> str:
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------------------- context


@dataclass
class Context:
    """The device under test and the registry its backends come from."""

    registry: PluginRegistry
    device: Device
    provider: str  # the plugin providing the device
    registry_factory: Callable[[], PluginRegistry] | None = None
    host_threads: int | None = 1  # torch's host (intra-op) threads during the run; None: the device's choice

    @property
    def torch_device(self) -> torch.device:
        return self.device.torch_device(0)

    def default_dtype(self) -> torch.dtype:
        return self.device.default_dtype()

    def pin_host_threads(self) -> None:
        """Apply `host_threads` (again after anything that ran `Device.setup`, which may set them).

        The suite's shapes are small: on the host, one thread runs them several times faster than a
        few that wait on each other, and implementation and reference are timed alike."""
        if self.host_threads:
            torch.set_num_threads(self.host_threads)


def make_context(device_name: str | None, registry: PluginRegistry | None,
                 registry_factory: Callable[[], PluginRegistry] | None, host_threads: int | None = 1) -> Context:
    """Resolve the device (raising DeviceError with the registry's message when it cannot be used)."""
    if registry is None:
        registry = (registry_factory or PluginRegistry)()
        registry_factory = registry_factory or PluginRegistry
    device = registry.select_device(device_name)
    # devices() asks the plugins again (new objects): match by class and name
    provider = next((p for d, p in registry.devices() if type(d) is type(device) and d.name == device.name), "?")
    device.setup(0)
    ctx = Context(registry, device, provider, registry_factory, host_threads)
    ctx.pin_host_threads()
    return ctx


# -------------------------------------------------------------------------------------- case record


class CaseFailure(AssertionError):
    """A conformance case failed; the message names the hook and the case."""


@dataclass
class Case:
    """One checked combination (hook, spec, dtype, page size, batch). Records what the run report
    needs and collects every problem found, so that a failure lists all of them."""

    family: str
    label: str  # e.g. "attention mla decode page_size=16 dtype=bfloat16 batch=ragged shape=small"
    props: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def __post_init__(self):
        # served_by: the class path of every implementation the case exercised; whether any of them
        # is not the core's reference decides if the case checked something of the device's own.
        self.props.update(family=self.family, label=self.label, status="running", implementation="",
                          served_by=[], error=None, bound=None, dtype=None, ref_time=None, impl_time=None,
                          note="")

    @property
    def seed(self) -> int:
        return seed_of(self.label)

    # -- which implementation runs
    def serve(self, ctx: Context, hook: str, expect: type | None = None, **hook_kwargs):
        """The implementation the device's plugins return for this case, through the registry.

        `hook` is the hook's name without the `dsserve_` prefix (the registry method of that name
        is called with the same keyword arguments). Skips the case (status "reference") when the answer
        is one of the core's reference classes (comparing the reference with its own float64 oracle
        checks nothing of the device's), and (status "unsupported") when nobody answers; fails it when
        the answer is not of the contract's type. Which plugin answered is the registry's business:
        only the class matters here.
        """
        import pytest

        try:
            full = getattr(ctx.registry, hook)(device=ctx.device, **hook_kwargs)
        except DeviceError as exc:
            self.props.update(status="unsupported", note=one_line(exc))
            pytest.skip(f"unsupported: {one_line(exc)}")
        except Exception as exc:  # a plugin's hook raised instead of answering or returning None
            self.fail(f"dsserve_{hook} raised {type(exc).__name__}: {one_line(exc)[:300]}")
            self.done()
        self.props["implementation"] = class_path(full)
        self.props["served_by"] = [class_path(full)]
        if is_reference(class_path(full)):
            self.props.update(status="reference", note="served by the core's reference")
            pytest.skip(f"reference: '{ctx.device.name}' serves {self.label} with the core's reference")
        if expect is not None and not isinstance(full, expect):
            self.fail(f"dsserve_{hook} returned {class_path(full)}, which is not a {expect.__name__}")
            self.done()
        return full

    def reference_only(self, note: str) -> None:
        import pytest

        self.props.update(status="reference", note=note)
        pytest.skip(f"reference: {note}")

    def skip(self, note: str) -> None:
        import pytest

        self.props.update(status="skipped", note=note)
        pytest.skip(note)

    # -- findings
    def fail(self, problem: str) -> None:
        self.problems.append(one_line(problem))

    @contextmanager
    def calling(self, what: str):
        """Turn an exception from the implementation into a failure naming the call and the case."""
        try:
            yield
        except CaseFailure:
            raise
        except Exception as exc:  # the implementation under test raised: that is the finding
            self.fail(f"{what} raised {type(exc).__name__}: {one_line(exc)[:300]}")
            self.done()

    def check_tensor(self, what: str, out: object, shape: tuple, dtype: torch.dtype,
                     device: torch.device) -> bool:
        """Shape, dtype, device and finiteness of a returned tensor; False (and a failure) if wrong."""
        if not isinstance(out, torch.Tensor):
            self.fail(f"{what} returned {type(out).__name__}, not a tensor")
            return False
        ok = True
        if tuple(out.shape) != tuple(shape):
            self.fail(f"{what} returned shape {tuple(out.shape)}, expected {tuple(shape)}")
            ok = False
        if out.dtype != dtype:
            self.fail(f"{what} returned dtype {dtype_name(out.dtype)}, expected {dtype_name(dtype)}")
            ok = False
        if out.device.type != device.type:
            self.fail(f"{what} returned a tensor on '{out.device}', expected '{device}'")
            ok = False
        if ok and out.is_floating_point():
            bad = int((~torch.isfinite(out)).sum())
            if bad:
                self.fail(f"{what} returned {bad} NaN/inf values")
                ok = False
        return ok

    def compare(self, what: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
                bound: float | None = None) -> float:
        """Normalised error of out against the oracle; the case keeps its worst one."""
        bound = BOUNDS[dtype] if bound is None else bound
        err = normalised_error(out, ref)
        prev = self.props["error"]
        if prev is None or err / bound > prev / self.props["bound"]:
            self.props.update(error=err, bound=bound, dtype=dtype_name(dtype))
        if not err <= bound:  # NaN fails too
            prefix = f"{what}: " if what else ""
            self.fail(f"{prefix}normalised error {err:.1e} > {bound:.0e}")
        return err

    def note_dtype(self, dtype: torch.dtype) -> None:
        self.props["dtype"] = dtype_name(dtype)

    def timed(self, impl_fn: Callable[[], object], ref_fn: Callable[[], object] | None,
              device: torch.device) -> None:
        """Median times of the implementation and of the reference doing the same work."""
        with self.calling("a timing run"):
            self.props["impl_time"], self.props["ref_time"] = median_times(impl_fn, ref_fn, device)

    def done(self) -> None:
        """Raise with every problem found (each line names the case), or mark the case passed."""
        if self.problems:
            self.props["status"] = "failed"
            lines = [f"{self.label}: {p}" for p in self.problems]
            self.props["note"] = lines[0]
            raise CaseFailure("\n".join(lines))
        self.props["status"] = "passed"


# --------------------------------------------------------------------------------- guarded buffers


class Guarded:
    """A tensor handed to an implementation, placed inside a larger buffer whose margins hold a
    sentinel: a write past either end of the tensor lands in a margin, and any write to the tensor
    itself (inputs are read-only) shows against the snapshot."""

    def __init__(self, name: str, values: torch.Tensor, dtype: torch.dtype, device: torch.device):
        self.name = name
        n = values.numel()
        sentinel = SENTINEL if dtype.is_floating_point else INT_SENTINEL
        self.buffer = torch.full((n + 2 * MARGIN,), sentinel, dtype=dtype, device=device)
        self.buffer[MARGIN:MARGIN + n] = values.reshape(-1).to(device=device, dtype=dtype)
        self.tensor = self.buffer[MARGIN:MARGIN + n].view(values.shape)
        self.snapshot = self.buffer.clone()

    def check(self, case: Case, in_place: bool = False) -> None:
        """Fail the case for writes outside the tensor, and (unless the call may work in place, as
        all_reduce may) for writes into it."""
        changed = changed_elements(self.buffer, self.snapshot)
        if not bool(changed.any()):
            return
        n = self.tensor.numel()
        before = int(changed[:MARGIN].sum())
        inside = int(changed[MARGIN:MARGIN + n].sum())
        after = int(changed[MARGIN + n:].sum())
        if after:
            case.fail(f"wrote {after} elements past the end of input '{self.name}'")
        if before:
            case.fail(f"wrote {before} elements before the start of input '{self.name}'")
        if inside and not in_place:
            case.fail(f"modified its input '{self.name}' ({inside} elements)")


def is_byte_float(dtype: torch.dtype) -> bool:
    """An 8-bit float format (an fp8 KV cache's)."""
    return dtype.is_floating_point and dtype.itemsize == 1


def changed_elements(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise 'differs', bit for bit (a NaN written over a NaN still counts as equal)."""
    if a.is_floating_point():
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return a.view(bits) != b.view(bits)
    return a != b


def snapshot_meta(meta: AttentionMetadata) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in vars(meta).items() if isinstance(v, torch.Tensor)}


def check_meta(case: Case, meta: AttentionMetadata, before: dict[str, torch.Tensor]) -> None:
    for name, old in before.items():
        new = getattr(meta, name)
        if new.shape != old.shape or bool(changed_elements(new, old).any()):
            case.fail(f"modified the metadata tensor '{name}'")


# ------------------------------------------------------------------------------------- paged layout


class PagedLayout:
    """Sequences in a paged KV pool laid out so that out-of-bounds accesses are caught.

    Pages alternate: even page ids (page 0, which padded page-table entries point at, included) are
    guard pages no sequence owns; odd ids, shuffled, are handed to the sequences. So the physical
    neighbours of every owned page are guard pages, and every page-table row has at least one
    padding entry (0) after its last page. Every slot that holds no live token is filled with
    SENTINEL before the call; after it, exactly the new tokens' slots may have changed.
    """

    def __init__(self, prefix_lens: list[int], extend_lens: list[int], page_size: int, gen: torch.Generator):
        self.prefix_lens, self.extend_lens, self.page_size = list(prefix_lens), list(extend_lens), page_size
        self.seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
        need = [-(-n // page_size) for n in self.seq_lens]
        owned = sum(need)
        self.num_pages = 2 * owned + 1
        odd = torch.arange(1, 2 * owned, 2)[torch.randperm(owned, generator=gen)]
        self.table = torch.zeros(len(need), max(need) + 1, dtype=torch.int32)
        self.pages: list[list[int]] = []
        used = 0
        for i, n in enumerate(need):
            self.table[i, :n] = odd[used:used + n].to(torch.int32)
            self.pages.append(odd[used:used + n].tolist())
            used += n
        self.owner: dict[int, tuple[int, int]] = {}  # live slot -> (sequence, position)
        for i, n in enumerate(self.seq_lens):
            for pos in range(n):
                self.owner[self.pages[i][pos // page_size] * page_size + pos % page_size] = (i, pos)

    @property
    def num_slots(self) -> int:
        return self.num_pages * self.page_size

    def meta(self, device: torch.device) -> AttentionMetadata:
        return AttentionMetadata.build(prefix_lens=self.prefix_lens, extend_lens=self.extend_lens,
                                       page_table=self.table, page_size=self.page_size, device=device)

    def slots(self, i: int, start: int, stop: int) -> torch.Tensor:
        pos = torch.arange(start, stop)
        pages = torch.tensor(self.pages[i], dtype=torch.int64)[pos // self.page_size]
        return pages * self.page_size + pos % self.page_size

    def fill(self, flat: torch.Tensor, context: list[torch.Tensor]) -> None:
        """flat [slots, ...]: SENTINEL everywhere, then each sequence's cached prefix rows (converted
        to flat's dtype: an 8-bit float cache is given the rows as it stores them)."""
        rows_of = [rows.to(flat.device, flat.dtype) for rows in context]
        if is_byte_float(flat.dtype):
            # fill_ and index_put have no float8 kernel on every device; bytes have
            sentinel = int(torch.tensor(SENTINEL).to(flat.dtype).view(torch.uint8))
            flat, rows_of = flat.view(torch.uint8), [r.view(torch.uint8) for r in rows_of]
            flat.fill_(sentinel)
        else:
            flat.fill_(SENTINEL)
        for i, rows in enumerate(rows_of):
            p = self.prefix_lens[i]
            if p:
                flat[self.slots(i, 0, p).to(flat.device)] = rows[:p]

    def describe_slot(self, slot: int) -> str:
        page, offset = divmod(slot, self.page_size)
        if slot in self.owner:
            i, pos = self.owner[slot]
            return f"slot {slot} (sequence {i}'s cached token {pos})"
        for i, pages in enumerate(self.pages):
            if page in pages:
                j = pages.index(page)
                return (f"slot {slot} (page {page}, sequence {i}'s page {j}, offset {offset}, past its "
                        f"{self.seq_lens[i]} tokens)")
        return f"slot {slot} (guard page {page} offset {offset}, mapped by no page table)"

    def check_writes(self, case: Case, what: str, flat_after: torch.Tensor, flat_before: torch.Tensor,
                     loc: torch.Tensor, new_rows: torch.Tensor) -> None:
        """Exactly the new tokens' slots changed, and they hold the new rows (as the cache stores
        them: `new_rows` converted to its dtype, bit for bit)."""
        changed = changed_elements(flat_after, flat_before).reshape(flat_after.shape[0], -1).any(dim=1).to(HOST)
        loc_h = loc.to(HOST)
        expected = torch.zeros_like(changed)
        expected[loc_h] = True
        stray = (changed & ~expected).nonzero().flatten().tolist()
        if stray:
            where = "; ".join(self.describe_slot(s) for s in stray[:3])
            case.fail(f"wrote {what} outside the new tokens' slots: {len(stray)} slots changed, "
                      f"first {where}")
        want = new_rows.to(flat_after.device, flat_after.dtype).reshape(loc_h.numel(), -1)
        if is_byte_float(flat_after.dtype):  # compared bit for bit anyway; index_select may lack float8
            want, flat_after = want.view(torch.uint8), flat_after.view(torch.uint8)
        got = flat_after.index_select(0, loc.to(flat_after.device)).reshape(loc_h.numel(), -1)
        wrong = changed_elements(got, want).any(dim=1).nonzero().flatten().tolist()
        if wrong:
            case.fail(f"{what} of {len(wrong)} new tokens not written at their out_cache_loc slots "
                      f"(first: token {wrong[0]}, {self.describe_slot(int(loc_h[wrong[0]]))})")
