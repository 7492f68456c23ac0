"""Property tests (hypothesis): invariants that must hold for any shapes and data."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import kernelattn as ka

torch = pytest.importorskip("torch")

KINDS = ["elu", "glu", "aoglu", "favor", "hedgehog", "ffn"]


@st.composite
def problems(draw):
    B = draw(st.integers(1, 2))
    H = draw(st.integers(1, 3))
    N = draw(st.integers(1, 12))
    d = draw(st.sampled_from([2, 3, 5, 8]))
    e = draw(st.sampled_from([1, 4, 6]))
    kind = draw(st.sampled_from(KINDS))
    seed = draw(st.integers(0, 2**31 - 1))
    chunk = draw(st.integers(1, 9))
    return B, H, N, d, e, kind, seed, chunk


def _make(B, H, N, d, e, kind, seed):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, B, H, N, d))
    v = rng.standard_normal((B, H, N, e))
    phi = kind if kind == "elu" else ka.feature_map(kind, num_heads=H, head_dim=d, seed=seed, dtype="float64")
    return q, k, v, phi, rng


@settings(max_examples=40, deadline=None)
@given(problems(), st.integers(1, 6), st.booleans())
def test_padding_never_changes_valid_outputs(problem, pad, causal):
    B, H, N, d, e, kind, seed, chunk = problem
    q, k, v, phi, rng = _make(B, H, N, d, e, kind, seed)
    out = ka.linear_attention(q, k, v, feature_map=phi, causal=causal, chunk_size=chunk)
    # right-pad every sequence with garbage tokens marked invalid
    P = N + pad
    qp = np.concatenate([q, rng.standard_normal((B, H, pad, d)) * 5], axis=2)
    kp = np.concatenate([k, rng.standard_normal((B, H, pad, d)) * 5], axis=2)
    vp = np.concatenate([v, rng.standard_normal((B, H, pad, e)) * 5], axis=2)
    mask = np.zeros((B, P), bool)
    mask[:, :N] = True
    outp = ka.linear_attention(qp, kp, vp, feature_map=phi, causal=causal, key_mask=mask, chunk_size=chunk)
    np.testing.assert_allclose(outp[:, :, :N], out, rtol=1e-9, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(problems(), st.integers(1, 6), st.sampled_from(["chunked", "naive", "recurrent"]))
def test_appending_future_tokens_never_changes_causal_outputs(problem, extra, method):
    B, H, N, d, e, kind, seed, chunk = problem
    q, k, v, phi, rng = _make(B, H, N + extra, d, e, kind, seed)
    long = ka.linear_attention(q, k, v, feature_map=phi, causal=True, method=method, chunk_size=chunk)
    short = ka.linear_attention(q[:, :, :N], k[:, :, :N], v[:, :, :N], feature_map=phi, causal=True,
                                method=method, chunk_size=chunk)
    np.testing.assert_allclose(long[:, :, :N], short, rtol=1e-9, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(problems(), st.integers(1, 4), st.booleans())
def test_padding_never_changes_gradients_and_padded_inputs_get_none(problem, pad, causal):
    B, H, N, d, e, kind, seed, chunk = problem
    q, k, v, phi, rng = _make(B, H, N + pad, d, e, kind, seed)
    tphi = phi if isinstance(phi, str) else phi.to(like=torch.zeros(1, dtype=torch.float64))
    w = torch.tensor(rng.standard_normal((B, H, N, e)))
    mask = np.zeros((B, N + pad), bool)
    mask[:, :N] = True

    def grads(n, key_mask):
        tq, tk, tv = (torch.tensor(a[:, :, :n], requires_grad=True) for a in (q, k, v))
        out = ka.linear_attention(tq, tk, tv, feature_map=tphi, causal=causal, chunk_size=chunk,
                                  key_mask=None if key_mask is None else torch.tensor(key_mask))
        (out[:, :, :N] * w).sum().backward()
        return tq.grad.numpy(), tk.grad.numpy(), tv.grad.numpy()

    gq, gk, gv = grads(N, None)
    pq, pk, pv = grads(N + pad, mask)
    np.testing.assert_allclose(pq[:, :, :N], gq, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(pk[:, :, :N], gk, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(pv[:, :, :N], gv, rtol=1e-9, atol=1e-12)
    assert not np.any(pk[:, :, N:]) and not np.any(pv[:, :, N:]) and not np.any(pq[:, :, N:])
