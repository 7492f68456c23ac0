"""ListOps data: prefix expressions over digits with MAX, MIN, MED and SM, nested in brackets.

``[MAX 4 3 [MIN 2 3 ] 1 0 ]`` evaluates to 4. Operators: MAX, MIN, MED (the
median, rounded down, as ``int(numpy.median(...))`` in LRA's generator) and SM
(sum modulo 10); ten classes, the values 0-9.

The generator follows LRA's ``listops.py``: a node at depth < ``max_depth`` is
an operator with probability ``1 - value_p`` (0.25 by default), with 2 to
``max_args`` arguments, and expressions are drawn until their length (in
tokens) lies in ``[min_length, max_length]``. LRA used max_depth 10, max_args
10 and lengths 500-2000. Everything is drawn from ``numpy.random.default_rng(seed)``.

The vocabulary is LRA's: 0 = padding, the 15 symbols ``[MAX [MIN [MED [SM ]``
and the digits, and an out-of-vocabulary id (17 ids in all, as tfds'
``TokenTextEncoder`` gave LRA).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

OPERATORS = ("[MAX", "[MIN", "[MED", "[SM")
END = "]"
DIGITS = tuple(str(i) for i in range(10))
PAD, OOV = 0, 16
VOCAB = ("<pad>",) + OPERATORS + (END,) + DIGITS + ("<oov>",)
TOKEN_ID = {tok: i for i, tok in enumerate(VOCAB)}
NUM_CLASSES = 10
assert len(VOCAB) == 17 and TOKEN_ID["<oov>"] == OOV


@dataclass(frozen=True)
class ListOpsConfig:
    """How to generate a ListOps dataset (defaults: LRA's)."""

    max_depth: int = 10
    max_args: int = 10
    min_length: int = 500
    max_length: int = 2000
    value_p: float = 0.25
    train: int = 96_000
    validation: int = 2_000
    test: int = 2_000
    seed: int = 0


def _generate(rng, depth, cfg):
    """A random expression as nested lists: an int, or [op, arg, arg, ...]; and its token count."""
    r = rng.random() if depth < cfg.max_depth else 1.0
    if r > cfg.value_p:
        return int(rng.integers(10)), 1
    n_args = int(rng.integers(2, cfg.max_args + 1))
    args, length = [], 2  # the operator and the closing bracket
    for _ in range(n_args):
        sub, sub_len = _generate(rng, depth + 1, cfg)
        args.append(sub)
        length += sub_len
    return [OPERATORS[int(rng.integers(len(OPERATORS)))], *args], length


def evaluate_tree(tree) -> int:
    """The value of an expression tree (the generator's side of the check)."""
    if isinstance(tree, int):
        return tree
    op, *args = tree
    values = [evaluate_tree(a) for a in args]
    if op == "[MAX":
        return max(values)
    if op == "[MIN":
        return min(values)
    if op == "[MED":
        return int(np.median(values))
    if op == "[SM":
        return sum(values) % 10
    raise ValueError(f"unknown operator {op!r}")


def to_tokens(tree) -> list[str]:
    """``[MAX 4 3 [MIN 2 3 ] 1 0 ]`` as a list of tokens."""
    if isinstance(tree, int):
        return [str(tree)]
    out = [tree[0]]
    for arg in tree[1:]:
        out += to_tokens(arg)
    return out + [END]


def generate(n: int, cfg: ListOpsConfig, rng: np.random.Generator) -> list[tuple[str, int]]:
    """``n`` (expression, label) pairs with lengths in [cfg.min_length, cfg.max_length]."""
    out = []
    while len(out) < n:
        tree, length = _generate(rng, 1, cfg)
        if cfg.min_length <= length <= cfg.max_length:
            out.append((" ".join(to_tokens(tree)), evaluate_tree(tree)))
    return out


def encode(expression: str, length: int | None = None) -> np.ndarray:
    """Token ids of an expression (unknown symbols -> OOV), right-padded with 0 to ``length``."""
    ids = [TOKEN_ID.get(tok, OOV) for tok in expression.split()]
    if length is not None:
        if len(ids) > length:
            raise ValueError(f"expression has {len(ids)} tokens, more than length={length}")
        ids += [PAD] * (length - len(ids))
    return np.asarray(ids, dtype=np.int64)


def decode(ids) -> str:
    """The expression back from ids (padding dropped)."""
    return " ".join(VOCAB[int(i)] for i in ids if int(i) != PAD)


@dataclass
class Split:
    """One split: token ids (n, max_length), lengths (n,) and labels (n,)."""

    tokens: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray

    def __len__(self):
        return len(self.labels)


def build(cfg: ListOpsConfig, cache_dir: str | None = None, *, verbose: bool = True) -> dict[str, Split]:
    """Generate (or load from ``cache_dir``) the train / validation / test splits of ``cfg``.

    Splits are written to ``cache_dir/listops-<hash>.npz`` with the config
    beside them, and reloaded when the config matches. The label distribution
    of each split is printed when ``verbose``.
    """
    path = None
    if cache_dir is not None:
        key = _stable_key(cfg)
        path = os.path.join(cache_dir, f"listops-{key}.npz")
        if os.path.exists(path):
            with np.load(path) as f:
                splits = {name: Split(f[f"{name}_tokens"], f[f"{name}_lengths"], f[f"{name}_labels"])
                          for name in ("train", "validation", "test")}
            if verbose:
                print(f"ListOps splits loaded from {path}")
                describe(splits)
            return splits
    rng = np.random.default_rng(cfg.seed)
    splits = {}
    seen = set()
    for name, n in (("train", cfg.train), ("validation", cfg.validation), ("test", cfg.test)):
        rows = []
        while len(rows) < n:  # held-out splits never repeat a training expression
            for expr, label in generate(n - len(rows), cfg, rng):
                if name == "train" or expr not in seen:
                    rows.append((expr, label))
                if name == "train":
                    seen.add(expr)
        tokens = np.stack([encode(expr, cfg.max_length) for expr, _ in rows]) if rows else \
            np.zeros((0, cfg.max_length), np.int64)
        lengths = np.asarray([len(expr.split()) for expr, _ in rows], dtype=np.int64)
        labels = np.asarray([label for _, label in rows], dtype=np.int64)
        splits[name] = Split(tokens.astype(np.int8), lengths, labels)
    if path is not None:
        os.makedirs(cache_dir, exist_ok=True)
        np.savez_compressed(path, **{f"{name}_{field}": getattr(s, field) for name, s in splits.items()
                                     for field in ("tokens", "lengths", "labels")})
        with open(path[:-4] + ".json", "w") as f:
            json.dump(asdict(cfg), f, indent=1)
    if verbose:
        describe(splits)
    return splits


def _stable_key(cfg: ListOpsConfig) -> str:
    import hashlib

    return hashlib.sha1(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:12]


def describe(splits: dict[str, Split]) -> None:
    """Print sizes, lengths and the label distribution of each split."""
    for name, s in splits.items():
        counts = Counter(s.labels.tolist())
        dist = " ".join(f"{c}:{counts.get(c, 0) / max(1, len(s)):.2f}" for c in range(NUM_CLASSES))
        print(f"  {name:<10} {len(s):>6} examples, length {s.lengths.min() if len(s) else 0}-"
              f"{s.lengths.max() if len(s) else 0} (mean {s.lengths.mean() if len(s) else 0:.0f}); labels {dist}")
