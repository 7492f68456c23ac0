"""Adam and AdamW on parameter trees, in pure array API (every backend).

An optimiser is a small immutable object with two methods, in the functional
style of optax::

    opt = ka.optim.AdamW(lr=5e-3, weight_decay=0.1, schedule=ka.optim.inverse_sqrt_warmup(1000))
    state = opt.init(phi)                      # a FeatureMap or any tree of arrays
    phi, state = opt.update(phi, grads, state)  # grads: same tree (or the FeatureMap value_and_grad returns)

The updates are those of ``torch.optim.Adam`` / ``torch.optim.AdamW`` (bias
corrected moments, eps added to the corrected root, Adam's weight decay as an
L2 term in the gradient, AdamW's decoupled), with the learning rate of step
t = 1, 2, ... equal to ``lr * schedule(t)``. Nothing is random, so the same
inputs give the same parameters on every run.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from . import _compat, _tree, _validation
from .feature_maps import FeatureMap

__all__ = ["Adam", "AdamState", "AdamW", "constant", "inverse_sqrt_warmup"]


def constant():
    """The schedule that keeps the base learning rate: ``t -> 1``."""
    return _Constant()


class _Constant:
    def __call__(self, t: int) -> float:
        return 1.0

    def __repr__(self):
        return "constant()"


def inverse_sqrt_warmup(warmup: int):
    """The paper's multiplier ``min(1, t / warmup) / sqrt(max(t, warmup))``.

    Linear warm-up over ``warmup`` steps to ``1 / sqrt(warmup)``, then decay
    as ``1 / sqrt(t)`` (Yorsh & Kovalenko used warmup 1000 or 8000 with base
    learning rates 0.005-0.05).

    Parameters
    ----------
    warmup : int
        Number of warm-up steps (positive).

    Returns
    -------
    callable
        ``schedule(t)`` for steps t = 1, 2, ...

    Examples
    --------
    >>> import kernelattn as ka
    >>> s = ka.optim.inverse_sqrt_warmup(100)
    >>> round(s(50), 4), round(s(100), 4), round(s(400), 4)
    (0.05, 0.1, 0.05)
    """
    return _InverseSqrtWarmup(_validation.integer("warmup", warmup))


class _InverseSqrtWarmup:
    def __init__(self, warmup):
        self.warmup = warmup

    def __call__(self, t: int) -> float:
        return min(1.0, t / self.warmup) / math.sqrt(max(t, self.warmup))

    def __repr__(self):
        return f"inverse_sqrt_warmup({self.warmup})"


class AdamState(NamedTuple):
    """Optimiser state: the number of steps taken and the two moment trees.

    Attributes
    ----------
    step : int
        Steps taken so far (0 after :meth:`Adam.init`).
    m, v : tree of arrays
        First and second moment estimates, shaped like the parameters.
    """

    step: int
    m: object
    v: object


def _params_of(tree, name="params"):
    tree = tree.params if isinstance(tree, FeatureMap) else tree
    for leaf in _tree.leaves(tree):
        if not _compat.is_array_api_obj(leaf):
            raise TypeError(f"{name} must be a FeatureMap or a tree (dicts, lists, tuples) of arrays; "
                            f"got a leaf {_validation.short(leaf)}")
    return tree


class Adam:
    """Adam (Kingma & Ba 2015), as ``torch.optim.Adam``.

    Parameters
    ----------
    lr : float, default 1e-3
        Base learning rate.
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    weight_decay : float, default 0
        L2 term added to the gradient (``g + weight_decay * p``).
    schedule : callable, optional
        Multiplier of the learning rate at step t = 1, 2, ... (see
        :func:`inverse_sqrt_warmup`); default constant.
    """

    decoupled = False

    def __init__(self, lr: float = 1e-3, *, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 schedule=None):
        lr, eps, weight_decay = (_validation.nonnegative(name, value) for name, value in (
            ("lr", lr), ("eps", eps), ("weight_decay", weight_decay)))
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError(f"betas must be two numbers in [0, 1); got {_validation.short(betas)}")
        betas = tuple(_validation.number(f"betas[{i}]", b, low=0.0, high=1.0, allowed="a number in [0, 1)")
                      for i, b in enumerate(betas))
        if schedule is not None and not callable(schedule):
            raise TypeError(f"schedule must be a callable t -> multiplier; got {_validation.short(schedule)}")
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.schedule = constant() if schedule is None else schedule

    def __repr__(self):
        return (f"{type(self).__name__}(lr={self.lr}, betas={self.betas}, eps={self.eps}, "
                f"weight_decay={self.weight_decay}, schedule={self.schedule!r})")

    def learning_rate(self, step: int) -> float:
        """The learning rate used by step ``step`` (1, 2, ...)."""
        return self.lr * float(self.schedule(step))

    def init(self, params) -> AdamState:
        """Zero moments shaped like ``params`` (a FeatureMap or a tree of arrays)."""
        tree = _params_of(params)
        if not _tree.leaves(tree):
            raise ValueError("nothing to optimise: the parameter tree has no arrays")

        def zeros(a):
            return _compat.array_namespace(a).zeros_like(a)

        return AdamState(0, _tree.tree_map(zeros, tree), _tree.tree_map(zeros, tree))

    def update(self, params, grads, state: AdamState):
        """One step; returns ``(new_params, new_state)``.

        Parameters
        ----------
        params : FeatureMap or tree of arrays
        grads : same structure as ``params``
            (a FeatureMap of gradients for a FeatureMap, as from
            :func:`kernelattn.value_and_grad`).
        state : AdamState

        Returns
        -------
        new_params : like ``params``
        new_state : AdamState
        """
        if not isinstance(state, AdamState):
            raise TypeError(f"state must be the AdamState from {type(self).__name__}.init; "
                            f"got {_validation.short(state)}")
        tree, gtree = _params_of(params), _params_of(grads, "grads")
        p_leaves, g_leaves = _tree.leaves(tree), _tree.leaves(gtree)
        if len(p_leaves) != len(g_leaves) or any(tuple(p.shape) != tuple(g.shape)
                                                 for p, g in zip(p_leaves, g_leaves)):
            raise ValueError("grads must have the structure and shapes of params")
        t = state.step + 1
        lr = self.learning_rate(t)
        b1, b2 = self.betas
        c1, c2 = 1.0 - b1**t, 1.0 - b2**t
        new_p, new_m, new_v = [], [], []
        for p, g, m, v in zip(p_leaves, g_leaves, _tree.leaves(state.m), _tree.leaves(state.v)):
            xp = _compat.array_namespace(p)
            if g.dtype != p.dtype:
                g = xp.astype(g, p.dtype)
            if self.weight_decay and not self.decoupled:
                g = g + self.weight_decay * p
            m = b1 * m + (1.0 - b1) * g
            v = b2 * v + (1.0 - b2) * (g * g)
            if self.weight_decay and self.decoupled:
                p = p * (1.0 - lr * self.weight_decay)
            p = p - (lr / c1) * m / (xp.sqrt(v) * (1.0 / math.sqrt(c2)) + self.eps)
            new_p.append(p)
            new_m.append(m)
            new_v.append(v)
        new_tree = _tree.with_leaves(tree, new_p)
        out = params.replace(params=new_tree) if isinstance(params, FeatureMap) else new_tree
        return out, AdamState(t, _tree.with_leaves(state.m, new_m), _tree.with_leaves(state.v, new_v))


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter 2019), as ``torch.optim.AdamW``: decoupled weight decay.

    Each step first shrinks the parameters by ``1 - lr_t * weight_decay``,
    then takes the Adam step. The paper trained with AdamW, weight decay 0.1
    and :func:`inverse_sqrt_warmup`.

    Parameters
    ----------
    lr : float, default 1e-3
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    weight_decay : float, default 0.01
    schedule : callable, optional
    """

    decoupled = True

    def __init__(self, lr: float = 1e-3, *, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 schedule=None):
        super().__init__(lr, betas=betas, eps=eps, weight_decay=weight_decay, schedule=schedule)
