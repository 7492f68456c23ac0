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
from ._dispatch import KNOWN_BACKENDS, Resolution
from ._dispatch import resolve as _resolve
from . import _validation
from .feature_maps import _register_pytrees as _reg

_reg()  # a no-op unless JAX is already imported


def explain_dispatch(op: str, q, /, *, backend: str | None = None, **static) -> Resolution:
    """Which implementation would run ``op`` on arrays like ``q``, and why.

    Parameters
    ----------
    op : {"linear_attention", "softmax_attention"}
    q : array
        An input of the call (its library, device and dtype decide).
    backend : str, optional
        As in :func:`linear_attention`.
    **static
        The call's static options as :func:`linear_attention` passes them
        (``causal``, ``method``, ``masked``, ``kind``).

    Returns
    -------
    Resolution
        ``.backend`` is ``"agnostic"`` or an adapter name; ``.reason`` says why.

    Examples
    --------
    >>> import numpy as np, kernelattn as ka
    >>> ka.explain_dispatch("linear_attention", np.zeros((1, 1, 2, 2)), backend="agnostic").backend
    'agnostic'
    """
    xp = _validation.namespace_of(q=q)
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
    "losses",
    "num_params",
    "kinds",
    "optim",
    "orthogonality_penalty",
    "register_feature_map",
    "softmax_attention",
    "softmax_attention_weights",
    "unregister_feature_map",
    "value_and_grad",
])
