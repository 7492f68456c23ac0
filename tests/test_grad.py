"""Hand-derived gradients (kernelattn.grad): against central finite differences in float64, against
torch.autograd and jax.grad on the same inputs, on every backend, and in O(N) memory when causal."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import kernelattn as ka
from kernelattn import _tree
from kernelattn.testing import reference_feature_map, to_numpy

import torch
import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", True)

B, H, N, L, d = 2, 2, 11, 9, 6

# every trainable kind, with and without bias, tied and untied, stacked; and the fixed maps
KINDS = [
    ("ffn", {}), ("ffn", {"bias": True, "depth": 2}), ("glu", {"depth": 2}), ("glu", {"tied": False, "bias": True}),
    ("aoglu", {"depth": 3, "bias": True}), ("aoglu", {"tied": False}), ("hedgehog", {}),
    ("hedgehog", {"bias": True, "tied": False}), ("favor", {}), ("elu", {}), ("relu", {}),
]
IDS = [k + "".join(f"-{a}={b}" for a, b in o.items()) for k, o in KINDS]
# (causal, method, cross, masked, initial_state)
MODES = [
    (False, "auto", True, True, True),    # non-causal cross-attention N != L, masked, from a state
    (False, "auto", False, False, False),
    (True, "chunked", False, True, True),  # causal by chunks (chunk 4 does not divide N = 11)
    (True, "recurrent", False, False, False),
    (True, "naive", False, True, False),
    (False, "naive", True, False, True),
]
MODE_IDS = ["noncausal-cross-mask-state", "noncausal", "chunked-mask-state", "causal-recurrent",
            "naive-causal-mask", "naive-cross-state"]
# jax.grad of the core, path against path: one mode (causal chunks, masked, from a state); every
# mode is checked against torch autograd above and against the float64 definition in test_edges.py
CORE_MODES = [MODES[2]]
CORE_IDS = [MODE_IDS[2]]


def _phi(kind, opts, dtype="float64"):
    if kind in ("elu", "relu"):
        return ka.feature_map(kind)
    return ka.feature_map(kind, num_heads=H, head_dim=d, seed=0, dtype=dtype, **opts)


def _problem(kind, opts, causal, cross, masked, init, seed=0):
    rng = np.random.default_rng(seed)
    phi = _phi(kind, opts)
    Lk = L if cross else N
    shift = 0.3 if kind == "relu" else 0.0  # keep relu features away from all-zero rows
    q = rng.standard_normal((B, H, N, d)) * 0.5 + shift
    k = rng.standard_normal((B, H, Lk, d)) * 0.5 + shift
    v = rng.standard_normal((B, H, Lk, d))
    mask = None
    if masked:
        mask = np.ones((B, Lk), bool)
        mask[1, 5:] = False
    m = phi(q[:, :, :1]).shape[-1]
    state = None
    if init:
        S0, z0 = np.abs(rng.standard_normal((B, H, m, d))), np.abs(rng.standard_normal((B, H, m)))
        state = ka.LinearAttentionState(S0, z0)
    w = rng.standard_normal((B, H, N, d))  # cotangent of the output
    ws = ka.LinearAttentionState(rng.standard_normal((B, H, m, d)), rng.standard_normal((B, H, m)))
    return phi, q, k, v, mask, state, w, ws


def _manual(phi, q, k, v, mask, state, w, ws, causal, method):
    (out, st), vjp = ka.linear_attention_vjp(q, k, v, feature_map=phi, causal=causal, key_mask=mask, method=method,
                                            chunk_size=4, initial_state=state, return_state=True)
    g = vjp(w, ws)
    init = [] if state is None else list(g.initial_state)
    return [g.q, g.k, g.v] + _tree.leaves(g.feature_map.params) + init


def _rel(a, b):
    a, b = np.asarray(to_numpy(a), np.float64), np.asarray(to_numpy(b), np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _objective(phi, q, k, v, mask, state, w, ws, causal, method):
    out, st = ka.linear_attention(q, k, v, feature_map=phi, causal=causal, key_mask=mask, method=method, chunk_size=4,
                                  initial_state=state, return_state=True, backend="agnostic")
    return float(np.sum(out * w) + np.sum(st.S * ws.S) + np.sum(st.z * ws.z))


@pytest.mark.parametrize("mode", CORE_MODES, ids=CORE_IDS)
@pytest.mark.parametrize("kind,opts", KINDS, ids=IDS)
def test_linear_attention_vjp_matches_central_differences(kind, opts, mode):
    causal, method, cross, masked, init = mode
    phi, q, k, v, mask, state, w, ws = _problem(kind, opts, causal, cross, masked, init)
    grads = _manual(phi, q, k, v, mask, state, w, ws, causal, method)
    leaves = phi.parameters()
    arrays = [q, k, v] + leaves + ([] if state is None else list(state))
    rng = np.random.default_rng(1)
    h = 1e-6
    fd, hand = [], []
    for which, (arr, g) in enumerate(zip(arrays, grads)):
        assert g.shape == arr.shape
        for _ in range(6):
            idx = tuple(int(rng.integers(0, s)) for s in arr.shape)
            vals = []
            for sign in (1, -1):
                moved = arr.copy()
                moved[idx] += sign * h
                args = [q, k, v]
                p, st = phi, state
                if which < 3:
                    args[which] = moved
                elif which < 3 + len(leaves):
                    new = list(leaves)
                    new[which - 3] = moved
                    p = phi.replace(params=_tree.with_leaves(phi.params, new))
                else:
                    st = list(state)
                    st[which - 3 - len(leaves)] = moved
                    st = ka.LinearAttentionState(*st)
                vals.append(_objective(p, *args, mask, st, w, ws, causal, method))
            fd.append((vals[0] - vals[1]) / (2 * h))
            hand.append(g[idx])
    assert _rel(hand, fd) <= 1e-6


def _torch_grads(phi, q, k, v, mask, state, w, ws, causal, method):
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    tphi = phi.to(like=tq)
    params = tphi.parameters()
    for p in params:
        p.requires_grad_(True)
    tstate = None
    if state is not None:
        tstate = ka.LinearAttentionState(*(torch.tensor(s, requires_grad=True) for s in state))
    out, st = ka.linear_attention(tq, tk, tv, feature_map=tphi, causal=causal, method=method, chunk_size=4,
                                  key_mask=None if mask is None else torch.tensor(mask), initial_state=tstate,
                                  return_state=True, backend="agnostic")
    loss = (out * torch.tensor(w)).sum() + (st.S * torch.tensor(ws.S)).sum() + (st.z * torch.tensor(ws.z)).sum()
    wrt = [tq, tk, tv] + params + ([] if tstate is None else list(tstate))
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return [torch.zeros_like(a) if g is None else g for a, g in zip(wrt, grads)]


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("kind,opts", KINDS, ids=IDS)
def test_linear_attention_vjp_matches_torch_autograd(kind, opts, mode):
    causal, method, cross, masked, init = mode
    problem = _problem(kind, opts, causal, cross, masked, init, seed=2)
    hand = _manual(*problem, causal, method)
    auto = _torch_grads(*problem, causal, method)
    assert len(hand) == len(auto)
    for a, b in zip(hand, auto):
        assert _rel(a, b) <= 1e-6


@pytest.mark.slow  # quick: jax.grad against the float64 definition in test_edges.py
@pytest.mark.parametrize("mode", CORE_MODES, ids=CORE_IDS)
@pytest.mark.parametrize("kind,opts", KINDS, ids=IDS)
def test_linear_attention_vjp_matches_jax_grad(kind, opts, mode):
    causal, method, cross, masked, init = mode
    phi, q, k, v, mask, state, w, ws = _problem(kind, opts, causal, cross, masked, init, seed=3)
    hand = _manual(phi, q, k, v, mask, state, w, ws, causal, method)
    jphi = phi.to(like=jnp.asarray(q))
    jmask = None if mask is None else jnp.asarray(mask)

    def loss(q, k, v, params, state):
        out, st = ka.linear_attention(q, k, v, feature_map=jphi.replace(params=params), causal=causal, method=method,
                                      chunk_size=4, key_mask=jmask, initial_state=state, return_state=True,
                                      backend="agnostic")
        return jnp.sum(out * w) + jnp.sum(st.S * ws.S) + jnp.sum(st.z * ws.z)

    jstate = None if state is None else ka.LinearAttentionState(*(jnp.asarray(s) for s in state))
    args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jphi.params, jstate)
    gq, gk, gv, gp, gs = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*args)
    auto = [gq, gk, gv] + _tree.leaves(gp) + ([] if gs is None else list(gs))
    assert len(hand) == len(auto)
    for a, b in zip(hand, auto):
        assert _rel(a, b) <= 1e-6


# ---------------------------------------------------------------------------
# distillation losses: value_and_grad against autodiff of kernelattn.losses

LOSS_KINDS = [("glu", {"depth": 2, "bias": True}), ("aoglu", {"depth": 3, "tied": False}), ("hedgehog", {"bias": True}),
              ("ffn", {})]


@pytest.mark.parametrize("causal,masked,cross", [(False, True, True), (True, True, False), (False, False, False)],
                         ids=["cross-masked", "causal-masked", "plain"])
@pytest.mark.slow_where(kind=("aoglu", "hedgehog", "ffn"))  # quick: glu, attention_kl, causal-masked
@pytest.mark.slow  # path against path; quick tier: test_value_and_grad_on_every_backend and the definition
@pytest.mark.parametrize("loss", ["attention_kl", "output_mse"])
@pytest.mark.parametrize("kind,opts", LOSS_KINDS, ids=[k + str(len(o)) for k, o in LOSS_KINDS])
def test_value_and_grad_matches_torch_and_jax(kind, opts, loss, causal, masked, cross):
    rng = np.random.default_rng(4)
    phi = _phi(kind, opts)
    Lk = L if cross else N
    q, k, v = rng.standard_normal((B, H, N, d)), rng.standard_normal((B, H, Lk, d)), rng.standard_normal((B, H, Lk, d))
    mask = None
    if masked:
        mask = np.ones((B, Lk), bool)
        mask[1, 4:] = False
        mask[0, :] = False  # a sequence with no valid key at all
    opt = dict(causal=causal, ortho_weight=0.05)
    value, g = ka.value_and_grad(loss, phi, q, k, v, key_mask=mask, **opt)
    hand = [g.q, g.k] + ([g.v] if loss == "output_mse" else []) + _tree.leaves(g.feature_map.params)
    if loss == "attention_kl":
        assert g.v is None

    def loss_fn(phi, q, k, v, mask):
        if loss == "attention_kl":
            val = ka.losses.attention_kl(phi, q, k, causal=causal, key_mask=mask)
        else:
            val = ka.losses.output_mse(phi, q, k, v, causal=causal, key_mask=mask)
        return val + ka.orthogonality_penalty(phi, weight=0.05)

    # torch
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    tphi = phi.to(like=tq)
    for p in tphi.parameters():
        p.requires_grad_(True)
    tval = loss_fn(tphi, tq, tk, tv, None if mask is None else torch.tensor(mask))
    wrt = [tq, tk] + ([tv] if loss == "output_mse" else []) + tphi.parameters()
    tgrads = torch.autograd.grad(tval, wrt)
    tval = float(tval.detach())
    assert abs(float(value) - tval) <= 1e-12 * max(1.0, abs(tval))
    for a, b in zip(hand, tgrads):
        assert _rel(a, b) <= 1e-6

    # jax
    jphi = phi.to(like=jnp.asarray(q))
    jmask = None if mask is None else jnp.asarray(mask)

    def jloss(params, q, k, v):
        return loss_fn(jphi.replace(params=params), q, k, v, jmask)

    jval, (gp, gq, gk, gv) = jax.value_and_grad(jloss, argnums=(0, 1, 2, 3))(jphi.params, *(jnp.asarray(a)
                                                                                              for a in (q, k, v)))
    jgrads = [gq, gk] + ([gv] if loss == "output_mse" else []) + _tree.leaves(gp)
    assert abs(float(value) - float(jval)) <= 1e-12 * max(1.0, abs(float(jval)))
    for a, b in zip(hand, jgrads):
        assert _rel(a, b) <= 1e-6


def test_value_and_grad_matches_central_differences():
    rng = np.random.default_rng(5)
    phi = _phi("aoglu", {"depth": 2, "bias": True})
    q, k, v = (rng.standard_normal((B, H, N, d)) for _ in range(3))
    for loss in ("attention_kl", "output_mse"):
        value, g = ka.value_and_grad(loss, phi, q, k, v, causal=True, ortho_weight=0.1)

        def f(phi, q, k, v):
            fn = ka.losses.attention_kl if loss == "attention_kl" else ka.losses.output_mse
            args = (q, k) if loss == "attention_kl" else (q, k, v)
            return float(fn(phi, *args, causal=True) + ka.orthogonality_penalty(phi, weight=0.1))

        assert float(value) == pytest.approx(f(phi, q, k, v), rel=1e-12)
        leaves = phi.parameters()
        fd, hand = [], []
        for i, (arr, garr) in enumerate(zip(leaves, _tree.leaves(g.feature_map.params))):
            for _ in range(4):
                idx = tuple(int(rng.integers(0, s)) for s in arr.shape)
                vals = []
                for sign in (1, -1):
                    new = list(leaves)
                    new[i] = arr.copy()
                    new[i][idx] += sign * 1e-6
                    vals.append(f(phi.replace(params=_tree.with_leaves(phi.params, new)), q, k, v))
                fd.append((vals[0] - vals[1]) / 2e-6)
                hand.append(garr[idx])
        for arr, garr in ((q, g.q), (k, g.k)):
            for _ in range(6):
                idx = tuple(int(rng.integers(0, s)) for s in arr.shape)
                vals = []
                for sign in (1, -1):
                    moved = arr.copy()
                    moved[idx] += sign * 1e-6
                    vals.append(f(phi, moved, k, v) if arr is q else f(phi, q, moved, v))
                fd.append((vals[0] - vals[1]) / 2e-6)
                hand.append(garr[idx])
        assert _rel(hand, fd) <= 1e-6


def test_wrt_selects_gradients_and_skips_the_rest():
    rng = np.random.default_rng(6)
    phi = _phi("glu", {})
    q, k, v = (rng.standard_normal((B, H, N, d)) for _ in range(3))
    full_val, full = ka.value_and_grad("output_mse", phi, q, k, v)
    val, part = ka.value_and_grad("output_mse", phi, q, k, v, wrt=("feature_map",))
    assert part.q is None and part.k is None and part.v is None
    assert float(val) == float(full_val)
    for a, b in zip(_tree.leaves(part.feature_map.params), _tree.leaves(full.feature_map.params)):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# feature maps alone


@pytest.mark.parametrize("kind,opts", KINDS, ids=IDS)
@pytest.mark.parametrize("role", ["query", "key"])
def test_feature_map_vjp_matches_torch(kind, opts, role):
    rng = np.random.default_rng(7)
    phi = _phi(kind, opts)
    x = rng.standard_normal((B, H, N, d))
    y, vjp = ka.feature_map_vjp(phi, x, role=role)
    gy = rng.standard_normal(y.shape)
    gx, gphi = vjp(gy)
    ref = reference_feature_map(phi, x, role=role)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-14)

    tx = torch.tensor(x, requires_grad=True)
    tphi = phi.to(like=tx)
    params = tphi.parameters()
    for p in params:
        p.requires_grad_(True)
    ty = tphi.query(tx) if role == "query" else tphi.key(tx)
    grads = torch.autograd.grad((ty * torch.tensor(gy)).sum(), [tx] + params, allow_unused=True)
    hand = [gx] + _tree.leaves(gphi.params)
    assert len(hand) == len(grads)
    for a, b, p in zip(hand, grads, [tx] + params):
        b = torch.zeros_like(p) if b is None else b  # the other role's blocks of an untied map
        assert a.shape == tuple(b.shape)
        if float(torch.linalg.norm(b)) == 0.0:
            assert float(np.abs(to_numpy(a)).max()) == 0.0
        else:
            assert _rel(a, b) <= 1e-6


def test_fixed_map_gradient_tree_is_empty_and_favor_buffers_are_not_trained():
    x = np.random.default_rng(8).standard_normal((1, H, 4, d))
    phi = _phi("favor", {})
    _, vjp = ka.feature_map_vjp(phi, x)
    gx, gphi = vjp(np.ones((1, H, 4, d)))
    assert gphi.params == {} and gphi.buffers == {}
    assert gx.shape == x.shape


# ---------------------------------------------------------------------------
# every backend: the same gradients in float32 as float64 NumPy


@pytest.mark.parametrize("kind,opts", [("aoglu", {"depth": 2, "bias": True}), ("hedgehog", {"tied": False}),
                                       ("elu", {})], ids=["aoglu", "hedgehog", "elu"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.slow_where(xp_backend=("jax", "dask"), kind="aoglu")  # quick on dask: hedgehog causal, elu
@pytest.mark.slow_where(xp_backend=("jax", "dask"), kind="hedgehog", causal=False)
@pytest.mark.slow_where(xp_backend="jax")  # quick: jax gradients in test_edges.py
def test_vjp_on_every_backend(xp_backend, kind, opts, causal):
    phi64, q, k, v, mask, state, w, ws = _problem(kind, opts, causal, False, True, True, seed=9)
    ref = _manual(phi64, q, k, v, mask, state, w, ws, causal, "auto")
    a = xp_backend.asarray
    phi = phi64 if kind == "elu" else phi64.to(like=a(q))  # the same values, in float32 on this backend
    (out, st), vjp = ka.linear_attention_vjp(
        a(q), a(k), a(v), feature_map=phi, causal=causal, key_mask=a(mask), chunk_size=4,
        initial_state=ka.LinearAttentionState(a(state.S), a(state.z)), return_state=True)
    g = vjp(a(w), ka.LinearAttentionState(a(ws.S), a(ws.z)))
    hand = [g.q, g.k, g.v] + _tree.leaves(g.feature_map.params) + list(g.initial_state)
    like = a(q)
    for x in hand:  # the caller's library and dtype
        assert type(x) is type(like) and x.dtype == like.dtype
    assert len(hand) == len(ref)
    for x, r in zip(hand, ref):
        assert _rel(x, r) <= 2e-5


@pytest.mark.slow_where(xp_backend=("jax", "dask"), loss="output_mse")
@pytest.mark.parametrize("loss", ["attention_kl", "output_mse"])
def test_value_and_grad_on_every_backend(xp_backend, loss):
    rng = np.random.default_rng(10)
    q, k, v = (rng.standard_normal((B, H, N, d)) for _ in range(3))
    mask = np.ones((B, N), bool)
    mask[0, 7:] = False
    phi64 = _phi("glu", {"depth": 2})
    ref_val, ref = ka.value_and_grad(loss, phi64, q, k, v, key_mask=mask, causal=True, ortho_weight=0.01)
    a = xp_backend.asarray
    val, g = ka.value_and_grad(loss, phi64.to(like=a(q)), a(q), a(k), a(v), key_mask=a(mask), causal=True,
                               ortho_weight=0.01)
    assert float(val) == pytest.approx(float(ref_val), rel=1e-5)
    for x, r in zip(_tree.leaves(g.feature_map.params) + [g.q, g.k],
                    _tree.leaves(ref.feature_map.params) + [ref.q, ref.k]):
        assert _rel(x, r) <= 1e-4


def test_half_precision_grads_come_back_in_the_input_dtype():
    rng = np.random.default_rng(11)
    q, k, v = (torch.tensor(rng.standard_normal((1, H, 8, d)), dtype=torch.bfloat16) for _ in range(3))
    phi = ka.feature_map("glu", num_heads=H, head_dim=d, seed=0, like=q)
    out, vjp = ka.linear_attention_vjp(q, k, v, feature_map=phi, causal=True)
    g = vjp(torch.ones_like(out))
    assert out.dtype == g.q.dtype == g.k.dtype == g.v.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in g.feature_map.parameters())
    ref_out, ref_vjp = ka.linear_attention_vjp(*(x.float() for x in (q, k, v)), feature_map=phi.to(like=q.float()),
                                               causal=True)
    ref = ref_vjp(torch.ones_like(ref_out))
    assert _rel(g.q.float(), ref.q) < 2e-2


# ---------------------------------------------------------------------------
# causal backward in O(N) memory


def _peak_bytes(fn):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_causal_backward_never_builds_an_N_by_m_by_e_tensor():
    """Peak memory of the causal VJP (forward + backward) stays far below one (N, m, e) array.

    NumPy reports its allocations to tracemalloc. With N = 2048, m = e = 64 an (N, m, e)
    float64 array is 64 MiB; each (N, d) array (inputs, features, outputs, their gradients) is
    1 MiB and the per-chunk prefix states (N/C of (m, e)) 1 MiB together.
    """
    rng = np.random.default_rng(12)
    n, m = 2048, 64
    q, k, v, w = (rng.standard_normal((1, 1, n, m)) * 0.3 for _ in range(4))
    phi = ka.feature_map("ffn", num_heads=1, head_dim=m, seed=0, dtype="float64")
    full = n * m * m * 8

    def chunked():
        out, vjp = ka.linear_attention_vjp(q, k, v, feature_map=phi, causal=True, chunk_size=64)
        vjp(w)

    def cumsum_form():  # what an autodiff of prefix sums of outer products would keep: (N, m, e)
        fk = phi(k)
        np.cumsum(fk[..., :, None] * v[..., None, :], axis=2)

    peak = _peak_bytes(chunked)
    assert peak < full / 3, (f"causal VJP peaked at {peak / 2**20:.1f} MiB; "
                             f"one (N, m, e) array is {full / 2**20:.0f} MiB")
    assert _peak_bytes(cumsum_form) >= full  # the measurement does see such a tensor


def test_causal_backward_memory_grows_linearly_in_N():
    rng = np.random.default_rng(13)
    phi = ka.feature_map("glu", num_heads=1, head_dim=16, seed=0, dtype="float64")
    peaks = []
    for n in (2048, 8192):
        q, k, v, w = (rng.standard_normal((1, 1, n, 16)) for _ in range(4))

        def run():
            out, vjp = ka.linear_attention_vjp(q, k, v, feature_map=phi, causal=True, chunk_size=64)
            vjp(w)

        peaks.append(_peak_bytes(run))
    assert peaks[1] < 4 * peaks[0] * 1.25  # 4x the tokens, about 4x the memory (quadratic would be 16x)


def test_chunked_backward_is_a_reverse_pass_over_chunks():
    """Gradients of early tokens depend on later chunks only through the carried state."""
    rng = np.random.default_rng(14)
    phi = _phi("glu", {})
    q, k, v = (rng.standard_normal((1, H, 12, d)) for _ in range(3))
    w = np.zeros((1, H, 12, d))
    w[:, :, 11] = 1.0  # only the last query's output matters
    out, vjp = ka.linear_attention_vjp(q, k, v, feature_map=phi, causal=True, chunk_size=4)
    g = vjp(w)
    assert np.abs(g.q[:, :, :11]).max() == 0.0  # earlier queries do not affect the last output
    assert np.abs(g.k[:, :, :4]).min() > 0.0    # keys of the first chunk reach it through the state


# ---------------------------------------------------------------------------
# errors


def test_clear_errors():
    x = np.zeros((1, H, 4, d))
    phi = _phi("glu", {})
    with pytest.raises(TypeError, match="callable"):
        ka.linear_attention_vjp(x, x, x, feature_map=lambda t: t)
    out, vjp = ka.linear_attention_vjp(x, x, x, feature_map=phi)
    with pytest.raises(ValueError, match="g_out must have the shape"):
        vjp(np.zeros((1, H, 3, d)))
    with pytest.raises(ValueError, match="loss must be one of"):
        ka.value_and_grad("kl", phi, x, x)
    with pytest.raises(ValueError, match="needs the values"):
        ka.value_and_grad("output_mse", phi, x, x)
    with pytest.raises(ValueError, match="wrt must name"):
        ka.value_and_grad("attention_kl", phi, x, x, wrt=("phi",))
    with pytest.raises(ValueError, match="role"):
        ka.feature_map_vjp(phi, x, role="value")
    y, fvjp = ka.feature_map_vjp(phi, x)
    with pytest.raises(ValueError, match="gy must have the shape"):
        fvjp(np.zeros((1, H, 4, d + 1)))
    with pytest.raises(ValueError, match="num_heads"):
        ka.linear_attention_vjp(np.zeros((1, H + 1, 4, d)), np.zeros((1, H + 1, 4, d)), np.zeros((1, H + 1, 4, d)),
                                feature_map=phi)
