"""Linear attention on features for torch, by blocks of tokens.

Shapes: batch B, heads H, query length N, key length L, feature dim m, value
dim e, E = e + 1. States are *augmented*: ``S' = [S, z]`` (B, H, m, E), so
that ``phi(q) S'`` is ``[num, den]`` in one product; the causal form also
augments the values with a column of ones, ``va = [v, 1]`` (B, H, L, E).

Why blocks. On a CPU the cost of linear attention is not its FLOPs but its
temporaries: a full-size intermediate (32 MiB at N = 16384, H = 8, m = 64)
is fresh memory, page-faulted in on every call. Walking the sequence in
blocks of a few hundred tokens (all heads at once) keeps every temporary in
the L2/L3 cache and out of the page-fault path, and lets the feature map be
applied block by block (:func:`forward_fused`), so phi(Q) and phi(K) never
exist in full. The outputs themselves are allocated in huge pages where
Linux allows (:mod:`kernelattn.backends._torch_mem`).

Causal attention inside a block is the chunked form (exact masked products
inside chunks of C tokens, an exclusive prefix of chunk states between them),
with the state carried from block to block. Its backward
(:func:`_causal_backward`) walks the blocks in reverse, recomputing what it
needs per block from O(N / T) state checkpoints and carrying the reverse
state R = sum over later queries of phi(q_i) [g_i / den_i, -(g_i . out_i) / den_i]^T,
so memory stays O(N) and no (N, m, e) tensor is ever formed.

The differentiable entry point is the custom op ``kernelattn::attend`` (with
``kernelattn::attend_backward``): opaque to ``torch.compile``, so a compiled
model runs these loops as they are instead of unrolling them into a graph.
"""

from __future__ import annotations

from typing import Optional

import torch

from kernelattn.backends import _torch_mem

#: floats per block operand: B*H*T*max(m, E) stays near 512 KiB in float32
BLOCK_FLOATS = 1 << 17
#: the same for the non-causal forward (2 MiB, in L3): its blocks are two products and the feature map, and
#: fewer, larger ones measured 5-15 % faster than at BLOCK_FLOATS (B * H from 8 to 96, N from 4K to 16K, the ffn
#: map, asv_benchmarks/torch_cpu_targets.py's machine); the causal blocks' chunked products are not
NONCAUSAL_BLOCK_FLOATS = 1 << 19
#: largest block (tokens)
MAX_BLOCK = 2048


def block_tokens(bh: int, width: int, chunk: int, floats: Optional[int] = None) -> int:
    """Tokens per block T: a multiple of ``chunk`` (and of 64 where it can be) sized to the cache budget.

    ``width`` is the per-token width of the operands (max(m, e)); the (T, C)
    intra-chunk products of the causal form count as ``chunk`` wide. Blocks
    of a multiple of 64 tokens keep the BLAS kernels on their fast path.
    ``floats``: the budget per operand (default :data:`BLOCK_FLOATS`).
    """
    align = chunk * max(1, 64 // chunk) if 64 % chunk == 0 else chunk
    t = min(MAX_BLOCK, (floats or BLOCK_FLOATS) // max(1, bh * max(width, chunk)))
    return max(align, (t // align) * align) if t >= align else max(chunk, (t // chunk) * chunk)


def segments(n: int, chunk: int, block: int) -> list[tuple[int, int, int]]:
    """``(start, stop, chunk)`` covering range(n): blocks of whole chunks, then the remainder."""
    out = []
    t0 = 0
    while t0 < n:
        t1 = min(t0 + block, n)
        full = ((t1 - t0) // chunk) * chunk
        if full:
            out.append((t0, t0 + full, chunk))
        if t0 + full < t1:
            out.append((t0 + full, t1, t1 - t0 - full))
        t0 = t1
    return out


# ---------------------------------------------------------------------------
# one block


def _values_block(buf, v, t0, t1, keep=None):
    """``[v[t0:t1], 1]`` in ``buf`` (B, H, >= n, E) whose last column holds ones; padded values zeroed."""
    n = t1 - t0
    va = buf[:, :, :n]
    vals = va[..., :-1]
    vals.copy_(v[:, :, t0:t1])
    if keep is not None:  # the ones stay: the caller zeroes the keys' features
        vals.masked_fill_(~keep[:, None, t0:t1, None], 0.0)
    return va


_LOWER: dict = {}


def _strict_lower(G, bh, like):
    """(bh, G, G) view of the strictly lower-triangular ones: ``L @ X`` is X's exclusive prefix over G."""
    key = (G, like.dtype, like.device)
    lower = _LOWER.get(key)
    if lower is None:
        lower = _LOWER[key] = torch.ones(G, G, dtype=like.dtype, device=like.device).tril_(-1)
    return lower.expand(bh, G, G)


def _causal_block(fq, fk, va, S, chunk: int):
    """Causal attention of one block given the state S (B, H, m, E) before it.

    Returns ``nu`` (B, H, n, E) = [numerators, denominators] and the state after the block.
    The states before each chunk are ``S + L @ Sc``, L strictly lower triangular:
    one small product instead of a cumulative sum over a short axis (4x faster here).
    """
    B, H, n, m = fq.shape
    E = va.shape[-1]
    G, bh = n // chunk, B * H
    fq3 = fq.reshape(bh * G, chunk, m)
    fk3 = fk.reshape(bh * G, chunk, m)
    va3 = va.reshape(bh * G, chunk, E)
    A = torch.bmm(fq3, fk3.transpose(1, 2)).tril_()  # exact products inside each chunk
    nu = torch.bmm(A, va3)
    Sc = torch.bmm(fk3.transpose(1, 2), va3).view(bh, G, m * E)  # each chunk's own state
    prefix = torch.bmm(_strict_lower(G, bh, Sc), Sc).add_(S.reshape(bh, 1, m * E))
    S_next = (prefix[:, -1] + Sc[:, -1]).view(B, H, m, E)
    nu.baddbmm_(fq3, prefix.view(bh * G, m, E))
    return nu.view(B, H, n, E), S_next


def _write_out(out, nu, t0, t1, eps, den=None, plain=False):
    """out[t0:t1] = num / (den + eps); keeps den + eps in ``den`` when given.

    A zero denominator (nothing to attend to) is stored as +inf: the row reads
    out as num / inf = 0 and the backward's 1 / den is 0, for every eps >= 0.
    ``plain`` (nonnegative features, eps > 0, no state given, no ``den``):
    there num is 0 wherever den is, so num / (den + eps) is that zero row already.
    """
    if plain:
        out[:, :, t0:t1] = nu[..., :-1] / nu[..., -1:].add_(eps)
        return
    d = nu[..., -1:]
    d = torch.where(d != 0, d + eps, torch.inf)
    # a temporary, then a copy: torch.div(..., out=) into this strided slice runs ~4x slower on CPU
    # (measured at N = 16384, B = 1, H = 8: 50 ms against 13 ms for the whole output)
    out[:, :, t0:t1] = nu[..., :-1] / d
    if den is not None:
        den[:, :, t0:t1] = d[..., 0]


# ---------------------------------------------------------------------------
# forward by blocks, features from a function of the token range


def forward_blocks(fq_of, fk_of, v, *, N: int, m: int, causal: bool, eps: float, chunk: int,
                   state=None, keep=None, out_dtype=None, compute_dtype=None, want_den: bool = False,
                   nonnegative: bool = False):
    """Linear attention walking the tokens in blocks.

    Parameters
    ----------
    fq_of, fk_of : callable (start, stop) -> torch.Tensor, shape (B, H, stop - start, m)
        Query / key features of a token range, in the compute dtype. For the
        fused path they apply phi to that slice of q / k; otherwise they slice
        precomputed features. With ``keep``, ``fk_of`` must return a fresh
        tensor (it is masked in place).
    v : torch.Tensor, shape (B, H, L, e)
    N, m : int
        Number of queries and feature width.
    causal, eps, chunk
        As in :func:`kernelattn.linear_attention` (causal needs N = L).
    state : torch.Tensor, shape (B, H, m, E), optional
        Augmented state [S, z] to continue from.
    keep : bool torch.Tensor, shape (B, L), optional
        True for real keys.
    out_dtype, compute_dtype : torch.dtype
    want_den : bool
        Also return den + eps, shape (B, H, N) (for the backward).
    nonnegative : bool
        The features are never negative (see :func:`_write_out`).

    Returns
    -------
    out : (B, H, N, e) in ``out_dtype``
    state : (B, H, m, E) in the compute dtype
    den : (B, H, N) or None
    """
    B, H, L, e = v.shape
    E = e + 1
    cdt = compute_dtype or v.dtype
    dev = v.device
    S = torch.zeros(B, H, m, E, dtype=cdt, device=dev) if state is None else state.to(cdt).clone()
    out = _torch_mem.empty((B, H, N, e), dtype=out_dtype or cdt, device=dev)
    den = torch.empty(B, H, N, dtype=cdt, device=dev) if want_den else None
    plain = nonnegative and eps > 0 and state is None and not want_den
    if causal:
        segs = segments(N, chunk, block_tokens(B * H, max(m, e), chunk))
        buf = torch.ones(B, H, max((t1 - t0 for t0, t1, _ in segs), default=0), E, dtype=cdt, device=dev)
        for t0, t1, c in segs:
            fk = fk_of(t0, t1)
            if keep is not None:
                fk.masked_fill_(~keep[:, None, t0:t1, None], 0.0)
            va = _values_block(buf, v, t0, t1, keep)
            nu, S = _causal_block(fq_of(t0, t1), fk, va, S, c)
            _write_out(out, nu, t0, t1, eps, den, plain)
        return out, S, den
    block = block_tokens(B * H, max(m, e), 1, NONCAUSAL_BLOCK_FLOATS)
    Sv, z = S[..., :e].clone(), S[..., e].clone()
    Sv3, z3 = Sv.view(B * H, m, e), z.view(B * H, m)
    for t0 in range(0, L, block):
        t1 = min(t0 + block, L)
        fk = fk_of(t0, t1).reshape(B * H, t1 - t0, m)
        vb = v[:, :, t0:t1]
        if keep is not None:
            drop = ~keep[:, None, t0:t1, None]
            fk.masked_fill_(drop.expand(B, H, t1 - t0, 1).reshape(B * H, t1 - t0, 1), 0.0)
            vb = vb.masked_fill(drop, 0.0)
        Sv3.baddbmm_(fk.transpose(1, 2), vb.to(cdt).reshape(B * H, t1 - t0, e))
        z3.add_(fk.sum(1))
    S = torch.cat([Sv, z.unsqueeze(-1)], dim=-1)
    for t0 in range(0, N, block):
        t1 = min(t0 + block, N)
        _write_out(out, torch.matmul(fq_of(t0, t1), S), t0, t1, eps, den, plain)
    return out, S, den


def forward_fused(q, k, v, *, fmap, m, causal, eps, chunk, state=None, keep=None, compute_dtype,
                  nonnegative=False):
    """Forward with phi applied block by block (no autograd): phi(Q), phi(K) never exist in full.

    ``fmap(x, role)`` maps a (B, H, n, d) slice, already in the compute dtype,
    to its (B, H, n, m) features.
    """
    cdt = compute_dtype

    def fq_of(t0, t1):
        return fmap(q[:, :, t0:t1].to(cdt), "query")

    def fk_of(t0, t1):
        return fmap(k[:, :, t0:t1].to(cdt), "key")

    out, S, _ = forward_blocks(fq_of, fk_of, v, N=q.shape[2], m=m, causal=causal, eps=eps, chunk=chunk,
                               state=state, keep=keep, out_dtype=q.dtype, compute_dtype=cdt,
                               nonnegative=nonnegative)
    return out, S


# ---------------------------------------------------------------------------
# backward


def _ones_column(v):
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def _grad_aug(g, out, den):
    """[g / den, -(g . out) / den]: the gradient with respect to [num, den] (B, H, n, E)."""
    ga = torch.empty(*g.shape[:-1], g.shape[-1] + 1, dtype=den.dtype, device=den.device)
    d = den.unsqueeze(-1)
    torch.div(g, d, out=ga[..., :-1])
    ga[..., -1:] = -(g * out).sum(-1, keepdim=True) / d
    return ga


def _noncausal_backward(g, gS, fq, fk, v, state, out, den):
    va = _ones_column(v)
    S = torch.matmul(fk.transpose(-1, -2), va)
    if state is not None:
        S = S + state
    ga = _grad_aug(g, out, den)
    dfq = torch.matmul(ga, S.transpose(-1, -2))
    R = torch.matmul(fq.transpose(-1, -2), ga)
    if gS is not None:
        R = R + gS
    dfk = torch.matmul(va, R.transpose(-1, -2))
    dv = torch.matmul(fk, R[..., :-1])
    return dfq, dfk, dv, R


def _causal_backward(g, gS, fq, fk, v, state, out, den, chunk):
    B, H, N, m = fq.shape
    e = v.shape[-1]
    E = e + 1
    segs = segments(N, chunk, block_tokens(B * H, max(m, e), chunk))
    buf = torch.ones(B, H, max((t1 - t0 for t0, t1, _ in segs), default=0), E, dtype=fq.dtype, device=fq.device)
    # state at the start of every block: one cheap forward sweep, O(N / T) memory
    S = torch.zeros(B, H, m, E, dtype=fq.dtype, device=fq.device) if state is None else state
    starts = []
    for t0, t1, _ in segs:
        starts.append(S)
        va = _values_block(buf, v, t0, t1)
        S = torch.baddbmm(S.reshape(B * H, m, E), fk[:, :, t0:t1].reshape(B * H, t1 - t0, m).transpose(1, 2),
                          va.reshape(B * H, t1 - t0, E)).view(B, H, m, E)
    R = torch.zeros(B, H, m, E, dtype=fq.dtype, device=fq.device) if gS is None else gS.clone()
    dfq, dfk, dv = (_torch_mem.empty(t.shape, dtype=t.dtype, device=t.device) for t in (fq, fk, v))
    for (t0, t1, c), S0 in zip(reversed(segs), reversed(starts)):
        n, G = t1 - t0, (t1 - t0) // c
        va5 = _values_block(buf, v, t0, t1).reshape(B, H, G, c, E)
        ga5 = _grad_aug(g[:, :, t0:t1], out[:, :, t0:t1], den[:, :, t0:t1]).reshape(B, H, G, c, E)
        fq5 = fq[:, :, t0:t1].reshape(B, H, G, c, m)
        fk5 = fk[:, :, t0:t1].reshape(B, H, G, c, m)
        A = torch.matmul(fq5, fk5.transpose(-1, -2)).tril_()  # A[i, j] = phi(q_i) . phi(k_j), j <= i
        Bm = torch.matmul(ga5, va5.transpose(-1, -2)).tril_()  # Bm[i, j] = ga_i . va_j, j <= i
        bh = B * H
        Sc = torch.matmul(fk5.transpose(-1, -2), va5).view(bh, G, m * E)
        lower = _strict_lower(G, bh, Sc)
        prefix = torch.bmm(lower, Sc).add_(S0.reshape(bh, 1, m * E)).view(B, H, G, m, E)  # state before each chunk
        Gc = torch.matmul(fq5.transpose(-1, -2), ga5).view(bh, G, m * E)  # each chunk's share of R
        suffix = torch.bmm(lower.transpose(1, 2), Gc).add_(R.reshape(bh, 1, m * E))  # R after each chunk
        total = (suffix[:, 0] + Gc[:, 0]).view(B, H, m, E)
        suffix = suffix.view(B, H, G, m, E)
        dfq[:, :, t0:t1] = (torch.matmul(Bm, fk5) + torch.matmul(ga5, prefix.transpose(-1, -2))).reshape(B, H, n, m)
        dfk[:, :, t0:t1] = (torch.matmul(Bm.transpose(-1, -2), fq5)
                            + torch.matmul(va5, suffix.transpose(-1, -2))).reshape(B, H, n, m)
        dva = torch.matmul(A.transpose(-1, -2), ga5) + torch.matmul(fk5, suffix)
        dv[:, :, t0:t1] = dva[..., :-1].reshape(B, H, n, e)
        R = total
    return dfq, dfk, dv, R


# ---------------------------------------------------------------------------
# the custom ops: differentiable, opaque to torch.compile


@torch.library.custom_op("kernelattn::attend", mutates_args=())
def attend(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, state: Optional[torch.Tensor],
           causal: bool, eps: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear attention on features: (out (B, H, N, e), state [S, z] (B, H, m, E), den + eps (B, H, N)).

    ``fq`` (B, H, N, m), ``fk`` (B, H, L, m) and ``v`` (B, H, L, e) share the
    compute dtype, padded keys already zeroed; ``state`` is (B, H, m, E) or None.
    """
    out, S, den = forward_blocks(lambda a, b: fq[:, :, a:b], lambda a, b: fk[:, :, a:b], v,
                                 N=fq.shape[2], m=fq.shape[3], causal=causal, eps=eps, chunk=chunk,
                                 state=state, compute_dtype=fq.dtype, want_den=True)
    return out, S, den


@attend.register_fake
def _(fq, fk, v, state, causal, eps, chunk):
    B, H, N, m = fq.shape
    e = v.shape[-1]
    return fq.new_empty(B, H, N, e), fq.new_empty(B, H, m, e + 1), fq.new_empty(B, H, N)


@torch.library.custom_op("kernelattn::attend_backward", mutates_args=())
def attend_backward(g: torch.Tensor, g_state: Optional[torch.Tensor], fq: torch.Tensor, fk: torch.Tensor,
                    v: torch.Tensor, state: Optional[torch.Tensor], out: torch.Tensor, den: torch.Tensor,
                    causal: bool, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (d fq, d fk, d v, d state) of :func:`attend`."""
    g = g.to(fq.dtype)
    if causal:
        return _causal_backward(g, g_state, fq, fk, v, state, out, den, chunk)
    return _noncausal_backward(g, g_state, fq, fk, v, state, out, den)


@attend_backward.register_fake
def _(g, g_state, fq, fk, v, state, out, den, causal, chunk):
    B, H, _, m = fq.shape
    e = v.shape[-1]
    return torch.empty_like(fq), torch.empty_like(fk), torch.empty_like(v), fq.new_empty(B, H, m, e + 1)


def _setup_context(ctx, inputs, output):
    fq, fk, v, state, causal, eps, chunk = inputs
    out, _S, den = output
    ctx.save_for_backward(fq, fk, v, state, out, den)
    ctx.causal, ctx.chunk = causal, chunk


def _backward(ctx, g_out, g_state, _g_den):
    fq, fk, v, state, out, den = ctx.saved_tensors
    if g_out is None:
        g_out = torch.zeros_like(out)
    dfq, dfk, dv, dstate = attend_backward(g_out, g_state, fq, fk, v, state, out, den, ctx.causal, ctx.chunk)
    return dfq, dfk, dv, (dstate if state is not None else None), None, None, None


attend.register_autograd(_backward, setup_context=_setup_context)
