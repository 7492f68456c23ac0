"""Head-wise feature maps phi: (B, H, N, d) -> (B, H, N, m), in pure array API.

Trainable blocks (Yorsh & Kovalenko 2022), each with per-head weights of shape
(H, d_in, d_out) applied as ``x @ W[h]``:

* ``ffn``:   ``f(x W + b)``
* ``glu``:   ``f(x W + b) * sigmoid(x G + c)``
* ``aoglu``: ``f(x W + b) * sigmoid((x A) B + c)``, a rank-r gate

``f`` is Softplus on the last block of a stack and the identity on inner
blocks, so the output is positive. Also here: the fixed maps ``elu`` (elu+1),
``relu``, ``favor`` (Performer's positive random features) and the trainable
``hedgehog`` map (Zhang et al. 2024). Which function a kind runs is recorded
in :mod:`kernelattn.kinds`.

A block is a dict of arrays (``W``, ``G``, ``A``, ``B``, ``b``, ``c``); the
inputs are already in the compute dtype (see :func:`apply`).
"""

from __future__ import annotations

import math

from .._compat import device as _device_of
from ._utils import cast, elu_plus_one, sigmoid, softmax_last, softplus  # noqa: F401 (elu_plus_one: re-export)


def _linear(x, W, b, *, xp):
    # (B, H, N, d_in) @ (H, d_in, d_out) broadcasts over the head axis.
    y = xp.matmul(x, cast(W, x.dtype, xp=xp))
    if b is not None:
        y = y + cast(b, x.dtype, xp=xp)[:, None, :]
    return y


def _gate(x, block, *, xp):
    if "G" in block:
        g = xp.matmul(x, cast(block["G"], x.dtype, xp=xp))
    else:  # low-rank gate of AOGLU: (x A) B
        g = xp.matmul(xp.matmul(x, cast(block["A"], x.dtype, xp=xp)), cast(block["B"], x.dtype, xp=xp))
    if block.get("c") is not None:
        g = g + cast(block["c"], x.dtype, xp=xp)[:, None, :]
    return sigmoid(g, xp=xp)


def feedforward(x, blocks, *, xp):
    """Apply a stack of ffn / glu / aoglu blocks; Softplus on the last one only.

    Parameters
    ----------
    x : array, shape (B, H, N, d)
        Inputs in the compute dtype.
    blocks : list of dict
        Per-block parameters: ``W`` (H, d_in, d_out), optional ``b`` (H, d_out);
        for a GLU ``G`` (H, d_in, d_out), for an AOGLU ``A`` (H, d_in, r) and
        ``B`` (H, r, d_out); optional gate bias ``c`` (H, d_out).
    xp : namespace

    Returns
    -------
    array, shape (B, H, N, m)
    """
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        y = _linear(x, block["W"], block.get("b"), xp=xp)
        if i == last:
            y = softplus(y, xp=xp)
        if "G" in block or "A" in block:
            y = y * _gate(x, block, xp=xp)
        x = y
    return x


def hedgehog(x, W, b, *, xp):
    """Hedgehog map: ``[softmax(x W + b), softmax(-(x W + b))]`` over features.

    ``W`` is (H, d, m/2); the output has m features and every row sums to 2.
    """
    y = _linear(x, W, b, xp=xp)
    return xp.concat([softmax_last(y, xp=xp), softmax_last(-y, xp=xp)], axis=-1)


def favor(x, omega, *, xp):
    """Performer's positive random features (FAVOR+) for the softmax kernel.

    ``phi(x) = exp(w_i . x' - |x'|^2 / 2) / sqrt(m)`` with ``x' = x / d**0.25``
    and ``omega`` of shape (H, d, m), so that ``phi(q) . phi(k)`` estimates
    ``exp(q . k / sqrt(d))`` without bias. The exponent equals
    ``(|w|^2 - |x' - w|^2) / 2``, bounded above by ``|w|^2 / 2``, so it cannot
    overflow for the Gaussian-sized ``w`` the initialiser draws.
    """
    d = x.shape[-1]
    m = omega.shape[-1]
    xs = x * (1.0 / d**0.25)
    proj = xp.matmul(xs, cast(omega, x.dtype, xp=xp))
    sq = xp.sum(xs * xs, axis=-1, keepdims=True) * 0.5
    return xp.exp(proj - sq) * (1.0 / math.sqrt(m))


def orthogonality_penalty(weights, *, xp):
    """Sum over weights of ``mean_{h,i,j} ((W_h W_h^T - I)_{ij})^2``.

    For a non-square (d_in, d_out) weight the smaller Gram matrix is used, the
    one that can equal the identity. Returns a 0-d array.
    """
    total = None
    for W in weights:
        d_in, d_out = W.shape[-2], W.shape[-1]
        Wt = xp.permute_dims(W, (0, 2, 1))
        gram = xp.matmul(W, Wt) if d_in <= d_out else xp.matmul(Wt, W)
        n = min(d_in, d_out)
        eye = xp.eye(n, dtype=W.dtype, device=_device_of(W))
        term = xp.mean((gram - eye) ** 2)
        total = term if total is None else total + term
    return total

