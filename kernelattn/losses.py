"""Losses for training feature maps: distillation to softmax attention and the orthogonality penalty.

Each loss is a 0-d array in the inputs' library, built from plain array
operations, so torch autograd and ``jax.grad`` differentiate it directly.
:func:`kernelattn.value_and_grad` computes the same values with hand-derived
gradients, on every backend.

* :func:`attention_kl` - Hedgehog's attention distillation (Zhang et al. 2024):
  mean over query rows of KL(softmax weights || linear attention weights).
  It differs from their cross-entropy by the softmax entropy, a constant in
  phi, so the gradient in phi is the same.
* :func:`output_mse` - relative squared error of the attention output against
  softmax attention, ``sum((o - o*)^2) / sum(o*^2)``.
* :func:`orthogonality_penalty` - the paper's regulariser on main weights.
"""

from __future__ import annotations

from . import _validation
from ._agnostic import grad as _core
from ._agnostic._utils import cast, compute_dtype
from .attention import _static_checks
from .feature_maps import FeatureMap, as_feature_map, orthogonality_penalty

__all__ = ["LOSSES", "attention_kl", "orthogonality_penalty", "output_mse"]

#: Distillation losses by name (as :func:`kernelattn.fit_feature_map` and
#: :func:`kernelattn.value_and_grad` accept them).
LOSSES = {
    "attention_kl": "mean over rows of KL(softmax attention weights || linear attention weights)",
    "output_mse": "sum((linear out - softmax out)^2) / sum(softmax out^2)",
}


def _prepare(phi, q, k, v=None, *, key_mask=None, causal=False, eps=1e-6, scale=None, floor=1e-8,
             need_v=False):
    """Validate a distillation call; returns (xp, phi, q, k, v) with arrays in the compute dtype."""
    if need_v and v is None:
        raise ValueError("this loss compares attention outputs, so it needs the values v (B, H, L, e); got None")
    xp = _validation.check_attention_inputs(q, k, k if v is None else v, key_mask=key_mask, causal=causal)
    _validation.nonnegative("eps", eps)
    _validation.nonnegative("floor", floor)
    if scale is not None:
        _validation.positive("scale", scale)
    phi = as_feature_map(phi)
    if not isinstance(phi, FeatureMap):
        raise TypeError(f"distillation losses need a FeatureMap (from ka.feature_map), not a plain callable "
                        f"(its parameters are what gets trained); got {_validation.short(phi)}")
    phi.check_compatible(q, name="q")
    phi.check_compatible(k, name="k")
    cdt = compute_dtype(q.dtype, xp=xp)
    q, k = cast(q, cdt, xp=xp), cast(k, cdt, xp=xp)
    if v is not None:
        v = cast(v, cdt, xp=xp)
    return xp, phi, q, k, v


def attention_kl(phi, q, k, /, *, causal: bool = False, key_mask=None, eps: float = 1e-6,
                 scale: float | None = None, floor: float = 1e-8):
    r"""Mean KL divergence from softmax attention weights to linear attention weights.

    .. math::

        \frac{1}{B H N} \sum_{b,h,i} \sum_j p_{ij} \left(\log p_{ij} - \log(a_{ij} + \delta)\right)

    with :math:`p = \mathrm{softmax}(Q K^\top \cdot \mathrm{scale})` and
    :math:`a_{ij} = \phi(q_i)\cdot\phi(k_j) / (\sum_j \phi(q_i)\cdot\phi(k_j) + \varepsilon)`.

    Parameters
    ----------
    phi : FeatureMap
    q : array, shape (B, H, N, d)
    k : array, shape (B, H, L, d)
    causal : bool, default False
    key_mask : bool array, shape (B, L), optional
        True for a real key; masked places count in neither distribution.
    eps : float, default 1e-6
        As in :func:`kernelattn.linear_attention`.
    scale : float, optional
        Softmax scale, default 1 / sqrt(d).
    floor : float, default 1e-8
        delta: linear weights are floored before the log, so a map that gives
        a key exactly zero weight (relu) gets a large finite KL, not inf.

    Returns
    -------
    0-d array, in the compute dtype (float32 for half-precision inputs)

    Notes
    -----
    Costs O(N L) memory: it is meant for distillation on samples, not long
    sequences.

    Examples
    --------
    >>> import numpy as np, kernelattn as ka
    >>> q, k = np.random.default_rng(0).standard_normal((2, 1, 2, 8, 4))
    >>> phi = ka.feature_map("hedgehog", num_heads=2, head_dim=4, seed=0, dtype="float64")
    >>> float(ka.losses.attention_kl(phi, q, k)) > 0
    True
    """
    xp, phi, q, k, _ = _prepare(phi, q, k, key_mask=key_mask, causal=causal, eps=eps, scale=scale, floor=floor)
    eps, floor = float(eps), float(floor)  # NumPy scalars and 0-d arrays pass the checks; the core takes floats
    scale = None if scale is None else float(scale)
    return _core.attention_kl(q, k, feature_map=phi, causal=causal, key_mask=key_mask, eps=eps, scale=scale,
                              floor=floor, xp=xp)


def output_mse(phi, q, k, v, /, *, causal: bool = False, key_mask=None, eps: float = 1e-6,
               scale: float | None = None, chunk_size: int | None = None, method: str = "auto"):
    """Relative squared error of linear attention's output against softmax attention's.

    ``sum((o - o*)^2) / sum(o*^2)`` over all elements, with ``o`` from
    :func:`kernelattn.linear_attention` and ``o*`` from
    :func:`kernelattn.softmax_attention` (its square root is the relative RMS
    error that :func:`kernelattn.approximation_error` reports).

    Parameters
    ----------
    phi : FeatureMap
    q : array, shape (B, H, N, d)
    k : array, shape (B, H, L, d)
    v : array, shape (B, H, L, e)
    causal, key_mask, eps, chunk_size, method
        As in :func:`kernelattn.linear_attention`.
    scale : float, optional
        Softmax scale, default 1 / sqrt(d).

    Returns
    -------
    0-d array, in the compute dtype
    """
    xp, phi, q, k, v = _prepare(phi, q, k, v, key_mask=key_mask, causal=causal, eps=eps, scale=scale, need_v=True)
    eps, chunk_size, method = _static_checks(eps, chunk_size, method)
    scale = None if scale is None else float(scale)
    return _core.output_mse(q, k, v, feature_map=phi, causal=causal, key_mask=key_mask, eps=eps, scale=scale,
                            chunk_size=64 if chunk_size is None else chunk_size, method=method, xp=xp)
