"""Linear attention in a handful of whole-tensor torch ops, for short and medium sequences.

At small N the blocked and fused paths of :mod:`kernelattn.backends._torch_ops`
spend more on their loops than on arithmetic; here the formula is written
out as a user would write it (``asv_benchmarks/shape_targets.py`` compares
the two): phi of all tokens at once, then

* non-causal: ``S = phi(K)^T V``, ``z = sum_j phi(k_j)``, ``out = phi(Q) S / phi(Q) z``;
* causal: the masked product ``A = tril(phi(Q) phi(K)^T)``,
  ``out = A V / rowsum(A)``: O(N^2) work, which below a few hundred tokens
  beats the chunked form (see ``CAUSAL_MAX`` in ``backends/torch.py``).

Autograd sees every op (out of place when gradients are needed, in place
otherwise). Padded keys are selected away with ``where`` after phi, and a
row with nothing to attend to gives zeros, as in the core
(:func:`kernelattn._agnostic.attention.normalise`): its denominator becomes
+inf, so the row and its gradient are 0 for every eps >= 0.
"""

from __future__ import annotations

import torch

from kernelattn.backends import _torch_fmap as fmaps


def _dot(fq, z):
    """phi(q_i) . z for every row: (B, H, n, m), (B, H, m) -> (B, H, n, 1). A product and a sum: on the
    CPU a batched matrix-vector product (matmul with one column) is 3-4x slower at every size measured."""
    return (fq * z.unsqueeze(-2)).sum(-1, keepdim=True)


def attend(q, k, v, phi, *, causal: bool, key_mask, eps: float, state, return_state: bool, grad: bool, cdt):
    """``(out, (S, z) or None)``; q (B, H, N, d), k (B, H, L, d), v (B, H, L, e); state (S0, z0) or None."""
    # in place only eagerly: the exact-softplus check of the in-place map reads a value (a graph break)
    inplace = not grad and not torch.compiler.is_compiling()
    # phi out of place: on whole tensors F.softplus (one pass) beats the in-place exp/log form of
    # _torch_fmap.softplus_, which pays off only on the cache-sized blocks of the fused path
    fq = fmaps.apply(phi, q if q.dtype == cdt else q.to(cdt), role="query")
    fk = fmaps.apply(phi, k if k.dtype == cdt else k.to(cdt), role="key")
    vc = v if v.dtype == cdt else v.to(cdt)
    if key_mask is not None:
        keep = key_mask[:, None, :, None]
        fk = torch.where(keep, fk, 0.0)
        vc = torch.where(keep, vc, 0.0)
    S0, z0 = (None, None) if state is None else (state[0].to(cdt), state[1].to(cdt))
    S = z = None
    if causal:
        a = torch.matmul(fq, fk.transpose(-1, -2))
        a = a.tril_() if inplace else a.tril()
        num = torch.matmul(a, vc)
        den = a.sum(-1, keepdim=True)
        if S0 is not None:
            num = num + torch.matmul(fq, S0)
            den = den + _dot(fq, z0)
        if return_state:
            S = torch.matmul(fk.transpose(-1, -2), vc)
            z = fk.sum(-2)
            if S0 is not None:
                S, z = S + S0, z + z0
    else:
        S = torch.matmul(fk.transpose(-1, -2), vc)
        z = fk.sum(-2)
        if S0 is not None:
            S, z = S + S0, z + z0
        num = torch.matmul(fq, S)
        den = _dot(fq, z)
    if eps > 0 and S0 is None and getattr(phi, "form", None) in fmaps.NONNEGATIVE_FORMS:
        # features >= 0: den = 0 only where every product phi(q_i) . phi(k_j) is, and then num = 0 too, so
        # num / (den + eps) is already the core's zero row (two ops fewer). Its gradient is the core's too:
        # padded keys are zeros in phi(K) and V, and a feature that is 0 has derivative 0 in every form
        # (relu, and the underflow of exp / softplus / sigmoid), so g / eps never gets past phi
        # (tests/test_edges.py, the zero-denominator gradient tests). Not with a given state:
        # nothing makes a caller's S vanish where its z does
        out = num.div_(den.add_(eps)) if inplace else num / (den + eps)
    else:
        den = torch.where(den != 0, den + eps, torch.inf)
        out = num.div_(den) if inplace else num / den
    if out.dtype != q.dtype:
        out = out.to(q.dtype)
    return out, ((S, z) if return_state else None)
