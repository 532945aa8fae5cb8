"""`dsserve` (serve), `dsserve generate`, `dsserve bench`, `dsserve conformance`, `dsserve plugins`,
`dsserve plan`, `dsserve quantize`, `dsserve convert`.

Each subcommand has a function that adds its parser to the subparsers and sets `func`
(namespace -> exit code); this file dispatches, and holds the two small ones. With no subcommand,
dsserve serves.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from dsserve import __version__
from dsserve.core.config import EngineArgs

SUBCOMMANDS = {  # name -> "module:function" adding its parser
    "serve": "dsserve.server.launch:register",
    "generate": "dsserve.cli:register_generate",
    "bench": "dsserve.bench:register",
    "conformance": "dsserve.conformance.cli:register",
    "plugins": "dsserve.cli:register_plugins",
    "plan": "dsserve.models.plan:register",
    "quantize": "dsserve.models.quantize:register_quantize",
    "convert": "dsserve.models.quantize:register_convert",
}


class _PrintVersion(argparse.Action):
    """`dsserve --version`: dsserve's version and torch's (imported only here: it takes a second)."""

    def __init__(self, option_strings, dest, **kwargs):
        # SUPPRESS: no `version` attribute in the namespace the subcommands read their options from
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the versions of dsserve and torch and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        import torch

        print(f"dsserve {__version__} (torch {torch.__version__})")
        parser.exit()


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsserve", description="Serve DeepSeek models on any device. With no subcommand: serve.")
    parser.add_argument("--version", action=_PrintVersion)
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, target in SUBCOMMANDS.items():
        if only in (None, name):
            module, function = target.split(":")
            getattr(importlib.import_module(module), function)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        # `dsserve` alone serves, so its help is the subcommand list followed by serve's flags.
        build_parser().print_help()
        print()
        build_parser("serve").parse_args(["serve", "--help"])
    if not argv or argv[0] not in (*SUBCOMMANDS, "--version"):
        argv.insert(0, "serve")
    # Import only the chosen subcommand's module: `dsserve plugins` need not load the server.
    ns = build_parser(argv[0]).parse_args(argv)
    from dsserve.models.loader import CheckpointError

    from dsserve.core.plugins import DeviceError

    try:
        return ns.func(ns)
    except (DeviceError, CheckpointError, ValueError) as e:  # ValueError: invalid flag values, prompts
        print(f"dsserve: {e}", file=sys.stderr)
        return 2


def register_generate(sub) -> None:
    gen = sub.add_parser("generate", help="complete one prompt offline and print it")
    EngineArgs.add_cli_args(gen)
    g = gen.add_argument_group("generation")
    g.add_argument("--prompt", required=True, help="the text to complete")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    gen.set_defaults(func=_generate)


def register_plugins(sub) -> None:
    sub.add_parser("plugins", help="list device plugins, their devices and the hooks they implement"
                   ).set_defaults(func=_plugins)


def _generate(ns: argparse.Namespace) -> int:
    from dsserve.core.engine import Engine

    args = EngineArgs.from_cli_args(ns)
    params = _sampling_params(ns)  # a bad value stops here, before the model loads
    with Engine.from_args(args) as engine:
        prompt = ns.prompt
        if ns.chat:
            prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        print(engine.generate(prompts=[prompt], sampling_params=params)[0].text)
    return 0


# SamplingParams field -> the `dsserve generate` flag that sets it
_SAMPLING_FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p",
                   "top_k": "--top-k", "seed": "--sampling-seed"}


def _sampling_params(ns: argparse.Namespace):
    """`dsserve generate`'s sampling flags as SamplingParams; a ValueError naming the flag when one is invalid."""
    from dsserve.core.errors import RequestError
    from dsserve.core.sampling_params import SamplingParams

    values = {field: getattr(ns, flag.removeprefix("--").replace("-", "_")) for field, flag in _SAMPLING_FLAGS.items()}
    try:
        return SamplingParams(**values)
    except RequestError as e:
        raise ValueError(e.message_for(_SAMPLING_FLAGS.get(e.param, e.param))) from None


def _plugins(ns: argparse.Namespace) -> int:
    from dsserve.core.plugin_report import render_plugins
    from dsserve.core.plugins import default_registry

    print(render_plugins(default_registry()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
