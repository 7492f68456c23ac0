"""Linear and softmax attention in pure array API.

Shapes: batch B, heads H, query length N, key length L, head dim d, value
dim e, feature dim m. The kernelized output is

    out_i = phi(q_i)^T S / (phi(q_i)^T z + eps),  S = sum_j phi(k_j) v_j^T,  z = sum_j phi(k_j)

with the sums over all keys (non-causal) or over j <= i (causal). A state is
the pair (S, z) of shapes (B, H, m, e) and (B, H, m); it carries a causal
sequence from one call to the next (recurrent decoding).

Three causal strategies compute the same numbers:

* ``naive``: the masked (N, N) matrix phi(Q) phi(K)^T, O(N^2): the reference;
* ``chunked``: exact masked products inside chunks of C tokens, plus an
  exclusive prefix of per-chunk states between chunks; memory O(N (C + m e / C)),
  never an (N, m, e) tensor;
* ``recurrent``: the state updated one token at a time.

Each forward is written once: ``noncausal_forward``, ``quadratic_forward`` and
``chunked_forward`` serve both the plain forwards here and the hand VJPs of
:mod:`.grad`, which ask them (``save=True``) to keep what the backward needs.

Inputs of float16/bfloat16 are computed in float32 and cast back; states stay
in float32.
"""

from __future__ import annotations

import math

from .. import _compat
from .._compat import device as _device
from ._utils import cast, compute_dtype, swap_last

# ---------------------------------------------------------------------------
# on features: phi(q) (B, H, N, m), phi(k) (B, H, L, m), v (B, H, L, e)


def mask_keys(fk, v, key_mask, *, xp):
    """Select away the rows of phi(K) and V at padded keys (``key_mask`` False).

    The mask acts after the feature map, so padded keys never reach S or z; it
    selects (``where``) rather than multiplies, so whatever a padded row holds
    (NaN, Inf) cannot reach a sum. ``key_mask`` is boolean (B, L), True for a
    real key.
    """
    if key_mask is None:
        return fk, v
    keep = key_mask[:, None, :, None]
    return xp.where(keep, fk, xp.zeros_like(fk)), xp.where(keep, v, xp.zeros_like(v))


def inverse_den(den, eps, *, xp):
    """``1 / (den + eps)`` where ``den != 0``, else 0 (the rule of :func:`normalise`, for VJPs)."""
    ok = den != 0
    return xp.where(ok, 1.0 / xp.where(ok, den + eps, xp.ones_like(den)), xp.zeros_like(den))


def normalise(num, den, eps, *, xp):
    """``num / (den + eps)`` where ``den != 0``; zeros where ``den = 0``.

    num (..., e), den (..., 1). A row with nothing to attend to (den = 0) gives
    zeros and, through the double ``where``, a zero gradient, for every eps >= 0
    (no 0/0, and no 1/eps that would amplify rounding in the gradient).
    """
    ok = den != 0
    safe = xp.where(ok, den + eps, xp.ones_like(den))
    return xp.where(ok, num / safe, xp.zeros_like(num))


def _finish(num, den, eps, save, *, xp):
    """The output, and 1 / (den + eps) (0 where den = 0) if ``save``, else None.

    Saving, the output is ``num * r`` with that ``r``, the form the hand VJP
    differentiates (the same numbers to rounding as :func:`normalise`).
    """
    if not save:
        return normalise(num, den, eps, xp=xp), None
    r = inverse_den(den, eps, xp=xp)
    return num * r, r


def state_of(fk, v, *, xp):
    """(S, z) of a block of keys: S = phi(K)^T V (B, H, m, e), z = sum phi(K) (B, H, m)."""
    return xp.matmul(swap_last(fk, xp=xp), v), xp.sum(fk, axis=-2)


def _add_state(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a[0] + b[0], a[1] + b[1]


def _readout(fq, state, *, xp):
    """phi(Q) S and phi(Q) z for a state shared by every query."""
    S, z = state
    return xp.matmul(fq, S), xp.matmul(fq, z[..., None])


def noncausal_forward(fq, fk, v, *, eps, initial_state=None, save=False, xp):
    """The non-causal forward, once for :func:`noncausal` and the hand VJP.

    Returns ``(out, state, saved)``: the state (S, z) after every key
    (initial state included) and, if ``save``, ``saved = {"r": 1 / (den +
    eps)}`` (B, H, N, 1), 0 where den = 0 (else None).
    """
    state = _add_state(initial_state, state_of(fk, v, xp=xp))
    num, den = _readout(fq, state, xp=xp)
    out, r = _finish(num, den, eps, save, xp=xp)
    return out, state, ({"r": r} if save else None)


def noncausal(fq, fk, v, *, eps, initial_state=None, return_state=False, xp):
    """Non-causal linear attention on features; any N and L (cross-attention)."""
    out, state, _ = noncausal_forward(fq, fk, v, eps=eps, initial_state=initial_state, xp=xp)
    return out, (state if return_state else None)


def _causal_mask(n, l, *, device, xp):
    i = xp.arange(n, device=device)[:, None]
    j = xp.arange(l, device=device)[None, :]
    return j <= i


def quadratic_forward(fq, fk, v, *, causal, eps, initial_state=None, return_state=False, save=False, xp):
    """The O(N L) forward, once for :func:`quadratic` and the hand VJP.

    Returns ``(out, state, saved)``: the state after every key when
    ``return_state`` or ``save`` (else None) and, if ``save``, ``saved`` with
    ``"A"`` (B, H, N, L) the masked product, ``"keep"`` the causal mask (or
    None) and ``"r"`` = 1 / (den + eps) (B, H, N, 1), 0 where den = 0.
    """
    A = xp.matmul(fq, swap_last(fk, xp=xp))
    keep = None
    if causal:
        keep = _causal_mask(fq.shape[-2], fk.shape[-2], device=_device(fq), xp=xp)
        A = xp.where(keep, A, xp.zeros_like(A))
    num = xp.matmul(A, v)
    den = xp.sum(A, axis=-1, keepdims=True)
    if initial_state is not None:
        n0, d0 = _readout(fq, initial_state, xp=xp)
        num, den = num + n0, den + d0
    state = None
    if return_state or save:
        state = _add_state(initial_state, state_of(fk, v, xp=xp))
    out, r = _finish(num, den, eps, save, xp=xp)
    return out, state, ({"A": A, "keep": keep, "r": r} if save else None)


def quadratic(fq, fk, v, *, causal, eps, initial_state=None, return_state=False, xp):
    """The O(N L) form: A = phi(Q) phi(K)^T, masked below the diagonal if causal."""
    out, state, _ = quadratic_forward(fq, fk, v, causal=causal, eps=eps, initial_state=initial_state,
                                      return_state=return_state, xp=xp)
    return out, state


def _pad_tokens(x, pad, *, xp):
    if pad == 0:
        return x
    zeros = xp.zeros((*x.shape[:-2], pad, x.shape[-1]), dtype=x.dtype, device=_device(x))
    return xp.concat([x, zeros], axis=-2)


def exclusive_prefix(x, *, axis, xp):
    """Sums of the entries before each one along ``axis`` (the first is 0).

    Shifted inclusive sums, not ``cumsum(x) - x``: that difference cancels, and
    its gradient (a reverse sum minus the entry itself) amplifies rounding.
    """
    n = x.shape[axis]
    if n <= 1:
        return xp.zeros_like(x)
    if _compat.is_numpy_namespace(xp) or _compat.is_array_api_strict_namespace(xp):
        # NumPy's cumulative sum along a leading axis is about 10x slower than n - 1
        # additions of whole slices; these give the same sums, in the same order
        def entry(i):
            index = [slice(None)] * x.ndim
            index[axis] = i
            return x[tuple(index)]

        acc = xp.zeros_like(entry(0))
        parts = [acc]
        for i in range(n - 1):
            acc = acc + entry(i)
            parts.append(acc)
        return xp.stack(parts, axis=axis)
    head = [slice(None)] * x.ndim
    head[axis] = slice(0, n - 1)
    zero = [slice(None)] * x.ndim
    zero[axis] = slice(0, 1)
    return xp.concat([xp.zeros_like(x[tuple(zero)]), xp.cumulative_sum(x[tuple(head)], axis=axis)], axis=axis)


def empty_state(B, H, m, e, *, dtype, device, xp):
    """The state of no keys: zeros (B, H, m, e) and (B, H, m)."""
    return (xp.zeros((B, H, m, e), dtype=dtype, device=device), xp.zeros((B, H, m), dtype=dtype, device=device))


def _no_tokens(fq, v, *, initial_state, return_state, xp):
    """Causal attention over zero tokens: an empty output and the state unchanged."""
    B, H, _, m = fq.shape
    e = v.shape[-1]
    out = xp.zeros((B, H, 0, e), dtype=fq.dtype, device=_device(fq))
    if not return_state:
        return out, None
    if initial_state is None:
        initial_state = empty_state(B, H, m, e, dtype=fq.dtype, device=_device(fq), xp=xp)
    return out, tuple(initial_state)


def chunk_tokens(x, C, *, xp):
    """(B, H, n, f) -> (B, H, n_c, C, f): zero-padded to a multiple of C, then split into chunks."""
    B, H, n, f = x.shape
    nc = -(-n // C)
    return xp.reshape(_pad_tokens(x, nc * C - n, xp=xp), (B, H, nc, C, f))


def unchunk_tokens(x, n, *, xp):
    """The inverse of :func:`chunk_tokens`: (B, H, n_c, C, f) -> (B, H, n, f), padded rows dropped."""
    B, H, nc, C, f = x.shape
    x = xp.reshape(x, (B, H, nc * C, f))
    return x[:, :, :n, :] if nc * C != n else x


def chunk_scores(fq_c, fk_c, keep, *, xp):
    """The masked products inside each chunk, phi(Q_c) phi(K_c)^T below the diagonal (B, H, n_c, C, C)."""
    A = xp.matmul(fq_c, swap_last(fk_c, xp=xp))
    return xp.where(keep, A, xp.zeros_like(A))


class ChunkedSaved:
    """What :func:`chunked_forward` keeps for the backward (``save=True``).

    All in the chunked layout (B, H, n_c, C, ...), zero-padded: the chunked
    inputs ``fq``, ``fk``, ``v``; the (C, C) causal mask ``keep``; the
    exclusive prefix states ``S_prev`` (B, H, n_c, m, e) and ``z_prev``
    (B, H, n_c, m), the state before each chunk, initial state included;
    ``r`` = 1 / (den + eps) (B, H, n_c, C, 1), 0 where den = 0; and the
    output ``out`` = num * r (B, H, n_c, C, e). Never an (N, m, e) tensor.
    """

    __slots__ = ("fq", "fk", "v", "keep", "S_prev", "z_prev", "r", "out")

    def __init__(self, **kw):
        for key, val in kw.items():
            setattr(self, key, val)


def chunked_forward(fq, fk, v, *, eps, chunk_size=64, initial_state=None, return_state=False, save=False, xp):
    """The causal forward by chunks (N = L >= 1), once for :func:`chunked` and the hand VJP.

    Inside a chunk: the masked product (C, C). Between chunks: the exclusive
    prefix sum of the per-chunk states, shape (N/C, m, e). The sequence is
    zero-padded to a multiple of C; padded rows are dropped from the output.

    Returns ``(out, state, saved)``: ``state`` the state after the last token
    when ``return_state`` or ``save`` (else None); ``saved`` a
    :class:`ChunkedSaved` when ``save`` (else None).
    """
    N = fq.shape[-2]
    C = max(1, min(chunk_size, N))
    fq_c, fk_c, v_c = (chunk_tokens(a, C, xp=xp) for a in (fq, fk, v))

    # intra-chunk: exact masked products
    keep = _causal_mask(C, C, device=_device(fq), xp=xp)
    A = chunk_scores(fq_c, fk_c, keep, xp=xp)
    num = xp.matmul(A, v_c)
    den = xp.sum(A, axis=-1, keepdims=True)
    del A

    # inter-chunk: states of all earlier chunks
    S_c, z_c = state_of(fk_c, v_c, xp=xp)  # (B, H, nc, m, e), (B, H, nc, m)
    S_prev, z_prev = exclusive_prefix(S_c, axis=2, xp=xp), exclusive_prefix(z_c, axis=2, xp=xp)
    if initial_state is not None:
        S_prev = S_prev + initial_state[0][:, :, None, ...]
        z_prev = z_prev + initial_state[1][:, :, None, ...]
    num = num + xp.matmul(fq_c, S_prev)
    den = den + xp.matmul(fq_c, z_prev[..., None])

    out_c, r = _finish(num, den, eps, save, xp=xp)
    state = None
    if return_state or save:
        state = (S_prev[:, :, -1, ...] + S_c[:, :, -1, ...], z_prev[:, :, -1, ...] + z_c[:, :, -1, ...])
    saved = None
    if save:
        saved = ChunkedSaved(fq=fq_c, fk=fk_c, v=v_c, keep=keep, S_prev=S_prev, z_prev=z_prev,
                             r=r, out=out_c)
    return unchunk_tokens(out_c, N, xp=xp), state, saved


def chunked(fq, fk, v, *, eps, chunk_size=64, initial_state=None, return_state=False, xp):
    """Causal linear attention by chunks of ``chunk_size`` tokens (N = L); see :func:`chunked_forward`."""
    if fq.shape[-2] == 0:
        return _no_tokens(fq, v, initial_state=initial_state, return_state=return_state, xp=xp)
    out, state, _ = chunked_forward(fq, fk, v, eps=eps, chunk_size=chunk_size, initial_state=initial_state,
                                    return_state=return_state, xp=xp)
    return out, state


def recurrent(fq, fk, v, *, eps, initial_state=None, return_state=False, xp):
    """Causal linear attention one token at a time, carrying (S, z)."""
    B, H, N, m = fq.shape
    e = v.shape[-1]
    if N == 0:
        return _no_tokens(fq, v, initial_state=initial_state, return_state=return_state, xp=xp)
    if initial_state is None:
        S, z = empty_state(B, H, m, e, dtype=fq.dtype, device=_device(fq), xp=xp)
    else:
        S, z = initial_state
    outs = []
    for t in range(N):
        fk_t, v_t, fq_t = fk[:, :, t, :], v[:, :, t, :], fq[:, :, t, :]
        S = S + fk_t[..., :, None] * v_t[..., None, :]
        z = z + fk_t
        num = xp.matmul(fq_t[..., None, :], S)[..., 0, :]
        den = xp.sum(fq_t * z, axis=-1, keepdims=True)
        outs.append(normalise(num, den, eps, xp=xp))
    out = xp.stack(outs, axis=2)
    return out, ((S, z) if return_state else None)


STRATEGIES = ("auto", "chunked", "naive", "recurrent")


def attention_on_features(
    fq, fk, v, *, causal, eps, method="auto", chunk_size=64, key_mask=None,
    initial_state=None, return_state=False, xp,
):
    """Linear attention given phi(Q) and phi(K), all in the compute dtype."""
    fk, v = mask_keys(fk, v, key_mask, xp=xp)
    kw = dict(eps=eps, initial_state=initial_state, return_state=return_state, xp=xp)
    if method == "naive":
        return quadratic(fq, fk, v, causal=causal, **kw)
    if not causal:
        return noncausal(fq, fk, v, **kw)
    if method == "recurrent":
        return recurrent(fq, fk, v, **kw)
    return chunked(fq, fk, v, chunk_size=chunk_size, **kw)


def linear_attention(
    q, k, v, *, feature_map, causal=False, key_mask=None, eps=1e-6, chunk_size=64,
    method="auto", initial_state=None, return_state=False, xp,
):
    """Kernelized attention of (B, H, N, d) queries over (B, H, L, d) keys.

    ``feature_map`` is an object with ``apply(x, *, role, xp)`` (role
    ``"query"`` or ``"key"``). Returns ``(out, state)``: ``out`` (B, H, N, e)
    in the dtype of ``q``; ``state`` None unless ``return_state``.
    """
    dtype = q.dtype
    cdt = compute_dtype(dtype, xp=xp)
    q, k, v = (cast(a, cdt, xp=xp) for a in (q, k, v))
    if initial_state is not None:
        initial_state = tuple(cast(s, cdt, xp=xp) for s in initial_state)
    fq = feature_map.apply(q, role="query", xp=xp)
    fk = feature_map.apply(k, role="key", xp=xp)
    out, state = attention_on_features(
        fq, fk, v, causal=causal, eps=eps, method=method, chunk_size=chunk_size,
        key_mask=key_mask, initial_state=initial_state, return_state=return_state, xp=xp,
    )
    return cast(out, dtype, xp=xp), state


def attention_weights(fq, fk, *, causal, key_mask=None, eps=1e-6, xp):
    """The (B, H, N, L) attention matrix of linear attention, rows normalised."""
    A = xp.matmul(fq, swap_last(fk, xp=xp))
    if causal:
        keep = _causal_mask(fq.shape[-2], fk.shape[-2], device=_device(fq), xp=xp)
        A = xp.where(keep, A, xp.zeros_like(A))
    if key_mask is not None:
        A = xp.where(key_mask[:, None, None, :], A, xp.zeros_like(A))
    return normalise(A, xp.sum(A, axis=-1, keepdims=True), eps, xp=xp)


def _softmax_scores(q, k, *, causal, key_mask, scale, xp):
    """Scaled logits with -inf at masked places, and the mask of valid places."""
    s = xp.matmul(q, swap_last(k, xp=xp)) * scale
    keep = None
    if causal:
        keep = _causal_mask(q.shape[-2], k.shape[-2], device=_device(q), xp=xp)
    if key_mask is not None:
        km = key_mask[:, None, None, :]
        keep = km if keep is None else xp.logical_and(keep, km)
    if keep is not None:
        s = xp.where(keep, s, xp.full_like(s, -math.inf))
    return s


def softmax_weights(q, k, *, causal=False, key_mask=None, scale=None, xp):
    """softmax(Q K^T * scale) with masks; a row with no valid key is all zeros."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    s = _softmax_scores(q, k, causal=causal, key_mask=key_mask, scale=scale, xp=xp)
    mx = xp.max(s, axis=-1, keepdims=True)
    mx = xp.where(xp.isfinite(mx), mx, xp.zeros_like(mx))
    p = xp.exp(s - mx)
    den = xp.sum(p, axis=-1, keepdims=True)
    return p / xp.where(den > 0, den, xp.ones_like(den))


def softmax_attention(q, k, v, *, causal=False, key_mask=None, scale=None, xp):
    """Exact softmax attention, O(N L) memory; the reference linear attention approximates."""
    dtype = q.dtype
    cdt = compute_dtype(dtype, xp=xp)
    q, k, v = (cast(a, cdt, xp=xp) for a in (q, k, v))
    p = softmax_weights(q, k, causal=causal, key_mask=key_mask, scale=scale, xp=xp)
    return cast(xp.matmul(p, v), dtype, xp=xp)
