"""Linear and softmax attention on every backend: against float64 references, and
the causal strategies (naive, chunked, recurrent) against each other."""

from __future__ import annotations

import numpy as np
import pytest

import kernelattn as ka
from kernelattn.testing import (
    assert_close,
    reference_linear_attention,
    reference_softmax_attention,
    rel_rms_error,
    to_numpy,
)

# (B, H, N, L, d, e): awkward cases on purpose
SHAPES = [
    (2, 3, 17, 17, 12, 12),   # d not a power of two, N not a multiple of the chunk
    (1, 1, 1, 1, 4, 4),       # N = 1, H = 1
    (2, 2, 9, 13, 8, 5),      # N != L (cross), e != d
    (1, 2, 64, 64, 16, 16),   # N a multiple of the chunk
]
SHAPE_IDS = ["B{}H{}N{}L{}d{}e{}".format(*s) for s in SHAPES]
# (shape, causal) pairs that make sense: causal needs N = L
CASES = [pytest.param(s, c, id=f"{i}-{'causal' if c else 'noncausal'}")
         for s, i in zip(SHAPES, SHAPE_IDS) for c in (False, True) if not (c and s[2] != s[3])]
#: quick tier (-m "not slow"): everything on numpy, array_api_strict and torch; on dask (a graph per
#: case) one trainable map (glu), one fixed (elu) and two of the shapes; jax (a compile per shape)
#: only in the full run: its paths are held in the quick tier by test_edges.py and test_backend_jax.py
HEAVY = ("jax", "dask")
pytestmark = pytest.mark.slow_where(xp_backend="jax")
REPEAT_SHAPES = [SHAPES[1], SHAPES[3]]
KERNELS = [("elu", {}), ("glu", {"depth": 2}), ("aoglu", {"depth": 3}), ("ffn", {}), ("hedgehog", {}),
           ("favor", {}), ("relu", {})]


def _qkv(rng, B, H, N, L, d, e, scale=0.5):
    return (rng.standard_normal((B, H, N, d)) * scale, rng.standard_normal((B, H, L, d)) * scale,
            rng.standard_normal((B, H, L, e)))


def _phi(kind, opts, H, d, like, seed=0):
    if kind in ("elu", "relu"):
        return kind
    return ka.feature_map(kind, num_heads=H, head_dim=d, seed=seed, like=like, **opts)


@pytest.mark.slow_where(xp_backend=HEAVY, kind=("aoglu", "ffn", "hedgehog", "favor", "relu"))
@pytest.mark.slow_where(xp_backend=HEAVY, shape=REPEAT_SHAPES)
@pytest.mark.parametrize("shape,causal", CASES)
@pytest.mark.parametrize("kind,opts", KERNELS, ids=[k for k, _ in KERNELS])
def test_linear_attention_matches_reference(xp_backend, shape, causal, kind, opts, rng):
    B, H, N, L, d, e = shape
    q_np, k_np, v_np = _qkv(rng, *shape)
    q, k, v = (xp_backend.asarray(a, "float32") for a in (q_np, k_np, v_np))
    phi = _phi(kind, opts, H, d, q)
    out = ka.linear_attention(q, k, v, feature_map=phi, causal=causal, chunk_size=8)
    ref = reference_linear_attention(q_np, k_np, v_np, feature_map=phi, causal=causal)
    assert out.shape == (B, H, N, e)
    assert_close(out, ref, rtol=1e-4, atol=1e-5, like=q)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_float64_matches_reference_tightly(xp_backend, causal, rng):
    if not xp_backend.has("float64"):
        pytest.skip("no float64")
    q_np, k_np, v_np = _qkv(rng, 2, 2, 21, 21, 6, 7)
    q, k, v = (xp_backend.asarray(a, "float64") for a in (q_np, k_np, v_np))
    phi = ka.feature_map("aoglu", num_heads=2, head_dim=6, depth=2, seed=1, like=q)
    out = ka.linear_attention(q, k, v, feature_map=phi, causal=causal, chunk_size=4)
    assert_close(out, reference_linear_attention(q_np, k_np, v_np, feature_map=phi, causal=causal),
                 rtol=1e-10, atol=1e-12, like=q)


@pytest.mark.slow_where(xp_backend=HEAVY, chunk_size=(1, 8, 64, 100))
@pytest.mark.slow_where(xp_backend=HEAVY, kind="favor")
@pytest.mark.parametrize("chunk_size", [1, 3, 8, 64, 100])
@pytest.mark.parametrize("kind", ["elu", "glu", "favor"])
def test_naive_chunked_recurrent_agree_with_final_states(xp_backend, chunk_size, kind, rng):
    B, H, N, d, e = 2, 2, 19, 8, 6
    q_np, k_np, v_np = _qkv(rng, B, H, N, N, d, e)
    q, k, v = (xp_backend.asarray(a, "float32") for a in (q_np, k_np, v_np))
    phi = _phi(kind, {}, H, d, q)
    outs = {}
    for method in ("naive", "chunked", "recurrent"):
        outs[method] = ka.linear_attention(q, k, v, feature_map=phi, causal=True, method=method,
                                           chunk_size=chunk_size, return_state=True)
    ref_out, (S, z) = reference_linear_attention(q_np, k_np, v_np, feature_map=phi, causal=True,
                                                 return_state=True)
    for method, (out, state) in outs.items():
        assert isinstance(state, ka.LinearAttentionState)
        assert_close(out, ref_out, rtol=1e-4, atol=1e-5, like=q)
        assert_close(state.S, S, rtol=1e-4, atol=1e-5)
        assert_close(state.z, z, rtol=1e-4, atol=1e-5)


def test_noncausal_naive_equals_linear_form(xp_backend, rng):
    q_np, k_np, v_np = _qkv(rng, 2, 2, 11, 15, 8, 8)
    q, k, v = (xp_backend.asarray(a) for a in (q_np, k_np, v_np))
    phi = ka.feature_map("glu", num_heads=2, head_dim=8, seed=0, like=q)
    a = ka.linear_attention(q, k, v, feature_map=phi)
    b = ka.linear_attention(q, k, v, feature_map=phi, method="naive")
    assert_close(a, to_numpy(b), rtol=1e-5, atol=1e-6)


@pytest.mark.slow_where(xp_backend="jax", masked=False)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_prefill_then_step_equals_parallel(xp_backend, masked, rng):
    B, H, N, d, P = 2, 2, 12, 8, 5  # prompt of P tokens, then one token at a time
    q_np, k_np, v_np = _qkv(rng, B, H, N, N, d, d)
    q, k, v = (xp_backend.asarray(a) for a in (q_np, k_np, v_np))
    mask_np = np.ones((B, N), dtype=bool)
    if masked:
        mask_np[0, :3] = False   # left padding in row 0
        mask_np[1, 7] = False    # a padded token mid-way
    mask = xp_backend.asarray(mask_np) if masked else None
    phi = ka.feature_map("aoglu", num_heads=H, head_dim=d, depth=2, seed=0, like=q)
    full = ka.linear_attention(q, k, v, feature_map=phi, causal=True, key_mask=mask)
    out, state = ka.linear_attention(q[:, :, :P, :], k[:, :, :P, :], v[:, :, :P, :], feature_map=phi, causal=True,
                                     key_mask=None if mask is None else mask[:, :P], return_state=True)
    steps = [to_numpy(out)]
    for t in range(P, N):
        o, state = ka.linear_attention_step(q[:, :, t, :], k[:, :, t, :], v[:, :, t, :], feature_map=phi, state=state,
                                            key_mask=None if mask is None else mask[:, t])
        assert o.shape == (B, H, d)
        steps.append(to_numpy(o)[:, :, None])
    stepped = np.concatenate(steps, axis=2)
    np.testing.assert_allclose(stepped, to_numpy(full), rtol=1e-4, atol=1e-5)
    assert_close(full, reference_linear_attention(q_np, k_np, v_np, feature_map=phi, causal=True,
                                                  key_mask=mask_np), rtol=1e-4, atol=1e-5, like=q)


def test_step_from_empty_and_multi_token_step(xp_backend, rng):
    q_np, k_np, v_np = _qkv(rng, 1, 2, 6, 6, 4, 4)
    q, k, v = (xp_backend.asarray(a) for a in (q_np, k_np, v_np))
    o1, s1 = ka.linear_attention_step(q[:, :, :4, :], k[:, :, :4, :], v[:, :, :4, :])
    o2, s2 = ka.linear_attention_step(q[:, :, 4:, :], k[:, :, 4:, :], v[:, :, 4:, :], state=s1)
    full, sf = ka.linear_attention(q, k, v, causal=True, return_state=True)
    np.testing.assert_allclose(np.concatenate([to_numpy(o1), to_numpy(o2)], axis=2), to_numpy(full),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(s2.S), to_numpy(sf.S), rtol=1e-5, atol=1e-6)


def test_initial_state_continues_noncausal_too(xp_backend, rng):
    q_np, k_np, v_np = _qkv(rng, 1, 2, 5, 10, 4, 3)
    q, k, v = (xp_backend.asarray(a) for a in (q_np, k_np, v_np))
    _, s = ka.linear_attention(q, k[:, :, :6, :], v[:, :, :6, :], return_state=True)
    cont = ka.linear_attention(q, k[:, :, 6:, :], v[:, :, 6:, :], initial_state=s)
    whole = ka.linear_attention(q, k, v)
    np.testing.assert_allclose(to_numpy(cont), to_numpy(whole), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("method", ["auto", "naive", "recurrent"])
def test_key_mask_after_phi_and_padding_invariance(xp_backend, causal, method, rng):
    B, H, N, d = 2, 2, 10, 8
    q_np, k_np, v_np = _qkv(rng, B, H, N, N, d, d)
    mask_np = np.ones((B, N), dtype=bool)
    mask_np[0, 6:] = False
    mask_np[1, ::3] = False
    # garbage in padded slots must not matter
    k_bad, v_bad = k_np.copy(), v_np.copy()
    k_bad[~mask_np[:, None, :, None].repeat(H, 1).repeat(d, 3)] = 1e3
    v_bad[~mask_np[:, None, :, None].repeat(H, 1).repeat(d, 3)] = -1e3
    q = xp_backend.asarray(q_np)
    phi = ka.feature_map("glu", num_heads=H, head_dim=d, seed=2, like=q)
    mask = xp_backend.asarray(mask_np)
    out_a = ka.linear_attention(q, xp_backend.asarray(k_np), xp_backend.asarray(v_np), feature_map=phi,
                                causal=causal, key_mask=mask, method=method)
    out_b = ka.linear_attention(q, xp_backend.asarray(k_bad), xp_backend.asarray(v_bad), feature_map=phi,
                                causal=causal, key_mask=mask, method=method)
    ref = reference_linear_attention(q_np, k_np, v_np, feature_map=phi, causal=causal, key_mask=mask_np)
    assert_close(out_a, ref, rtol=1e-4, atol=1e-5, like=q)
    assert_close(out_b, ref, rtol=1e-4, atol=1e-5)


def test_noncausal_padding_keys_appended_change_nothing(xp_backend, rng):
    B, H, N, L, P, d = 2, 2, 6, 9, 5, 8
    q_np, k_np, v_np = _qkv(rng, B, H, N, L, d, d)
    pad = rng.standard_normal((B, H, P, d)) * 3
    q = xp_backend.asarray(q_np)
    phi = ka.feature_map("aoglu", num_heads=H, head_dim=d, seed=0, like=q)
    plain = ka.linear_attention(q, xp_backend.asarray(k_np), xp_backend.asarray(v_np), feature_map=phi)
    mask = np.concatenate([np.ones((B, L), bool), np.zeros((B, P), bool)], axis=1)
    padded = ka.linear_attention(q, xp_backend.asarray(np.concatenate([k_np, pad], 2)),
                                 xp_backend.asarray(np.concatenate([v_np, pad], 2)), feature_map=phi,
                                 key_mask=xp_backend.asarray(mask))
    np.testing.assert_allclose(to_numpy(padded), to_numpy(plain), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_fully_masked_rows_give_zeros_not_nan(xp_backend, causal, rng):
    B, H, N, d = 2, 1, 5, 4
    q_np, k_np, v_np = _qkv(rng, B, H, N, N, d, d)
    mask_np = np.ones((B, N), bool)
    mask_np[0] = False          # nothing valid in row 0
    mask_np[1, :2] = False      # causal: queries 0, 1 of row 1 see nothing
    q, k, v = (xp_backend.asarray(a) for a in (q_np, k_np, v_np))
    mask = xp_backend.asarray(mask_np)
    for method in ("auto", "naive", "recurrent"):
        out = to_numpy(ka.linear_attention(q, k, v, causal=causal, key_mask=mask, method=method))
        assert np.all(np.isfinite(out))
        np.testing.assert_array_equal(out[0], 0.0)
        if causal:
            np.testing.assert_array_equal(out[1, :, :2], 0.0)
    sm = to_numpy(ka.softmax_attention(q, k, v, causal=causal, key_mask=mask))
    assert np.all(np.isfinite(sm))
    np.testing.assert_array_equal(sm[0], 0.0)
    np.testing.assert_allclose(sm, reference_softmax_attention(q_np, k_np, v_np, causal=causal, key_mask=mask_np),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.slow_where(xp_backend=HEAVY, shape=REPEAT_SHAPES)
@pytest.mark.parametrize("shape,causal", CASES)
def test_softmax_matches_reference(xp_backend, shape, causal, rng):
    q_np, k_np, v_np = _qkv(rng, *shape, scale=2.0)
    q, k, v = (xp_backend.asarray(a) for a in (q_np, k_np, v_np))
    out = ka.softmax_attention(q, k, v, causal=causal)
    assert_close(out, reference_softmax_attention(q_np, k_np, v_np, causal=causal), rtol=1e-4, atol=1e-5, like=q)
    w = ka.softmax_attention_weights(q, k, causal=causal)
    np.testing.assert_allclose(to_numpy(w).sum(-1), 1.0, rtol=1e-5)


def test_attention_weights_reproduce_outputs(xp_backend, rng):
    q_np, k_np, v_np = _qkv(rng, 1, 2, 7, 7, 4, 4)
    q, k, v = (xp_backend.asarray(a) for a in (q_np, k_np, v_np))
    phi = ka.feature_map("glu", num_heads=2, head_dim=4, seed=0, like=q)
    w = to_numpy(ka.linear_attention_weights(q, k, feature_map=phi, causal=True))
    out = to_numpy(ka.linear_attention(q, k, v, feature_map=phi, causal=True))
    np.testing.assert_allclose(w @ v_np, out, rtol=1e-4, atol=1e-5)
    assert np.all(np.triu(w[0, 0], 1) == 0)


HALF = ["float16", "bfloat16"]


@pytest.mark.slow_where(xp_backend=HEAVY, dtype="bfloat16")
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_half_precision_accumulates_in_float32(xp_backend, dtype, causal, rng):
    if not xp_backend.has(dtype):
        pytest.skip(f"{xp_backend.name} has no {dtype}")
    B, H, N, d = 1, 2, 300, 16
    q_np, k_np, v_np = _qkv(rng, B, H, N, N, d, d)
    q, k, v = (xp_backend.asarray(a, dtype) for a in (q_np, k_np, v_np))
    phi = ka.feature_map("glu", num_heads=H, head_dim=d, seed=0, like=q)
    out, state = ka.linear_attention(q, k, v, feature_map=phi, causal=causal, return_state=True)
    assert out.dtype == q.dtype
    assert state.S.dtype == xp_backend.xp.float32
    # reference on the rounded inputs and rounded parameters
    q32, k32, v32 = (to_numpy(a).astype(np.float64) for a in (q, k, v))
    ref = reference_linear_attention(q32, k32, v32, feature_map=phi, causal=causal)
    tol = 1e-2 if dtype == "bfloat16" else 2e-3
    assert rel_rms_error(out, ref) < tol
    sm = ka.softmax_attention(q, k, v, causal=causal)
    assert sm.dtype == q.dtype
    assert rel_rms_error(sm, reference_softmax_attention(q32, k32, v32, causal=causal)) < tol


def test_callable_and_pair_feature_maps(xp_backend, rng):
    q_np, k_np, v_np = _qkv(rng, 1, 2, 5, 5, 4, 4)
    q, k, v = (xp_backend.asarray(a) for a in (q_np, k_np, v_np))
    xp = xp_backend.xp
    square = lambda x: x * x + 0.1  # noqa: E731
    out = ka.linear_attention(q, k, v, feature_map=square)
    ref = reference_linear_attention(q_np, k_np, v_np, feature_map=lambda x: x * x + 0.1)
    np.testing.assert_allclose(to_numpy(out), ref, rtol=1e-4, atol=1e-5)
    pair = ka.linear_attention(q, k, v, feature_map=(square, lambda x: xp.exp(x)))
    assert np.all(np.isfinite(to_numpy(pair)))
