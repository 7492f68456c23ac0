"""Hand-derived vector-Jacobian products (VJPs), in pure array API.

These let every backend train, NumPy, CuPy, array-api-strict and Dask
included, with no autodiff library. Each ``*_vjp`` function runs the forward
computation, keeps what the backward needs, and returns the result together
with a function ``vjp(cotangent) -> gradients``. Loss functions come as
``*_value_and_grad``. Shapes: batch B, heads H, query length N, key length L,
head dim d, value dim e, feature dim m; a block weight is (H, d_in, d_out).

Conventions
-----------
* Inputs are already in the compute dtype (float32 for half precision); the
  public layer casts. Parameter gradients are cast to each parameter's dtype.
* Gradients of a parameter tree have the same structure as the tree: a list
  of block dicts per role, with the same keys as the blocks.
* The causal backward is a reverse pass over chunks that carries the state
  gradient (dS, dz) of shape (B, H, m, e), (B, H, m): like the forward, it
  holds (C, C), (C, m) and (m, e) pieces and the per-chunk prefix states,
  never an (N, m, e) tensor.
"""

from __future__ import annotations

import math

from .._compat import device as _device
from . import attention as _att
from . import feature_maps as _fm
from ._utils import cast, sigmoid, softmax_last, softplus, swap_last

# ---------------------------------------------------------------------------
# helpers


def _weight_grad(x, gy, *, xp):
    """Gradient of a head-wise weight: sum over the batch of x^T gy, (H, d_in, d_out)."""
    return xp.sum(xp.matmul(swap_last(x, xp=xp), gy), axis=0)


def _bias_grad(gy, *, xp):
    """Gradient of a head-wise bias (H, d_out): gy summed over batch and tokens."""
    return xp.sum(gy, axis=(0, 2))


def _like(g, p, *, xp):
    return cast(g, p.dtype, xp=xp)


def _add_trees(a, b):
    """Sum of two gradient lists of block dicts with the same keys."""
    return [{key: x[key] + y[key] for key in x} for x, y in zip(a, b)]


# ---------------------------------------------------------------------------
# feature maps


def feedforward_vjp(x, blocks, *, xp):
    """Stack of ffn / glu / aoglu blocks (see :func:`feature_maps.feedforward`)."""
    last = len(blocks) - 1
    saved = []
    for i, block in enumerate(blocks):
        W = cast(block["W"], x.dtype, xp=xp)
        u = xp.matmul(x, W)
        if block.get("b") is not None:
            u = u + cast(block["b"], x.dtype, xp=xp)[:, None, :]
        a = softplus(u, xp=xp) if i == last else u
        gate = t = None
        if "G" in block or "A" in block:
            if "G" in block:
                s = xp.matmul(x, cast(block["G"], x.dtype, xp=xp))
            else:
                t = xp.matmul(x, cast(block["A"], x.dtype, xp=xp))  # (B, H, N, r)
                s = xp.matmul(t, cast(block["B"], x.dtype, xp=xp))
            if block.get("c") is not None:
                s = s + cast(block["c"], x.dtype, xp=xp)[:, None, :]
            gate = sigmoid(s, xp=xp)
            y = a * gate
        else:
            y = a
        saved.append((x, u, a, gate, t))
        x = y

    def vjp(gy):
        grads = [None] * len(blocks)
        for i in range(last, -1, -1):
            block = blocks[i]
            x, u, a, gate, t = saved[i]
            g = {}
            if gate is None:
                ga = gy
            else:
                ga = gy * gate
                gs = gy * a * gate * (1.0 - gate)
            gu = ga * sigmoid(u, xp=xp) if i == last else ga
            g["W"] = _weight_grad(x, gu, xp=xp)
            gx = xp.matmul(gu, swap_last(cast(block["W"], x.dtype, xp=xp), xp=xp))
            if block.get("b") is not None:
                g["b"] = _bias_grad(gu, xp=xp)
            if gate is not None:
                if "G" in block:
                    g["G"] = _weight_grad(x, gs, xp=xp)
                    gx = gx + xp.matmul(gs, swap_last(cast(block["G"], x.dtype, xp=xp), xp=xp))
                else:
                    g["B"] = _weight_grad(t, gs, xp=xp)
                    gt = xp.matmul(gs, swap_last(cast(block["B"], x.dtype, xp=xp), xp=xp))
                    g["A"] = _weight_grad(x, gt, xp=xp)
                    gx = gx + xp.matmul(gt, swap_last(cast(block["A"], x.dtype, xp=xp), xp=xp))
                if block.get("c") is not None:
                    g["c"] = _bias_grad(gs, xp=xp)
            grads[i] = {key: _like(val, block[key], xp=xp) for key, val in g.items()}
            gy = gx
        return gy, grads

    return x, vjp


def hedgehog_vjp(x, block, *, xp):
    """``[softmax(x W + b), softmax(-(x W + b))]``."""
    W = cast(block["W"], x.dtype, xp=xp)
    y = xp.matmul(x, W)
    if block.get("b") is not None:
        y = y + cast(block["b"], x.dtype, xp=xp)[:, None, :]
    p1, p2 = softmax_last(y, xp=xp), softmax_last(-y, xp=xp)
    half = W.shape[-1]

    def vjp(gout):
        g1, g2 = gout[..., :half], gout[..., half:]
        gy = (p1 * (g1 - xp.sum(g1 * p1, axis=-1, keepdims=True))
              - p2 * (g2 - xp.sum(g2 * p2, axis=-1, keepdims=True)))
        g = {"W": _weight_grad(x, gy, xp=xp)}
        if block.get("b") is not None:
            g["b"] = _bias_grad(gy, xp=xp)
        gx = xp.matmul(gy, swap_last(W, xp=xp))
        return gx, [{key: _like(val, block[key], xp=xp) for key, val in g.items()}]

    return xp.concat([p1, p2], axis=-1), vjp


def favor_vjp(x, omega, *, xp):
    """FAVOR+ features; ``omega`` is a fixed buffer, so only the input gets a gradient."""
    d = x.shape[-1]
    m = omega.shape[-1]
    c = 1.0 / d**0.25
    om = cast(omega, x.dtype, xp=xp)
    xs = x * c
    y = xp.exp(xp.matmul(xs, om) - xp.sum(xs * xs, axis=-1, keepdims=True) * 0.5) * (1.0 / math.sqrt(m))

    def vjp(gy):
        ge = gy * y  # gradient of the exponent
        gxs = xp.matmul(ge, swap_last(om, xp=xp)) - xp.sum(ge, axis=-1, keepdims=True) * xs
        return gxs * c, []

    return y, vjp


def elu_vjp(x, *, xp):
    """``elu(x) + 1``: the gradient is 1 above zero and the output itself below."""
    y = _fm.elu_plus_one(x, xp=xp)
    return y, lambda gy: (xp.where(x > 0, gy, gy * y), [])


def relu_vjp(x, *, xp):
    """``max(x, 0)``."""
    y = xp.maximum(x, xp.zeros_like(x))
    return y, lambda gy: (xp.where(x > 0, gy, xp.zeros_like(gy)), [])


def orthogonality_penalty_vjp(weights, *, xp):
    """``sum_W mean((W W^T - I)^2)`` (the smaller Gram matrix) and its gradient per weight.

    Parameters
    ----------
    weights : list of arrays, each (H, d_in, d_out)

    Returns
    -------
    value : 0-d array
    grads : list of arrays shaped like ``weights``
        d/dW = 4 / (H n^2) (G - I) W for G = W W^T (n = d_in <= d_out),
        or 4 / (H n^2) W (G - I) for G = W^T W.
    """
    total, grads = None, []
    for W in weights:
        H, d_in, d_out = W.shape
        n = min(d_in, d_out)
        Wt = swap_last(W, xp=xp)
        wide = d_in <= d_out
        gram = xp.matmul(W, Wt) if wide else xp.matmul(Wt, W)
        r = gram - xp.eye(n, dtype=W.dtype, device=_device(W))
        term = xp.mean(r**2)
        total = term if total is None else total + term
        scale = 4.0 / (H * n * n)
        grads.append(scale * (xp.matmul(r, W) if wide else xp.matmul(W, r)))
    return total, grads


# ---------------------------------------------------------------------------
# linear attention on features


def _noncausal_vjp(fq, fk, v, *, eps, initial_state, xp):
    """Non-causal: the forward of :func:`attention.noncausal_forward`, then its VJP."""
    out, (S, z), saved = _att.noncausal_forward(fq, fk, v, eps=eps, initial_state=initial_state, save=True, xp=xp)
    r = saved["r"]  # (B, H, N, 1)

    def vjp(g, g_state):
        g_num = g * r
        g_den = -xp.sum(g * out, axis=-1, keepdims=True) * r
        gfq = xp.matmul(g_num, swap_last(S, xp=xp)) + g_den * z[..., None, :]
        gS = xp.matmul(swap_last(fq, xp=xp), g_num)
        gz = xp.matmul(swap_last(fq, xp=xp), g_den)[..., 0]
        if g_state is not None:
            gS, gz = gS + g_state[0], gz + g_state[1]
        gfk = xp.matmul(v, swap_last(gS, xp=xp)) + gz[..., None, :]
        gv = xp.matmul(fk, gS)
        return gfq, gfk, gv, (gS, gz)

    return out, (S, z), vjp


def _quadratic_vjp(fq, fk, v, *, causal, eps, initial_state, xp):
    """The O(N L) form (``method="naive"``): the forward of :func:`attention.quadratic_forward`, then its VJP."""
    out, (S, z), saved = _att.quadratic_forward(fq, fk, v, causal=causal, eps=eps, initial_state=initial_state,
                                                save=True, xp=xp)
    A, keep, r = saved["A"], saved["keep"], saved["r"]

    def vjp(g, g_state):
        g_num = g * r
        g_den = -xp.sum(g * out, axis=-1, keepdims=True) * r
        gA = xp.matmul(g_num, swap_last(v, xp=xp)) + g_den
        if keep is not None:
            gA = xp.where(keep, gA, xp.zeros_like(gA))
        gfq = xp.matmul(gA, fk)
        gfk = xp.matmul(swap_last(gA, xp=xp), fq)
        gv = xp.matmul(swap_last(A, xp=xp), g_num)
        g0S = xp.matmul(swap_last(fq, xp=xp), g_num)
        g0z = xp.matmul(swap_last(fq, xp=xp), g_den)[..., 0]
        if initial_state is not None:
            gfq = gfq + xp.matmul(g_num, swap_last(initial_state[0], xp=xp)) + g_den * initial_state[1][..., None, :]
        if g_state is not None:
            gfk = gfk + xp.matmul(v, swap_last(g_state[0], xp=xp)) + g_state[1][..., None, :]
            gv = gv + xp.matmul(fk, g_state[0])
            g0S, g0z = g0S + g_state[0], g0z + g_state[1]
        return gfq, gfk, gv, (g0S, g0z)

    return out, (S, z), vjp


def _chunked_vjp(fq, fk, v, *, eps, chunk_size, initial_state, xp):
    """Causal linear attention by chunks: the forward of :func:`attention.chunked_forward`, then its VJP.

    The backward reads the forward's saved chunked layout (prefix states,
    1 / den, outputs) and is a reverse pass over the chunks: the keys of a
    chunk reach later queries only through the state, so the pass carries its
    gradient (dS, dz), holding one chunk's (C, C), (C, m) and (m, e) pieces at
    a time.
    """
    B, H, N, m = fq.shape
    e = v.shape[-1]
    out, state, sv = _att.chunked_forward(fq, fk, v, eps=eps, chunk_size=chunk_size, initial_state=initial_state,
                                          save=True, xp=xp)
    nc, C = sv.fq.shape[2], sv.fq.shape[3]

    def vjp(g, g_state):
        if g_state is None:
            dS = xp.zeros((B, H, m, e), dtype=fq.dtype, device=_device(fq))
            dz = xp.zeros((B, H, m), dtype=fq.dtype, device=_device(fq))
        else:
            dS, dz = g_state  # gradient w.r.t. the state after the last chunk
        g_c = _att.chunk_tokens(g, C, xp=xp)  # padded rows: r = 0 there, so no gradient
        g_num = g_c * sv.r
        g_den = -xp.sum(g_c * sv.out, axis=-1, keepdims=True) * sv.r
        gfq, gfk, gv = [None] * nc, [None] * nc, [None] * nc
        for c in range(nc - 1, -1, -1):
            fq_c, fk_c, v_c = sv.fq[:, :, c, ...], sv.fk[:, :, c, ...], sv.v[:, :, c, ...]
            g_num_c, g_den_c = g_num[:, :, c, ...], g_den[:, :, c, ...]
            A = _att.chunk_scores(fq_c, fk_c, sv.keep, xp=xp)  # the forward's (C, C) product, recomputed
            gA = xp.matmul(g_num_c, swap_last(v_c, xp=xp)) + g_den_c
            gA = xp.where(sv.keep, gA, xp.zeros_like(gA))
            gfq[c] = (xp.matmul(gA, fk_c) + xp.matmul(g_num_c, swap_last(sv.S_prev[:, :, c, ...], xp=xp))
                      + g_den_c * sv.z_prev[:, :, c, ...][..., None, :])
            # keys of this chunk reach later queries through the carried state (dS, dz)
            gfk[c] = xp.matmul(swap_last(gA, xp=xp), fq_c) + xp.matmul(v_c, swap_last(dS, xp=xp)) + dz[..., None, :]
            gv[c] = xp.matmul(swap_last(A, xp=xp), g_num_c) + xp.matmul(fk_c, dS)
            dS = dS + xp.matmul(swap_last(fq_c, xp=xp), g_num_c)
            dz = dz + xp.matmul(swap_last(fq_c, xp=xp), g_den_c)[..., 0]
        return tuple(_att.unchunk_tokens(xp.stack(parts, axis=2), N, xp=xp) for parts in (gfq, gfk, gv)) + ((dS, dz),)

    return out, state, vjp


def attention_on_features_vjp(fq, fk, v, *, causal, eps, method="auto", chunk_size=64, key_mask=None,
                              initial_state=None, xp):
    """Linear attention on features and its VJP (see :func:`attention.attention_on_features`).

    Parameters
    ----------
    fq : array, shape (B, H, N, m)
    fk : array, shape (B, H, L, m)
    v : array, shape (B, H, L, e)
    causal, eps, method, chunk_size, key_mask, initial_state
        As in :func:`attention.linear_attention`. Causal attention with any
        method but ``"naive"`` runs by chunks, backward included.

    Returns
    -------
    out : array, shape (B, H, N, e)
    state : tuple (S, z)
        The state after the last key, (B, H, m, e) and (B, H, m).
    vjp : callable
        ``vjp(g_out, g_state=None)`` returns ``(g_fq, g_fk, g_v, g_initial_state)``;
        ``g_state`` is the cotangent of the returned state (or None), and
        ``g_initial_state`` is None unless an initial state was given.
    """
    fk_m, v_m = _att.mask_keys(fk, v, key_mask, xp=xp)
    kw = dict(eps=eps, initial_state=initial_state, xp=xp)
    if method == "naive":
        out, state, inner = _quadratic_vjp(fq, fk_m, v_m, causal=causal, **kw)
    elif not causal or fq.shape[2] == 0:  # no tokens: nothing causal to do
        out, state, inner = _noncausal_vjp(fq, fk_m, v_m, **kw)
    else:
        out, state, inner = _chunked_vjp(fq, fk_m, v_m, chunk_size=chunk_size, **kw)

    def vjp(g_out, g_state=None):
        gfq, gfk, gv, g0 = inner(g_out, g_state)
        if key_mask is not None:  # padded rows were zeroed after phi: no gradient reaches them
            keep = key_mask[:, None, :, None]
            gfk = xp.where(keep, gfk, xp.zeros_like(gfk))
            gv = xp.where(keep, gv, xp.zeros_like(gv))
        return gfq, gfk, gv, (g0 if initial_state is not None else None)

    return out, state, vjp


def param_grads(feature_map, g_query, g_key):
    """Assemble per-role block gradients into the shape of ``feature_map.params``."""
    params = feature_map.params
    if not params:
        return {}
    if "shared" in params:
        return {"shared": _add_trees(g_query, g_key)}
    return {"key": g_key, "query": g_query}


def linear_attention_vjp(q, k, v, *, feature_map, causal=False, key_mask=None, eps=1e-6, chunk_size=64,
                         method="auto", initial_state=None, xp):
    """Linear attention (see :func:`attention.linear_attention`) and its VJP.

    ``q``, ``k``, ``v`` are in the compute dtype; ``feature_map`` has
    ``kind``, ``params``, ``buffers`` and ``blocks(role)``.

    Returns
    -------
    out : array, shape (B, H, N, e)
    state : tuple (S, z)
    vjp : callable
        ``vjp(g_out, g_state=None)`` returns ``(g_q, g_k, g_v, g_params,
        g_initial_state)``, ``g_params`` shaped like ``feature_map.params``.
    """
    fq, vjp_q = _phi_vjp(feature_map, q, "query", xp=xp)
    fk, vjp_k = _phi_vjp(feature_map, k, "key", xp=xp)
    out, state, vjp_att = attention_on_features_vjp(
        fq, fk, v, causal=causal, eps=eps, method=method, chunk_size=chunk_size, key_mask=key_mask,
        initial_state=initial_state, xp=xp)

    def vjp(g_out, g_state=None):
        gfq, gfk, gv, g0 = vjp_att(g_out, g_state)
        gq, gbq = vjp_q(gfq)
        gk, gbk = vjp_k(gfk)
        return gq, gk, gv, param_grads(feature_map, gbq, gbk), g0

    return out, state, vjp


def _phi_vjp(feature_map, x, role, *, xp):
    # the map's kind holds its hand VJP (kernelattn/kinds.py)
    return feature_map.vjp(x, role=role, xp=xp)


# ---------------------------------------------------------------------------
# distillation losses: linear attention against softmax attention


def _valid_mask(n, l, *, causal, key_mask, device, xp):
    """Boolean mask of attended places, broadcastable to (B, H, N, L); None if all."""
    keep = _att._causal_mask(n, l, device=device, xp=xp) if causal else None
    if key_mask is not None:
        km = key_mask[:, None, None, :]
        keep = km if keep is None else xp.logical_and(keep, km)
    return keep


def _zero_where_not(keep, x, *, xp):
    return x if keep is None else xp.where(keep, x, xp.zeros_like(x))


def softmax_log_weights(q, k, *, keep, scale, xp):
    """``(p, log p)`` of softmax(Q K^T * scale), both 0 at masked places and in empty rows."""
    s = xp.matmul(q, swap_last(k, xp=xp)) * scale
    if keep is not None:
        s = xp.where(keep, s, xp.full_like(s, -math.inf))
    mx = xp.max(s, axis=-1, keepdims=True)
    mx = xp.where(xp.isfinite(mx), mx, xp.zeros_like(mx))
    ex = xp.exp(s - mx)
    den = xp.sum(ex, axis=-1, keepdims=True)
    den = xp.where(den > 0, den, xp.ones_like(den))
    logp = _zero_where_not(keep, s - mx - xp.log(den), xp=xp)
    return ex / den, logp


def _softmax_input_grads(gs, q, k, scale, *, xp):
    """Gradients of q and k from the gradient ``gs`` (B, H, N, L) of the scaled logits."""
    return (xp.matmul(gs, k) * scale, xp.matmul(swap_last(gs, xp=xp), q) * scale)


def softmax_teacher(q, k, v=None, *, loss, causal=False, key_mask=None, scale=None, xp):
    """What a distillation loss needs from softmax attention, computed once for fixed q, k, v.

    ``(p, log p)`` for ``"attention_kl"``, ``(p, p @ v)`` for ``"output_mse"``
    (each (B, H, N, L) and (B, H, N, e)); pass it as ``teacher=`` to the
    ``*_value_and_grad`` functions to skip recomputing it at every step.
    """
    N, d = q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    keep = _valid_mask(N, k.shape[-2], causal=causal, key_mask=key_mask, device=_device(q), xp=xp)
    p, logp = softmax_log_weights(q, k, keep=keep, scale=scale, xp=xp)
    return (p, logp) if loss == "attention_kl" else (p, xp.matmul(p, v))


def attention_kl_value_and_grad(q, k, *, feature_map, causal=False, key_mask=None, eps=1e-6, scale=None,
                                floor=1e-8, need_inputs=True, teacher=None, xp):
    """Mean over rows of KL(softmax weights || linear attention weights), and its gradients.

    ``KL_i = sum_j p_ij (log p_ij - log(a_ij + floor))`` with ``p`` the
    softmax weights and ``a`` the linear attention weights
    ``phi(q_i).phi(k_j) / (sum_j phi(q_i).phi(k_j) + eps)`` (Hedgehog's
    attention distillation; the same gradient in phi as the cross-entropy).
    The mean runs over all B * H * N rows.

    Returns
    -------
    value : 0-d array
    grads : tuple (g_q, g_k, g_params)
        g_q, g_k (B, H, N, d) and (B, H, L, d), None unless ``need_inputs``
        (both the softmax teacher and the linear student depend on them);
        g_params shaped like ``feature_map.params``.
    """
    B, H, N, d = q.shape
    L = k.shape[-2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    keep = _valid_mask(N, L, causal=causal, key_mask=key_mask, device=_device(q), xp=xp)
    if teacher is None:
        teacher = softmax_teacher(q, k, loss="attention_kl", causal=causal, key_mask=key_mask, scale=scale, xp=xp)
    p, logp = teacher
    fq, vjp_q = _phi_vjp(feature_map, q, "query", xp=xp)
    fk, vjp_k = _phi_vjp(feature_map, k, "key", xp=xp)
    A = _zero_where_not(keep, xp.matmul(fq, swap_last(fk, xp=xp)), xp=xp)
    D = xp.sum(A, axis=-1, keepdims=True) + eps
    a = A / D
    t = a + floor
    f = _zero_where_not(keep, logp - xp.log(t), xp=xp)
    rows = B * H * N
    value = xp.sum(p * f) / rows

    # student: d/da = -p / t / rows; through a = A / D
    ga = -(p / t) / rows
    gA = (ga - xp.sum(ga * a, axis=-1, keepdims=True)) / D
    gA = _zero_where_not(keep, gA, xp=xp)
    gfq = xp.matmul(gA, fk)
    gfk = xp.matmul(swap_last(gA, xp=xp), fq)
    gq, gbq = vjp_q(gfq)
    gk, gbk = vjp_k(gfk)
    g_params = param_grads(feature_map, gbq, gbk)
    if not need_inputs:
        return value, (None, None, g_params)
    # teacher: d/ds of sum_j p_j f_j is p (f - sum_j p_j f_j), per row
    gs = p * (f - xp.sum(p * f, axis=-1, keepdims=True)) / rows
    tq, tk = _softmax_input_grads(gs, q, k, scale, xp=xp)
    return value, (gq + tq, gk + tk, g_params)


def output_mse_value_and_grad(q, k, v, *, feature_map, causal=False, key_mask=None, eps=1e-6, scale=None,
                              chunk_size=64, method="auto", need_inputs=True, teacher=None, xp):
    """Relative squared error of the output, ``sum((o - o*)^2) / sum(o*^2)``, and its gradients.

    ``o`` is linear attention, ``o*`` softmax attention of the same q, k, v.

    Returns
    -------
    value : 0-d array
    grads : tuple (g_q, g_k, g_v, g_params)
        g_q, g_k, g_v None unless ``need_inputs``; both attentions depend on them.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if teacher is None:
        teacher = softmax_teacher(q, k, v, loss="output_mse", causal=causal, key_mask=key_mask, scale=scale, xp=xp)
    p, target = teacher
    out, _, vjp = linear_attention_vjp(q, k, v, feature_map=feature_map, causal=causal, key_mask=key_mask,
                                       eps=eps, chunk_size=chunk_size, method=method, xp=xp)
    diff = out - target
    err, norm = xp.sum(diff * diff), xp.sum(target * target)
    value = err / norm
    g_out = (2.0 / norm) * diff
    gq, gk, gv, g_params, _ = vjp(g_out)
    if not need_inputs:
        return value, (None, None, None, g_params)
    g_target = -g_out - (2.0 * err / (norm * norm)) * target
    gp = xp.matmul(g_target, swap_last(v, xp=xp))
    gs = p * (gp - xp.sum(gp * p, axis=-1, keepdims=True))
    tq, tk = _softmax_input_grads(gs, q, k, scale, xp=xp)
    return value, (gq + tq, gk + tk, gv + xp.matmul(swap_last(p, xp=xp), g_target), g_params)


def attention_kl(q, k, *, feature_map, causal=False, key_mask=None, eps=1e-6, scale=None, floor=1e-8, xp):
    """The value of :func:`attention_kl_value_and_grad`, from plain array operations.

    Written without the VJP machinery, so torch autograd and ``jax.grad``
    differentiate it directly (and check the hand-derived gradients).
    """
    B, H, N, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    keep = _valid_mask(N, k.shape[-2], causal=causal, key_mask=key_mask, device=_device(q), xp=xp)
    p, logp = softmax_log_weights(q, k, keep=keep, scale=scale, xp=xp)
    fq = feature_map.apply(q, role="query", xp=xp)
    fk = feature_map.apply(k, role="key", xp=xp)
    A = _zero_where_not(keep, xp.matmul(fq, swap_last(fk, xp=xp)), xp=xp)
    a = A / (xp.sum(A, axis=-1, keepdims=True) + eps)
    f = _zero_where_not(keep, logp - xp.log(a + floor), xp=xp)
    return xp.sum(p * f) / (B * H * N)


def output_mse(q, k, v, *, feature_map, causal=False, key_mask=None, eps=1e-6, scale=None, chunk_size=64,
               method="auto", xp):
    """The value of :func:`output_mse_value_and_grad`, from the forward core functions."""
    target = _att.softmax_attention(q, k, v, causal=causal, key_mask=key_mask, scale=scale, xp=xp)
    out, _ = _att.linear_attention(q, k, v, feature_map=feature_map, causal=causal, key_mask=key_mask, eps=eps,
                                   chunk_size=chunk_size, method=method, xp=xp)
    diff = out - target
    return xp.sum(diff * diff) / xp.sum(target * target)


def distill_value_and_grad(loss, q, k, v=None, *, feature_map, causal=False, key_mask=None, eps=1e-6, scale=None,
                           floor=1e-8, ortho_weight=0.0, chunk_size=64, method="auto", need_inputs=True,
                           teacher=None, xp):
    """A distillation loss plus ``ortho_weight`` times the orthogonality penalty, and its gradients.

    Returns ``(value, (g_q, g_k, g_v, g_params))``; g_q, g_k, g_v are None
    unless ``need_inputs`` (g_v also for ``"attention_kl"``).
    """
    common = dict(feature_map=feature_map, causal=causal, key_mask=key_mask, eps=eps, scale=scale,
                  need_inputs=need_inputs, teacher=teacher, xp=xp)
    if loss == "attention_kl":
        value, (gq, gk, g_params) = attention_kl_value_and_grad(q, k, floor=floor, **common)
        gv = None
    else:
        value, (gq, gk, gv, g_params) = output_mse_value_and_grad(q, k, v, chunk_size=chunk_size, method=method,
                                                                  **common)
    weights = feature_map.main_weights()
    if ortho_weight and weights:
        penalty, g_w = orthogonality_penalty_vjp(weights, xp=xp)
        value = value + ortho_weight * cast(penalty, value.dtype, xp=xp)
        extra = iter([ortho_weight * g for g in g_w])  # in main_weights order: roles sorted, blocks in order
        g_params = {role: [{key: (g + next(extra) if key == "W" else g) for key, g in block.items()}
                           for block in g_params[role]]
                    for role in sorted(g_params)}
    return value, (gq, gk, gv, g_params)
