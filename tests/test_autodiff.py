"""Gradients flow through the core: torch autograd and jax.grad (under jit), checked
against central finite differences in float64 and against each other."""

from __future__ import annotations

import numpy as np
import pytest

import kernelattn as ka
from kernelattn.testing import to_numpy

torch = pytest.importorskip("torch", reason="torch is part of the default test set")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
jax.config.update("jax_enable_x64", True)

B, H, N, d = 2, 2, 11, 6
KINDS = [("glu", {"depth": 2}), ("aoglu", {"depth": 2, "bias": True}), ("ffn", {}), ("hedgehog", {"bias": True}),
         ("glu", {"tied": False}), ("favor", {}), ("elu", {})]
IDS = [k + ("-" + "-".join(f"{a}={b}" for a, b in o.items()) if o else "") for k, o in KINDS]


def _data(seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, H, N, d)) * 0.5 for _ in range(3))
    w = rng.standard_normal((B, H, N, d))
    mask = np.ones((B, N), bool)
    mask[1, 7:] = False
    return q, k, v, w, mask


def _loss_np(q, k, v, phi, w, mask, causal, method="auto"):
    out = ka.linear_attention(q, k, v, feature_map=phi, causal=causal, key_mask=mask, method=method, chunk_size=4)
    return float(np.sum(out * w))


def _torch_grads(phi_np, q, k, v, w, mask, causal, method="auto"):
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    phi = phi_np.to(like=tq) if isinstance(phi_np, ka.FeatureMap) else phi_np
    params = phi.parameters() if isinstance(phi, ka.FeatureMap) else []
    for p in params:
        p.requires_grad_(True)
    out = ka.linear_attention(tq, tk, tv, feature_map=phi, causal=causal, key_mask=torch.tensor(mask),
                              method=method, chunk_size=4)
    (out * torch.tensor(w)).sum().backward()
    return [t.grad.numpy() for t in (tq, tk, tv)] + [p.grad.numpy() for p in params]


def _phi(kind, opts):
    if kind == "elu":
        return ka.feature_map("elu")
    return ka.feature_map(kind, num_heads=H, head_dim=d, seed=0, dtype="float64", **opts)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("kind,opts", KINDS, ids=IDS)
def test_torch_autograd_matches_finite_differences(kind, opts, causal):
    q, k, v, w, mask = _data()
    phi = _phi(kind, opts)
    grads = _torch_grads(phi, q, k, v, w, mask, causal)
    rng = np.random.default_rng(1)
    h = 1e-6
    arrays = [q, k, v] + (phi.parameters() if isinstance(phi, ka.FeatureMap) else [])
    for which, (arr, g) in enumerate(zip(arrays, grads)):
        for _ in range(4):
            idx = tuple(rng.integers(0, s) for s in arr.shape)
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += h
            minus[idx] -= h

            def loss(a):
                args = [q, k, v]
                p = phi
                if which < 3:
                    args[which] = a
                else:
                    leaves = phi.parameters()
                    leaves[which - 3] = a
                    p = _rebuild(phi, leaves)
                return _loss_np(*args, p, w, mask, causal)

            fd = (loss(plus) - loss(minus)) / (2 * h)
            assert abs(g[idx] - fd) <= 1e-6 * max(1.0, abs(fd)), (which, idx, g[idx], fd)


def _rebuild(phi, leaves):
    from kernelattn._tree import with_leaves

    return phi.replace(params=with_leaves(phi.params, leaves))


# quick tier (-m "not slow"): glu causal; jax.grad against the float64 definition: test_edges.py
@pytest.mark.slow_where(kind=("aoglu", "ffn", "hedgehog", "favor", "elu"))
@pytest.mark.slow  # path against path; quick tier: jax.grad under jit against the definition (test_edges.py)
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("kind,opts", KINDS, ids=IDS)
def test_jax_grad_under_jit_matches_torch(kind, opts, causal):
    q, k, v, w, mask = _data(3)
    phi_np = _phi(kind, opts)
    tgrads = _torch_grads(phi_np, q, k, v, w, mask, causal)
    jphi = phi_np.to(like=jnp.asarray(q)) if isinstance(phi_np, ka.FeatureMap) else phi_np

    @jax.jit
    def loss(q, k, v, phi):
        out = ka.linear_attention(q, k, v, feature_map=phi, causal=causal, key_mask=jnp.asarray(mask),
                                  chunk_size=4)
        return jnp.sum(out * w)

    gq, gk, gv, gphi = jax.grad(loss, argnums=(0, 1, 2, 3))(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jphi)
    assert isinstance(gphi, ka.FeatureMap)
    jgrads = [gq, gk, gv] + gphi.parameters()
    assert len(jgrads) == len(tgrads)
    for jg, tg in zip(jgrads, tgrads):
        np.testing.assert_allclose(np.asarray(jg), tg, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", ["naive", "chunked", "recurrent"])
def test_causal_strategies_have_equal_gradients(method):
    q, k, v, w, mask = _data(5)
    phi = _phi("aoglu", {"depth": 2})
    ref = _torch_grads(phi, q, k, v, w, mask, True, method="naive")
    got = _torch_grads(phi, q, k, v, w, mask, True, method=method)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.slow_where(lib="jax")  # quick: test_backend_jax.py::test_padded_keys_change_nothing_and_get_no_gradient
@pytest.mark.parametrize("lib", ["torch", "jax"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_padded_inputs_get_zero_gradient(lib, causal):
    q, k, v, w, mask = _data(7)
    phi = _phi("glu", {})
    if lib == "torch":
        gq, gk, gv, *_ = _torch_grads(phi, q, k, v, w, mask, causal)
    else:
        jphi = phi.to(like=jnp.asarray(q))

        def loss(k, v):
            return jnp.sum(ka.linear_attention(jnp.asarray(q), k, v, feature_map=jphi, causal=causal,
                                               key_mask=jnp.asarray(mask)) * w)

        gk, gv = jax.grad(loss, argnums=(0, 1))(jnp.asarray(k), jnp.asarray(v))
        gk, gv = np.asarray(gk), np.asarray(gv)
    pad = ~mask
    assert np.all(np.asarray(gk)[1][:, pad[1]] == 0) and np.all(np.asarray(gv)[1][:, pad[1]] == 0)
    assert np.any(np.asarray(gk)[1][:, mask[1]] != 0)


def test_jit_traces_once_and_dispatch_stays_out_of_the_graph():
    q, k, v, w, mask = _data()
    phi = ka.feature_map("glu", num_heads=H, head_dim=d, seed=0, like=jnp.asarray(q))
    traces = []

    @jax.jit
    def f(q, k, v, phi):
        traces.append(1)
        return ka.linear_attention(q, k, v, feature_map=phi, causal=True)

    a = f(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), phi)
    b = f(jnp.asarray(q) + 1, jnp.asarray(k), jnp.asarray(v), phi)
    assert len(traces) == 1
    assert isinstance(a, jax.Array) and a.dtype == jnp.float64 and a.shape == (B, H, N, d)
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_jax_float32_default_and_vmap():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((B, H, N, d)), dtype=jnp.float32) for _ in range(3))
    phi = ka.feature_map("aoglu", num_heads=H, head_dim=d, seed=0, like=q)
    full = ka.linear_attention(q, k, v, feature_map=phi, causal=True)
    per_item = jax.vmap(lambda a, b, c: ka.linear_attention(a[None], b[None], c[None], feature_map=phi,
                                                           causal=True)[0])(q, k, v)
    assert full.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(per_item), np.asarray(full), rtol=1e-5, atol=1e-6)


def test_orthogonality_penalty_is_differentiable():
    phi = ka.feature_map("glu", num_heads=H, head_dim=d, depth=2, seed=0, dtype="float64")
    rng = np.random.default_rng(0)
    phi = phi.replace(params={"shared": [dict(b, W=b["W"] + 0.1 * rng.standard_normal(b["W"].shape))
                                         for b in phi.params["shared"]]})
    tphi = phi.to(like=torch.zeros(1, dtype=torch.float64))
    for p in tphi.parameters():
        p.requires_grad_(True)
    ka.orthogonality_penalty(tphi, weight=0.5).backward()
    jphi = phi.to(like=jnp.zeros(1, dtype=jnp.float64))
    gj = jax.grad(lambda p: ka.orthogonality_penalty(p, weight=0.5))(jphi)
    for tp, jp in zip(tphi.main_weights(), gj.main_weights()):
        np.testing.assert_allclose(tp.grad.numpy(), np.asarray(jp), rtol=1e-10, atol=1e-14)
    for block, gblock in zip(tphi.params["shared"], gj.params["shared"]):  # gates are not penalised
        assert block["G"].grad is None and not np.any(np.asarray(gblock["G"]))
    W = phi.main_weights()[0]
    Hh, n = W.shape[0], W.shape[1]
    expected = 0.5 * 4 * np.matmul(np.matmul(W, W.transpose(0, 2, 1)) - np.eye(n), W) / (Hh * n * n)
    np.testing.assert_allclose(tphi.main_weights()[0].grad.numpy(), expected, rtol=1e-10)
