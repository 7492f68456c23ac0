"""One forward per strategy: the hand VJP runs the core's own forwards (no second copy in grad.py),
and its results still match the float64 definition (kernelattn.testing)."""

from __future__ import annotations

import numpy as np
import pytest

import kernelattn as ka
from kernelattn._agnostic import attention as core
from kernelattn.testing import reference_linear_attention, reference_linear_attention_vjp

B, H, d = 2, 2, 5


def _counting(monkeypatch, name):
    """Replace ``core.<name>`` by a wrapper that records the ``save`` flag of every call."""
    calls = []
    original = getattr(core, name)

    def wrapper(*args, **kwargs):
        calls.append(bool(kwargs.get("save", False)))
        return original(*args, **kwargs)

    monkeypatch.setattr(core, name, wrapper)
    return calls


def _phi():
    return ka.feature_map("glu", num_heads=H, head_dim=d, seed=0, dtype="float64")


def _inputs(n, l, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, n, d)) * 0.5
    k, v = rng.standard_normal((B, H, l, d)) * 0.5, rng.standard_normal((B, H, l, d))
    return q, k, v, rng.standard_normal((B, H, n, d))


@pytest.mark.parametrize("method", ["auto", "chunked", "recurrent"])
def test_causal_vjp_runs_the_core_chunked_forward(monkeypatch, method):
    calls = _counting(monkeypatch, "chunked_forward")
    q, k, v, w = _inputs(11, 11)
    out, vjp = ka.linear_attention_vjp(q, k, v, feature_map=_phi(), causal=True, chunk_size=4, method=method)
    vjp(w)
    assert calls == [True]  # once, keeping what the backward needs
    ka.linear_attention(q, k, v, feature_map=_phi(), causal=True, chunk_size=4, backend="agnostic")
    assert calls == [True, False]  # the plain forward is the same function, saving nothing


@pytest.mark.parametrize("name,kw", [("noncausal_forward", dict(causal=False)),
                                     ("quadratic_forward", dict(causal=True, method="naive")),
                                     ("quadratic_forward", dict(causal=False, method="naive"))])
def test_other_vjps_run_the_core_forwards(monkeypatch, name, kw):
    calls = _counting(monkeypatch, name)
    chunked = _counting(monkeypatch, "chunked_forward")
    q, k, v, w = _inputs(7, 7)
    out, vjp = ka.linear_attention_vjp(q, k, v, feature_map=_phi(), **kw)
    vjp(w)
    assert calls == [True] and chunked == []


def _check(q, k, v, w, *, causal, key_mask=None, initial_state=None, chunk_size=64, method="auto"):
    phi = _phi()
    m = phi(q[:, :, :1]).shape[-1]
    rng = np.random.default_rng(5)
    ws = ka.LinearAttentionState(rng.standard_normal((B, H, m, d)), rng.standard_normal((B, H, m)))
    (out, st), vjp = ka.linear_attention_vjp(q, k, v, feature_map=phi, causal=causal, key_mask=key_mask,
                                            chunk_size=chunk_size, method=method, initial_state=initial_state,
                                            return_state=True)
    g = vjp(w, ws)
    ref, (S, z) = reference_linear_attention(q, k, v, feature_map=phi, causal=causal, key_mask=key_mask,
                                             initial_state=initial_state, return_state=True)
    want = reference_linear_attention_vjp(q, k, v, w, feature_map=phi, causal=causal, key_mask=key_mask,
                                          initial_state=initial_state, g_state=ws)
    tol = dict(rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(out, ref, **tol)
    np.testing.assert_allclose(st.S, S, **tol)
    np.testing.assert_allclose(st.z, z, **tol)
    for got, key in ((g.q, "q"), (g.k, "k"), (g.v, "v")):
        np.testing.assert_allclose(got, want[key], **tol, err_msg=key)
    leaves = [np.asarray(p) for p in _leaves(g.feature_map)]
    assert len(leaves) == len(want["params"])
    for got, ref_p in zip(leaves, want["params"]):
        np.testing.assert_allclose(got, ref_p, **tol)
    if initial_state is not None:
        np.testing.assert_allclose(g.initial_state.S, want["state"][0], **tol)
        np.testing.assert_allclose(g.initial_state.z, want["state"][1], **tol)
    if key_mask is not None:  # padded keys get exactly zero gradient
        pad = ~key_mask[:, None, :, None]
        assert np.all(np.where(pad, g.k, 0.0) == 0.0) and np.all(np.where(pad, g.v, 0.0) == 0.0)
    return g


def _leaves(grad_map):
    return grad_map.parameters()


def _state(m, seed=3):
    rng = np.random.default_rng(seed)
    return ka.LinearAttentionState(np.abs(rng.standard_normal((B, H, m, d))), np.abs(rng.standard_normal((B, H, m))))


@pytest.mark.parametrize("method", ["auto", "naive"])
def test_causal_chunks_partial_chunk_padding_and_state_match_definition(method):
    n = 19  # chunks of 4: four full ones and a partial one of 3
    q, k, v, w = _inputs(n, n, seed=1)
    mask = np.ones((B, n), bool)
    mask[0, :3] = False   # left padding
    mask[1, -5:] = False  # right padding
    k[0, :, :3] = np.nan  # whatever a padded row holds never reaches a sum
    v[1, :, -5:] = np.inf
    m = _phi()(q[:, :, :1]).shape[-1]
    kf, vf = np.where(mask[:, None, :, None], k, 0.0), np.where(mask[:, None, :, None], v, 0.0)
    g = _check(q, kf, vf, w, causal=True, key_mask=mask, initial_state=_state(m), chunk_size=4, method=method)
    # the NaN / Inf inputs give the same numbers as the zeroed ones
    (out, _), vjp = ka.linear_attention_vjp(q, k, v, feature_map=_phi(), causal=True, key_mask=mask, chunk_size=4,
                                            method=method, initial_state=_state(m), return_state=True)
    g2 = vjp(w)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(g2.q))
    assert np.all(np.isfinite(np.where(mask[:, None, :, None], g2.k, 0.0)))
    assert g.q.shape == q.shape


def test_causal_without_state_and_one_chunk_match_definition():
    q, k, v, w = _inputs(6, 6, seed=2)
    _check(q, k, v, w, causal=True, chunk_size=64)  # one partial chunk (C clipped to N)
    _check(q, k, v, w, causal=True, chunk_size=1)   # chunks of one token
    _check(q, k, v, w, causal=True, chunk_size=3)   # chunks that divide N


@pytest.mark.parametrize("method", ["auto", "naive"])
def test_noncausal_cross_attention_matches_definition(method):
    q, k, v, w = _inputs(7, 12, seed=4)  # L != N
    mask = np.ones((B, 12), bool)
    mask[0, :2] = False
    mask[1, -4:] = False
    m = _phi()(q[:, :, :1]).shape[-1]
    _check(q, k, v, w, causal=False, key_mask=mask, initial_state=_state(m), method=method)
    _check(q, k, v, w, causal=False, method=method)


def test_no_tokens():
    phi = _phi()
    m = phi(np.zeros((B, H, 1, d)))[..., :].shape[-1]
    q = np.zeros((B, H, 0, d))
    state = _state(m)
    (out, st), vjp = ka.linear_attention_vjp(q, q, q, feature_map=phi, causal=True, initial_state=state,
                                            return_state=True)
    assert out.shape == (B, H, 0, d)
    np.testing.assert_array_equal(st.S, state.S)
    g = vjp(np.zeros((B, H, 0, d)), ka.LinearAttentionState(np.ones_like(state.S), np.ones_like(state.z)))
    assert g.q.shape == q.shape
    np.testing.assert_array_equal(g.initial_state.S, np.ones_like(state.S))
