"""Triton kernels for linear attention on features (CUDA; CPU under ``TRITON_INTERPRET=1``).

Shapes, flattened over batch and heads (BH = B * H): features ``fq`` (BH, N, m),
``fk`` (BH, L, m), values ``v`` (BH, L, e); a state is (S (BH, m, e), z (BH, m)).
Everything accumulates in float32; features may be float32, float16 or
bfloat16 (float32 products use IEEE precision, never TF32).

Kernels (all on tiles of BC tokens, features and values padded to powers of two):

* ``_xty``: per program, ``sum_t X_t^T Y_t`` and ``sum_t w_t X_t`` over a range
  of tokens -- the state of a chunk (range = one chunk) or a partial sum of
  the whole sequence (non-causal);
* ``_prefix``: walks the chunk states in order (or in reverse), writing the
  state before each chunk and the final state -- exact sums, no subtraction;
* ``_chunk_fwd``: causal output of one chunk from its features and the state
  before it: ``(tril(q k^T) v + q S) / (rowsum(tril(q k^T)) + q . z + eps)``;
* ``_chunk_bwd``: the gradients of one chunk, given the state before it and
  the reverse state after it (see :mod:`kernelattn.backends._torch_ops` for
  the algebra: gn = g / den, gd = -(g . out) / den);
* ``_rows``: per token ``x_t M (+ w_t u)``, or normalised by ``x_t . u + eps``
  -- the non-causal read-out and its backward.

The causal form keeps one (m, e) state per chunk on the device: O(N m e / C)
memory (twice an (N, e) tensor for C = 64, m = e = 128), never (N, m, e).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _p2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(int(n)))


@triton.jit
def _xty(X, Y, Wt, OUT, OUTV, T, DX, DY, TPP, sxb, sxt, syb, syt, swb,
         HAS_W: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, BT: tl.constexpr, BX: tl.constexpr,
         BY: tl.constexpr):
    bh = tl.program_id(0)
    p = tl.program_id(1)
    nprog = tl.num_programs(1)
    ox = tl.arange(0, BX)
    oy = tl.arange(0, BY)
    acc = tl.zeros((BX, BY), dtype=tl.float32)
    accv = tl.zeros((BX,), dtype=tl.float32)
    start = p * TPP
    stop = tl.minimum(start + TPP, T)
    for t0 in range(start, stop, BT):
        ot = t0 + tl.arange(0, BT)
        mt = ot < stop
        x = tl.load(X + bh * sxb + ot[:, None] * sxt + ox[None, :], mask=mt[:, None] & (ox[None, :] < DX), other=0.0)
        y = tl.load(Y + bh * syb + ot[:, None] * syt + oy[None, :], mask=mt[:, None] & (oy[None, :] < DY), other=0.0)
        if UPCAST:
            x, y = x.to(tl.float32), y.to(tl.float32)
        acc += tl.dot(tl.trans(x), y, input_precision=PREC)
        if HAS_W:
            w = tl.load(Wt + bh * swb + ot, mask=mt, other=0.0)
            accv += tl.sum(x.to(tl.float32) * w[:, None], axis=0)
        else:
            accv += tl.sum(x.to(tl.float32), axis=0)
    base = (bh * nprog + p)
    tl.store(OUT + base * DX * DY + ox[:, None] * DY + oy[None, :], acc, mask=(ox[:, None] < DX) & (oy[None, :] < DY))
    tl.store(OUTV + base * DX + ox, accv, mask=ox < DX)


@triton.jit
def _prefix(SC, ZC, S0, Z0, P, PZ, SF, ZF, NC, DX, DY,
            HAS_S0: tl.constexpr, REVERSE: tl.constexpr, BX: tl.constexpr, BY: tl.constexpr):
    bh = tl.program_id(0)
    ox = tl.arange(0, BX)
    oy = tl.arange(0, BY)
    mxy = (ox[:, None] < DX) & (oy[None, :] < DY)
    mx = ox < DX
    tile = ox[:, None] * DY + oy[None, :]
    if HAS_S0:
        run = tl.load(S0 + bh * DX * DY + tile, mask=mxy, other=0.0)
        runv = tl.load(Z0 + bh * DX + ox, mask=mx, other=0.0)
    else:
        run = tl.zeros((BX, BY), dtype=tl.float32)
        runv = tl.zeros((BX,), dtype=tl.float32)
    for i in range(0, NC):
        if REVERSE:
            c = NC - 1 - i
        else:
            c = i
        base = bh * NC + c
        tl.store(P + base * DX * DY + tile, run, mask=mxy)
        tl.store(PZ + base * DX + ox, runv, mask=mx)
        run += tl.load(SC + base * DX * DY + tile, mask=mxy, other=0.0)
        runv += tl.load(ZC + base * DX + ox, mask=mx, other=0.0)
    tl.store(SF + bh * DX * DY + tile, run, mask=mxy)
    tl.store(ZF + bh * DX + ox, runv, mask=mx)


@triton.jit
def _chunk_fwd(Q, K, V, PV, PZ, OUT, DEN, N, DM, DE, eps, sq, sk, sv, so,
               PREC: tl.constexpr, UPCAST: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr, BE: tl.constexpr):
    bh = tl.program_id(0)
    c = tl.program_id(1)
    nc = tl.num_programs(1)
    ot = c * BC + tl.arange(0, BC)
    om = tl.arange(0, BM)
    oe = tl.arange(0, BE)
    mt = ot < N
    q = tl.load(Q + bh * sq + ot[:, None] * DM + om[None, :], mask=mt[:, None] & (om[None, :] < DM), other=0.0)
    k = tl.load(K + bh * sk + ot[:, None] * DM + om[None, :], mask=mt[:, None] & (om[None, :] < DM), other=0.0)
    v = tl.load(V + bh * sv + ot[:, None] * DE + oe[None, :], mask=mt[:, None] & (oe[None, :] < DE), other=0.0)
    if UPCAST:
        q, k, v = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32)
    base = bh * nc + c
    P = tl.load(PV + base * DM * DE + om[:, None] * DE + oe[None, :], mask=(om[:, None] < DM) & (oe[None, :] < DE),
                other=0.0)
    pz = tl.load(PZ + base * DM + om, mask=om < DM, other=0.0)
    A = tl.dot(q, tl.trans(k), input_precision=PREC)
    A = tl.where(ot[:, None] >= ot[None, :], A, 0.0)
    num = tl.dot(A.to(v.dtype), v, input_precision=PREC) + tl.dot(q.to(tl.float32), P, input_precision=PREC)
    den = tl.sum(A, axis=1) + tl.sum(q.to(tl.float32) * pz[None, :], axis=1)
    den = tl.where(den != 0, den + eps, float("inf"))  # nothing to attend to: 0 out, 0 gradient
    tl.store(OUT + bh * so + ot[:, None] * DE + oe[None, :], num / den[:, None], mask=mt[:, None] & (oe[None, :] < DE))
    tl.store(DEN + bh * N + ot, den, mask=mt)


@triton.jit
def _chunk_bwd(Q, K, V, GN, GD, PV, PZ, RV, RZ, DQ, DK, DV, N, DM, DE, sq, sk, sv, sg,
               PREC: tl.constexpr, UPCAST: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr, BE: tl.constexpr):
    bh = tl.program_id(0)
    c = tl.program_id(1)
    nc = tl.num_programs(1)
    ot = c * BC + tl.arange(0, BC)
    om = tl.arange(0, BM)
    oe = tl.arange(0, BE)
    mt = ot < N
    mqm = mt[:, None] & (om[None, :] < DM)
    mqe = mt[:, None] & (oe[None, :] < DE)
    mme = (om[:, None] < DM) & (oe[None, :] < DE)
    q = tl.load(Q + bh * sq + ot[:, None] * DM + om[None, :], mask=mqm, other=0.0)
    k = tl.load(K + bh * sk + ot[:, None] * DM + om[None, :], mask=mqm, other=0.0)
    v = tl.load(V + bh * sv + ot[:, None] * DE + oe[None, :], mask=mqe, other=0.0)
    if UPCAST:
        q, k, v = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32)
    gn = tl.load(GN + bh * sg + ot[:, None] * DE + oe[None, :], mask=mqe, other=0.0)
    gd = tl.load(GD + bh * N + ot, mask=mt, other=0.0)
    base = bh * nc + c
    P = tl.load(PV + base * DM * DE + om[:, None] * DE + oe[None, :], mask=mme, other=0.0)
    pz = tl.load(PZ + base * DM + om, mask=om < DM, other=0.0)
    R = tl.load(RV + base * DM * DE + om[:, None] * DE + oe[None, :], mask=mme, other=0.0)
    rz = tl.load(RZ + base * DM + om, mask=om < DM, other=0.0)
    tri = ot[:, None] >= ot[None, :]
    A = tl.where(tri, tl.dot(q, tl.trans(k), input_precision=PREC), 0.0)
    Bm = tl.where(tri, tl.dot(gn, tl.trans(v.to(tl.float32)), input_precision=PREC) + gd[:, None], 0.0)
    dq = tl.dot(Bm, k.to(tl.float32), input_precision=PREC) + tl.dot(gn, tl.trans(P), input_precision=PREC) \
        + gd[:, None] * pz[None, :]
    dk = tl.dot(tl.trans(Bm), q.to(tl.float32), input_precision=PREC) \
        + tl.dot(v.to(tl.float32), tl.trans(R), input_precision=PREC) + rz[None, :]
    dv = tl.dot(tl.trans(A), gn, input_precision=PREC) + tl.dot(k.to(tl.float32), R, input_precision=PREC)
    tl.store(DQ + bh * sq + ot[:, None] * DM + om[None, :], dq, mask=mqm)
    tl.store(DK + bh * sk + ot[:, None] * DM + om[None, :], dk, mask=mqm)
    tl.store(DV + bh * sv + ot[:, None] * DE + oe[None, :], dv, mask=mqe)


@triton.jit
def _rows(X, M, U, Wt, OUT, DEN, T, DX, DY, eps, sxb, sxt, sob,
          TRANS_M: tl.constexpr, NORMALIZE: tl.constexpr, HAS_U: tl.constexpr, HAS_W: tl.constexpr,
          PREC: tl.constexpr, BT: tl.constexpr, BX: tl.constexpr, BY: tl.constexpr):
    """out_t = x_t M' (+ w_t u), or x_t M' / (x_t . u + eps); M' = M (DX, DY) or M^T with M (DY, DX)."""
    bh = tl.program_id(0)
    ot = tl.program_id(1) * BT + tl.arange(0, BT)
    ox = tl.arange(0, BX)
    oy = tl.arange(0, BY)
    mt = ot < T
    x = tl.load(X + bh * sxb + ot[:, None] * sxt + ox[None, :], mask=mt[:, None] & (ox[None, :] < DX),
                other=0.0).to(tl.float32)
    mxy = (ox[:, None] < DX) & (oy[None, :] < DY)
    if TRANS_M:
        Mt = tl.load(M + bh * DX * DY + oy[None, :] * DX + ox[:, None], mask=mxy, other=0.0)
    else:
        Mt = tl.load(M + bh * DX * DY + ox[:, None] * DY + oy[None, :], mask=mxy, other=0.0)
    acc = tl.dot(x, Mt, input_precision=PREC)
    if NORMALIZE:
        u = tl.load(U + bh * DX + ox, mask=ox < DX, other=0.0)
        den = tl.sum(x * u[None, :], axis=1)
        den = tl.where(den != 0, den + eps, float("inf"))  # nothing to attend to: 0 out, 0 gradient
        acc = acc / den[:, None]
        tl.store(DEN + bh * T + ot, den, mask=mt)
    elif HAS_U:
        u = tl.load(U + bh * DY + oy, mask=oy < DY, other=0.0)
        if HAS_W:
            w = tl.load(Wt + bh * T + ot, mask=mt, other=0.0)
            acc += w[:, None] * u[None, :]
        else:
            acc += u[None, :]
    tl.store(OUT + bh * sob + ot[:, None] * DY + oy[None, :], acc, mask=mt[:, None] & (oy[None, :] < DY))


# ---------------------------------------------------------------------------
# launchers


def _prec(t):
    return "ieee" if t.dtype == torch.float32 else "tf32"


def _upcast(t) -> bool:
    """Products of bfloat16 tiles come out wrong in Triton 3.7's CPU interpreter (NumPy has no
    bfloat16); there, and only there, the kernels upcast their tiles to float32 first."""
    return t.dtype == torch.bfloat16 and triton.knobs.runtime.interpret


def _xty_sum(X, Y, w=None, *, tokens_per_program, BT=64):
    """(sum_t X^T Y, sum_t w X) per program over ``tokens_per_program`` tokens: (BH, P, DX, DY), (BH, P, DX)."""
    BH, T, DX = X.shape
    DY = Y.shape[2]
    P = max(1, triton.cdiv(T, tokens_per_program))
    out = torch.empty(BH, P, DX, DY, dtype=torch.float32, device=X.device)
    outv = torch.empty(BH, P, DX, dtype=torch.float32, device=X.device)
    _xty[(BH, P)](X, Y, w if w is not None else X, out, outv, T, DX, DY, tokens_per_program,
                  X.stride(0), X.stride(1), Y.stride(0), Y.stride(1), w.stride(0) if w is not None else 0,
                  HAS_W=w is not None, PREC=_prec(X), UPCAST=_upcast(X), BT=min(BT, tokens_per_program),
                  BX=_p2(DX), BY=_p2(DY))
    return out, outv


def _prefix_states(Sc, zc, S0=None, z0=None, *, reverse=False):
    BH, NC, DX, DY = Sc.shape
    P = torch.empty_like(Sc)
    PZ = torch.empty_like(zc)
    SF = torch.empty(BH, DX, DY, dtype=torch.float32, device=Sc.device)
    ZF = torch.empty(BH, DX, dtype=torch.float32, device=Sc.device)
    has = S0 is not None
    _prefix[(BH,)](Sc, zc, S0 if has else Sc, z0 if has else zc, P, PZ, SF, ZF, NC, DX, DY,
                   HAS_S0=has, REVERSE=reverse, BX=_p2(DX), BY=_p2(DY))
    return P, PZ, SF, ZF


def _rows_apply(X, M, U=None, w=None, *, trans=False, normalize=False, eps=0.0, BT=64):
    BH, T, DX = X.shape
    DY = M.shape[1] if trans else M.shape[2]
    out = torch.empty(BH, T, DY, dtype=torch.float32, device=X.device)
    den = torch.empty(BH, T, dtype=torch.float32, device=X.device) if normalize else out
    _rows[(BH, triton.cdiv(T, BT))](X, M.contiguous(), U if U is not None else M, w if w is not None else X, out, den,
                                   T, DX, DY, float(eps), X.stride(0), X.stride(1), out.stride(0),
                                   TRANS_M=trans, NORMALIZE=normalize, HAS_U=U is not None, HAS_W=w is not None,
                                   PREC="ieee", BT=BT, BX=_p2(DX), BY=_p2(DY))
    return (out, den) if normalize else out


def _grad_parts(g, out, den):
    g = g.float()
    gn = g / den.unsqueeze(-1)
    gd = -(g * out).sum(-1) / den
    return gn.contiguous(), gd.contiguous()


class _Attend(torch.autograd.Function):
    """Linear attention on features with Triton kernels, forward and backward."""

    @staticmethod
    def forward(ctx, fq, fk, v, state, causal, eps, chunk):
        B, H, N, m = fq.shape
        L, e = v.shape[2], v.shape[3]
        q3, k3, v3 = fq.reshape(B * H, N, m), fk.reshape(B * H, L, m), v.reshape(B * H, L, e)
        S0 = z0 = None
        if state is not None:
            S0 = state[..., :e].reshape(B * H, m, e).float().contiguous()
            z0 = state[..., e].reshape(B * H, m).float().contiguous()
        if causal:
            Sc, zc = _xty_sum(k3, v3, tokens_per_program=chunk)
            P, PZ, SF, ZF = _prefix_states(Sc, zc, S0, z0)
            out = torch.empty(B * H, N, e, dtype=torch.float32, device=fq.device)
            den = torch.empty(B * H, N, dtype=torch.float32, device=fq.device)
            BM, BE = _p2(m), _p2(e)
            _chunk_fwd[(B * H, triton.cdiv(N, chunk))](q3, k3, v3, P, PZ, out, den, N, m, e, float(eps),
                                                      q3.stride(0), k3.stride(0), v3.stride(0), out.stride(0),
                                                      PREC=_prec(q3), UPCAST=_upcast(q3), BC=chunk, BM=BM, BE=BE)
            ctx.save_for_backward(q3, k3, v3, P, PZ, out, den)
        else:
            parts, partv = _xty_sum(k3, v3, tokens_per_program=max(chunk, 4096))
            SF, ZF = parts.sum(1), partv.sum(1)
            if S0 is not None:
                SF, ZF = SF + S0, ZF + z0
            out, den = _rows_apply(q3, SF, ZF, normalize=True, eps=eps)
            ctx.save_for_backward(q3, k3, v3, SF, ZF, out, den)
        ctx.causal, ctx.chunk, ctx.shape, ctx.has_state = causal, chunk, (B, H, N, L, m, e), state is not None
        S = torch.cat([SF, ZF.unsqueeze(-1)], dim=-1).view(B, H, m, e + 1)
        return out.view(B, H, N, e), S

    @staticmethod
    def backward(ctx, g, gS):
        B, H, N, L, m, e = ctx.shape
        q3, k3, v3, X1, X2, out, den = ctx.saved_tensors
        if g is None:
            g = torch.zeros_like(out)
        gn, gd = _grad_parts(g.reshape(B * H, N, e), out, den)
        gSv = gz = None
        if gS is not None:
            gSv = gS[..., :e].reshape(B * H, m, e).float().contiguous()
            gz = gS[..., e].reshape(B * H, m).float().contiguous()
        if ctx.causal:
            P, PZ, chunk = X1, X2, ctx.chunk
            Gc, gzc = _xty_sum(q3.float(), gn, gd, tokens_per_program=chunk)
            R, RZ, RT, RZT = _prefix_states(Gc, gzc, gSv, gz, reverse=True)
            dq = torch.empty(B * H, N, m, dtype=torch.float32, device=q3.device)
            dk = torch.empty_like(dq)
            dv = torch.empty(B * H, N, e, dtype=torch.float32, device=q3.device)
            _chunk_bwd[(B * H, triton.cdiv(N, chunk))](q3, k3, v3, gn, gd, P, PZ, R, RZ, dq, dk, dv, N, m, e,
                                                      q3.stride(0), k3.stride(0), v3.stride(0), gn.stride(0),
                                                      PREC="ieee", UPCAST=_upcast(q3), BC=chunk, BM=_p2(m),
                                                      BE=_p2(e))
        else:
            SF, ZF = X1, X2
            dq = _rows_apply(gn, SF, ZF, gd, trans=True)
            parts, partv = _xty_sum(q3.float(), gn, gd, tokens_per_program=max(ctx.chunk, 4096))
            RT, RZT = parts.sum(1), partv.sum(1)
            if gSv is not None:
                RT, RZT = RT + gSv, RZT + gz
            dk = _rows_apply(v3.float(), RT, RZT, trans=True)
            dv = _rows_apply(k3.float(), RT)
        dstate = None
        if ctx.has_state:
            dstate = torch.cat([RT, RZT.unsqueeze(-1)], dim=-1).view(B, H, m, e + 1)
        return (dq.view(B, H, N, m).to(q3.dtype), dk.view(B, H, L, m).to(k3.dtype), dv.view(B, H, L, e).to(v3.dtype),
                dstate, None, None, None)


def attend(fq, fk, v, state=None, *, causal: bool, eps: float, chunk: int = 64):
    """Linear attention on features: (out (B, H, N, e) float32, state [S, z] (B, H, m, e + 1) float32).

    ``fq`` (B, H, N, m), ``fk`` (B, H, L, m), ``v`` (B, H, L, e): one dtype
    (float32, float16 or bfloat16), padded keys already zeroed; ``state``
    (B, H, m, e + 1) or None. ``chunk`` (a power of two >= 16) is the chunk of
    the causal form. Differentiable with respect to every tensor.
    """
    chunk = _p2(chunk)
    return _Attend.apply(fq.contiguous(), fk.contiguous(), v.contiguous(), state, bool(causal), float(eps), chunk)
