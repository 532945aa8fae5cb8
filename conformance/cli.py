"""`dsserve conformance --device X [--support]`: the conformance suite from the command line."""
from __future__ import annotations

import argparse
import sys

from .harness import FAMILIES


def register(sub) -> None:
    p = sub.add_parser(
        "conformance",
        help="check a device's plugins against the torch-native reference and run dsserve-tiny on it",
        description="Runs the conformance suite shipped in dsserve.conformance for one device: every hook "
                    "family its plugins implement, on random inputs against the reference (normalised "
                    "error per dtype, exact expert choice, no NaN/inf, no writes outside the new tokens' "
                    "cache slots or past any buffer), paged-KV consistency, and dsserve-tiny end to end. "
                    "Prints a table per hook family and implementation, and per family how many cases ran on "
                    "the device's own implementations and how many fell to the reference; the exit code is "
                    "non-zero when a case fails or when no case ran on the device's own implementations.")
    p.add_argument("--device", default=None, metavar="NAME",
                   help="the device to check (a name `dsserve plugins` lists); default: the best available")
    p.add_argument("--support", action="store_true",
                   help="only list which hook families and dtypes the device's plugins implement (nothing runs)")
    p.add_argument("--family", action="append", choices=FAMILIES, metavar="FAMILY",
                   help=f"run only this hook family (repeatable): {', '.join(FAMILIES)}")
    p.add_argument("-k", dest="keyword", default=None, metavar="EXPR",
                   help="pytest -k expression selecting cases by test id (e.g. 'mla and decode')")
    p.add_argument("-v", "--verbose", action="store_true", help="show pytest's own progress and report")
    p.add_argument("--host-threads", type=int, default=1, metavar="N",
                   help="torch host threads during the run (0: keep the device's own choice); default 1: the "
                        "cases are small, and one thread runs them fastest")
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    if ns.support:
        from .support import support_report

        print(support_report(ns.device))
        return 0
    try:
        import pytest  # noqa: F401
    except ImportError:
        print("dsserve conformance runs its suite with pytest: pip install 'dsserve[conformance]'", file=sys.stderr)
        return 2
    from .runner import run_conformance

    result = run_conformance(ns.device, families=ns.family, keyword=ns.keyword, verbose=ns.verbose,
                             host_threads=ns.host_threads or None)
    print(result.report())
    return result.exit_code
