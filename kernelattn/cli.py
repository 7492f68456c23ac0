"""Command line: ``python -m kernelattn [command] [options]``.

Each command lives in a module of :mod:`kernelattn.commands`; without a
command the default one runs (see ``python -m kernelattn --help``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

from . import __version__
from .commands import COMMANDS, DEFAULT
from .commands._args import UsageError


def _module(name):
    return importlib.import_module(f"kernelattn.commands.{COMMANDS[name]}")


def _epilog(*examples: str) -> str:
    return "example" + ("s" if len(examples) > 1 else "") + ":\n" + "\n".join(f"  {e}" for e in examples)


def build_parser():
    """(the parser, {command: its subparser})."""
    mods = {name: _module(name) for name in COMMANDS}
    parser = argparse.ArgumentParser(
        prog="python -m kernelattn", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"kernelattn {__version__}: linear attention with trainable feedforward kernels.\n"
                    f"Without a command, runs '{DEFAULT}'; 'python -m kernelattn COMMAND --help' for its options.",
        epilog=_epilog(*(mod.EXAMPLES[0] for mod in mods.values())))
    parser.add_argument("--version", action="version", version=f"kernelattn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    subparsers = {}
    for name, mod in mods.items():
        subparsers[name] = sub.add_parser(name, help=mod.HELP, description=mod.DESCRIPTION,
                                          epilog=_epilog(*mod.EXAMPLES),
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(subparsers[name])
    return parser, subparsers


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, DEFAULT)
    parser, subparsers = build_parser()
    args = parser.parse_args(argv)
    try:
        with _torch_grad_mode_restored():
            return int(_module(args.command).run(args) or 0)
    except UsageError as exc:  # a bad value found after parsing: argparse's error and exit status 2
        subparsers[args.command].error(str(exc))


@contextlib.contextmanager
def _torch_grad_mode_restored():
    """Commands may switch torch autograd off for speed; give the caller its mode back."""
    before = sys.modules["torch"].is_grad_enabled() if "torch" in sys.modules else True
    try:
        yield
    finally:
        if "torch" in sys.modules:
            sys.modules["torch"].set_grad_enabled(before)
