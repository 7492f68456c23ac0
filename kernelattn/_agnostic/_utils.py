"""Small array-API helpers shared by the core modules."""

from __future__ import annotations


def compute_dtype(dtype, *, xp):
    """Dtype the core computes in: float32 for half-precision inputs, else ``dtype``."""
    # float16 and bfloat16 are not in the standard, so ask for the width
    if xp.finfo(dtype).bits < 32:
        return xp.float32
    return dtype


def cast(x, dtype, *, xp):
    """``x`` as ``dtype``, without a copy when it already is."""
    if x.dtype == dtype:
        return x
    return xp.astype(x, dtype)


def sigmoid(x, *, xp):
    """Logistic sigmoid that never overflows (and so never poisons gradients)."""
    e = xp.exp(-xp.abs(x))
    one = xp.ones_like(e)
    return xp.where(x >= 0, one / (one + e), e / (one + e))


def softplus(x, *, xp):
    """``log(1 + exp(x))`` computed as ``max(x, 0) + log1p(exp(-|x|))``."""
    return xp.maximum(x, xp.zeros_like(x)) + xp.log1p(xp.exp(-xp.abs(x)))


def elu_plus_one(x, *, xp):
    """``elu(x) + 1``; the exp sees ``min(x, 0)`` so no branch can overflow."""
    return xp.where(x > 0, x + 1, xp.exp(xp.minimum(x, xp.zeros_like(x))))


def softmax_last(x, *, xp):
    """Softmax over the last axis, shifted by the row maximum."""
    e = xp.exp(x - xp.max(x, axis=-1, keepdims=True))
    return e / xp.sum(e, axis=-1, keepdims=True)


def swap_last(x, *, xp):
    """Swap the last two axes (a batched transpose)."""
    axes = tuple(range(x.ndim - 2)) + (x.ndim - 1, x.ndim - 2)
    return xp.permute_dims(x, axes)
