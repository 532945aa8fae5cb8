"""Per-case results of a conformance run and the table printed at its end.

Each case records a dict in its test report's user_properties (see `harness.Case`); the collector,
a pytest plugin object, turns reports into `CaseResult`s.
"""
from __future__ import annotations

import re
import statistics
from dataclasses import dataclass

from dsserve.core.table import table_lines

from .harness import FAMILIES, PROPERTY, is_reference, one_line

WIDTH = 110
_EXCEPTION_PREFIX = re.compile(r"^(?:[\w.]+\.)?(?:CaseFailure|AssertionError): ")


@dataclass
class CaseResult:
    nodeid: str
    family: str
    implementation: str
    label: str
    status: str  # passed, failed, reference, unsupported, skipped, error
    error: float | None = None
    bound: float | None = None
    dtype: str | None = None
    impl_time: float | None = None
    ref_time: float | None = None
    message: str = ""
    served_by: tuple[str, ...] = ()  # class paths of the implementations the case exercised

    @property
    def ran(self) -> bool:
        return self.status in ("passed", "failed")

    @property
    def own(self) -> bool:
        """Ran on the device's own code: at least one implementation it exercised is not the core's
        reference. A case that failed before any implementation was known (a plugin's hook or the
        device raised) counts too: the reference answers every hook without raising."""
        if not self.ran:
            return False
        if not self.served_by:
            return self.status == "failed"
        return not all(is_reference(p) for p in self.served_by)

    @property
    def on_reference(self) -> bool:
        """Served by the core's reference alone: left to it, or run on nothing but its classes."""
        return self.status == "reference" or (self.ran and not self.own)

    @property
    def speed(self) -> float | None:
        """Reference time over implementation time: above 1, the implementation is faster."""
        if self.impl_time and self.ref_time:
            return self.ref_time / self.impl_time
        return None


class Collector:
    """A pytest plugin object gathering one CaseResult per test (and collection errors)."""

    def __init__(self):
        self.results: list[CaseResult] = []
        self.errors: list[str] = []  # problems outside any case: collection errors, internal errors

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self.errors.append(f"collecting {report.nodeid or 'the suite'} failed: {_crash(report)}")

    def pytest_runtest_logreport(self, report) -> None:
        props = dict(next((v for k, v in report.user_properties if k == PROPERTY), {}))
        if report.when == "call" or (report.when == "setup" and not report.passed):
            status = props.get("status", "")
            if report.failed:
                status = "failed" if status in ("failed", "running") else "error"
            elif report.skipped:
                status = status if status in ("reference", "unsupported", "skipped") else "skipped"
            elif report.passed:
                status = "passed"
            message = ""
            if report.failed:
                message = _crash(report)
                label = props.get("label")
                if label and not message.startswith(label):  # not one of the suite's own findings
                    message = f"{label}: {message}"
            elif report.skipped:
                message = props.get("note") or _skip_reason(report)
            self.results.append(CaseResult(
                nodeid=report.nodeid, family=props.get("family", "?"),
                implementation=props.get("implementation", "") or "-", label=props.get("label", report.nodeid),
                status=status, error=props.get("error"), bound=props.get("bound"), dtype=props.get("dtype"),
                impl_time=props.get("impl_time"), ref_time=props.get("ref_time"), message=message,
                served_by=tuple(props.get("served_by", ())),
            ))
        elif report.when == "teardown" and report.failed:
            self.errors.append(f"{report.nodeid}: teardown failed: {_crash(report)}")


def _crash(report) -> str:
    longrepr = report.longrepr
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None and crash.message:
        text = crash.message
    else:
        text = str(longrepr)
    # Our own failures carry "case: problem" lines; drop the exception's class name in front.
    lines = [_EXCEPTION_PREFIX.sub("", line) for line in text.splitlines() if line.strip()]
    return "\n".join(lines[:12])


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return one_line(longrepr)


# ------------------------------------------------------------------------------------------- table


def _fmt_error(rows: list[CaseResult]) -> str:
    measured = [r for r in rows if r.ran and r.error is not None and r.bound]
    if not measured:
        return "-"
    worst = max(measured, key=lambda r: r.error / r.bound)
    return f"{worst.error:.1e} ({worst.dtype}, bound {worst.bound:.0e})"


def _fmt_speed(rows: list[CaseResult]) -> str:
    speeds = [r.speed for r in rows if r.ran and r.speed is not None]
    return f"{statistics.median(speeds):.2f}x" if speeds else "-"


def _not_run(rows: list[CaseResult]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        if not r.ran:
            counts[r.status] = counts.get(r.status, 0) + 1
    names = {"reference": "reference", "unsupported": "unsupported", "skipped": "skipped", "error": "errors"}
    return ", ".join(f"{n} {names.get(s, s)}" for s, n in sorted(counts.items())) or "-"


def render_table(results: list[CaseResult]) -> str:
    """One row per hook family and implementation class."""
    groups: dict[tuple[str, str], list[CaseResult]] = {}
    for r in results:
        groups.setdefault((r.family, r.implementation), []).append(r)
    order = {f: i for i, f in enumerate(FAMILIES)}
    rows = []
    for (family, impl), rs in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])):
        ran = [r for r in rs if r.ran]
        failed = sum(r.status == "failed" for r in rs) + sum(r.status == "error" for r in rs)
        result = "-" if not ran and not failed else ("FAIL" if failed else "ok")
        rows.append([family, impl, str(len(ran)), str(failed), result, _fmt_error(rs), _fmt_speed(rs), _not_run(rs)])
    header = ["HOOK FAMILY", "IMPLEMENTATION", "RUN", "FAILED", "RESULT", "WORST ERROR", "SPEED", "NOT RUN"]
    return "\n".join(table_lines(header, rows, WIDTH))


def render_family_summary(results: list[CaseResult]) -> str:
    """One row per hook family: cases run on the device's own code, cases the reference alone served,
    and the rest (skipped, unsupported, errors)."""
    order = {f: i for i, f in enumerate(FAMILIES)}
    rows = []
    for family in sorted({r.family for r in results}, key=lambda f: (order.get(f, 99), f)):
        rs = [r for r in results if r.family == family]
        rest = [r for r in rs if not r.own and not r.on_reference]
        rows.append([family, str(sum(r.own for r in rs)), str(sum(r.on_reference for r in rs)), _not_run(rest)])
    header = ["HOOK FAMILY", "DEVICE'S OWN", "REFERENCE", "NOT RUN"]
    return "\n".join(table_lines(header, rows, WIDTH))


def nothing_checked(results: list[CaseResult], device: str) -> str | None:
    """The line that fails a run in which no case ran on the device's own implementations (None when
    one did, or when no case was collected at all: pytest fails that run itself)."""
    if not results or any(r.own for r in results):
        return None
    reference = sum(r.on_reference for r in results)
    rest = len(results) - reference
    return (f"dsserve conformance: no case ran on device '{device}''s own implementations ({reference} of "
            f"{len(results)} cases fell to the torch-native reference{f', {rest} did not run' if rest else ''}): "
            f"nothing of the device's was checked")


def render_failures(results: list[CaseResult], errors: list[str], limit: int = 40) -> str:
    lines = []
    failed = [r for r in results if r.status in ("failed", "error")]
    for r in failed[:limit]:
        msg = r.message or r.label
        first, *rest = msg.splitlines() or [r.label]
        lines.append(f"FAILED {first}")
        lines.extend(f"       {m}" for m in rest)
    if len(failed) > limit:
        lines.append(f"... and {len(failed) - limit} more failed cases")
    lines.extend(f"ERROR {e}" for e in errors)
    return "\n".join(lines)


LEGEND = ("WORST ERROR: the largest normalised error ||out-ref||^2/||ref||^2 against the float64 "
          "reference relative to its bound; SPEED: median over cases of reference time / implementation "
          "time on this device (above 1: faster than the reference); NOT RUN: 'reference', cases served "
          "by a class of the core's reference (dsserve.core.reference), whether a plugin returned it or "
          "left the hook to it (nothing of the device's to check); 'unsupported', cases no plugin serves; "
          "'skipped', cases that cannot run here (the reason is in the verbose report). Per hook family: "
          "DEVICE'S OWN, cases run on at least one implementation that is not the reference's; REFERENCE, "
          "cases served by the reference's classes alone (a two-rank communicator case runs all the same, "
          "over the device's torch.distributed backend). A run with no case of the device's own fails.")
