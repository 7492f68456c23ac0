"""Argument types and checks shared by the commands.

Every bad value ends in argparse's own one-line error and exit status 2: the
``type=`` functions below raise ``argparse.ArgumentTypeError`` (argparse adds
``argument --X:``), and checks that need other options or data raise
:class:`UsageError`, which the command line turns into ``parser.error``.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os


class UsageError(Exception):
    """A bad command-line value found after parsing; shown as ``error: <message>``, exit status 2."""

    def __init__(self, option: str, message: str):
        super().__init__(f"argument {option}: {message}")


def _int(text: str, what: str, low: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        value = None
    if value is None or value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _int(text, "a positive integer", 1)


def nonnegative_int(text: str) -> int:
    return _int(text, "a non-negative integer", 0)


def _float(text: str, what: str, ok) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (a learning rate)."""
    return _float(text, "a finite number > 0", lambda x: math.isfinite(x) and x > 0)


def nonnegative_float(text: str) -> float:
    """A finite number >= 0 (a weight)."""
    return _float(text, "a finite number >= 0", lambda x: math.isfinite(x) and x >= 0)


def seconds(text: str) -> float:
    """A number of seconds >= 0; inf means no limit."""
    return _float(text, "a number of seconds >= 0 (inf: no limit)", lambda x: x >= 0)


def int_list(low: int = 1, *, allow_empty: bool = False, example: str = "256,1024"):
    """A type for comma-separated integers >= low; '' gives [] when allow_empty."""
    what = "positive" if low == 1 else "non-negative"

    def parse(text: str) -> list[int]:
        if not text.strip() and allow_empty:
            return []
        parts = text.split(",")
        try:
            values = [int(p.strip()) for p in parts]
        except ValueError:
            values = None
        if not values or any(v < low for v in values):
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what} integers such as {example}"
                + (" (or '' for none)" if allow_empty else "") + f", got {text!r}")
        return values

    parse.__name__ = f"{what} integer list"
    return parse


def choice_list(choices, *, all_word: str | None = None):
    """A type for comma-separated names from ``choices`` (``all_word`` selects every one)."""
    choices = tuple(choices)
    allowed = ", ".join(choices) + (f" or '{all_word}'" if all_word else "")

    def parse(text: str) -> list[str]:
        if all_word is not None and text.strip() == all_word:
            return list(choices)
        names = [n.strip() for n in text.split(",")]
        if any(n not in choices for n in names):
            raise argparse.ArgumentTypeError(f"expected comma-separated names from {allowed}, got {text!r}")
        return names

    parse.__name__ = "name list"
    return parse


def require_library(option: str, name: str) -> None:
    """UsageError unless the array library ``name`` can be imported."""
    if name != "numpy" and importlib.util.find_spec(name) is None:
        raise UsageError(option, f"{name!r} is not installed (pip install {name.replace('_', '-')})")


def _file_above(path: str):
    """The nearest existing path at or above ``path`` when it is not a folder, else None."""
    head = os.path.abspath(path)
    while not os.path.exists(head) and os.path.dirname(head) != head:
        head = os.path.dirname(head)
    return None if os.path.isdir(head) else head


def output_folder(option: str, path: str) -> None:
    """UsageError when ``path`` (a folder to create or reuse) is empty, a file or lies under one."""
    if not path:
        raise UsageError(option, "expected a folder name, got ''")
    head = _file_above(path)
    if head == os.path.abspath(path):
        raise UsageError(option, f"{path!r} is a file, not a folder")
    if head is not None:
        raise UsageError(option, f"{path!r} lies under {head!r}, which is a file")


def output_file(option: str, path: str, suffixes=None) -> None:
    """UsageError when ``path`` (a file to write) is a folder, lies under a file, or has an unknown suffix."""
    if not path:
        return
    if os.path.isdir(path):
        raise UsageError(option, f"{path!r} is a folder; give a file name such as {os.path.join(path, 'demo.png')!r}")
    head = _file_above(os.path.dirname(os.path.abspath(path)))
    if head is not None:
        raise UsageError(option, f"{path!r} lies under {head!r}, which is a file")
    suffix = os.path.splitext(path)[1].lstrip(".").lower()
    if suffix and suffixes is not None and suffix not in suffixes:
        raise UsageError(option, f"unknown file type {suffix!r} in {path!r}; use one of {', '.join(sorted(suffixes))}")
