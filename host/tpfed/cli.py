"""The ``tpfed`` command. Each subcommand is a module in :mod:`tpfed.commands` that defines
``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``; modules import their
heavy dependencies inside ``run`` so that ``tpfed --help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from tpfed import __version__, commands
from tpfed.errors import TpfedError


def _command_modules():
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"{commands.__name__}.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpfed",
        description="Run one transformer across many small, unequal devices.",
    )
    parser.add_argument("--version", action="version", version=f"tpfed {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in _command_modules():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args._run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        return _reader_gone()
    except TpfedError as exc:
        print(f"tpfed: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tpfed: interrupted", file=sys.stderr)
        return 130


def _reader_gone() -> int:
    """Standard output's reader went away (``tpfed plan --json | head``): stop quietly, as
    ``cat`` does, with the status of a process ended by SIGPIPE."""
    import os

    try:  # whatever is still buffered must not fail again at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141
