"""pytest wiring of the conformance suite: the `--dsserve-device` option, the device context, and the
per-case record every check writes into its report.

Run it as `dsserve conformance --device X` (which prints the summary table) or as
`pytest --pyargs dsserve.conformance --dsserve-device X` (the table ends pytest's own summary).
"""
from __future__ import annotations

import textwrap

import pytest
import torch
from dsserve.conformance.harness import PROPERTY, Case, Context
from dsserve.conformance.pytest_option import add_option
from dsserve.conformance.report import LEGEND, WIDTH, nothing_checked, render_family_summary, render_table
from dsserve.conformance.runner import SESSION, Session
from dsserve.core.plugins import DeviceError


def pytest_addoption(parser) -> None:
    # Normally the installed `pytest11` plugin has added it already (see pytest_option.py); this
    # covers runs with plugin autoloading turned off.
    try:
        add_option(parser)
    except ValueError:  # already added
        pass


def pytest_configure(config) -> None:
    if config.pluginmanager.get_plugin(SESSION) is None:
        session = Session(device_name=config.getoption("dsserve_device", None),
                          host_threads=config.getoption("dsserve_host_threads", 1) or None)
        try:
            session.context()
        except DeviceError as exc:
            raise pytest.UsageError(f"dsserve conformance: {exc}") from None
        config.pluginmanager.register(session, SESSION)


def _unchecked(session: Session | None) -> str | None:
    """In a plain pytest run: the line saying no case ran on the device's own code, or None."""
    if session is None or not session.print_table or session.ctx is None:
        return None
    return nothing_checked(session.results, session.ctx.device.name)


def pytest_sessionfinish(session, exitstatus) -> None:
    # As `dsserve conformance` does: passing cases the reference alone served checked nothing of the device's.
    if exitstatus == pytest.ExitCode.OK and _unchecked(session.config.pluginmanager.get_plugin(SESSION)):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, config) -> None:
    session = config.pluginmanager.get_plugin(SESSION)
    if session is None or not session.results or not session.print_table:
        return
    ctx = session.ctx
    title = f"dsserve conformance: device {ctx.device.name}" if ctx else "dsserve conformance"
    terminalreporter.section(title)
    for line in [*render_table(session.results).splitlines(), "",
                 *render_family_summary(session.results).splitlines(), "", *textwrap.wrap(LEGEND, WIDTH)]:
        terminalreporter.write_line(line)
    unchecked = _unchecked(session)
    if unchecked:
        terminalreporter.write_line(unchecked, red=True)


@pytest.fixture(scope="session")
def ctx(pytestconfig) -> Context:
    return pytestconfig.pluginmanager.get_plugin(SESSION).context()


@pytest.fixture
def make_case(request):
    """make_case(family, label) -> Case, recorded in this test's report."""

    def make(family: str, label: str) -> Case:
        case = Case(family, label)
        request.node.user_properties.append((PROPERTY, case.props))
        return case

    return make


@pytest.fixture(autouse=True)
def _no_autograd():
    with torch.inference_mode():
        yield
