"""Running the suite from Python: `run_conformance(device, registry=None, ...)`.

The CLI (`dsserve conformance`) and dsserve's own tests both go through this function. It runs the
package's pytest files in-process with a `Session` plugin that hands the tests the device context
(and the registry, when the caller gives one: a test can check a registry holding a deliberately
broken plugin) and collects one `CaseResult` per case.
"""
from __future__ import annotations

import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsserve.core.plugins import PluginRegistry

from .harness import FAMILIES, Context, dtype_name, make_context
from .report import (
    LEGEND,
    WIDTH,
    CaseResult,
    Collector,
    nothing_checked,
    render_failures,
    render_family_summary,
    render_table,
)

SESSION = "dsserve-conformance-session"
PACKAGE_DIR = Path(__file__).resolve().parent
INI_FILE = PACKAGE_DIR / "pytest.ini"
FAMILY_FILES = {
    "attention": "test_attention.py",
    "moe": "test_moe.py",
    "linear": "test_linear.py",
    "layer-ops": "test_layer_ops.py",
    "communicator": "test_communicator.py",
    "paged-kv": "test_paged_kv.py",
    "end-to-end": "test_end_to_end.py",
}
assert tuple(FAMILY_FILES) == FAMILIES


class Session(Collector):
    """What one conformance run shares: the device context and the collected results.

    `run_conformance` registers one with pytest (with the registry it was given); a plain
    `pytest --pyargs dsserve.conformance` run gets one from the suite's conftest.
    """

    def __init__(self, device_name: str | None = None, registry: PluginRegistry | None = None,
                 registry_factory: Callable[[], PluginRegistry] | None = None, host_threads: int | None = 1):
        super().__init__()
        self.host_threads = host_threads
        self.__name__ = SESSION  # the name pluggy registers this object under
        self.device_name = device_name
        self.registry = registry
        self.registry_factory = registry_factory
        self.ctx: Context | None = None
        # A plain pytest run: the table ends pytest's terminal report, and the conftest fails the run
        # when nothing of the device's was checked (run_conformance prints and judges its own).
        self.print_table = True

    def context(self) -> Context:
        if self.ctx is None:
            self.ctx = make_context(self.device_name, self.registry, self.registry_factory, self.host_threads)
        return self.ctx


@dataclass
class ConformanceResult:
    device: str
    header: str
    results: list[CaseResult]
    errors: list[str]
    pytest_exit_code: int
    seconds: float
    failures: list[CaseResult] = field(init=False)
    nothing_checked: str | None = field(init=False)  # the line saying no case ran on the device's own code

    def __post_init__(self):
        self.failures = [r for r in self.results if r.status in ("failed", "error")]
        self.nothing_checked = nothing_checked(self.results, self.device)

    @property
    def own_cases(self) -> int:
        """Cases run on at least one of the device's own (non-reference) implementations."""
        return sum(r.own for r in self.results)

    @property
    def ok(self) -> bool:
        # Passing cases served by the reference alone check nothing of the device's: a run needs one
        # case of the device's own to pass.
        return self.pytest_exit_code == 0 and not self.failures and not self.errors and self.own_cases > 0

    @property
    def exit_code(self) -> int:
        """0 when every case that ran passed and one ran on the device's own code; pytest's code
        (1 for failures) otherwise."""
        return 0 if self.ok else (self.pytest_exit_code or 1)

    def table(self) -> str:
        """The per-implementation table, then the per-family counts of own and reference cases."""
        return render_table(self.results) + "\n\n" + render_family_summary(self.results)

    def report(self) -> str:
        """Header, failures, the table and a closing verdict, as printed by `dsserve conformance`."""
        ran = sum(r.ran for r in self.results)
        not_run = len(self.results) - ran
        parts = [self.header, ""]
        failures = render_failures(self.results, self.errors)
        if failures:
            parts += [failures, ""]
        parts += [self.table(), "", textwrap.fill(LEGEND, WIDTH), ""]
        verdict = "PASSED" if self.ok else "FAILED"
        detail = (f"{ran} cases run ({self.own_cases} on the device's own implementations), "
                  f"{len(self.failures)} failed, {not_run} not run; {self.seconds:.1f} s")
        if self.pytest_exit_code and not self.failures and not self.errors:
            detail += f"; pytest exit code {self.pytest_exit_code}"
        if self.nothing_checked:
            parts.append(self.nothing_checked)
        parts.append(f"conformance {verdict} for device '{self.device}': {detail}")
        return "\n".join(parts)


def describe_device(ctx: Context) -> str:
    source = next((i.source for i in ctx.registry.plugins() if i.name == ctx.provider), "")
    try:
        dtype = dtype_name(ctx.default_dtype())
    except Exception as exc:  # a faulty plugin: say so, the cases will fail on their own
        dtype = f"error ({type(exc).__name__})"
    return (f"dsserve conformance: device '{ctx.device.name}' from plugin '{ctx.provider}'"
            f"{f' ({source})' if source else ''}; torch device '{ctx.torch_device}', default dtype {dtype}")


def run_conformance(
    device_name: str | None = None,
    registry: PluginRegistry | None = None,
    *,
    registry_factory: Callable[[], PluginRegistry] | None = None,
    families: Sequence[str] | None = None,
    keyword: str | None = None,
    verbose: bool = False,
    host_threads: int | None = 1,
    pytest_args: Sequence[str] = (),
) -> ConformanceResult:
    """Run the conformance suite for one device and return its per-case results.

    device_name:      the device to check (None: the best available one).
    registry:         where the device and its backends come from (default: a fresh PluginRegistry
                      with every installed plugin, as `dsserve` itself builds).
    registry_factory: a picklable callable building that registry again, for the checks that run in
                      worker processes (the multi-rank communicator); without it they are skipped when
                      a registry is given.
    families:         limit the run to these hook families (`FAMILIES`); keyword: a pytest -k expression.
    verbose:          show pytest's own progress and report instead of running silently.
    host_threads:     torch's host threads during the run (restored after it); None leaves the number
                      the device's setup chose. The cases are small, and one thread runs them fastest.
    Raises DeviceError when the device is unknown or unavailable.
    """
    unknown = sorted(set(families or ()) - set(FAMILY_FILES))
    if unknown:
        raise ValueError(f"unknown hook families {unknown}; choose from {', '.join(FAMILY_FILES)}")
    threads_before = torch.get_num_threads()
    session = Session(device_name, registry, registry_factory, host_threads)
    try:
        return _run(session, families, keyword, verbose, pytest_args)
    finally:
        torch.set_num_threads(threads_before)


def _run(session: Session, families, keyword, verbose, pytest_args) -> ConformanceResult:
    import pytest

    ctx = session.context()
    paths = [PACKAGE_DIR / FAMILY_FILES[f] for f in families] if families else [PACKAGE_DIR]
    args = [*map(str, paths), "-c", str(INI_FILE), "--rootdir", str(PACKAGE_DIR),
            "--dsserve-device", ctx.device.name]
    if keyword:
        args += ["-k", keyword]
    args += ["-v", "-rfEs"] if verbose else ["-p", "no:terminal"]
    session.print_table = False
    args += list(pytest_args)
    start = time.perf_counter()
    code = int(pytest.main(args, plugins=[session]))
    return ConformanceResult(ctx.device.name, describe_device(ctx), session.results, session.errors, code,
                             time.perf_counter() - start)
