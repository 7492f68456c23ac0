"""Every path against the float64 definition, at the edges.

Each backend x path (its fast path, and the array-API core) x causal x method
x mask pattern is compared with :func:`kernelattn.testing.reference_linear_attention`
(outputs, returned state) and :func:`~kernelattn.testing.reference_linear_attention_vjp`
(gradients of q, k, v and every phi parameter), never only with another path.
Gradients come from torch autograd, ``jax.grad`` (under ``jit``) and the
hand-derived VJP (NumPy, array-api-strict).
"""

from __future__ import annotations

import numpy as np
import pytest

import kernelattn as ka
from kernelattn import _tree
from kernelattn.testing import (edge_key_mask, reference_linear_attention, reference_linear_attention_vjp,
                                to_numpy)

B, H, D = 3, 2, 8
N = 37            # not a multiple of the chunk
CHUNK = 16        # several chunks, and a partial one
L_CROSS = 23

MASKS = ("none", "right", "left", "holes", "item", "cross")
#: the quick tier (-m "not slow") runs every case on numpy, array_api_strict and torch (fast), and on
#: jax and dask (a compile or a graph per case) each test with fewer patterns, kinds and dtypes
HEAVY = ("jax", "dask")


def make_mask(pattern, rng, n):
    """(B, n) boolean key mask of a named pattern (None for "none" and "cross")."""
    return None if pattern == "cross" else edge_key_mask(pattern, B, n, rng, chunk=CHUNK)


def inputs(rng, pattern, *, n=N, cross=False):
    L = L_CROSS if cross else n
    q = rng.standard_normal((B, H, n, D))
    k = rng.standard_normal((B, H, L, D))
    v = rng.standard_normal((B, H, L, D))
    g = rng.standard_normal((B, H, n, D))
    return q, k, v, g, make_mask(pattern, rng, L)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.linalg.norm(b)
    return np.linalg.norm(a - b) / den if den > 0 else np.linalg.norm(a)


def glu(rng_seed=0, dtype="float64"):
    return ka.feature_map("glu", num_heads=H, head_dim=D, depth=2, seed=rng_seed, dtype=dtype)


# ---------------------------------------------------------------------------
# running one path: outputs and gradients, as float64 NumPy


def _torch_grads(bk, q, k, v, g, phi, key_mask, kw, dtype="float32"):
    import torch

    ts = [torch.tensor(a).to(getattr(torch, dtype)).requires_grad_(True) for a in (q, k, v)]
    phi_t = phi.to(like=ts[0])
    leaves = [p.detach().clone().requires_grad_(True) for p in phi_t.parameters()]
    phi_t = phi_t.replace(params=_tree.with_leaves(phi_t.params, leaves))
    km = None if key_mask is None else torch.tensor(key_mask)
    out = ka.linear_attention(*ts, feature_map=phi_t, key_mask=km, **kw)
    (out.float() * torch.tensor(g, dtype=torch.float32)).sum().backward()
    grads = [t.grad for t in ts] + [p.grad for p in leaves]
    return to_numpy(out.detach().float()), [np.zeros(1) if x is None else to_numpy(x.float()) for x in grads]


def _jax_grads(bk, q, k, v, g, phi, key_mask, kw, dtype="float32"):
    import jax
    import jax.numpy as jnp

    arrs = [jnp.asarray(a, dtype=getattr(jnp, dtype)) for a in (q, k, v)]
    phi_j = phi.to(like=arrs[0])
    km = None if key_mask is None else jnp.asarray(key_mask)
    gj = jnp.asarray(g, dtype=jnp.float32)

    def loss(q, k, v, params):
        out = ka.linear_attention(q, k, v, feature_map=phi_j.replace(params=params), key_mask=km, **kw)
        return jnp.sum(out.astype(jnp.float32) * gj), out

    fn = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    if kw.get("method") != "recurrent":  # jit would unroll the recurrent loop: compiling it costs seconds
        fn = jax.jit(fn)
    (_, out), grads = fn(*arrs, phi_j.params)
    gq, gk, gv, gp = grads
    return (to_numpy(out.astype(jnp.float32)),
            [to_numpy(x.astype(jnp.float32)) for x in (gq, gk, gv, *_tree.leaves(gp))])


def _hand_grads(bk, q, k, v, g, phi, key_mask, kw):
    kw = {a: b for a, b in kw.items() if a != "backend"}
    arrs = [bk.asarray(a) for a in (q, k, v)]
    phi_x = phi.to(like=arrs[0])
    km = None if key_mask is None else bk.asarray(key_mask)
    out, vjp = ka.linear_attention_vjp(*arrs, feature_map=phi_x, key_mask=km, **kw)
    gr = vjp(bk.asarray(g))
    return to_numpy(out), [to_numpy(x) for x in (gr.q, gr.k, gr.v, *gr.feature_map.parameters())]


GRADS = {"torch": _torch_grads, "jax": _jax_grads, "numpy": _hand_grads, "array_api_strict": _hand_grads}


def _check_against_reference(xp_backend, rng, *, causal, pattern, path, method):
    bk = xp_backend
    cross = pattern == "cross"
    # the recurrent strategy is a Python loop over tokens (unrolled by jax.jit): fewer tokens
    q, k, v, g, key_mask = inputs(rng, pattern, cross=cross, n=19 if method == "recurrent" else N)
    phi = glu()
    kw = dict(causal=causal, method=method, chunk_size=CHUNK)
    if path == "core":
        kw["backend"] = "agnostic"
    ref = reference_linear_attention(q, k, v, feature_map=phi, causal=causal, key_mask=key_mask)
    # forward on every backend, through the public function
    arrs = [bk.asarray(a) for a in (q, k, v)]
    km = None if key_mask is None else bk.asarray(key_mask)
    out = ka.linear_attention(*arrs, feature_map=phi.to(like=arrs[0]), key_mask=km, **kw)
    assert rel(to_numpy(out), ref) < 1e-5, f"forward {rel(to_numpy(out), ref):.2e}"
    assert np.isfinite(to_numpy(out)).all()
    grad_fn = GRADS.get(bk.name)
    if grad_fn is None:
        return
    out, grads = grad_fn(bk, q, k, v, g, phi, key_mask, kw)
    want = reference_linear_attention_vjp(q, k, v, g, feature_map=phi, causal=causal, key_mask=key_mask)
    names = ["q", "k", "v"] + [f"phi[{i}]" for i in range(len(want["params"]))]
    for name, got, exp in zip(names, grads, [want["q"], want["k"], want["v"], *want["params"]]):
        err = rel(got, exp)
        assert np.isfinite(got).all(), f"non-finite gradient of {name}"
        assert err < 1e-4, f"gradient of {name}: relative error {err:.2e} against the float64 definition"


CASES = [(c, p) for c in (False, True) for p in MASKS if not (c and p == "cross")]


@pytest.mark.slow_where(xp_backend=HEAVY, pattern=("right", "holes", "item", "cross"))
@pytest.mark.slow_where(xp_backend=HEAVY, path="fast", causal=False, pattern="left")  # quick: fast causal-left,
@pytest.mark.slow_where(xp_backend=HEAVY, path="fast", causal=True, pattern="none")   # fast noncausal-none,
@pytest.mark.slow_where(xp_backend=HEAVY, path="core", causal=False, pattern="none")  # core noncausal-left,
@pytest.mark.slow_where(xp_backend=HEAVY, path="core", causal=True, pattern="left")   # core causal-none
@pytest.mark.parametrize("causal, pattern", CASES, ids=[f"{'causal' if c else 'noncausal'}-{p}" for c, p in CASES])
@pytest.mark.parametrize("path", ["fast", "core"])
def test_paths_match_definition(xp_backend, rng, causal, pattern, path):
    _check_against_reference(xp_backend, rng, causal=causal, pattern=pattern, path=path, method="auto")


@pytest.mark.slow_where(xp_backend=HEAVY, pattern=("none", "right", "holes", "item"))
@pytest.mark.parametrize("pattern", MASKS[:-1])
@pytest.mark.parametrize("method", ["naive", "recurrent"])
@pytest.mark.slow_where(xp_backend="jax", method="recurrent")  # jax quick: naive (recurrent: a token loop, eager)
def test_reference_strategies_match_definition(xp_backend, rng, method, pattern):
    _check_against_reference(xp_backend, rng, causal=True, pattern=pattern, path="core", method=method)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("pattern", ["left", "holes"])
def test_long_sequences_match_definition(xp_backend, rng, causal, pattern):
    """N = 512 (the issue's bound): float32 rounding over many chunks and blocks."""
    bk = xp_backend
    q, k, v, g, key_mask = inputs(rng, pattern, n=512)
    phi = glu()
    kw = dict(causal=causal)
    ref = reference_linear_attention(q, k, v, feature_map=phi, causal=causal, key_mask=key_mask)
    grad_fn = GRADS.get(bk.name)
    if grad_fn is None:
        arrs = [bk.asarray(a) for a in (q, k, v)]
        km = None if key_mask is None else bk.asarray(key_mask)
        out = ka.linear_attention(*arrs, feature_map=phi.to(like=arrs[0]), key_mask=km, **kw)
        assert rel(to_numpy(out), ref) < 1e-5
        return
    out, grads = grad_fn(bk, q, k, v, g, phi, key_mask, kw)
    assert rel(out, ref) < 1e-5
    want = reference_linear_attention_vjp(q, k, v, g, feature_map=phi, causal=causal, key_mask=key_mask)
    for got, exp in zip(grads, [want["q"], want["k"], want["v"], *want["params"]]):
        assert rel(got, exp) < 1e-4


# ---------------------------------------------------------------------------
# returned state, every kind, half precision


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.slow_where(xp_backend=HEAVY, pattern="item")
@pytest.mark.slow_where(xp_backend="jax", pattern="none")
@pytest.mark.slow_where(xp_backend="jax", causal=False)  # jax quick: causal-left
@pytest.mark.parametrize("pattern", ["none", "left", "item"])
def test_returned_state_matches_definition(xp_backend, rng, causal, pattern):
    bk = xp_backend
    q, k, v, _, key_mask = inputs(rng, pattern)
    phi = glu()
    S0 = np.abs(rng.standard_normal((B, H, D, D)))
    z0 = np.abs(rng.standard_normal((B, H, D)))
    ref, (S, z) = reference_linear_attention(q, k, v, feature_map=phi, causal=causal, key_mask=key_mask,
                                             initial_state=(S0, z0), return_state=True)
    arrs = [bk.asarray(a) for a in (q, k, v)]
    km = None if key_mask is None else bk.asarray(key_mask)
    for backend in (None, "agnostic"):
        out, st = ka.linear_attention(*arrs, feature_map=phi.to(like=arrs[0]), key_mask=km, causal=causal,
                                      initial_state=(bk.asarray(S0), bk.asarray(z0)), return_state=True,
                                      chunk_size=CHUNK, backend=backend)
        assert rel(to_numpy(out), ref) < 1e-5
        assert rel(to_numpy(st.S), S) < 1e-5 and rel(to_numpy(st.z), z) < 1e-5


KINDS = ("ffn", "aoglu", "hedgehog", "favor", "elu", "relu")


@pytest.mark.slow_where(xp_backend=HEAVY, kind=("ffn", "hedgehog", "favor", "relu"))  # quick: aoglu, elu
@pytest.mark.slow_where(xp_backend="jax", kind="aoglu", causal=False)  # jax: aoglu causal, elu noncausal
@pytest.mark.slow_where(xp_backend="jax", kind="elu", causal=True)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_every_kind_matches_definition(xp_backend, rng, kind, causal):
    bk = xp_backend
    q, k, v, _, key_mask = inputs(rng, "left")
    phi = kind if kind in ("elu", "relu") else ka.feature_map(kind, num_heads=H, head_dim=D, seed=1,
                                                               dtype="float64")
    ref = reference_linear_attention(q, k, v, feature_map=phi, causal=causal, key_mask=key_mask)
    arrs = [bk.asarray(a) for a in (q, k, v)]
    fm = phi if isinstance(phi, str) else phi.to(like=arrs[0])
    km = bk.asarray(key_mask)
    for backend in (None, "agnostic"):
        out = ka.linear_attention(*arrs, feature_map=fm, key_mask=km, causal=causal, chunk_size=CHUNK,
                                  backend=backend)
        assert rel(to_numpy(out), ref) < 1e-5, (backend, rel(to_numpy(out), ref))


#: documented tolerance of half-precision inputs (computed in float32, rounded once on the way out
#: and once on the way in): relative norm error against the float64 definition on the rounded inputs
HALF_TOL = 5e-3


@pytest.mark.slow_where(xp_backend=HEAVY, dtype="bfloat16")
@pytest.mark.slow_where(xp_backend="jax", causal=False)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_half_precision_within_documented_tolerance(xp_backend, rng, dtype, causal):
    bk = xp_backend
    if not bk.has(dtype):
        pytest.skip(f"{bk.name} has no {dtype}")
    q, k, v, _, key_mask = inputs(rng, "left")
    arrs = [bk.asarray(a, dtype=dtype) for a in (q, k, v)]
    rounded = [to_numpy(a).astype(np.float64) for a in arrs]
    phi = glu()
    ref = reference_linear_attention(*rounded, feature_map=phi, causal=causal, key_mask=key_mask)
    for backend in (None, "agnostic"):
        out = ka.linear_attention(*arrs, feature_map=phi.to(like=arrs[0], dtype=arrs[0].dtype),
                                  key_mask=bk.asarray(key_mask), causal=causal, chunk_size=CHUNK, backend=backend)
        assert out.dtype == arrs[0].dtype
        assert rel(to_numpy(out).astype(np.float64), ref) < HALF_TOL


#: documented tolerance of half-precision gradients (same measure)
HALF_GRAD_TOL = 1e-2


@pytest.mark.backends("torch", "jax")
@pytest.mark.slow_where(xp_backend="jax", dtype="bfloat16")
@pytest.mark.slow_where(xp_backend="jax", causal=False)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_half_precision_gradients_within_documented_tolerance(xp_backend, rng, dtype, causal):
    """Gradients of half inputs against the definition on the rounded inputs and parameters."""
    bk = xp_backend
    q, k, v, g, key_mask = inputs(rng, "left")
    xs = [to_numpy(bk.asarray(a, dtype=dtype)).astype(np.float64) for a in (q, k, v)]
    phi = glu()
    # the map runs in the inputs' dtype: compare with its parameters rounded the same way
    rounded = [to_numpy(p).astype(np.float64) for p in phi.to(like=bk.asarray(q, dtype=dtype)).parameters()]
    phi_r = phi.replace(params=_tree.with_leaves(phi.params, rounded))
    out, grads = GRADS[bk.name](bk, *xs, g, phi_r, key_mask, dict(causal=causal, chunk_size=CHUNK), dtype=dtype)
    want = reference_linear_attention_vjp(*xs, g, feature_map=phi_r, causal=causal, key_mask=key_mask)
    assert rel(out, reference_linear_attention(*xs, feature_map=phi_r, causal=causal, key_mask=key_mask)) < HALF_TOL
    for got, exp in zip(grads, [want["q"], want["k"], want["v"], *want["params"]]):
        assert np.isfinite(got).all()
        assert rel(got, exp) < HALF_GRAD_TOL, rel(got, exp)


# ---------------------------------------------------------------------------
# zero denominators, eps = 0, relu on negative inputs (item 3)


@pytest.mark.slow_where(xp_backend=HEAVY, eps=1e-6)
@pytest.mark.slow_where(xp_backend="jax")  # jax quick: the gradient test below runs these rows forward too
@pytest.mark.parametrize("eps", [0.0, 1e-6])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_zero_denominator_rows_give_zeros(xp_backend, rng, eps, causal):
    bk = xp_backend
    q, k, v, _, key_mask = inputs(rng, "item")
    arrs = [bk.asarray(a) for a in (q, k, v)]
    km = bk.asarray(key_mask)
    for backend in (None, "agnostic"):
        out = to_numpy(ka.linear_attention(*arrs, key_mask=km, causal=causal, eps=eps, backend=backend))
        assert np.isfinite(out).all()
        assert (out[1] == 0).all()                     # the fully padded batch item
        ref = reference_linear_attention(q, k, v, causal=causal, key_mask=key_mask, eps=eps)
        assert rel(out, ref) < 1e-5
    # relu on all-negative inputs: phi = 0, so every denominator is 0
    neg = [bk.asarray(-np.abs(a)) for a in (q, k)]
    for backend in (None, "agnostic"):
        out = to_numpy(ka.linear_attention(*neg, arrs[2], feature_map="relu", causal=causal, eps=eps,
                                           backend=backend))
        assert np.isfinite(out).all() and (out == 0).all()


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_zero_denominator_rows_with_a_callers_state(xp_backend, causal):
    """A state the caller made up may have S != 0 where z = 0 (no sequence of nonnegative features does):
    with no valid key, relu queries meet den = 0 and the definition's zero row, not S / eps."""
    bk = xp_backend
    rng = np.random.default_rng(5)
    q, k, v = rng.random((1, H, 5, D)), rng.standard_normal((1, H, 5, D)), rng.standard_normal((1, H, 5, D))
    S0, z0 = np.ones((1, H, D, D)), np.zeros((1, H, D))
    key_mask = np.zeros((1, 5), dtype=bool)
    ref = reference_linear_attention(q, k, v, feature_map="relu", causal=causal, key_mask=key_mask,
                                     initial_state=(S0, z0))
    assert (ref == 0).all()
    args = [bk.asarray(a.astype(np.float32)) for a in (q, k, v)]
    state = tuple(bk.asarray(a.astype(np.float32)) for a in (S0, z0))
    for backend in (None, "agnostic"):
        out = to_numpy(ka.linear_attention(*args, feature_map="relu", causal=causal, key_mask=bk.asarray(key_mask),
                                           initial_state=state, backend=backend))
        assert (out == 0).all(), backend


@pytest.mark.backends(*GRADS)   # the libraries with a gradient path
@pytest.mark.slow_where(xp_backend="jax", eps=1e-6)
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_zero_denominator_rows_have_zero_gradient(xp_backend, rng, eps):
    bk = xp_backend
    grad_fn = GRADS[bk.name]
    q, k, v, g, key_mask = inputs(rng, "left")
    phi = glu()
    for backend in (None, "agnostic"):
        kw = dict(causal=True, eps=eps, chunk_size=CHUNK, method="auto")
        if backend:
            kw["backend"] = backend
        out, grads = grad_fn(bk, q, k, v, g, phi, key_mask, kw)
        for x in grads:
            assert np.isfinite(x).all()
        assert (grads[0][1, :, :N - 3] == 0).all()     # rows with no real key before them
        want = reference_linear_attention_vjp(q, k, v, g, feature_map=phi, causal=True, key_mask=key_mask, eps=eps)
        assert rel(grads[0], want["q"]) < 1e-4 and rel(grads[1], want["k"]) < 1e-4


@pytest.mark.backends(*GRADS)
@pytest.mark.slow_where(xp_backend="jax", causal=False)
@pytest.mark.slow_where(xp_backend="jax", eps=0.0)
@pytest.mark.parametrize("eps", [0.0, 1e-6])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_zero_denominator_rows_of_disjoint_features_have_the_definitions_gradient(xp_backend, causal, eps):
    """relu features with disjoint supports: phi(q_i) != 0 and phi(k_j) != 0, yet every product is 0, so
    den = num = 0 on the first rows. Their output is 0 and their gradient is the definition's (0 for the
    row), not g / eps pushed through phi (a path that divides num / (den + eps) must not leak it)."""
    rng = np.random.default_rng(11)
    n, half = 12, D // 2
    q = np.abs(rng.standard_normal((1, H, n, D)))
    q[..., half:] *= -1                       # queries live on the first half of the features
    k = np.abs(rng.standard_normal((1, H, n, D)))
    k[:, :, :6, :half] *= -1                  # the first 6 keys on the second half only
    v, g = rng.standard_normal((1, H, n, D)), rng.standard_normal((1, H, n, D))
    phi = ka.feature_map("relu")
    kw = dict(causal=causal, eps=eps, chunk_size=4, method="auto")
    for backend in (None, "agnostic"):
        kw_b = dict(kw, backend=backend) if backend else kw
        key_mask = None if causal else np.arange(n)[None] < 6   # non-causal: only the disjoint keys
        out, grads = GRADS[xp_backend.name](xp_backend, q, k, v, g, phi, key_mask, kw_b)
        ref = reference_linear_attention(q, k, v, feature_map="relu", causal=causal, key_mask=key_mask, eps=eps)
        want = reference_linear_attention_vjp(q, k, v, g, feature_map="relu", causal=causal, key_mask=key_mask,
                                              eps=eps)
        assert (ref[:, :, :6] == 0).all() and (out[:, :, :6] == 0).all(), backend
        for name, got, exp in zip("qkv", grads, (want["q"], want["k"], want["v"])):
            assert np.isfinite(got).all(), (backend, name)
            assert np.abs(got - exp).max() < 1e-4 * max(1.0, np.abs(exp).max()), (backend, name)


# ---------------------------------------------------------------------------
# empty inputs (item 4)


@pytest.mark.slow_where(xp_backend=HEAVY, causal=False, n=0)  # quick on jax, dask: (True, 0, 0), (False, 5, 0)
@pytest.mark.slow_where(xp_backend="jax", causal=False)
@pytest.mark.parametrize("causal, n, l", [(False, 0, 0), (True, 0, 0), (False, 0, 5), (False, 5, 0)])
def test_empty_inputs(xp_backend, causal, n, l):
    bk = xp_backend
    phi = glu(dtype="float32")
    q = bk.asarray(np.zeros((2, H, n, D)))
    k = bk.asarray(np.zeros((2, H, l, D)))
    v = bk.asarray(np.zeros((2, H, l, 5)))
    for backend in (None, "agnostic"):
        for method in (("auto", "naive", "recurrent") if causal else ("auto",)):
            out, st = ka.linear_attention(q, k, v, feature_map=phi.to(like=q), causal=causal, return_state=True,
                                          method=method, backend=backend)
            assert tuple(out.shape) == (2, H, n, 5)
            assert out.dtype == q.dtype and type(out) is type(q)
            assert tuple(st.S.shape) == (2, H, D, 5) and tuple(st.z.shape) == (2, H, D)
            if l == 0:
                assert (to_numpy(st.S) == 0).all() and (to_numpy(st.z) == 0).all()
            if n:
                assert (to_numpy(out) == 0).all()          # nothing to attend to
    if n == l:
        o, st = ka.linear_attention_step(q, k, v, feature_map=phi.to(like=q))
        assert tuple(o.shape) == (2, H, 0, 5) and tuple(st.S.shape) == (2, H, D, 5)


def test_edge_key_masks_are_the_named_patterns(rng):
    assert edge_key_mask("none", B, N) is None
    item = edge_key_mask("item", B, N, chunk=CHUNK)
    assert not item[1].any() and not item[2, :CHUNK + 1].any() and item[2, CHUNK + 1:].all() and item[0].all()
    left = edge_key_mask("left", B, N)
    assert not left[0, :7].any() and left[0, 7:].all() and left[1].sum() == 3
    holes = edge_key_mask("holes", B, N, rng)
    assert holes[:, 0].all() and not holes.all()
    with pytest.raises(ValueError, match="pattern must be one of .*; got 'middle'"):
        edge_key_mask("middle", B, N)
