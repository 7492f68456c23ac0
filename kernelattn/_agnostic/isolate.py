"""Keeping padded, future and non-finite inputs away from the outputs that must not see them.

Matrix products cannot skip an entry: ``0 * NaN`` is NaN, so a NaN in a padded
key, or (causal) in a later token, would reach every output that shares a
product with it, forward and backward, whatever the masks say. So, before
any path runs:

* padded keys and values are replaced by zeros (selected with ``where``,
  never multiplied by the mask);
* when the inputs may hold NaN or Inf, every non-finite token is replaced by
  zeros too, and the outputs whose definition depends on it (its own row;
  with ``causal`` every later row, otherwise every row) are set to NaN
  afterwards. Everything else is computed from finite numbers only, so no
  NaN reaches another output or any gradient.

Pure array API (``xp`` required), like the rest of the core.
"""

from __future__ import annotations

import math

from .._compat import device as _device


def _zero(x, *, xp):
    return xp.zeros((), dtype=x.dtype, device=_device(x))


def drop_padding(k, v, key_mask, *, xp):
    """k and v with zeros at padded keys (``key_mask`` (B, L) False)."""
    if key_mask is None:
        return k, v
    keep = key_mask[:, None, :, None]
    return xp.where(keep, k, _zero(k, xp=xp)), xp.where(keep, v, _zero(v, xp=xp))


def _row_ok(x, *, xp):
    return xp.all(xp.isfinite(x), axis=-1)


def isolate(q, k, v, initial_state, *, causal, xp):
    """Replace non-finite tokens by zeros; return them and the rows to set to NaN.

    Returns ``(q, k, v, initial_state, bad_rows, bad_state)``: ``bad_rows``
    (B, H, N) is True where the output depends on a non-finite input;
    ``bad_state`` (B, H) where the returned state does.
    """
    q_ok = _row_ok(q, xp=xp)
    kv_ok = xp.logical_and(_row_ok(k, xp=xp), _row_ok(v, xp=xp))
    q = xp.where(q_ok[..., None], q, _zero(q, xp=xp))
    k = xp.where(kv_ok[..., None], k, _zero(k, xp=xp))
    v = xp.where(kv_ok[..., None], v, _zero(v, xp=xp))
    kv_bad = xp.logical_not(kv_ok)
    if causal:
        seen = xp.cumulative_sum(xp.astype(kv_bad, xp.int32), axis=-1) > 0
    else:
        seen = xp.any(kv_bad, axis=-1, keepdims=True)
    bad_rows = xp.logical_or(xp.logical_not(q_ok), seen)
    bad_state = xp.any(kv_bad, axis=-1)
    if initial_state is not None:
        S, z = initial_state
        s_ok = xp.logical_and(xp.all(_row_ok(S, xp=xp), axis=-1), _row_ok(z, xp=xp))
        initial_state = (xp.where(s_ok[..., None, None], S, _zero(S, xp=xp)),
                         xp.where(s_ok[..., None], z, _zero(z, xp=xp)))
        bad_rows = xp.logical_or(bad_rows, xp.logical_not(s_ok)[..., None])
        bad_state = xp.logical_or(bad_state, xp.logical_not(s_ok))
    return q, k, v, initial_state, bad_rows, bad_state


def _nan(x, *, xp):
    return xp.full((), math.nan, dtype=x.dtype, device=_device(x))


def poison(out, state, bad_rows, bad_state, *, xp):
    """NaN at the rows (and states) whose definition involves a non-finite input."""
    out = xp.where(bad_rows[..., None], _nan(out, xp=xp), out)
    if state is not None:
        S, z = state
        state = (xp.where(bad_state[..., None, None], _nan(S, xp=xp), S),
                 xp.where(bad_state[..., None], _nan(z, xp=xp), z))
    return out, state
