"""Causal chunked linear attention for JAX, with a memory-lean custom VJP.

The sequence is cut into chunks of C tokens, and the chunks into blocks of G
chunks (about :data:`BLOCK_TOKENS` tokens). A ``lax.scan`` walks the blocks,
carrying the running state ``S1 = [S | z]`` of shape (B, H, m, e + 1) (the
value sums S with the key sums z as one extra column, so that numerator and
denominator come out of one product). Inside a block, for its chunks c at
once, with the features computed there::

    A_c    = tril(phi(Q_c) phi(K_c)^T)                          (C, C)
    S1_c   = S1 + sum of phi(K_j)^T [V_j | 1] over earlier chunks j
    num1_c = A_c [V_c | 1] + phi(Q_c) S1_c                      (C, e + 1)
    out_c  = num1_c[:, :e] / (num1_c[:, e] + eps)

and the state moves past the block. The feature map is applied inside the
loop, forward and backward, so phi(Q) and phi(K) never exist for the whole
sequence. The backward pass is a reverse ``lax.scan`` over the blocks that
carries the state's gradient ``dS1`` (and the feature map's parameter
gradients): it recomputes a block's features and products from the inputs
and the state saved at the start of the block. Blocks are read and written
as slices of the (B, H, N, .) arrays, never transposed to a block-major copy.

Memory: the backward pass keeps the inputs, the output, one float per token
and one state per block, O(N (d + e) + (N / (G C)) m e); there is no (N, m, e)
tensor, no (N, N) tensor, and no (N, m) feature tensor.

Everything here works on arrays already in the compute dtype (float32 for
half-precision inputs) and is traced once under ``jax.jit``; ``jax.vmap``
batches it like any JAX function, and it runs inside ``jax.shard_map``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax


#: tokens per ``lax.scan`` step: the chunks of a block are computed together
#: (bigger products, fewer loop steps); the chunk length stays the caller's.
BLOCK_TOKENS = 256


def _t(x):
    return jnp.swapaxes(x, -1, -2)


def _with_ones(v):
    """[v | 1]: (..., C, e) -> (..., C, e + 1)."""
    return jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)


def _chunk_inputs(phi_fn, params, q, k, v, keep):
    """phi(q), phi(k) and [v | 1] of one chunk, padded keys zeroed (after phi)."""
    fq = phi_fn(params, q, "query")
    fk = phi_fn(params, k, "key")
    v1 = _with_ones(v)
    if keep is not None:
        km = keep[:, None, :, None]
        fk = jnp.where(km, fk, jnp.zeros_like(fk))
        v1 = jnp.where(km, v1, jnp.zeros_like(v1))
    return fq, fk, v1


def _causal_mask(C):
    return jnp.tril(jnp.ones((C, C), dtype=bool))


def _exclusive_cumsum(x, reverse=False):
    """Sums of the earlier (``reverse``: later) chunks along axis 2; zeros at the end.

    Shifted sums, never ``cumsum(x) - x``: that difference cancels and amplifies
    rounding (the gradient of a left-padded causal sequence was off by 4-24 %).
    """
    zeros = jnp.zeros_like(x[:, :, :1])
    if reverse:
        return jnp.concatenate([lax.cumsum(x[:, :, 1:], axis=2, reverse=True), zeros], axis=2)
    return jnp.concatenate([zeros, jnp.cumsum(x[:, :, :-1], axis=2)], axis=2)


def _inverse_den(den, eps):
    """1 / (den + eps) where den != 0, else 0: a row with nothing to attend to gives zeros and no gradient."""
    ok = den != 0
    return jnp.where(ok, 1.0 / jnp.where(ok, den + eps, 1.0), 0.0)


def _split(x, C):
    """(B, H, T, f) -> (B, H, T / C, C, f)."""
    B, H, T, f = x.shape
    return jnp.reshape(x, (B, H, T // C, C, f))


def _merge(x):
    B, H, G, C, f = x.shape
    return jnp.reshape(x, (B, H, G * C, f))


def _block_forward(fq, fk, v1, S1, C):
    """One block of G chunks, vectorised over its chunks (the core's chunked form).

    ``fq``/``fk`` (B, H, G, C, m), ``v1`` (B, H, G, C, e + 1), ``S1`` the
    state before the block. Returns the masked intra-chunk products ``A``, the
    state before each chunk ``starts`` (B, H, G, m, e + 1), the per-chunk sums
    ``s`` and ``num1`` (B, H, G, C, e + 1).
    """
    A = jnp.where(_causal_mask(C), fq @ _t(fk), 0)
    s = _t(fk) @ v1
    starts = S1[:, :, None] + _exclusive_cumsum(s)
    num1 = A @ v1 + fq @ starts
    return A, s, starts, num1


@partial(jax.custom_vjp, nondiff_argnums=(0, 7, 8, 9))
def _kernel(phi_fn, params, q, k, v, key_mask, state, chunk_size, block_chunks, eps):
    out, state, _ = _forward(phi_fn, params, q, k, v, key_mask, state, chunk_size, block_chunks, eps)
    return out, state


def _block(x, i, T):
    """Tokens [i T, (i + 1) T) of ``x`` (B, H, N, f), or of a key mask (B, N); None stays None."""
    if x is None:
        return None
    return lax.dynamic_slice_in_dim(x, i * T, T, axis=2 if x.ndim == 4 else 1)


def _put(buffer, block, i, T):
    """``buffer`` (B, H, N, f) with tokens [i T, (i + 1) T) replaced by ``block``."""
    return lax.dynamic_update_slice_in_dim(buffer, block.astype(buffer.dtype), i * T, axis=2)


def _forward(phi_fn, params, q, k, v, key_mask, state, C, G, eps):
    B, H, N, _ = q.shape
    e = v.shape[-1]
    T = G * C

    def step(carry, i):
        S1, out = carry
        fq, fk, v1 = (_split(a, C) for a in _chunk_inputs(
            phi_fn, params, _block(q, i, T), _block(k, i, T), _block(v, i, T), _block(key_mask, i, T)))
        A, s, starts, num1 = _block_forward(fq, fk, v1, S1, C)
        inv = _inverse_den(num1[..., e], eps)
        out = _put(out, _merge(num1[..., :e] * inv[..., None]), i, T)
        return (starts[:, :, -1] + s[:, :, -1], out), (inv, S1)

    # The blocks are read and written in place (dynamic slices of the (B, H, N, .)
    # arrays), so the sequence is never transposed to a block-major layout.
    init = (state, jnp.zeros_like(v))  # zeros_like: the same mesh axes as v in shard_map
    (final, out), (inv, starts) = lax.scan(step, init, jnp.arange(N // T))
    return out, final, (inv, starts)


def _kernel_fwd(phi_fn, params, q, k, v, key_mask, state, C, G, eps):
    out, final, (inv, starts) = _forward(phi_fn, params, q, k, v, key_mask, state, C, G, eps)
    return (out, final), (params, q, k, v, key_mask, out, inv, starts)


def _kernel_bwd(phi_fn, C, G, eps, residuals, cotangents):
    params, q, k, v, key_mask, out, inv, block_starts = residuals
    g_out, g_final = cotangents
    g_out = g_out.astype(out.dtype)
    tril = _causal_mask(C)
    T = G * C
    # Parameter gradients are summed over blocks in at least float32.
    acc = jax.tree_util.tree_map(lambda p: p.astype(jnp.promote_types(p.dtype, jnp.float32)), params)

    def step(carry, x):
        gS1, g_params, gq, gk, gv = carry  # gS1: gradient of the state after this block
        i, r, S1 = x
        keep = _block(key_mask, i, T)
        (fq, fk, v1), features_vjp = jax.vjp(
            lambda p, a, b, c: _chunk_inputs(phi_fn, p, a, b, c, keep),
            acc, _block(q, i, T), _block(k, i, T), _block(v, i, T))
        o, go = _block(out, i, T), _block(g_out, i, T)
        fq, fk, v1, o, go = (_split(a, C) for a in (fq, fk, v1, o, go))
        A, _, starts, _ = _block_forward(fq, fk, v1, S1, C)
        # out = num / den with den = num1[..., e] + eps
        g_num1 = jnp.concatenate([go * r[..., None], (-jnp.sum(go * o, axis=-1) * r)[..., None]], axis=-1)
        gA = jnp.where(tril, g_num1 @ _t(v1), 0)
        g_starts = _t(fq) @ g_num1                           # (B, H, G, m, e + 1)
        # chunk j's sums enter the starts of every later chunk and the state after the block
        g_s = _exclusive_cumsum(g_starts, reverse=True) + gS1[:, :, None]
        g_fq = gA @ fk + g_num1 @ _t(starts)
        g_fk = _t(gA) @ fq + v1 @ _t(g_s)
        g_v1 = _t(A) @ g_num1 + fk @ g_s
        dp, dq, dk, dv = features_vjp(tuple(_merge(a) for a in (g_fq, g_fk, g_v1)))
        g_params = jax.tree_util.tree_map(jnp.add, g_params, dp)
        gq, gk, gv = _put(gq, dq, i, T), _put(gk, dk, i, T), _put(gv, dv, i, T)
        return (gS1 + jnp.sum(g_starts, axis=2), g_params, gq, gk, gv), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, acc)
    init = (g_final, zeros, jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v))
    nb = q.shape[2] // T
    (g_state, g_params, gq, gk, gv), _ = lax.scan(step, init, (jnp.arange(nb), inv, block_starts), reverse=True)
    g_params = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), g_params, params)
    return g_params, gq, gk, gv, None, g_state


_kernel.defvjp(_kernel_fwd, _kernel_bwd)


def _varying_axes(x):
    """The manual mesh axes ``x`` varies over inside ``jax.shard_map`` (empty elsewhere)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))  # older JAX


def _varying_like(tree, refs):
    """``tree`` with every array cast to vary over all the mesh axes that any of ``refs`` varies over."""
    axes = frozenset().union(*(_varying_axes(r) for r in refs if r is not None))
    if not axes:
        return tree

    def cast(x):
        missing = tuple(sorted(axes - _varying_axes(x)))
        return lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree_util.tree_map(cast, tree)


def _pad_tokens(x, pad):
    return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pad), (0, 0)]) if pad else x


def feature_dim(phi_fn, params, q):
    """m, the width of phi's output for queries like ``q`` (B, H, N, d), without computing it."""
    return jax.eval_shape(lambda p, x: phi_fn(p, x, "query"), params, q[:, :, :1]).shape[-1]


def causal_linear_attention(phi_fn, params, q, k, v, *, key_mask=None, initial_state=None,
                            chunk_size=64, eps=1e-6):
    """Causal linear attention with the feature map applied chunk by chunk.

    Parameters
    ----------
    phi_fn : callable
        ``phi_fn(params, x, role)`` maps (B, H, n, d) to (B, H, n, m); ``role``
        is ``"query"`` or ``"key"``. Must be a pure function of its arguments
        (a module-level function, so that traces are shared).
    params : pytree of arrays
        What ``phi_fn`` differentiates (a :class:`kernelattn.FeatureMap` is one).
    q, k : array, shape (B, H, N, d)
        Queries and keys in the compute dtype.
    v : array, shape (B, H, N, e)
    key_mask : bool array, shape (B, N), optional
        False drops a key from every sum (applied after phi).
    initial_state : (S, z) of shapes (B, H, m, e) and (B, H, m), optional
    chunk_size : int
        C, the length of the exact masked products. N is padded to whole
        blocks of chunks with masked keys; the padded outputs are dropped.
    eps : float

    Returns
    -------
    out : array, shape (B, H, N, e)
    state : (S, z), the sums after the last key.
    """
    B, H, N, _ = q.shape
    e = v.shape[-1]
    if N == 0:
        if initial_state is None:
            m = feature_dim(phi_fn, params, q)
            initial_state = (jnp.zeros((B, H, m, e), q.dtype), jnp.zeros((B, H, m), q.dtype))
        return jnp.zeros((B, H, 0, e), q.dtype), tuple(initial_state)
    C = max(1, min(int(chunk_size), N))
    chunks = -(-N // C)
    blocks = -(-chunks // max(1, BLOCK_TOKENS // C))
    G = -(-chunks // blocks)  # chunks per scan step, spread so that padding stays under one chunk per block
    pad = blocks * G * C - N
    if pad:
        valid = jnp.arange(N + pad) < N
        key_mask = (jnp.broadcast_to(valid, (B, N + pad)) if key_mask is None
                    else jnp.pad(key_mask, ((0, 0), (0, pad))))
        q, k, v = (_pad_tokens(a, pad) for a in (q, k, v))
    if initial_state is None:
        m = feature_dim(phi_fn, params, q)
        state = jnp.zeros((B, H, m, e + 1), q.dtype)
    else:
        S0, z0 = initial_state
        state = jnp.concatenate([S0.astype(q.dtype), z0.astype(q.dtype)[..., None]], axis=-1)
    # Inside jax.shard_map, the loop carries must vary over the same mesh axes as
    # the tokens: replicated parameters and states are cast to "varying" here, so
    # that the backward pass sums the parameters' gradients over the devices once
    # (the transpose of the cast), not once per block.
    params, q, k, v, key_mask, state = _varying_like((params, q, k, v, key_mask, state), (q, k, v, key_mask))
    out, final = _kernel(phi_fn, params, q, k, v, key_mask, state, C, G, float(eps))
    if pad:
        out = out[:, :, :N]
    return out, (final[..., :e], final[..., e])
