"""`dsserve bench`: `serving` loads an OpenAI-compatible server; `one-batch` times one batch locally.

The offline throughput comparison with transformers is `benchmarks/offline_throughput.py`; the shared
benchmark checkpoint is built by `dsserve.bench.bench_model.ensure_bench_model`.
"""
from __future__ import annotations

import argparse


def register(sub) -> None:
    from . import one_batch, serving

    bench = sub.add_parser("bench", help="benchmarks: serving (against a server), one-batch (local engine)",
                           description=__doc__)
    kinds = bench.add_subparsers(dest="bench_command", metavar="{serving,one-batch}")
    serving.add_parser(kinds)
    one_batch.add_parser(kinds)
    bench.set_defaults(func=lambda ns: _missing(bench))


def _missing(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2
