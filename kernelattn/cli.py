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


def _module(name):
    return importlib.import_module(f"kernelattn.commands.{COMMANDS[name]}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, DEFAULT)
    parser = argparse.ArgumentParser(
        prog="python -m kernelattn",
        description=f"kernelattn {__version__}: linear attention with trainable feedforward kernels. "
                    f"Without a command, runs '{DEFAULT}'.")
    parser.add_argument("--version", action="version", version=f"kernelattn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name in COMMANDS:
        mod = _module(name)
        mod.add_arguments(sub.add_parser(name, help=mod.HELP, description=mod.__doc__))
    args = parser.parse_args(argv)
    with _torch_grad_mode_restored():
        return int(_module(args.command).run(args) or 0)


@contextlib.contextmanager
def _torch_grad_mode_restored():
    """Commands may switch torch autograd off for speed; give the caller its mode back."""
    before = sys.modules["torch"].is_grad_enabled() if "torch" in sys.modules else True
    try:
        yield
    finally:
        if "torch" in sys.modules:
            sys.modules["torch"].set_grad_enabled(before)
