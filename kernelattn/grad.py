"""Gradients without an autodiff library: hand-derived VJPs that run on every backend.

torch and JAX users can differentiate :func:`kernelattn.linear_attention` with
their own autodiff. These functions give the same gradients on NumPy, CuPy,
array-api-strict and Dask too (and on torch and JAX, where they need no graph
and jit cleanly), computed by hand-derived vector-Jacobian products written
once against the array API (:mod:`kernelattn._agnostic.grad`).

* :func:`feature_map_vjp` - phi(x) and a function mapping a cotangent of
  phi(x) to gradients for x and for the map's parameters.
* :func:`linear_attention_vjp` - linear attention (every option of
  :func:`kernelattn.linear_attention`) and its VJP: gradients for q, k, v, the
  feature map and an initial state. Use it to train with any loss on the
  output: compute the loss and its gradient for ``out`` yourself, then pull
  it back.
* :func:`value_and_grad` - a distillation loss (:mod:`kernelattn.losses`),
  plus an optional orthogonality penalty, and its gradients.

Gradients for a feature map come back as a :class:`~kernelattn.FeatureMap`
whose ``params`` hold the gradients (same tree as the map's ``params``) and
whose ``buffers`` are empty (buffers such as FAVOR+'s projection are not
trained), so ``kernelattn.optim`` updates ``phi.params`` with ``g.params``.

Memory: causal attention is differentiated by a reverse pass over chunks that
carries the state gradient, so like the forward it needs O(N) memory (the
per-chunk prefix states, N/C of shape (m, e)), never an (N, m, e) tensor.
"""

from __future__ import annotations

from typing import NamedTuple

from . import _validation
from ._agnostic import grad as _core
from ._agnostic._utils import cast, compute_dtype
from ._agnostic import isolate as _isolate
from .attention import LinearAttentionState, _check_state, _isolated_inputs, _static_checks
from .feature_maps import FeatureMap, as_feature_map
from .losses import LOSSES, _prepare

__all__ = [
    "DistillationGrads",
    "LinearAttentionGrads",
    "feature_map_vjp",
    "linear_attention_vjp",
    "value_and_grad",
]


class LinearAttentionGrads(NamedTuple):
    """Gradients returned by the VJP of :func:`linear_attention_vjp`.

    Attributes
    ----------
    q : array, shape (B, H, N, d)
    k : array, shape (B, H, L, d)
    v : array, shape (B, H, L, e)
    feature_map : FeatureMap
        ``.params`` holds the gradients of the map's parameters (empty for
        fixed maps).
    initial_state : LinearAttentionState or None
        Gradients of (S, z) when an initial state was given.
    """

    q: object
    k: object
    v: object
    feature_map: FeatureMap
    initial_state: LinearAttentionState | None


class DistillationGrads(NamedTuple):
    """Gradients returned by :func:`value_and_grad` (None for what was not asked or not used).

    Attributes
    ----------
    feature_map : FeatureMap or None
        ``.params`` holds the gradients of the map's parameters.
    q : array, shape (B, H, N, d), or None
    k : array, shape (B, H, L, d), or None
    v : array, shape (B, H, L, e), or None
        None for ``"attention_kl"``, which does not use the values.
    """

    feature_map: FeatureMap | None
    q: object
    k: object
    v: object


def _grad_map(phi: FeatureMap, params) -> FeatureMap:
    return FeatureMap(phi.spec, params, {})


def _differentiable(given, name="feature_map"):
    phi = as_feature_map(given)
    if not isinstance(phi, FeatureMap):
        raise TypeError(f"{name} must be a FeatureMap (from ka.feature_map) or 'elu' / 'relu' for hand-derived "
                        f"gradients, not a plain callable (use torch autograd or jax.grad for it); "
                        f"got {_validation.short(given)}")
    return phi


def feature_map_vjp(phi, x, /, *, role: str = "query"):
    """Apply a feature map and return its vector-Jacobian product.

    Parameters
    ----------
    phi : FeatureMap or {"elu", "relu"}
    x : array, shape (B, H, N, d)
    role : {"query", "key"}
        Which map of an untied ``phi`` to apply.

    Returns
    -------
    y : array, shape (B, H, N, m)
        ``phi(x)`` in the dtype of ``x``.
    vjp : callable
        ``vjp(gy)`` with ``gy`` of shape (B, H, N, m) returns ``(gx, gphi)``:
        ``gx`` (B, H, N, d) in the dtype of ``x`` and ``gphi`` a FeatureMap
        whose ``params`` are the parameter gradients (only the blocks of
        ``role`` are non-zero for an untied map).

    Examples
    --------
    >>> import numpy as np, kernelattn as ka
    >>> x = np.random.default_rng(0).standard_normal((1, 2, 5, 4))
    >>> phi = ka.feature_map("glu", num_heads=2, head_dim=4, seed=0, dtype="float64")
    >>> y, vjp = ka.feature_map_vjp(phi, x)
    >>> gx, gphi = vjp(np.ones_like(y))      # gradients of y.sum()
    >>> gx.shape, gphi.params["shared"][0]["W"].shape
    ((1, 2, 5, 4), (2, 4, 4))
    """
    phi = _differentiable(phi, "phi")
    xp = _validation.namespace_of(x=_validation.array("x", x))
    _validation.check_ndim("x", x, 4, "(B, H, N, d)")
    _validation.real_floating(xp, "x", x)
    _validation.choice("role", role, ("query", "key"))
    phi.check_compatible(x, name="x")
    dtype = x.dtype
    cdt = compute_dtype(dtype, xp=xp)
    y, inner = phi.vjp(cast(x, cdt, xp=xp), role=role, xp=xp)

    def vjp(gy):
        _validation.namespace_of(x=x, gy=_validation.array("gy", gy))
        if tuple(gy.shape) != tuple(y.shape):
            raise ValueError(f"gy must have the shape of phi(x), {tuple(y.shape)}; got {tuple(gy.shape)}")
        gx, gblocks = inner(cast(gy, cdt, xp=xp))
        zeros = [{key: xp.zeros_like(a) for key, a in block.items()} for block in phi.blocks(role)]
        if not phi.params:
            params = {}
        elif "shared" in phi.params:
            params = {"shared": gblocks}
        else:
            other = "key" if role == "query" else "query"
            params = {role: gblocks, other: zeros}
        return cast(gx, dtype, xp=xp), _grad_map(phi, params)

    return cast(y, dtype, xp=xp), vjp


def linear_attention_vjp(
    q, k, v, /, *,
    feature_map="elu",
    causal: bool = False,
    key_mask=None,
    eps: float = 1e-6,
    chunk_size: int | None = None,
    method: str = "auto",
    initial_state=None,
    return_state: bool = False,
    layout: str = "BHND",
):
    """Linear attention and its vector-Jacobian product, on any backend.

    The forward is the one of :func:`kernelattn.linear_attention` (same
    arguments, same numbers to rounding) computed by the array-API core.

    Parameters
    ----------
    q : array, shape (B, H, N, d)
    k : array, shape (B, H, L, d)
    v : array, shape (B, H, L, e)
        (B, N, H, d), (B, L, H, d), (B, L, H, e) with ``layout="BNHD"``.
    feature_map : FeatureMap or {"elu", "relu"}, default "elu"
        Any map built by :func:`kernelattn.feature_map` (trainable or fixed);
        not a plain callable.
    causal, key_mask, eps, chunk_size, method, initial_state, return_state
        As in :func:`kernelattn.linear_attention`. Causal attention is
        differentiated by chunks (a reverse pass carrying the state) unless
        ``method="naive"``.
    layout : {"BHND", "BNHD"}, default "BHND"
        Axis order of q, k, v, ``out``, ``g_out`` and the gradients of q, k,
        v (see :func:`kernelattn.linear_attention`); states are (B, H, m, e)
        in both.

    Returns
    -------
    out : array, shape (B, H, N, e)
        Or ``(out, state)`` when ``return_state``; (B, N, H, e) with
        ``layout="BNHD"``.
    vjp : callable
        ``vjp(g_out, g_state=None)``: ``g_out``, shaped like ``out``, is the
        gradient of your loss for ``out``; ``g_state`` a
        :class:`~kernelattn.LinearAttentionState` for the returned state, or
        None. Returns :class:`LinearAttentionGrads` ``(q, k, v, feature_map,
        initial_state)``, the input gradients in the inputs' dtypes and layout.

    Examples
    --------
    Gradient of ``sum(out * w)`` for the map's parameters, with NumPy:

    >>> import numpy as np, kernelattn as ka
    >>> q, k, v, w = np.random.default_rng(0).standard_normal((4, 1, 2, 16, 8))
    >>> phi = ka.feature_map("aoglu", depth=3, num_heads=2, head_dim=8, seed=0, dtype="float64")
    >>> out, vjp = ka.linear_attention_vjp(q, k, v, feature_map=phi, causal=True)
    >>> grads = vjp(w)
    >>> [g["W"].shape for g in grads.feature_map.params["shared"]]
    [(2, 8, 8), (2, 8, 8), (2, 8, 8)]
    """
    xp = _validation.check_attention_inputs(q, k, v, key_mask=key_mask, causal=causal, layout=layout)
    q, k, v = _validation.to_bhnd(xp, layout, q, k, v)  # computed as (B, H, N, d); swapped back on the way out
    eps, chunk_size, method = _static_checks(eps, chunk_size, method)
    return_state = _validation.flag("return_state", return_state)
    phi = _differentiable(feature_map)
    phi.check_compatible(q, name="q")
    phi.check_compatible(k, name="k")
    B, H, e = q.shape[0], q.shape[1], v.shape[3]
    initial_state = _check_state(initial_state, q, B=B, H=H, e=e, feature_map=phi)
    dtypes = (q.dtype, k.dtype, v.dtype)
    cdt = compute_dtype(q.dtype, xp=xp)
    qc, kc, vc, init, guard = _isolated_inputs(q, k, v, key_mask, initial_state, causal=causal, xp=xp)
    qc, kc, vc = (cast(a, cdt, xp=xp) for a in (qc, kc, vc))
    if init is not None:
        init = tuple(cast(s, cdt, xp=xp) for s in init)
    out, state, inner = _core.linear_attention_vjp(
        qc, kc, vc, feature_map=phi, causal=bool(causal), key_mask=key_mask, eps=float(eps),
        chunk_size=64 if chunk_size is None else chunk_size, method=method, initial_state=init, xp=xp)
    out_shape = tuple(out.shape) if layout == "BHND" else tuple(out.shape[i] for i in (0, 2, 1, 3))

    def vjp(g_out, g_state=None):
        _validation.namespace_of(q=q, g_out=_validation.array("g_out", g_out))
        if tuple(g_out.shape) != out_shape:
            raise ValueError(f"g_out must have the shape of the output, {out_shape} (layout={layout!r}); "
                             f"got {tuple(g_out.shape)}")
        (g_out,) = _validation.to_bhnd(xp, layout, g_out)
        if g_state is not None:
            g_state = tuple(cast(s, cdt, xp=xp) for s in _validation.check_state(
                g_state, q, B=B, H=H, e=e, m=None if state is None else state[1].shape[2], name="g_state"))
        g_out = cast(g_out, cdt, xp=xp)
        if guard is not None:  # outputs set to NaN were computed from zeros: no gradient flows back
            g_out = xp.where(guard[0][..., None], xp.zeros_like(g_out), g_out)
            if g_state is not None:
                g_state = tuple(xp.where(xp.reshape(guard[1], (*guard[1].shape, *(1,) * (g.ndim - 2))),
                                         xp.zeros_like(g), g) for g in g_state)
        gq, gk, gv, gparams, g0 = inner(g_out, g_state)
        if g0 is not None:
            g0 = LinearAttentionState(*(cast(g, s.dtype, xp=xp) for g, s in zip(g0, initial_state)))
        gq, gk, gv = _validation.to_bhnd(xp, layout, *(cast(g, dt, xp=xp) for g, dt in zip((gq, gk, gv), dtypes)))
        return LinearAttentionGrads(gq, gk, gv, _grad_map(phi, gparams), g0)

    if guard is not None:
        out, state = _isolate.poison(out, state, *guard, xp=xp)
    (out,) = _validation.to_bhnd(xp, layout, cast(out, dtypes[0], xp=xp))
    if return_state:
        return (out, LinearAttentionState(*state)), vjp
    return out, vjp


_WRT = ("feature_map", "q", "k", "v")


def value_and_grad(
    loss: str,
    phi,
    q, k, v=None, /, *,
    causal: bool = False,
    key_mask=None,
    eps: float = 1e-6,
    scale: float | None = None,
    floor: float = 1e-8,
    ortho_weight: float = 0.0,
    chunk_size: int | None = None,
    method: str = "auto",
    wrt=_WRT,
):
    """A distillation loss and its gradients, by hand-derived VJPs (every backend).

    The value is ``losses.<loss>(phi, q, k[, v]) + ortho_weight *
    orthogonality_penalty(phi)``. Its gradients for q, k and v include both
    paths through which they act: the linear attention being trained and the
    softmax attention it imitates (``jax.grad`` of the same function agrees).

    Parameters
    ----------
    loss : {"attention_kl", "output_mse"}
        See :mod:`kernelattn.losses`.
    phi : FeatureMap
    q : array, shape (B, H, N, d)
    k : array, shape (B, H, L, d)
    v : array, shape (B, H, L, e), optional
        Required by ``"output_mse"``; ignored by ``"attention_kl"``.
    causal, key_mask, eps, chunk_size, method
        As in :func:`kernelattn.linear_attention`.
    scale : float, optional
        Softmax scale, default 1 / sqrt(d).
    floor : float, default 1e-8
        See :func:`kernelattn.losses.attention_kl`.
    ortho_weight : float, default 0
        lambda of the orthogonality penalty (added once).
    wrt : sequence of {"feature_map", "q", "k", "v"}
        Which gradients to compute (the others come back None); fitting asks
        for ``("feature_map",)`` only, which skips the teacher's backward.

    Returns
    -------
    value : 0-d array
        In the compute dtype (float32 for half-precision inputs).
    grads : DistillationGrads
        ``(feature_map, q, k, v)``.

    Examples
    --------
    >>> import numpy as np, kernelattn as ka
    >>> q, k = np.random.default_rng(0).standard_normal((2, 1, 2, 8, 4))
    >>> phi = ka.feature_map("ffn", num_heads=2, head_dim=4, seed=0, dtype="float64")
    >>> value, grads = ka.value_and_grad("attention_kl", phi, q, k, wrt=("feature_map",))
    >>> bool(np.isclose(value, ka.losses.attention_kl(phi, q, k)))
    True
    """
    loss = _validation.choice("loss", loss, sorted(LOSSES))
    if isinstance(wrt, str):  # one name
        wrt = (wrt,)
    if not isinstance(wrt, (tuple, list, set, frozenset)):
        raise TypeError(f"wrt must be a sequence of names from {list(_WRT)}; got {_validation.short(wrt)}")
    wrt = tuple(wrt)
    bad = [w for w in wrt if w not in _WRT]
    if bad:
        raise ValueError(f"wrt must name some of {list(_WRT)}; got {bad}")
    ortho_weight = _validation.nonnegative("ortho_weight", ortho_weight)
    eps, chunk_size, method = _static_checks(eps, chunk_size, method)
    floor = _validation.nonnegative("floor", floor)
    scale = None if scale is None else _validation.positive("scale", scale)
    dtypes = {name: getattr(a, "dtype", None) for name, a in (("q", q), ("k", k), ("v", v))}
    xp, phi, qc, kc, vc = _prepare(phi, q, k, v, key_mask=key_mask, causal=causal, eps=eps, scale=scale,
                                   floor=floor, need_v=loss == "output_mse")
    need_inputs = any(w in wrt for w in ("q", "k", "v"))
    value, (gq, gk, gv, gparams) = _core.distill_value_and_grad(
        loss, qc, kc, vc, feature_map=phi, causal=bool(causal), key_mask=key_mask, eps=float(eps), scale=scale,
        floor=float(floor), ortho_weight=float(ortho_weight), chunk_size=64 if chunk_size is None else chunk_size,
        method=method, need_inputs=need_inputs, xp=xp)
    out = {
        "feature_map": _grad_map(phi, gparams),
        "q": None if gq is None else cast(gq, dtypes["q"], xp=xp),
        "k": None if gk is None else cast(gk, dtypes["k"], xp=xp),
        "v": None if gv is None else cast(gv, dtypes["v"], xp=xp),
    }
    return value, DistillationGrads(**{name: (out[name] if name in wrt else None) for name in _WRT})

