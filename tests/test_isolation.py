"""Non-finite values in padded or future positions never reach other outputs or gradients.

Hypothesis plants NaN, +Inf or -Inf in padded keys/values and (causal) in
every input at positions >= t, on every backend and path, and checks that the
outputs before t and the valid outputs, and the gradients a loss over them
gives for q, k, v and phi's parameters, are those of the same inputs with
finite numbers in those places, and equal the float64 definition.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import kernelattn as ka
from kernelattn import _tree
from kernelattn.testing import reference_linear_attention, to_numpy

B, H, D = 2, 2, 4
CHUNK = 8
BAD = (np.nan, np.inf, -np.inf)

SETTINGS = settings(max_examples=6, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def planted(draw, causal, sizes=(1, 13, 21)):
    n = draw(st.sampled_from(sizes))
    t = draw(st.integers(0, n - 1)) if causal else n
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    q, k, v = rng.standard_normal((3, B, H, n, D))
    keep = rng.random((B, n)) > 0.3
    if draw(st.booleans()):
        keep[1] = False                      # a fully padded batch item
    bad = draw(st.sampled_from(BAD))
    dirty = [a.copy() for a in (q, k, v)]
    # padded keys and values: anything at all
    pad = np.broadcast_to(~keep[:, None, :, None], q.shape)
    for a in dirty[1:]:
        a[pad] = bad
    # future positions (causal): some entries of q, k, v at positions >= t
    if causal:
        for a in dirty:
            hit = rng.random(a.shape) < 0.3
            hit[:, :, :t] = False
            a[hit] = bad
    return q, k, v, dirty, keep, t, rng.standard_normal((B, H, n, D))


def _phi():
    return ka.feature_map("glu", num_heads=H, head_dim=D, seed=3, dtype="float64")


def _run(bk, arrays, keep, g, t, *, causal, backend, method, want_grad):
    """Outputs, and gradients of sum over valid rows i < t of out_i * g_i (float64 NumPy)."""
    phi = _phi()
    rows = np.zeros(g.shape, dtype=bool)
    rows[:, :, :t] = True
    kw = dict(causal=causal, method=method, chunk_size=CHUNK, backend=backend)
    if not want_grad:
        xs = [bk.asarray(a) for a in arrays]
        out = ka.linear_attention(*xs, feature_map=phi.to(like=xs[0]), key_mask=bk.asarray(keep), **kw)
        return to_numpy(out), None
    weight = np.where(rows, g, 0.0)
    if bk.name == "torch":
        import torch

        xs = [torch.tensor(a, dtype=torch.float32, requires_grad=True) for a in arrays]
        phi_t = phi.to(like=xs[0])
        leaves = [p.detach().clone().requires_grad_(True) for p in phi_t.parameters()]
        phi_t = phi_t.replace(params=_tree.with_leaves(phi_t.params, leaves))
        out = ka.linear_attention(*xs, feature_map=phi_t, key_mask=torch.tensor(keep), **kw)
        (torch.where(torch.tensor(rows), out, 0.0) * torch.tensor(weight, dtype=torch.float32)).sum().backward()
        grads = [x.grad for x in xs] + [p.grad for p in leaves]
        return to_numpy(out.detach()), [to_numpy(x) for x in grads]
    if bk.name == "jax":
        import jax
        import jax.numpy as jnp

        xs = [jnp.asarray(a, dtype=jnp.float32) for a in arrays]
        phi_j = phi.to(like=xs[0])
        km, wj, rj = jnp.asarray(keep), jnp.asarray(weight, dtype=jnp.float32), jnp.asarray(rows)

        def loss(q, k, v, p):
            out = ka.linear_attention(q, k, v, feature_map=phi_j.replace(params=p), key_mask=km, **kw)
            return jnp.sum(jnp.where(rj, out, 0.0) * wj), out

        fn = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
        if method != "recurrent":  # jit would unroll the recurrent loop: compiling it costs seconds
            fn = jax.jit(fn)
        (_, out), gr = fn(*xs, phi_j.params)
        return to_numpy(out), [to_numpy(x) for x in (*gr[:3], *_tree.leaves(gr[3]))]
    # NumPy-like libraries: the hand-derived VJP
    xs = [bk.asarray(a) for a in arrays]
    kw.pop("backend")
    out, vjp = ka.linear_attention_vjp(*xs, feature_map=phi.to(like=xs[0]), key_mask=bk.asarray(keep), **kw)
    gr = vjp(bk.asarray(weight))
    return to_numpy(out), [to_numpy(x) for x in (gr.q, gr.k, gr.v, *gr.feature_map.parameters())]


GRAD_BACKENDS = ("torch", "jax", "numpy", "array_api_strict")


def _check(bk, case, *, causal, backend, method):
    q, k, v, dirty, keep, t, g = case
    want_grad = bk.name in GRAD_BACKENDS
    out_c, grads_c = _run(bk, (q, k, v), keep, g, t, causal=causal, backend=backend, method=method,
                          want_grad=want_grad)
    out_d, grads_d = _run(bk, dirty, keep, g, t, causal=causal, backend=backend, method=method,
                          want_grad=want_grad)
    ref = reference_linear_attention(q, k, v, feature_map=_phi(), causal=causal, key_mask=keep)
    # outputs before t are finite, equal the clean ones, and equal the definition
    before = out_d[:, :, :t]
    assert np.isfinite(before).all(), "a non-finite value reached an earlier or valid output"
    np.testing.assert_allclose(before, out_c[:, :, :t], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(before, ref[:, :, :t], rtol=2e-4, atol=2e-5)
    if not want_grad:
        return
    names = ["q", "k", "v"] + [f"phi[{i}]" for i in range(len(grads_c) - 3)]
    for name, gc, gd in zip(names, grads_c, grads_d):
        if name in ("q", "k", "v"):  # positions >= t are outside the loss: compare those before t
            gc, gd = gc[:, :, :t], gd[:, :, :t]
            if name != "q":  # padded keys get no gradient at all
                assert (gd[~np.broadcast_to(keep[:, None, :t, None], gd.shape)] == 0).all(), name
        assert np.isfinite(gd).all(), f"non-finite gradient of {name}"
        np.testing.assert_allclose(gd, gc, rtol=1e-5, atol=1e-6, err_msg=name)


PATHS = [("fast", "auto"), ("core", "auto"), ("core", "naive"), ("core", "recurrent")]


# quick tier (-m "not slow"): every path on numpy, array_api_strict, torch and dask; jax (a compile
# per example) on its fast path
@pytest.mark.slow_where(xp_backend="jax", path="core")
@pytest.mark.slow_where(xp_backend="jax", sizes="all")  # jax quick: one length (a compile per shape)
@pytest.mark.slow_where(xp_backend=("numpy", "array_api_strict", "torch", "dask", "cupy"), sizes="one")  # repeat
@pytest.mark.slow_where(xp_backend="dask", path="core", method=("naive", "recurrent"))  # dask quick: fast, core-auto
@pytest.mark.parametrize("sizes", ["all", "one"])
@pytest.mark.parametrize("path, method", PATHS, ids=[f"{p}-{m}" for p, m in PATHS])
def test_causal_future_and_padding_never_leak(xp_backend, path, method, sizes):
    lengths = (1, 9) if method == "recurrent" else (1, 13, 21)

    @settings(SETTINGS, max_examples=6 if sizes == "all" else 2)
    @given(planted(causal=True, sizes=lengths if sizes == "all" else lengths[-1:]))
    def run(case):
        _check(xp_backend, case, causal=True, backend="agnostic" if path == "core" else None, method=method)

    run()


@pytest.mark.slow_where(xp_backend="jax")  # quick: jax's fast path in the causal test above
@pytest.mark.parametrize("path", ["fast", "core"])
def test_padding_never_leaks_noncausal(xp_backend, path):
    @SETTINGS
    @given(planted(causal=False))
    def run(case):
        _check(xp_backend, case, causal=False, backend="agnostic" if path == "core" else None, method="auto")

    run()


@pytest.mark.backends("torch", "jax")
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_long_sequence_paths_never_leak(xp_backend, monkeypatch, causal):
    """The tests above run short inputs on torch's direct formula and JAX's masked product; with the
    length limits at -1 the same inputs take the paths of long sequences (torch: blocked, fused and
    custom-op; JAX: the chunked scan)."""
    import importlib

    adapter = importlib.import_module(f"kernelattn.backends.{xp_backend.name}")
    for name in ("CAUSAL_MAX", "DIRECT_MAX"):
        if hasattr(adapter, name):
            monkeypatch.setattr(adapter, name, -1)

    @SETTINGS
    @given(planted(causal=causal))
    def run(case):
        _check(xp_backend, case, causal=causal, backend=None, method="auto")

    run()


@pytest.mark.slow_where(xp_backend="jax")  # quick: jax's fast path in test_causal_future_and_padding_never_leak
def test_nonfinite_query_poisons_only_its_row(xp_backend, rng):
    bk = xp_backend
    q, k, v = rng.standard_normal((3, B, H, 9, D))
    q[0, 1, 4, 2] = np.nan
    for causal in (False, True):
        for backend in (None, "agnostic"):
            out = to_numpy(ka.linear_attention(*(bk.asarray(a) for a in (q, k, v)), causal=causal, backend=backend))
            bad = ~np.isfinite(out).all(-1)
            assert bad[0, 1, 4] and bad.sum() == 1
