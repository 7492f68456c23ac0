"""Test helpers for kernelattn and its downstream users.

The references here are written independently of the array-API core, in
plain float64 NumPy with explicit loops and ``einsum``, so that comparing the
core against them is a real check and not the core against itself.
"""

from __future__ import annotations

import math

import numpy as np

from . import _compat
from ._convert import to_numpy
from .feature_maps import FeatureMap, as_feature_map

__all__ = [
    "assert_close",
    "reference_feature_map",
    "reference_linear_attention",
    "reference_softmax_attention",
    "rel_rms_error",
    "to_numpy",
    "watch_torch_sizes",
]


def _f64(x):
    return np.asarray(to_numpy(x), dtype=np.float64)


def _softplus(x):
    return np.logaddexp(0.0, x)


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _ref_blocks(x, blocks):
    """x (B, H, N, d) float64 through stacked ffn/glu/aoglu blocks, head by head."""
    last = len(blocks) - 1
    for i, blk in enumerate(blocks):
        W = _f64(blk["W"])
        y = np.einsum("bhnd,hdm->bhnm", x, W)
        if "b" in blk:
            y = y + _f64(blk["b"])[None, :, None, :]
        if i == last:
            y = _softplus(y)
        if "G" in blk:
            g = np.einsum("bhnd,hdm->bhnm", x, _f64(blk["G"]))
        elif "A" in blk:
            g = np.einsum("bhnr,hrm->bhnm", np.einsum("bhnd,hdr->bhnr", x, _f64(blk["A"])), _f64(blk["B"]))
        else:
            g = None
        if g is not None:
            if "c" in blk:
                g = g + _f64(blk["c"])[None, :, None, :]
            y = y * _sigmoid(g)
        x = y
    return x


def reference_feature_map(phi, x, *, role: str = "query") -> np.ndarray:
    """phi(x) in float64 NumPy, from the map's parameters (x: (B, H, N, d))."""
    x = _f64(x)
    phi = as_feature_map(phi)
    if not isinstance(phi, FeatureMap):
        return _f64(phi.apply(x, role=role, xp=_compat.numpy_namespace()))
    kind = phi.kind
    if kind in ("ffn", "glu", "aoglu"):
        return _ref_blocks(x, phi.blocks(role))
    if kind == "hedgehog":
        blk = phi.blocks(role)[0]
        y = np.einsum("bhnd,hdm->bhnm", x, _f64(blk["W"]))
        if "b" in blk:
            y = y + _f64(blk["b"])[None, :, None, :]

        def sm(t):
            t = np.exp(t - t.max(-1, keepdims=True))
            return t / t.sum(-1, keepdims=True)

        return np.concatenate([sm(y), sm(-y)], axis=-1)
    if kind == "elu":
        return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))
    if kind == "relu":
        return np.maximum(x, 0.0)
    if kind == "favor":
        omega = _f64(phi.buffers["omega"])
        d, m = x.shape[-1], omega.shape[-1]
        xs = x / d**0.25
        logits = np.einsum("bhnd,hdm->bhnm", xs, omega) - 0.5 * (xs**2).sum(-1, keepdims=True)
        return np.exp(logits) / math.sqrt(m)
    raise ValueError(f"no reference for kind {kind!r}")


def reference_linear_attention(q, k, v, *, feature_map="elu", causal=False, key_mask=None, eps=1e-6,
                               initial_state=None, return_state=False):
    """Linear attention in float64 by its quadratic definition, with explicit masks."""
    fq = reference_feature_map(feature_map, q, role="query")
    fk = reference_feature_map(feature_map, k, role="key")
    v = _f64(v)
    B, H, N, _ = fq.shape
    L = fk.shape[2]
    valid = np.ones((B, 1, N, L), dtype=bool)
    if key_mask is not None:
        valid = valid & to_numpy(key_mask).astype(bool)[:, None, None, :]
    if causal:
        valid = valid & np.tril(np.ones((N, L), dtype=bool))[None, None]
    A = np.einsum("bhnm,bhlm->bhnl", fq, fk) * valid
    num = np.einsum("bhnl,bhle->bhne", A, v)
    den = A.sum(-1, keepdims=True)
    if initial_state is not None:
        S0, z0 = _f64(initial_state[0]), _f64(initial_state[1])
        num = num + np.einsum("bhnm,bhme->bhne", fq, S0)
        den = den + np.einsum("bhnm,bhm->bhn", fq, z0)[..., None]
    out = num / (den + eps)
    if not return_state:
        return out
    keep = np.ones((B, L)) if key_mask is None else to_numpy(key_mask).astype(np.float64)
    fkm = fk * keep[:, None, :, None]
    S = np.einsum("bhlm,bhle->bhme", fkm, v)
    z = fkm.sum(2)
    if initial_state is not None:
        S, z = S + S0, z + z0
    return out, (S, z)


def reference_softmax_attention(q, k, v, *, causal=False, key_mask=None, scale=None):
    """softmax(Q K^T * scale) V in float64, looping over batch and head."""
    q, k, v = _f64(q), _f64(k), _f64(v)
    B, H, N, d = q.shape
    L = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    mask = None if key_mask is None else to_numpy(key_mask).astype(bool)
    out = np.zeros((B, H, N, v.shape[-1]))
    for b in range(B):
        for h in range(H):
            s = q[b, h] @ k[b, h].T * scale
            ok = np.ones((N, L), dtype=bool)
            if causal:
                ok &= np.tril(np.ones((N, L), dtype=bool))
            if mask is not None:
                ok &= mask[b][None, :]
            for i in range(N):
                if ok[i].any():
                    w = np.exp(s[i, ok[i]] - s[i, ok[i]].max())
                    out[b, h, i] = (w / w.sum()) @ v[b, h][ok[i]]
    return out


def rel_rms_error(actual, desired) -> float:
    """``rms(actual - desired) / rms(desired)`` in float64 (0 when both are zero)."""
    a, d = _f64(actual), _f64(desired)
    num = math.sqrt(float(np.mean((a - d) ** 2))) if a.size else 0.0
    den = math.sqrt(float(np.mean(d**2))) if d.size else 0.0
    return num / den if den > 0 else num


def assert_close(actual, desired, *, rtol=None, atol=0.0, like=None, check_dtype=True):
    """Assert ``actual`` matches ``desired`` elementwise, after checking its type.

    Parameters
    ----------
    actual : array
        The result under test.
    desired : array-like
        The expected values (often a float64 NumPy reference).
    rtol : float, optional
        Default by ``actual``'s dtype: 1e-10 float64, 2e-4 float32, 2e-2 half.
    atol : float
    like : array, optional
        If given, ``actual`` must have its library, device, shape and (with
        ``check_dtype``) dtype.
    """
    __tracebackhide__ = True
    if like is not None:
        lib_a = _compat.library_name(_compat.array_namespace(actual))
        lib_l = _compat.library_name(_compat.array_namespace(like))
        assert lib_a == lib_l, f"result is a {lib_a} array, expected {lib_l}"
        assert str(_compat.device(actual)) == str(_compat.device(like)), (
            f"result on {_compat.device(actual)}, expected {_compat.device(like)}")
        if check_dtype:
            assert actual.dtype == like.dtype, f"result dtype {actual.dtype}, expected {like.dtype}"
    a = _f64(actual)
    d = np.broadcast_to(_f64(desired), a.shape) if np.ndim(desired) == 0 else _f64(desired)
    assert a.shape == d.shape, f"shape {a.shape}, expected {d.shape}"
    if rtol is None:
        size = getattr(getattr(actual, "dtype", None), "itemsize", None)
        name = str(getattr(actual, "dtype", "float64"))
        rtol = 1e-10 if "64" in name else (2e-2 if ("16" in name) else 2e-4)
        del size
    np.testing.assert_allclose(a, d, rtol=rtol, atol=atol)


def watch_torch_sizes():
    """A context manager that records the largest torch tensor any aten op returns while it is active.

    ``with watch_torch_sizes() as w: ...`` then ``w.largest`` (elements). How
    the tests and the benchmark prove that no (N, m, e) tensor is ever formed.
    Needs torch (imported here, not by :mod:`kernelattn.testing` itself).
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Watch(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    return _Watch()
