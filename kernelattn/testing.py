"""Test helpers for kernelattn and its downstream users.

The references here are written independently of the array-API core: small,
obviously correct float64 definitions (the explicit O(N L) weight matrix, masks
applied by selection, the causal triangle, the documented eps rule), so that
comparing any path against them is a real check and not a path against itself.
:func:`reference_linear_attention_vjp` differentiates the same definition with
torch autograd in float64, for gradients of q, k, v, every phi parameter and
the initial state.
"""

from __future__ import annotations

import math

import numpy as np

from . import _compat
from ._convert import to_numpy
from .feature_maps import FeatureMap, as_feature_map

__all__ = [
    "assert_close",
    "edge_key_mask",
    "reference_feature_map",
    "reference_linear_attention",
    "reference_linear_attention_vjp",
    "reference_softmax_attention",
    "rel_rms_error",
    "to_numpy",
    "watch_torch_sizes",
]


def _f64(x):
    return np.asarray(to_numpy(x), dtype=np.float64)


def _ns(xp):
    return _compat.numpy_namespace() if xp is None else xp


def _ref_phi(phi, x, role, leaf, xp=None):
    """phi(x) by its kind's float64 definition (kernelattn/kinds.py; x float64, (B, H, N, d)).

    The built-in kinds' definitions are written apart from the forwards the
    library runs; ``leaf`` brings each parameter to float64 in ``xp``.
    """
    xp = _ns(xp)
    if not isinstance(phi, FeatureMap):
        return phi.apply(x, role=role, xp=xp)
    blocks = [{name: leaf(a) for name, a in blk.items() if a is not None} for blk in phi.blocks(role)]
    buffers = {name: leaf(a) for name, a in phi.buffers.items()}
    return phi.definition.define(x, blocks, buffers, xp=xp)


def reference_feature_map(phi, x, *, role: str = "query") -> np.ndarray:
    """phi(x) in float64 NumPy, from the map's parameters (x: (B, H, N, d))."""
    phi = as_feature_map(phi)
    return np.asarray(_ref_phi(phi, _f64(x), role, _f64))


def _ref_attention(fq, fk, v, valid, eps, S0, z0, xp):
    """The definition on features, O(N L): explicit weights, invalid pairs selected away.

    ``out_i = num_i / (den_i + eps)`` where ``den_i != 0``, and 0 where ``den_i = 0``
    (nothing real to attend to), for every eps >= 0.
    """
    A = xp.matmul(fq, xp.permute_dims(fk, (0, 1, 3, 2)))
    A = xp.where(valid, A, xp.zeros_like(A))
    num = xp.matmul(A, v)
    den = xp.sum(A, axis=-1, keepdims=True)
    if S0 is not None:
        num = num + xp.matmul(fq, S0)
        den = den + xp.matmul(fq, z0[..., None])
    ok = den != 0
    return xp.where(ok, num / xp.where(ok, den + eps, xp.ones_like(den)), xp.zeros_like(num))


def _ref_state(fk, v, key_mask, S0, z0, xp):
    if key_mask is not None:
        keep = key_mask[:, None, :, None]
        fk = xp.where(keep, fk, xp.zeros_like(fk))
        v = xp.where(keep, v, xp.zeros_like(v))
    S = xp.matmul(xp.permute_dims(fk, (0, 1, 3, 2)), v)
    z = xp.sum(fk, axis=2)
    if S0 is not None:
        S, z = S + S0, z + z0
    return S, z


def _ref_valid(B, N, L, key_mask, causal, xp, like):
    valid = xp.ones((B, 1, N, L), dtype=xp.bool)
    if key_mask is not None:
        valid = xp.logical_and(valid, key_mask[:, None, None, :])
    if causal:
        i = xp.arange(N)[:, None]
        j = xp.arange(L)[None, :]
        valid = xp.logical_and(valid, (j <= i)[None, None])
    return valid


def _ref_forward(q, k, v, phi, causal, key_mask, eps, S0, z0, leaf, xp):
    fq = _ref_phi(phi, q, "query", leaf, xp)
    fk = _ref_phi(phi, k, "key", leaf, xp)
    B, _, N, _ = q.shape
    L = k.shape[2]
    if key_mask is not None:
        km = key_mask
        k_keep = km[:, None, :, None]
        v = xp.where(k_keep, v, xp.zeros_like(v))
        fk = xp.where(k_keep, fk, xp.zeros_like(fk))
    valid = _ref_valid(B, N, L, key_mask, causal, xp, q)
    out = _ref_attention(fq, fk, v, valid, eps, S0, z0, xp)
    return out, _ref_state(fk, v, key_mask, S0, z0, xp)


def reference_linear_attention(q, k, v, *, feature_map="elu", causal=False, key_mask=None, eps=1e-6,
                               initial_state=None, return_state=False):
    """Linear attention in float64 NumPy by its O(N L) definition.

    ``out_i = sum_j A_ij v_j / (sum_j A_ij + eps)`` with ``A_ij = phi(q_i) . phi(k_j)``
    over the valid pairs (key_mask True, and j <= i when causal), plus the
    initial state's terms; a row whose denominator ``sum_j A_ij`` is zero gives
    zeros, for every eps >= 0. Written apart from the array-API core.
    """
    phi = as_feature_map(feature_map)
    km = None if key_mask is None else to_numpy(key_mask).astype(bool)
    S0 = z0 = None
    if initial_state is not None:
        S0, z0 = _f64(initial_state[0]), _f64(initial_state[1])
    out, state = _ref_forward(_f64(q), _f64(k), _f64(v), phi, causal, km, float(eps), S0, z0, _f64,
                              _compat.numpy_namespace())
    out = np.asarray(out)
    if not return_state:
        return out
    return out, (np.asarray(state[0]), np.asarray(state[1]))


def reference_linear_attention_vjp(q, k, v, g_out, *, feature_map="elu", causal=False, key_mask=None,
                                   eps=1e-6, initial_state=None, g_state=None):
    """Gradients of ``sum(out * g_out) [+ sum(S * gS) + sum(z * gz)]`` by the float64 definition.

    The reference of :func:`reference_linear_attention` is differentiated by
    torch autograd in float64 (torch is imported here only). Returns a dict of
    float64 NumPy arrays: ``"q"``, ``"k"``, ``"v"``, ``"params"`` (a list in the
    order of ``phi.parameters()``, empty for maps without parameters) and, if an
    initial state was given, ``"state"`` (gS, gz).
    """
    import torch
    import array_api_compat.torch as txp

    phi = as_feature_map(feature_map)

    def leaf_of(a):
        return torch.tensor(_f64(a), dtype=torch.float64, requires_grad=True)

    tq, tk, tv = leaf_of(q), leaf_of(k), leaf_of(v)
    params = []
    if isinstance(phi, FeatureMap):
        params = [leaf_of(p) for p in phi.parameters()]
        cache = {id(p): t for p, t in zip(phi.parameters(), params)}
    else:
        cache = {}

    def leaf(a):
        t = cache.get(id(a))
        return t if t is not None else torch.tensor(_f64(a), dtype=torch.float64)

    km = None if key_mask is None else torch.tensor(to_numpy(key_mask).astype(bool))
    S0 = z0 = None
    if initial_state is not None:
        S0, z0 = leaf_of(initial_state[0]), leaf_of(initial_state[1])
    out, (S, z) = _ref_forward(tq, tk, tv, phi, causal, km, float(eps), S0, z0, leaf, txp)
    loss = (out * torch.tensor(_f64(g_out))).sum()
    if g_state is not None:
        loss = loss + (S * torch.tensor(_f64(g_state[0]))).sum() + (z * torch.tensor(_f64(g_state[1]))).sum()
    wrt = [tq, tk, tv, *params] + ([S0, z0] if S0 is not None else [])
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads = [np.zeros(w.shape) if g is None else g.numpy() for g, w in zip(grads, wrt)]
    res = {"q": grads[0], "k": grads[1], "v": grads[2], "params": grads[3:3 + len(params)]}
    if S0 is not None:
        res["state"] = (grads[-2], grads[-1])
    return res


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


#: the key-padding patterns of the edge cases every path is tested on (tests/test_edges.py)
MASK_PATTERNS = ("none", "right", "left", "holes", "item")


def edge_key_mask(pattern: str, batch: int, length: int, rng=None, *, chunk: int = 16):
    """A (batch, length) boolean key mask (True = real key) of a named edge pattern, or None for ``"none"``.

    ``"right"`` / ``"left"``: padding at the end / the start (causal: the first rows then have no real key at
    all); ``"holes"``: random gaps (``rng``, a NumPy Generator), the first key kept; ``"item"``: batch item 1
    all padding, item 2 padded over its first ``chunk + 1`` keys. Needs batch >= 2 (3 for all of "item").
    """
    if pattern not in MASK_PATTERNS:
        raise ValueError(f"pattern must be one of {', '.join(map(repr, MASK_PATTERNS))}; got {pattern!r}")
    if pattern == "none":
        return None
    m = np.ones((batch, length), dtype=bool)
    if pattern == "right":
        m[0, length - 5:] = False
        m[1, length // 2:] = False
    elif pattern == "left":
        m[0, :7] = False
        m[1, :length - 3] = False
    elif pattern == "holes":
        m = (np.random.default_rng(0) if rng is None else rng).random((batch, length)) > 0.35
        m[:, 0] = True
    else:
        m[1, :] = False
        if batch > 2:
            m[2, :chunk + 1] = False
    return m


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
