"""Public attention functions: linear (kernelized) attention, its recurrent step, and softmax.

All take (B, H, N, d) queries and (B, H, L, d) keys with (B, H, L, e) values
(or, with ``layout="BNHD"``, (B, N, H, d), (B, L, H, d) and (B, L, H, e), as
JAX and Flax code usually holds them), in any array library, and return the
caller's array type, device, dtype and layout.
Validation happens here, once; the work is done by a backend fast path or the
array-API core (see :mod:`kernelattn._dispatch`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from . import _compat, _dispatch, _validation
from ._agnostic import attention as _core
from ._agnostic import isolate as _isolate
from ._agnostic._utils import cast, compute_dtype
from .feature_maps import _register_pytrees, as_feature_map

__all__ = [
    "LinearAttentionState",
    "linear_attention",
    "linear_attention_step",
    "linear_attention_weights",
    "softmax_attention",
    "softmax_attention_weights",
]

METHODS = _core.STRATEGIES
LAYOUTS = _validation.LAYOUTS


class LinearAttentionState(NamedTuple):
    """The running sums of causal linear attention (a pytree in JAX).

    Attributes
    ----------
    S : array, shape (B, H, m, e)
        Sum over seen keys of phi(k_j) v_j^T.
    z : array, shape (B, H, m)
        Sum over seen keys of phi(k_j).

    Both are float32 when the inputs are float16/bfloat16.
    """

    S: object
    z: object


def _check_state(state, q, *, B, H, e, feature_map=None):
    # with feature_map given, the state's m must be the map's feature size (when known without running it)
    return _validation.check_state(state, q, B=B, H=H, e=e, m=_validation.feature_size(feature_map, q))


def _isolated_inputs(q, k, v, key_mask, initial_state, *, causal, xp, visible=None):
    """Inputs every path may compute with, and what :func:`_isolate.poison` needs afterwards.

    Padded keys become zeros; when the inputs may hold NaN or Inf (always
    under tracing or for lazy arrays, where values cannot be looked at), the
    non-finite tokens become zeros and ``guard`` says which outputs their
    definition reaches (see :mod:`kernelattn._agnostic.isolate`). ``visible``:
    already known that the values may be looked at (the call cache's inputs).
    """
    k, v = _isolate.drop_padding(k, v, key_mask, xp=xp)
    state = () if initial_state is None else tuple(initial_state)
    if visible or all(_compat.values_visible(a) for a in (q, k, v, *state)):
        try:
            clean = _all_finite((q, k, v, *state), xp)
        except Exception:  # concrete arrays inside a jit trace still give a tracer
            clean = False
        if clean:
            return q, k, v, initial_state, None
    q, k, v, initial_state, bad_rows, bad_state = _isolate.isolate(q, k, v, initial_state, causal=causal, xp=xp)
    return q, k, v, initial_state, (bad_rows, bad_state)


def _all_finite(arrays, xp) -> bool:
    """Whether every entry is finite, from one sum per array.

    A finite float sum proves every term finite (NaN and Inf propagate through
    addition); an overflowing sum only sends the call to the isolating path,
    which is right for any input. Python floats: one sync, no extra kernels.
    """
    total = 0.0
    for a in arrays:
        if getattr(a, "requires_grad", False):  # a value check, not part of the graph (torch warns on float())
            a = a.detach()
        if _narrow(xp, a.dtype):  # a float16 sum overflows early
            total += float(xp.sum(a, dtype=xp.float32))
        else:
            total += float(a.sum() if hasattr(a, "sum") else xp.sum(a))
    return math.isfinite(total)


_NARROW: dict = {}


def _narrow(xp, dtype) -> bool:
    """Whether ``dtype`` has fewer than 32 bits (remembered per dtype: this runs on every call)."""
    key = (type(dtype), dtype)  # the type first: array-api-strict warns when its dtypes meet NumPy's in ==
    try:
        return _NARROW[key]
    except KeyError:
        narrow = _NARROW[key] = xp.finfo(dtype).bits < 32
        return narrow
    except TypeError:  # an unhashable dtype
        return xp.finfo(dtype).bits < 32


# -- the call cache ---------------------------------------------------------------
# A second call like an earlier one (same array types, shapes, dtypes, devices, gradient flags, the same
# feature map object and options) skips validation, feature-map normalisation and dispatch: what they
# found depends on nothing else. An adapter opts in with ``call_key`` (backends/_base.py), which returns
# None where values cannot be looked at (tracing) or the key would not capture what dispatch reads.

class _Checked(NamedTuple):
    arg: object        # the feature_map argument (kept alive, so its id is not reused)
    phi: object
    xp: object
    impl: object
    causal: bool
    eps: float
    chunk: int
    method: str
    return_state: bool
    layout: str


_CALLS: dict = {}
_CALL_KEYS: dict = {}  # array type -> its adapter's call_key
_MAX_CALLS = 256


def _forget_calls():
    _CALLS.clear()


_dispatch.on_clear(_forget_calls)


def _no_key(*args):
    return None


def _scalar(x):
    return (type(x), x)  # 1 and True hash alike; the validation of one says nothing of the other


def _call_key(q, k, v, feature_map, causal, key_mask, eps, chunk_size, method, initial_state, return_state,
              layout, backend, xp):
    keyer = _CALL_KEYS.get(type(q))
    if keyer is None or xp is not None or hasattr(feature_map, "as_feature_map"):
        return None  # framework modules build their map per call from their parameters: never cached
    arrays = keyer(q, k, v, key_mask, initial_state, feature_map)
    if arrays is None:
        return None
    fm = _scalar(feature_map) if isinstance(feature_map, str) else id(feature_map)
    return (arrays, fm, _scalar(causal), _scalar(eps), _scalar(chunk_size), _scalar(method),
            _scalar(return_state), _scalar(layout), _scalar(backend), _dispatch._fast_paths_disabled())


def _run_checked(c: _Checked, q, k, v, key_mask, initial_state):
    """The end of :func:`linear_attention` for a call the cache has seen."""
    xp = c.xp
    q, k, v = _validation.to_bhnd(xp, c.layout, q, k, v)
    guard = None
    if not getattr(getattr(c.impl.function, "__self__", None), "isolates_inputs", False):
        q, k, v, initial_state, guard = _isolated_inputs(q, k, v, key_mask, initial_state, causal=c.causal, xp=xp,
                                                         visible=True)
    out, state = c.impl(q, k, v, feature_map=c.phi, causal=c.causal, key_mask=key_mask, eps=c.eps,
                        chunk_size=c.chunk, method=c.method, initial_state=initial_state,
                        return_state=c.return_state, xp=xp)
    if guard is not None:
        out, state = _isolate.poison(out, state, *guard, xp=xp)
    (out,) = _validation.to_bhnd(xp, c.layout, out)
    if c.return_state:
        return out, LinearAttentionState(*state)
    return out


def _static_checks(eps, chunk_size, method):
    """Check the static options; returns (eps, chunk_size, method) as Python float, int (or None), str."""
    eps = _validation.nonnegative("eps", eps)
    chunk_size = _validation.optional_integer("chunk_size", chunk_size)
    return eps, chunk_size, _validation.choice("method", method, METHODS)


def linear_attention(
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
    backend: str | None = None,
    xp=None,
):
    r"""Kernelized (linear) attention: O((N + L) m e) instead of O(N L d).

    .. math::

        \mathrm{out}_i = \frac{\phi(q_i)^\top S}{\phi(q_i)^\top z + \varepsilon},\quad
        S = \sum_j \phi(k_j) v_j^\top,\quad z = \sum_j \phi(k_j)

    with the sums over every valid key, or over keys j <= i when ``causal``.

    Parameters
    ----------
    q : array, shape (B, H, N, d)
        Queries (real floating dtype); (B, N, H, d) with ``layout="BNHD"``.
    k : array, shape (B, H, L, d)
        Keys; L may differ from N (cross-attention) unless ``causal``;
        (B, L, H, d) with ``layout="BNHD"``.
    v : array, shape (B, H, L, e)
        Values; (B, L, H, e) with ``layout="BNHD"``.
    feature_map : FeatureMap, str, callable or (callable, callable), default "elu"
        phi. A :class:`~kernelattn.FeatureMap` from :func:`~kernelattn.feature_map`,
        the name of a shape-free map (``"elu"``, ``"relu"``), a callable
        mapping (B, H, N, d) to (B, H, N, m), or a (query map, key map) pair.
    causal : bool, default False
        Attend only to keys j <= i (needs N = L).
    key_mask : bool array, shape (B, L), optional
        True for a real key, False for padding. Applied after phi: padded keys
        never enter S or z. A query with no valid key gets zeros.
    eps : float, default 1e-6
        Added to the denominator.
    chunk_size : int, optional
        Chunk length C of the causal chunked form (default 64).
    method : {"auto", "chunked", "naive", "recurrent"}
        ``"auto"`` (the default) lets dispatch pick the implementation: the
        fast path of the arrays' library where it has one (see
        :func:`~kernelattn.explain_dispatch`), else the core's chunked form.
        Causal strategies: ``"chunked"`` (O(N) memory), ``"naive"`` (the
        masked O(N^2) product, the reference) or ``"recurrent"`` (token by
        token); the last two always run on the core. Non-causal attention uses
        the linear form, or the quadratic one for ``"naive"``. All agree to rounding.
    initial_state : LinearAttentionState, optional
        Running sums (S, z) of earlier keys to continue from (causal or not).
    return_state : bool, default False
        Also return the state after the last key.
    layout : {"BHND", "BNHD"}, default "BHND"
        Axis order of q, k, v and the output: heads before tokens
        (B, H, N, d), or tokens before heads (B, N, H, d), the layout of
        ``q_proj(x).reshape(B, N, H, d)`` without a transpose. The two
        give the same numbers; ``key_mask`` stays (B, L) and the state
        (B, H, m, e) in both.
    backend : str, optional
        ``"agnostic"`` forces the array-API core; a library name (``"torch"``,
        ``"jax"``, ...) asks for its adapter. Default: chosen automatically.
    xp : namespace, optional
        The arrays' namespace, if already known.

    Returns
    -------
    out : array, shape (B, H, N, e)
        Same library, device and dtype as ``q``; (B, N, H, e) with
        ``layout="BNHD"``.
    state : LinearAttentionState
        Only if ``return_state``.

    Examples
    --------
    >>> import numpy as np, kernelattn as ka
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 4, 16, 8), dtype=np.float32)
    >>> phi = ka.feature_map("glu", num_heads=4, head_dim=8, seed=0)
    >>> out = ka.linear_attention(q, k, v, feature_map=phi, causal=True)
    >>> out.shape, out.dtype
    ((2, 4, 16, 8), dtype('float32'))
    >>> naive = ka.linear_attention(q, k, v, feature_map=phi, causal=True, method="naive")
    >>> bool(np.allclose(out, naive, atol=1e-5))
    True

    Tokens before heads, as JAX and Flax code holds them:

    >>> qt, kt, vt = (np.swapaxes(a, 1, 2) for a in (q, k, v))       # (2, 16, 4, 8)
    >>> out_t = ka.linear_attention(qt, kt, vt, feature_map=phi, causal=True, layout="BNHD")
    >>> bool(np.allclose(np.swapaxes(out_t, 1, 2), out, atol=1e-6))
    True
    """
    try:
        key = _call_key(q, k, v, feature_map, causal, key_mask, eps, chunk_size, method, initial_state,
                        return_state, layout, backend, xp)
        seen = None if key is None else _CALLS.get(key)
    except TypeError:  # an unhashable option: the full checks say what is wrong with it, or run it
        key = seen = None
    if seen is not None and (seen.arg is feature_map or isinstance(feature_map, str)):
        return _run_checked(seen, q, k, v, key_mask, initial_state)
    checked_xp = _validation.check_attention_inputs(q, k, v, key_mask=key_mask, causal=causal, layout=layout)
    if xp is not None and not hasattr(xp, "asarray"):
        raise TypeError(f"xp must be an array namespace (or None); got {_validation.short(xp)}")
    xp = checked_xp if xp is None else xp
    q, k, v = _validation.to_bhnd(xp, layout, q, k, v)  # computed as (B, H, N, d); out swapped back below
    eps, chunk_size, method = _static_checks(eps, chunk_size, method)
    return_state = _validation.flag("return_state", return_state)
    phi = as_feature_map(feature_map)
    phi.check_compatible(q, name="q")
    phi.check_compatible(k, name="k")
    B, H = q.shape[0], q.shape[1]
    initial_state = _check_state(initial_state, q, B=B, H=H, e=v.shape[3], feature_map=phi)
    if _compat.is_jax_namespace(xp):
        _register_pytrees()
    impl = _dispatch.resolve(
        "linear_attention", xp, device=_validation._device_or_none(q), dtype=q.dtype, backend=backend,
        causal=bool(causal), method=method, masked=key_mask is not None, kind=getattr(phi, "kind", "callable"),
        arrays=(q, k, v, *(initial_state or ())), feature_map=phi,
    )
    checked = _Checked(feature_map, phi, xp, impl, bool(causal), float(eps), 64 if chunk_size is None else chunk_size,
                       method, bool(return_state), layout)
    if key is not None:
        if len(_CALLS) >= _MAX_CALLS:
            _CALLS.clear()
        _CALLS[key] = checked
    elif type(q) not in _CALL_KEYS:
        adapter = _dispatch.adapter_for(_compat.library_name(xp))
        _CALL_KEYS[type(q)] = getattr(adapter, "call_key", None) or _no_key
    guard = None
    if not getattr(getattr(impl.function, "__self__", None), "isolates_inputs", False):
        q, k, v, initial_state, guard = _isolated_inputs(q, k, v, key_mask, initial_state, causal=causal, xp=xp)
    out, state = impl(
        q, k, v, feature_map=phi, causal=checked.causal, key_mask=key_mask, eps=checked.eps,
        chunk_size=checked.chunk, method=method, initial_state=initial_state, return_state=checked.return_state,
        xp=xp,
    )
    if guard is not None:
        out, state = _isolate.poison(out, state, *guard, xp=xp)
    (out,) = _validation.to_bhnd(xp, layout, out)  # the same swap takes it back
    if return_state:
        return out, LinearAttentionState(*state)
    return out


def linear_attention_step(
    q, k, v, /, *,
    feature_map="elu",
    state=None,
    key_mask=None,
    eps: float = 1e-6,
    layout: str = "BHND",
    backend: str | None = None,
    xp=None,
):
    """Decode: attend new tokens causally to everything seen so far, and update the state.

    Parameters
    ----------
    q, k : array, shape (B, H, d) or (B, H, T, d)
        One new token (3-D) or T new tokens (4-D); (B, T, H, d) with
        ``layout="BNHD"`` (one token stays (B, H, d) in both layouts).
    v : array, shape (B, H, e) or (B, H, T, e)
        (B, T, H, e) with ``layout="BNHD"``.
    feature_map : as in :func:`linear_attention`
    state : LinearAttentionState, optional
        The state after the earlier tokens (for instance from
        ``linear_attention(..., causal=True, return_state=True)`` over a prompt);
        None starts empty.
    key_mask : bool array, shape (B,) or (B, T), optional
        False marks new tokens that are padding (they do not enter the state).
    eps : float, default 1e-6
    layout : {"BHND", "BNHD"}, default "BHND"
        Axis order of 4-D inputs and output (see :func:`linear_attention`).
    backend, xp : as in :func:`linear_attention`

    Returns
    -------
    out : array, shape like ``v``
    state : LinearAttentionState
        (B, H, m, e) and (B, H, m) in both layouts.

    Examples
    --------
    >>> import numpy as np, kernelattn as ka
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 2, 6, 4))
    >>> full = ka.linear_attention(q, k, v, causal=True)
    >>> state, outs = None, []
    >>> for t in range(6):
    ...     o, state = ka.linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state=state)
    ...     outs.append(o)
    >>> bool(np.allclose(np.stack(outs, axis=2), full))
    True
    """
    layout = _validation.choice("layout", layout, LAYOUTS)
    single = getattr(q, "ndim", None) == 3
    if single:
        for name, a in (("k", k), ("v", v)):
            if getattr(a, "ndim", None) != 3:
                raise ValueError(f"q is one token (B, H, d), so {name} must be (B, H, ·) too; "
                                 f"got shape {tuple(getattr(a, 'shape', ()))}")
        q, k, v = q[:, :, None, :], k[:, :, None, :], v[:, :, None, :]
        if key_mask is not None and getattr(key_mask, "ndim", None) == 1:
            key_mask = key_mask[:, None]
        layout = "BHND"  # one token has no token axis to order
    out, new_state = linear_attention(
        q, k, v, feature_map=feature_map, causal=True, key_mask=key_mask, eps=eps,
        initial_state=state, return_state=True, layout=layout, backend=backend, xp=xp,
    )
    if single:
        out = out[:, :, 0, :]
    return out, new_state


def softmax_attention(
    q, k, v, /, *,
    causal: bool = False,
    key_mask=None,
    scale: float | None = None,
    layout: str = "BHND",
    backend: str | None = None,
    xp=None,
):
    """Exact softmax attention, ``softmax(Q K^T * scale) V``: the O(N L) reference.

    Parameters
    ----------
    q : array, shape (B, H, N, d)
    k : array, shape (B, H, L, d)
    v : array, shape (B, H, L, e)
        (B, N, H, d), (B, L, H, d), (B, L, H, e) with ``layout="BNHD"``.
    causal : bool, default False
        Mask keys j > i (needs N = L).
    key_mask : bool array, shape (B, L), optional
        True for a real key. A query with no valid key gets zeros.
    scale : float, optional
        Default 1 / sqrt(d).
    layout : {"BHND", "BNHD"}, default "BHND"
        Axis order of q, k, v and the output (see :func:`linear_attention`).
    backend, xp : as in :func:`linear_attention`

    Returns
    -------
    array, shape (B, H, N, e)
        Same library, device and dtype as ``q``; (B, N, H, e) with
        ``layout="BNHD"``.

    Examples
    --------
    >>> import numpy as np, kernelattn as ka
    >>> q = k = v = np.eye(4)[None, None]
    >>> ka.softmax_attention(q, k, v, causal=True)[0, 0, 0]
    array([1., 0., 0., 0.])
    """
    xp = _validation.check_attention_inputs(q, k, v, key_mask=key_mask, causal=causal, layout=layout)
    q, k, v = _validation.to_bhnd(xp, layout, q, k, v)
    if scale is not None:
        scale = _validation.positive("scale", scale)
    impl = _dispatch.resolve("softmax_attention", xp, device=_validation._device_or_none(q), dtype=q.dtype,
                             backend=backend, causal=bool(causal), masked=key_mask is not None,
                             same_width=q.shape[-1] == v.shape[-1])
    q, k, v, _, guard = _isolated_inputs(q, k, v, key_mask, None, causal=causal, xp=xp)
    out = impl(q, k, v, causal=bool(causal), key_mask=key_mask, scale=scale, xp=xp)
    if guard is not None:
        out, _ = _isolate.poison(out, None, *guard, xp=xp)
    (out,) = _validation.to_bhnd(xp, layout, out)
    return out


def softmax_attention_weights(q, k, /, *, causal: bool = False, key_mask=None, scale: float | None = None):
    """The (B, H, N, L) softmax attention matrix (rows sum to 1, or 0 where nothing is valid).

    Parameters
    ----------
    q : array, shape (B, H, N, d)
    k : array, shape (B, H, L, d)
        Heads before tokens only (no ``layout``): swap axes 1 and 2 of
        (B, N, H, d) arrays first.
    causal, key_mask, scale : as in :func:`softmax_attention`

    Returns
    -------
    array, shape (B, H, N, L), in the dtype of ``q``
    """
    xp = _validation.check_attention_inputs(q, k, k, key_mask=key_mask, causal=causal)
    scale = None if scale is None else _validation.positive("scale", scale)
    cdt = compute_dtype(q.dtype, xp=xp)
    w = _core.softmax_weights(cast(q, cdt, xp=xp), cast(k, cdt, xp=xp), causal=causal,
                              key_mask=key_mask, scale=scale, xp=xp)
    return cast(w, q.dtype, xp=xp)


def linear_attention_weights(q, k, /, *, feature_map="elu", causal: bool = False, key_mask=None,
                             eps: float = 1e-6):
    """The (B, H, N, L) attention matrix linear attention implies (O(N L); for inspection).

    Row i is ``phi(q_i) . phi(k_j) / (sum_j phi(q_i) . phi(k_j) + eps)``.

    Parameters
    ----------
    q : array, shape (B, H, N, d)
    k : array, shape (B, H, L, d)
        Heads before tokens only (no ``layout``): swap axes 1 and 2 of
        (B, N, H, d) arrays first.
    feature_map, causal, key_mask, eps : as in :func:`linear_attention`

    Returns
    -------
    array, shape (B, H, N, L), in the dtype of ``q``
    """
    xp = _validation.check_attention_inputs(q, k, k, key_mask=key_mask, causal=causal)
    eps = _validation.nonnegative("eps", eps)
    phi = as_feature_map(feature_map)
    phi.check_compatible(q, name="q")
    cdt = compute_dtype(q.dtype, xp=xp)
    fq = phi.apply(cast(q, cdt, xp=xp), role="query", xp=xp)
    fk = phi.apply(cast(k, cdt, xp=xp), role="key", xp=xp)
    w = _core.attention_weights(fq, fk, causal=causal, key_mask=key_mask, eps=eps, xp=xp)
    return cast(w, q.dtype, xp=xp)
