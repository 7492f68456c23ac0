"""Minimal helpers for parameter trees (nested dicts, lists and tuples of arrays).

JAX users get the same trees as pytrees; these helpers let the rest of the
library (counting, converting, optimisers) walk them without JAX.
"""

from __future__ import annotations


def leaves(tree):
    """The arrays of ``tree`` in a fixed order (dict keys sorted)."""
    if tree is None:
        return []
    if isinstance(tree, dict):
        return [leaf for key in sorted(tree) for leaf in leaves(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [leaf for item in tree for leaf in leaves(item)]
    return [tree]


def tree_map(fn, tree, *rest):
    """Apply ``fn`` to matching leaves of ``tree`` and ``rest``; same structure out.

    Leaves are visited in the order of :func:`leaves`.
    """
    if tree is None:
        return None
    if isinstance(tree, dict):
        return {key: tree_map(fn, tree[key], *(r[key] for r in rest)) for key in sorted(tree)}
    if isinstance(tree, (list, tuple)):
        out = [tree_map(fn, t, *(r[i] for r in rest)) for i, t in enumerate(tree)]
        return type(tree)(out) if isinstance(tree, tuple) else out
    return fn(tree, *rest)


def with_leaves(tree, new_leaves):
    """``tree`` with its leaves replaced, in the order of :func:`leaves`."""
    it = iter(new_leaves)
    out = tree_map(lambda _: next(it), tree)
    if next(it, None) is not None:
        raise ValueError("more leaves than the tree holds")
    return out
