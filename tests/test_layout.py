"""``layout="BNHD"``: (batch, tokens, heads, features) arrays, as JAX and Flax code holds them.

On every backend a BNHD array gives the numbers of its BHND transpose (the
output transposed back), and both match the float64 definition
(:func:`kernelattn.testing.reference_linear_attention`) on the transposed
inputs: causal or not, with a key mask, a returned and an initial state, the
decoding step, softmax attention, and the gradients (hand VJP everywhere,
torch autograd and ``jax.grad`` too).
"""

from __future__ import annotations

import numpy as np
import pytest

import kernelattn as ka
from kernelattn.testing import (
    reference_linear_attention,
    reference_linear_attention_vjp,
    reference_softmax_attention,
    to_numpy,
)

B, N, H, D = 2, 11, 3, 4
CHUNK = 4  # several chunks and a partial one


def T(a):
    """BNHD <-> BHND (NumPy)."""
    return np.swapaxes(a, 1, 2)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.linalg.norm(b)
    return np.linalg.norm(a - b) / den if den > 0 else np.linalg.norm(a)


def data(rng, n=N, L=None):
    """BNHD queries, keys, values and an output cotangent (float64 NumPy)."""
    L = n if L is None else L
    q = rng.standard_normal((B, n, H, D))
    k = rng.standard_normal((B, L, H, D))
    v = rng.standard_normal((B, L, H, D + 1))
    g = rng.standard_normal((B, n, H, D + 1))
    return q, k, v, g


def mask(L):
    m = np.ones((B, L), dtype=bool)
    m[0, L - 3:] = False
    m[1, :2] = False
    return m


def phi_of(seed=0):
    return ka.feature_map("glu", num_heads=H, head_dim=D, depth=2, seed=seed, dtype="float64")


CASES = [(False, False), (False, True), (True, False), (True, True)]
IDS = [f"{'causal' if c else 'noncausal'}-{'mask' if m else 'nomask'}" for c, m in CASES]
#: quick tier (-m "not slow"): every case on numpy, array_api_strict and torch; on dask (a graph per
#: case) causal-mask, plus noncausal-nomask where a test has a path axis; on jax (a compile per
#: shape) the fast path causal-mask and jit
HEAVY = ("jax", "dask")


@pytest.mark.slow_where(xp_backend=HEAVY, causal=False, masked=True)
@pytest.mark.slow_where(xp_backend=HEAVY, causal=True, masked=False)
@pytest.mark.slow_where(xp_backend="jax", backend="agnostic")
@pytest.mark.slow_where(xp_backend="jax", causal=False)
@pytest.mark.parametrize("causal, masked", CASES, ids=IDS)
@pytest.mark.parametrize("backend", [None, "agnostic"], ids=["fast", "core"])
def test_bnhd_equals_bhnd_and_definition(xp_backend, rng, causal, masked, backend):
    bk = xp_backend
    q, k, v, _ = data(rng)
    km = mask(N) if masked else None
    phi = phi_of()
    kw = dict(causal=causal, chunk_size=CHUNK, backend=backend)
    arrs = [bk.asarray(a) for a in (q, k, v)]
    kmx = None if km is None else bk.asarray(km)
    phx = phi.to(like=arrs[0])
    out = ka.linear_attention(*arrs, feature_map=phx, key_mask=kmx, layout="BNHD", **kw)
    assert type(out) is type(arrs[0]) and tuple(out.shape) == (B, N, H, D + 1)
    want = ka.linear_attention(*(bk.asarray(T(a)) for a in (q, k, v)), feature_map=phx, key_mask=kmx, **kw)
    assert rel(T(to_numpy(out)), to_numpy(want)) < 1e-6
    ref = reference_linear_attention(T(q), T(k), T(v), feature_map=phi, causal=causal, key_mask=km)
    assert rel(T(to_numpy(out)), ref) < 1e-5


@pytest.mark.slow_where(xp_backend="jax")
def test_cross_attention_bnhd(xp_backend, rng):
    bk = xp_backend
    q, k, v, _ = data(rng, n=5, L=9)
    km = mask(9)
    phi = phi_of()
    arrs = [bk.asarray(a) for a in (q, k, v)]
    out = ka.linear_attention(*arrs, feature_map=phi.to(like=arrs[0]), key_mask=bk.asarray(km), layout="BNHD")
    assert tuple(out.shape) == (B, 5, H, D + 1)
    ref = reference_linear_attention(T(q), T(k), T(v), feature_map=phi, key_mask=km)
    assert rel(T(to_numpy(out)), ref) < 1e-5


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.slow_where(xp_backend=("jax", "dask"), causal=False)  # a compile per case: causal only
def test_states_are_bhmd_in_both_layouts(xp_backend, rng, causal):
    bk = xp_backend
    q, k, v, _ = data(rng)
    km = mask(N)
    phi = phi_of()
    S0 = np.abs(rng.standard_normal((B, H, D, D + 1)))
    z0 = np.abs(rng.standard_normal((B, H, D)))
    arrs = [bk.asarray(a) for a in (q, k, v)]
    init = ka.LinearAttentionState(bk.asarray(S0), bk.asarray(z0))
    out, (S, z) = ka.linear_attention(*arrs, feature_map=phi.to(like=arrs[0]), causal=causal,
                                      key_mask=bk.asarray(km), initial_state=init, return_state=True,
                                      layout="BNHD")
    ref, (rS, rz) = reference_linear_attention(T(q), T(k), T(v), feature_map=phi, causal=causal, key_mask=km,
                                               initial_state=(S0, z0), return_state=True)
    assert tuple(S.shape) == (B, H, D, D + 1) and tuple(z.shape) == (B, H, D)
    assert rel(T(to_numpy(out)), ref) < 1e-5
    assert rel(to_numpy(S), rS) < 1e-5 and rel(to_numpy(z), rz) < 1e-5


@pytest.mark.slow_where(xp_backend="jax")
def test_step_bnhd(xp_backend, rng):
    """A BNHD prompt, then single (B, H, d) tokens, then a BNHD chunk: the causal attention of the whole."""
    bk = xp_backend
    q, k, v, _ = data(rng)
    km = mask(N)
    phi = phi_of()
    ref = reference_linear_attention(T(q), T(k), T(v), feature_map=phi, causal=True, key_mask=km)
    X = [bk.asarray(a) for a in (q, k, v)]
    M = bk.asarray(km)
    phx = phi.to(like=X[0])
    outs = []
    o, state = ka.linear_attention_step(*(a[:, :4, ...] for a in X), feature_map=phx, key_mask=M[:, :4], layout="BNHD")
    assert tuple(o.shape) == (B, 4, H, D + 1)
    outs.append(to_numpy(o))
    for t in (4, 5):  # one token: (B, H, d) in both layouts
        o, state = ka.linear_attention_step(*(a[:, t, ...] for a in X), feature_map=phx, key_mask=M[:, t],
                                            state=state, layout="BNHD")
        assert tuple(o.shape) == (B, H, D + 1)
        outs.append(to_numpy(o)[:, None])
    o, state = ka.linear_attention_step(*(a[:, 6:, ...] for a in X), feature_map=phx, key_mask=M[:, 6:], state=state,
                                        layout="BNHD")
    outs.append(to_numpy(o))
    got = np.concatenate(outs, axis=1)
    assert rel(T(got), ref) < 1e-5
    # the same steps in BHND give the same numbers
    Y = [bk.asarray(T(a)) for a in (q, k, v)]
    o2, _ = ka.linear_attention_step(*(a[:, :, :4, :] for a in Y), feature_map=phx, key_mask=M[:, :4])
    assert rel(T(to_numpy(o2)), to_numpy(outs[0])) < 1e-6
    assert tuple(state.S.shape) == (B, H, D, D + 1)


@pytest.mark.slow_where(xp_backend=HEAVY, causal=False)
@pytest.mark.slow_where(xp_backend=HEAVY, masked=False)
@pytest.mark.slow_where(xp_backend="jax")
@pytest.mark.parametrize("causal, masked", CASES, ids=IDS)
def test_softmax_bnhd(xp_backend, rng, causal, masked):
    bk = xp_backend
    q, k, v, _ = data(rng)
    km = mask(N) if masked else None
    arrs = [bk.asarray(a) for a in (q, k, v)]
    out = ka.softmax_attention(*arrs, causal=causal, key_mask=None if km is None else bk.asarray(km),
                               layout="BNHD")
    assert tuple(out.shape) == (B, N, H, D + 1)
    ref = reference_softmax_attention(T(q), T(k), T(v), causal=causal, key_mask=km)
    assert rel(T(to_numpy(out)), ref) < 1e-5


@pytest.mark.slow_where(xp_backend=HEAVY, causal=False)
@pytest.mark.slow_where(xp_backend=HEAVY, masked=False)
@pytest.mark.slow_where(xp_backend="jax")
@pytest.mark.parametrize("causal, masked", CASES, ids=IDS)
def test_hand_vjp_bnhd(xp_backend, rng, causal, masked):
    bk = xp_backend
    q, k, v, g = data(rng)
    km = mask(N) if masked else None
    phi = phi_of()
    arrs = [bk.asarray(a) for a in (q, k, v)]
    kmx = None if km is None else bk.asarray(km)
    phx = phi.to(like=arrs[0])
    kw = dict(causal=causal, key_mask=kmx, chunk_size=CHUNK)
    out, vjp = ka.linear_attention_vjp(*arrs, feature_map=phx, layout="BNHD", **kw)
    gr = vjp(bk.asarray(g))
    assert tuple(out.shape) == (B, N, H, D + 1)
    assert [tuple(x.shape) for x in gr[:3]] == [q.shape, k.shape, v.shape]
    # the BHND call on the transposes, transposed back
    out2, vjp2 = ka.linear_attention_vjp(*(bk.asarray(T(a)) for a in (q, k, v)), feature_map=phx, **kw)
    gr2 = vjp2(bk.asarray(T(g)))
    assert rel(T(to_numpy(out)), to_numpy(out2)) < 1e-6
    for a, b in zip(gr[:3], gr2[:3]):
        assert rel(T(to_numpy(a)), to_numpy(b)) < 1e-6
    for a, b in zip(gr.feature_map.parameters(), gr2.feature_map.parameters()):
        assert rel(to_numpy(a), to_numpy(b)) < 1e-6
    # and the float64 definition
    want = reference_linear_attention_vjp(T(q), T(k), T(v), T(g), feature_map=phi, causal=causal, key_mask=km)
    for name, got, exp in zip("qkv", gr[:3], (want["q"], want["k"], want["v"])):
        assert rel(T(to_numpy(got)), exp) < 1e-4, name
    for got, exp in zip(gr.feature_map.parameters(), want["params"]):
        assert rel(to_numpy(got), exp) < 1e-4


def test_hand_vjp_bnhd_g_out_shape_is_checked():
    q, k, v, g = data(np.random.default_rng(0))
    _, vjp = ka.linear_attention_vjp(q, k, v, layout="BNHD")
    with pytest.raises(ValueError, match=r"g_out must have the shape of the output, \(2, 11, 3, 5\) "
                                         r"\(layout='BNHD'\)"):
        vjp(T(g))


@pytest.mark.backends("torch", "jax")
@pytest.mark.slow_where(xp_backend="jax")  # quick: torch here, jax under jit below
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_autodiff_through_bnhd(xp_backend, rng, causal):
    """torch autograd and jax.grad (under jit) flow through the layout's transposes."""
    q, k, v, g = data(rng)
    km = mask(N)
    phi = phi_of()
    want = reference_linear_attention_vjp(T(q), T(k), T(v), T(g), feature_map=phi, causal=causal, key_mask=km)
    kw = dict(causal=causal, chunk_size=CHUNK, layout="BNHD")
    if xp_backend.name == "torch":
        import torch

        ts = [torch.tensor(a, dtype=torch.float32, requires_grad=True) for a in (q, k, v)]
        with torch.enable_grad():
            out = ka.linear_attention(*ts, feature_map=phi.to(like=ts[0]), key_mask=torch.tensor(km), **kw)
            (out * torch.tensor(g, dtype=torch.float32)).sum().backward()
        grads = [t.grad for t in ts]
    else:
        import jax
        import jax.numpy as jnp

        arrs = [jnp.asarray(a, dtype=jnp.float32) for a in (q, k, v)]
        phj = phi.to(like=arrs[0])
        gj, kmj = jnp.asarray(g, dtype=jnp.float32), jnp.asarray(km)

        def loss(q, k, v):
            return jnp.sum(ka.linear_attention(q, k, v, feature_map=phj, key_mask=kmj, **kw) * gj)

        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*arrs)
    for name, got, exp in zip("qkv", grads, (want["q"], want["k"], want["v"])):
        assert tuple(got.shape) == (B, N, H, D + (name == "v"))
        assert rel(T(to_numpy(got)), exp) < 1e-4, name


@pytest.mark.backends("jax")
def test_jax_jit_bnhd(xp_backend, rng):
    import jax
    import jax.numpy as jnp

    q, k, v, _ = data(rng)
    phi = phi_of()
    arrs = [jnp.asarray(a, dtype=jnp.float32) for a in (q, k, v)]
    phj = phi.to(like=arrs[0])
    f = jax.jit(lambda q, k, v: ka.linear_attention(q, k, v, feature_map=phj, causal=True, layout="BNHD"))
    ref = reference_linear_attention(T(q), T(k), T(v), feature_map=phi, causal=True)
    assert rel(T(to_numpy(f(*arrs))), ref) < 1e-5


# ---------------------------------------------------------------------------
# errors


def test_layout_is_validated():
    q = np.zeros((1, 4, 2, 3))
    for fn in (ka.linear_attention, ka.softmax_attention, ka.linear_attention_vjp):
        with pytest.raises(ValueError, match=r"layout must be one of \['BHND', 'BNHD'\]; got 'bnhd'"):
            fn(q, q, q, layout="bnhd")
        with pytest.raises(TypeError, match=r"layout must be one of \['BHND', 'BNHD'\] \(a string\); got None"):
            fn(q, q, q, layout=None)
    with pytest.raises(ValueError, match="layout must be one of"):
        ka.linear_attention_step(q[:, 0], q[:, 0], q[:, 0], layout="NHD")


@pytest.mark.parametrize("layout, want", [
    ("BHND", r"q must have 4 dimensions \(B, H, N, d\) \[layout='BHND'; pass layout='BNHD' for \(B, N, H, d\)\]"),
    ("BNHD", r"q must have 4 dimensions \(B, N, H, d\) \[layout='BNHD'; pass layout='BHND' for \(B, H, N, d\)\]"),
])
def test_shape_error_names_the_layout(layout, want):
    q = np.zeros((4, 2, 3))
    with pytest.raises(ValueError, match=want):
        ka.linear_attention(q, q[None], q[None], layout=layout)
    with pytest.raises(ValueError, match=r"v must have 4 dimensions \(B, [HL], [LH], e\)"):
        ka.softmax_attention(q[None], q[None], q, layout=layout)


def test_bnhd_head_and_length_mismatches_are_named():
    q = np.zeros((2, 5, 3, 4))  # B=2, N=5, H=3
    with pytest.raises(ValueError, match=r"head counts differ \(axis 2, layout='BNHD'\)"):
        ka.linear_attention(q, q[:, :, :2], q, layout="BNHD")
    with pytest.raises(ValueError, match=r"key_mask must have shape \(B, L\) = \(2, 5\)"):
        ka.linear_attention(q, q, q, key_mask=np.ones((2, 3), bool), layout="BNHD")
    with pytest.raises(ValueError, match=r"N = L"):
        ka.linear_attention(q, q[:, :4], q[:, :4], causal=True, layout="BNHD")
