"""Distillation: train a feature map so that linear attention imitates softmax attention.

:func:`fit_feature_map` runs an optimiser (:mod:`kernelattn.optim`) on a
distillation loss (:mod:`kernelattn.losses`) over samples of queries, keys
(and values) - for instance those of a pretrained transformer's heads, as in
``python -m kernelattn demo``. :func:`approximation_error` measures how close a
map is: the relative error of the output and the KL divergence of the
attention weights, against softmax attention.

Gradients
---------
``grad="manual"`` (the default on every backend) uses the hand-derived VJPs of
:func:`kernelattn.value_and_grad` (with the softmax side of the loss computed
once, since the samples do not change), so NumPy, CuPy, array-api-strict and Dask
train without an autodiff library; on JAX the gradient step is compiled with
``jax.jit``. ``grad="autodiff"`` differentiates :mod:`kernelattn.losses` with
torch autograd or ``jax.grad`` instead (torch and JAX only). Both paths give
the same gradients (the tests check it), so the same fit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from . import _compat, _dispatch, _tree, _validation
from .feature_maps import FeatureMap, as_feature_map, orthogonality_penalty
from ._agnostic import grad as _core
from ._agnostic._utils import cast, compute_dtype
from .losses import LOSSES, attention_kl, output_mse
from .optim import Adam

__all__ = ["ApproximationError", "FitHistory", "approximation_error", "fit_feature_map"]

GRADS = ("auto", "manual", "autodiff")


class ApproximationError(NamedTuple):
    """How far linear attention with a feature map is from softmax attention.

    Attributes
    ----------
    output_error : float
        Relative RMS error of the output, ``||o - o*|| / ||o*||`` over all
        elements (the square root of :func:`kernelattn.losses.output_mse`).
    attention_kl : float
        Mean over query rows of KL(softmax weights || linear weights), in nats
        (:func:`kernelattn.losses.attention_kl`).
    """

    output_error: float
    attention_kl: float


def approximation_error(phi, q, k, v, /, *, causal: bool = False, key_mask=None, eps: float = 1e-6,
                        scale: float | None = None, floor: float = 1e-8) -> ApproximationError:
    """Output error and attention KL of linear attention with ``phi`` against softmax attention.

    Parameters
    ----------
    phi : FeatureMap or {"elu", "relu"}
    q : array, shape (B, H, N, d)
    k : array, shape (B, H, L, d)
    v : array, shape (B, H, L, e)
    causal, key_mask, eps
        As in :func:`kernelattn.linear_attention`.
    scale : float, optional
        Softmax scale, default 1 / sqrt(d).
    floor : float, default 1e-8
        See :func:`kernelattn.losses.attention_kl`.

    Returns
    -------
    ApproximationError
        ``(output_error, attention_kl)`` as Python floats.

    Examples
    --------
    >>> import kernelattn as ka
    >>> s = ka.data.minilm(layer=0)
    >>> err = ka.approximation_error("elu", s.q, s.k, s.v)
    >>> 0 < err.output_error < 2 and err.attention_kl > 0
    True
    """
    if v is None:
        raise ValueError("approximation_error needs the values v (B, H, L, e) to measure the output error; "
                         "got None")
    mse = output_mse(phi, q, k, v, causal=causal, key_mask=key_mask, eps=eps, scale=scale)
    kl = attention_kl(phi, q, k, causal=causal, key_mask=key_mask, eps=eps, scale=scale, floor=floor)
    return ApproximationError(math.sqrt(max(float(mse), 0.0)), float(kl))


@dataclass
class FitHistory:
    """What :func:`fit_feature_map` did.

    Attributes
    ----------
    loss : list of float
        Training loss (distillation loss + penalty) at each step, before its update.
    eval_steps : list of int
        Steps after which the evaluation data was measured (0 = before training).
    eval_output_error, eval_attention_kl : list of float
        :func:`approximation_error` on the evaluation data at those steps.
    grad : str
        ``"manual"`` (hand-derived VJPs) or ``"autodiff"``.
    seconds : float
        Wall time of the whole fit.
    """

    loss: list = field(default_factory=list)
    eval_steps: list = field(default_factory=list)
    eval_output_error: list = field(default_factory=list)
    eval_attention_kl: list = field(default_factory=list)
    grad: str = "manual"
    seconds: float = 0.0


def _progress(progress, steps, desc):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return None
    # disable=None: bars only when stderr is a terminal, so pipes and logs get no carriage returns
    opts = dict(total=steps, desc=desc, leave=False, dynamic_ncols=True, disable=None)
    if isinstance(progress, dict):
        opts.update(progress)
    return tqdm(**opts)


def _grad_fn(kind, xp, loss, options, ortho_weight):
    """(phi, q, k, v, mask, teacher) -> (value, grads FeatureMap) for the chosen gradient path."""
    lib = _compat.library_name(xp)
    adapter = _dispatch.adapter_for(lib)  # the library's own jit and autodiff (backends/)
    if kind == "manual":
        def step(phi, q, k, v, mask, teacher):
            value, (_, _, _, g_params) = _core.distill_value_and_grad(
                loss, q, k, v, feature_map=phi, key_mask=mask, ortho_weight=ortho_weight, need_inputs=False,
                teacher=teacher, xp=xp, **options)
            return value, FeatureMap(phi.spec, g_params, {})

        return step if adapter is None else adapter.jit(step)

    def loss_of(phi, q, k, v, mask):
        if loss == "attention_kl":
            value = attention_kl(phi, q, k, key_mask=mask, **options)
        else:
            value = output_mse(phi, q, k, v, key_mask=mask, **options)
        if ortho_weight:
            value = value + orthogonality_penalty(phi, weight=ortho_weight)
        return value

    vg = None if adapter is None else adapter.value_and_grad(loss_of)
    if vg is not None:
        return lambda phi, q, k, v, mask, teacher: vg(phi, q, k, v, mask)
    raise ValueError(f"grad='autodiff' needs torch or JAX arrays; these are {lib} arrays (use grad='manual')")


def _take(a, idx, xp):
    return None if a is None else xp.take(a, idx, axis=0)


def fit_feature_map(
    phi,
    q, k, v=None, /, *,
    loss: str = "attention_kl",
    steps: int = 200,
    lr: float = 1e-2,
    ortho_weight: float = 0.0,
    optimizer=None,
    batch_size: int | None = None,
    causal: bool = False,
    key_mask=None,
    eps: float = 1e-6,
    scale: float | None = None,
    eval_data=None,
    eval_every: int | None = None,
    seed=0,
    grad: str = "auto",
    progress=False,
    callback=None,
):
    """Train ``phi`` so that linear attention imitates softmax attention on samples.

    Parameters
    ----------
    phi : FeatureMap
        A trainable map (``ffn``, ``glu``, ``aoglu``, ``hedgehog``) whose
        parameters live in the library of ``q``; it is not modified.
    q : array, shape (B, H, N, d)
        Sample queries: B sequences (for instance sentences), H heads.
    k : array, shape (B, H, L, d)
    v : array, shape (B, H, L, e), optional
        Needed by ``loss="output_mse"`` and by evaluation of the output error.
    loss : {"attention_kl", "output_mse"}, default "attention_kl"
        See :mod:`kernelattn.losses`.
    steps : int, default 200
        Optimiser steps.
    lr : float, default 1e-2
        Learning rate of the default optimiser (Adam); ignored with ``optimizer``.
    ortho_weight : float, default 0
        lambda of the orthogonality penalty on main weights (the paper used
        0-0.1).
    optimizer : kernelattn.optim.Adam or AdamW, optional
        Default ``Adam(lr)``.
    batch_size : int, optional
        Sequences per step, drawn without replacement from a NumPy Generator
        seeded by ``seed`` (reshuffled each pass); default all B.
    causal, key_mask, eps
        As in :func:`kernelattn.linear_attention`; ``key_mask`` (B, L).
    scale : float, optional
        Softmax scale, default 1 / sqrt(d).
    eval_data : tuple (q, k, v) or (q, k, v, key_mask), optional
        Held-out samples; :func:`approximation_error` on them is recorded
        before training, every ``eval_every`` steps and at the end.
    eval_every : int, optional
        Default ``max(1, steps // 20)``.
    seed : int or numpy.random.Generator, default 0
        Only the batch order depends on it; with the same inputs and seed the
        fit is the same (bit for bit on one machine and backend).
    grad : {"auto", "manual", "autodiff"}, default "auto"
        Gradient path (see the module docs); ``"auto"`` is ``"manual"``.
    progress : bool or dict, default False
        Show a tqdm progress bar (if tqdm is installed); a dict is passed to tqdm.
    callback : callable, optional
        ``callback(step, phi, loss)`` after each step (``loss`` a float).

    Returns
    -------
    phi : FeatureMap
        The fitted map (same spec, library, device and dtype).
    history : FitHistory

    Examples
    --------
    >>> import kernelattn as ka
    >>> s = ka.data.minilm(layer=0)
    >>> train, test = s.split(held_out=1)
    >>> phi0 = ka.feature_map("hedgehog", num_heads=12, head_dim=32, seed=0)
    >>> phi, hist = ka.fit_feature_map(phi0, train.q, train.k, steps=30, lr=0.05)
    >>> hist.loss[-1] < hist.loss[0]
    True
    """
    loss = _validation.choice("loss", loss, sorted(LOSSES))
    grad = _validation.choice("grad", grad, GRADS)
    steps = _validation.integer("steps", steps)
    lr = _validation.nonnegative("lr", lr)
    ortho_weight = _validation.nonnegative("ortho_weight", ortho_weight)
    eps = _validation.nonnegative("eps", eps)
    scale = None if scale is None else _validation.positive("scale", scale)
    if optimizer is not None and not (callable(getattr(optimizer, "init", None))
                                      and callable(getattr(optimizer, "update", None))):
        raise TypeError(f"optimizer must be a kernelattn.optim optimiser (Adam, AdamW) or None; "
                        f"got {_validation.short(optimizer)}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be a callable (step, phi, loss) or None; got {_validation.short(callback)}")
    if not isinstance(progress, dict):
        _validation.flag("progress", progress)
    if not isinstance(seed, np.random.Generator):
        seed = _validation.rng("seed", seed)
    if loss == "output_mse" and v is None:
        raise ValueError("loss='output_mse' compares attention outputs, so it needs the values v; got None")
    xp = _validation.check_attention_inputs(q, k, k if v is None else v, key_mask=key_mask, causal=causal)
    if not (isinstance(phi, (FeatureMap, str)) or hasattr(phi, "as_feature_map")):
        raise TypeError(f"phi must be a trainable FeatureMap (ffn, glu, aoglu, hedgehog); got {_validation.short(phi)}")
    phi = as_feature_map(phi)
    if not isinstance(phi, FeatureMap) or not phi.parameters():
        raise ValueError(f"fit_feature_map needs a trainable FeatureMap (ffn, glu, aoglu, hedgehog); "
                         f"got {getattr(phi, 'kind', type(phi).__name__)!r}")
    phi.check_compatible(q, name="q")
    B = q.shape[0]
    if batch_size is not None:
        batch_size = _validation.integer("batch_size", batch_size)
        if batch_size > B:
            raise ValueError(f"batch_size={batch_size} exceeds the {B} sequences in q")
    if eval_every is None:
        eval_every = max(1, steps // 20)
    eval_every = _validation.integer("eval_every", eval_every)
    if eval_data is not None:
        if not (isinstance(eval_data, (tuple, list)) and len(eval_data) in (3, 4)):
            raise ValueError(f"eval_data must be a tuple (q, k, v) or (q, k, v, key_mask); "
                             f"got {_validation.short(eval_data)}")
        eval_data = tuple(eval_data) + (None,) * (4 - len(eval_data))
        for name, a in zip(("q", "k", "v"), eval_data):
            _validation.array(f"eval_data's {name}", a)
    opt = Adam(lr) if optimizer is None else optimizer
    rng = seed  # a Generator, checked above
    kind = "manual" if grad == "auto" else grad
    options = dict(causal=bool(causal), eps=eps, scale=scale)
    step_fn = _grad_fn(kind, xp, loss, options, ortho_weight)
    lib = _compat.library_name(xp)
    device = _compat.device(q)
    cdt = compute_dtype(q.dtype, xp=xp)
    q, k = cast(q, cdt, xp=xp), cast(k, cdt, xp=xp)
    v = None if v is None else cast(v, cdt, xp=xp)
    teacher = None
    if kind == "manual":  # q, k, v are fixed: the softmax side of the loss is computed once
        teacher = _core.softmax_teacher(q, k, v, loss=loss, causal=bool(causal), key_mask=key_mask, scale=scale,
                                        xp=xp)
        if lib == "dask":
            teacher = tuple(t.persist() for t in teacher)

    history = FitHistory(grad=kind)
    start = time.perf_counter()

    def evaluate(step, phi):
        if eval_data is None:
            return
        eq, ek, ev, em = eval_data
        err = approximation_error(phi, eq, ek, ev, causal=causal, key_mask=em, eps=eps, scale=scale)
        history.eval_steps.append(step)
        history.eval_output_error.append(err.output_error)
        history.eval_attention_kl.append(err.attention_kl)

    state = opt.init(phi)
    evaluate(0, phi)
    order = []
    bar = _progress(progress, steps, f"fit {phi.kind}")
    for step in range(1, steps + 1):
        if batch_size is None:
            qb, kb, vb, mb, tb = q, k, v, key_mask, teacher
        else:
            if len(order) < batch_size:
                order = list(rng.permutation(B))
            pick, order = order[:batch_size], order[batch_size:]
            idx = xp.asarray(np.asarray(pick, dtype=np.int64), device=device)
            qb, kb, vb, mb = (_take(a, idx, xp) for a in (q, k, v, key_mask))
            tb = None if teacher is None else tuple(_take(t, idx, xp) for t in teacher)
        value, g = step_fn(phi, qb, kb, vb, mb, tb)
        phi, state = opt.update(phi, g, state)
        if lib == "dask":  # keep the task graphs from growing step after step
            phi = phi.replace(params=_tree.tree_map(lambda a: a.persist(), phi.params))
            state = state._replace(m=_tree.tree_map(lambda a: a.persist(), state.m),
                                   v=_tree.tree_map(lambda a: a.persist(), state.v))
        value = float(value)
        history.loss.append(value)
        if not math.isfinite(value):
            if bar is not None:
                bar.close()
            raise FloatingPointError(f"the loss became {value} at step {step}; lower lr (now {opt.lr})")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
        if callback is not None:
            callback(step, phi, value)
        if step % eval_every == 0 or step == steps:
            evaluate(step, phi)
    if bar is not None:
        bar.close()
    history.seconds = time.perf_counter() - start
    return phi, history
