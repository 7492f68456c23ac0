"""English sentences from the docstrings of the Python standard library: text every machine has.

The docstrings are read from the source files with :mod:`ast` (nothing is
imported, so no module runs), split into sentences, and kept when they look
like prose. Modules are divided into two disjoint groups, so text to train on
and held-out text never come from the same module.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import sysconfig

__all__ = ["stdlib_sentences", "stdlib_passages"]

SPLITS = ("train", "held_out")
#: Every HELD_OUT_EVERY-th module (in name order) is held out.
HELD_OUT_EVERY = 4
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _docstrings(path):
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
        return []
    nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                           ast.AsyncFunctionDef)))
    return [d for d in (ast.get_docstring(n) for n in nodes) if d]


def _prose(text):
    """The sentences of a docstring that read as English prose (no code, lists or tables)."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        if ">>>" in para or para.lstrip().startswith(("-", "*", "+", "|", "=")):
            continue
        for s in _SENTENCE_END.split(" ".join(para.split())):
            words = s.split()
            letters = sum(c.isalpha() or c == " " for c in s)
            if 8 <= len(words) <= 40 and s[0].isupper() and s.endswith(".") and letters >= 0.9 * len(s):
                out.append(s)
    return out


@functools.lru_cache(maxsize=None)
def _by_module():
    root = sysconfig.get_paths()["stdlib"]
    names = sorted(f[:-3] for f in os.listdir(root) if f.endswith(".py") and not f.startswith("__"))
    return tuple((name, tuple(s for d in _docstrings(os.path.join(root, name + ".py")) for s in _prose(d)))
                 for name in names)


def _modules(split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}; got {split!r}")
    pairs = [(name, s) for name, s in _by_module() if s]
    held = split == "held_out"
    return [(name, s) for i, (name, s) in enumerate(pairs) if (i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == held]


def _evenly(items, limit):
    """At most ``limit`` of ``items``, taken at even steps (all of them for None)."""
    if limit is None:
        return items
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValueError(f"limit must be a positive int or None; got {limit!r}")
    if limit >= len(items):
        return items
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def stdlib_sentences(split: str = "held_out", *, limit: int | None = None) -> list[str]:
    """Prose sentences from the standard library's docstrings.

    Parameters
    ----------
    split : {"train", "held_out"}, default "held_out"
        Which group of modules: every fourth module (in name order) is held
        out; the two groups share no module.
    limit : int, optional
        At most this many sentences, taken evenly across the modules (in
        order), so a short list still spans many topics.

    Returns
    -------
    list of str
        The same on every machine with the same Python version (about 5,000
        sentences in all on CPython 3.11).

    Examples
    --------
    >>> import kernelattn as ka
    >>> s = ka.data.stdlib_sentences("held_out", limit=3)
    >>> len(s), all(t.endswith(".") for t in s)
    (3, True)
    >>> set(s) & set(ka.data.stdlib_sentences("train"))
    set()
    """
    out = [s for _, sentences in _modules(split) for s in sentences]
    out = list(dict.fromkeys(out))  # a sentence repeated in one docstring counts once
    if split == "train":  # the same sentence in a held-out module would leak
        held = set(stdlib_sentences("held_out"))
        out = [s for s in out if s not in held]
    return _evenly(out, limit)


def stdlib_passages(split: str = "train", *, sentences_per_passage: int = 4, limit: int | None = None) -> list[str]:
    """Passages of consecutive sentences from one module each (longer inputs, like paragraphs).

    Parameters
    ----------
    split : {"train", "held_out"}, default "train"
    sentences_per_passage : int, default 4
        Passages hold 1, 2, ..., up to this many sentences in turn, so their
        lengths vary as real inputs do.
    limit : int, optional
        At most this many passages, taken evenly.

    Examples
    --------
    >>> import kernelattn as ka
    >>> p = ka.data.stdlib_passages(limit=2)
    >>> len(p)
    2
    """
    if not isinstance(sentences_per_passage, int) or sentences_per_passage < 1:
        raise ValueError(f"sentences_per_passage must be a positive int; got {sentences_per_passage!r}")
    held = set() if split == "held_out" else set(stdlib_sentences("held_out"))
    out, size = [], 1
    for _, sentences in _modules(split):
        sentences = [s for s in sentences if s not in held]
        i = 0
        while i < len(sentences):
            out.append(" ".join(sentences[i:i + size]))
            i += size
            size = size % sentences_per_passage + 1
    return _evenly(out, limit)
