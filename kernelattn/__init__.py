"""kernelattn: linear self-attention with trainable feedforward kernels, on any array library.

Yorsh & Kovalenko, "Linear Self-Attention Approximation via Trainable
Feedforward Kernel" (ICANN 2022): softmax attention's exp(q . k) is replaced
by phi(q) . phi(k), with phi a small trainable network per head, so attention
costs O(N) instead of O(N^2). The math is written once against the Python
array API standard and runs on NumPy, array-api-strict, PyTorch, JAX, CuPy and
Dask arrays; importing kernelattn imports none of the frameworks.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .attention import (
    LinearAttentionState,
    linear_attention,
    linear_attention_step,
    linear_attention_weights,
    softmax_attention,
    softmax_attention_weights,
)
from .feature_maps import (
    KINDS,
    FeatureMap,
    FeatureMapSpec,
    feature_map,
    num_params,
    orthogonality_penalty,
)
from .kinds import Param, register_feature_map, unregister_feature_map
from . import kinds
from .grad import DistillationGrads, LinearAttentionGrads, feature_map_vjp, linear_attention_vjp, value_and_grad
from .decoding import LinearAttentionDecoder, decode_step
from .fit import ApproximationError, FitHistory, approximation_error, fit_feature_map
from . import data, losses, optim
from .pretrained import linearize, load_linearized, save_linearized
from ._dispatch import Resolution, register_backend, unregister_backend
from . import _dispatch


def __getattr__(name):
    if name == "KNOWN_BACKENDS":  # live: register_backend adds to it
        return _dispatch.KNOWN_BACKENDS
    raise AttributeError(f"module 'kernelattn' has no attribute {name!r}")
from ._dispatch import resolve as _resolve
from . import _validation
from .feature_maps import _register_pytrees as _reg
from .feature_maps import as_feature_map as _as_feature_map

_reg()  # a no-op unless JAX is already imported


def explain_dispatch(op: str, q, /, *, k=None, v=None, feature_map=None, key_mask=None, initial_state=None,
                     backend: str | None = None, **static) -> Resolution:
    """Which implementation would run ``op`` on these inputs, and why.

    Give what the call would get: ``q`` alone decides library, device and
    dtype; ``k``, ``v``, ``feature_map`` and ``initial_state`` let the
    adapter read the rest as the call does (for torch: whether gradients are
    needed). The answer is the one the call takes: dispatch makes both from
    the same facts.

    Parameters
    ----------
    op : {"linear_attention", "softmax_attention"}
    q : array
    k, v, feature_map, key_mask, initial_state : optional
        As in :func:`linear_attention` (``key_mask`` only says whether there is one).
    backend : str, optional
        As in :func:`linear_attention`.
    **static
        Options of the call (``causal``, ``method``, ``chunk_size`` is not
        one): defaults are those of :func:`linear_attention`
        (``causal=False``, ``method="auto"``, the ``"elu"`` map); ``masked``
        and ``kind`` are read from ``key_mask`` and ``feature_map`` unless
        given; a fact an adapter reads (``grad=True``) may be given too.

    Returns
    -------
    Resolution
        ``.implementation`` names the code (``"torch:custom-op"``,
        ``"agnostic:chunked"``...), ``.backend`` is ``"agnostic"`` or an
        adapter name, ``.reason`` says why.

    Examples
    --------
    >>> import numpy as np, kernelattn as ka
    >>> ka.explain_dispatch("linear_attention", np.zeros((1, 1, 2, 2)), causal=True).implementation
    'numpy:blocked'
    >>> ka.explain_dispatch("linear_attention", np.zeros((1, 1, 2, 2)), backend="agnostic").implementation
    'agnostic:noncausal'
    """
    xp = _validation.namespace_of(q=q)
    if op == "linear_attention":
        phi = None if feature_map is None else _as_feature_map(feature_map)
        static = {"causal": False, "method": "auto", "masked": key_mask is not None,
                  "kind": getattr(phi, "kind", "callable") if phi is not None else "elu", **static}
        static["causal"] = bool(static["causal"])
        arrays = tuple(a for a in (q, k, v, *(initial_state or ())) if a is not None)
        return _resolve(op, xp, device=_validation._device_or_none(q), dtype=q.dtype, backend=backend,
                        arrays=arrays, feature_map=phi if phi is not None else _as_feature_map("elu"), **static)
    if op == "softmax_attention":
        static = {"causal": False, "masked": key_mask is not None,
                  "same_width": v is None or q.shape[-1] == v.shape[-1], **static}
        static["causal"] = bool(static["causal"])
    return _resolve(op, xp, device=_validation._device_or_none(q), dtype=q.dtype, backend=backend, **static)


__all__ = sorted([
    "ApproximationError",
    "DistillationGrads",
    "FeatureMap",
    "FeatureMapSpec",
    "FitHistory",
    "KINDS",
    "KNOWN_BACKENDS",
    "LinearAttentionDecoder",
    "LinearAttentionGrads",
    "LinearAttentionState",
    "Param",
    "Resolution",
    "approximation_error",
    "data",
    "decode_step",
    "explain_dispatch",
    "feature_map",
    "feature_map_vjp",
    "fit_feature_map",
    "linear_attention",
    "linear_attention_step",
    "linear_attention_vjp",
    "linear_attention_weights",
    "linearize",
    "load_linearized",
    "losses",
    "num_params",
    "kinds",
    "optim",
    "orthogonality_penalty",
    "register_backend",
    "register_feature_map",
    "save_linearized",
    "softmax_attention",
    "softmax_attention_weights",
    "unregister_backend",
    "unregister_feature_map",
    "value_and_grad",
])
