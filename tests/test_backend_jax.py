"""The JAX fast paths (kernelattn.backends.jax) against the array-API core on the same inputs.

Tiers: forward and ``jax.grad`` vs ``backend="agnostic"`` (relative RMS <= 1e-5
in float32, <= 5e-3 in float16/bfloat16); float64 vs the NumPy reference of
kernelattn.testing; the custom VJP vs finite differences (``check_grads``);
jit (one trace), vmap over the batch; memory (no (N, m, e) or (N, N) array in
the traced program, XLA's temporary memory below the core's and linear in N).
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.extend
import jax.numpy as jnp
from jax.test_util import check_grads

import kernelattn as ka
from kernelattn.backends import _jax_chunked
from kernelattn.backends import jax as jax_backend
from kernelattn.testing import reference_linear_attention, reference_softmax_attention, rel_rms_error

# Process-wide, as the jax backend fixture of conftest.py does: float64 tests need it,
# and every float32 array below is made float32 explicitly.
jax.config.update("jax_enable_x64", True)

TOL = {jnp.float32: 1e-5, jnp.float16: 5e-3, jnp.bfloat16: 5e-3, jnp.float64: 1e-12}
KINDS = [("ffn", {}), ("glu", {"depth": 2}), ("aoglu", {"depth": 2, "bias": True}), ("hedgehog", {"bias": True}),
         ("glu", {"tied": False, "feature_dim": 10}), ("favor", {}), ("elu", {}), ("relu", {}), ("callable", {})]
KIND_IDS = [k + ("-" + "-".join(f"{a}={b}" for a, b in o.items()) if o else "") for k, o in KINDS]


def _callable_map(x):
    return jax.nn.softplus(x) + 0.1


def _phi(kind, opts, H, d, dtype=jnp.float32):
    if kind in ("elu", "relu"):
        return ka.feature_map(kind)
    if kind == "callable":
        return (_callable_map, lambda x: jnp.exp(-0.5 * x * x))
    return ka.feature_map(kind, num_heads=H, head_dim=d, seed=3, xp=jnp,
                          dtype=jnp.float64 if dtype == jnp.float64 else jnp.float32, **opts)


def _inputs(B, H, N, L, d, e, dtype=jnp.float32, seed=0, masked=False, state_m=None):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, H, N, d)) * 0.7, dtype=dtype)
    k = jnp.asarray(rng.standard_normal((B, H, L, d)) * 0.7, dtype=dtype)
    v = jnp.asarray(rng.standard_normal((B, H, L, e)), dtype=dtype)
    mask = None
    if masked:
        m = rng.random((B, L)) > 0.35
        m[0, :2] = True
        if B > 1:
            m[-1, :] = False  # a sequence with no valid key at all
        mask = jnp.asarray(m)
    state = None
    if state_m is not None:
        sdt = jnp.float64 if dtype == jnp.float64 else jnp.float32
        state = (jnp.asarray(rng.random((B, H, state_m, e)), dtype=sdt),
                 jnp.asarray(rng.random((B, H, state_m)) + 0.5, dtype=sdt))
    return q, k, v, mask, state


def _trainable(phi):
    return phi if isinstance(phi, ka.FeatureMap) else None


def _run(backend, q, k, v, phi, *, causal, mask=None, state=None, chunk=8, return_state=True):
    """Output, final state, and the gradients of a loss touching both (inputs, state, parameters)."""
    rng = np.random.default_rng(7)
    w = jnp.asarray(rng.standard_normal(q.shape[:3] + v.shape[3:]), dtype=jnp.float32)

    def loss(params, q, k, v, state):
        fm = phi if params is None else params
        out, (S, z) = ka.linear_attention(q, k, v, feature_map=fm, causal=causal, key_mask=mask, chunk_size=chunk,
                                          initial_state=state, return_state=True, backend=backend)
        total = jnp.sum(out.astype(jnp.float32) * w)
        if return_state:  # linear in the state: sin(S) of a sum of hundreds of keys is ill-conditioned
            wS = jnp.asarray(np.random.default_rng(8).standard_normal(S.shape), S.dtype)
            wz = jnp.asarray(np.random.default_rng(9).standard_normal(z.shape), z.dtype)
            total = total + 0.01 * jnp.sum(S * wS) + 0.1 * jnp.sum(z * wz)
        return total, (out, (S, z))

    args = (_trainable(phi), q, k, v, state)
    (_, (out, st)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(*args)
    return out, st, jax.tree_util.tree_leaves(grads)


def _compare(fast, core, tol):
    (o1, s1, g1), (o0, s0, g0) = fast, core
    assert o1.dtype == o0.dtype and o1.shape == o0.shape
    assert rel_rms_error(o1, o0) <= tol, ("out", rel_rms_error(o1, o0))
    for a, b in zip(s1, s0):
        assert a.dtype == b.dtype
        assert rel_rms_error(a, b) <= tol, ("state", rel_rms_error(a, b))
    assert len(g1) == len(g0) and len(g1) >= 3
    for i, (a, b) in enumerate(zip(g1, g0)):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert np.all(np.isfinite(np.asarray(a, dtype=np.float64)))
        assert rel_rms_error(a, b) <= tol, (f"gradient {i}", rel_rms_error(a, b))


# ---------------------------------------------------------------------------- dispatch


@pytest.fixture(autouse=True, params=["direct", "chunked"])
def jax_path(request, monkeypatch):
    """Every test twice: as dispatch has it (short causal inputs on the masked product), then with the
    length limit at -1, so the same inputs take the chunked scan of long sequences."""
    if request.param == "chunked":
        monkeypatch.setattr(jax_backend, "CAUSAL_MAX", -1)
    return request.param


def test_fast_path_is_chosen_for_jax_arrays(jax_path):
    q = jnp.zeros((1, 1, 4, 2), jnp.float32)
    short = jax_path == "direct"
    for causal in (False, True):
        res = ka.explain_dispatch("linear_attention", q, causal=causal, method="auto", masked=True, kind="glu")
        want = ("jax:causal-direct" if short else "jax:chunked-vjp") if causal else "jax:state-readout"
        assert res.backend == "jax" and res.implementation == want
        fn = (jax_backend.ADAPTER._causal_short if short else jax_backend.ADAPTER._causal) if causal \
            else jax_backend.ADAPTER._noncausal
        assert res.function == fn
    for method in ("naive", "recurrent"):
        res = ka.explain_dispatch("linear_attention", q, causal=True, method=method, masked=False, kind="elu")
        assert res.backend == "agnostic" and "reference" in res.reason
    assert ka.explain_dispatch("softmax_attention", q, causal=True, masked=False).backend == "jax"
    assert ka.explain_dispatch("linear_attention", q, backend="agnostic", causal=True).backend == "agnostic"


# ---------------------------------------------------------------------------- fast vs core


# quick tier (-m "not slow"): glu (depth 2), causal; jax against the float64 definition: test_edges.py
@pytest.mark.slow_where(kind=("ffn", "aoglu", "hedgehog", "favor", "elu", "relu", "callable"))
@pytest.mark.slow_where(kind="glu", opts={"tied": False, "feature_dim": 10})
@pytest.mark.slow  # quick tier: jax against the float64 definition in test_edges.py and test_isolation.py
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("kind,opts", KINDS, ids=KIND_IDS)
def test_forward_and_gradients_match_core(kind, opts, causal):
    B, H, N, d, e = 2, 3, 37, 6, 5  # N not a multiple of the chunk, d not a power of two
    masked = kind != "ffn"  # the unmasked code path: ffn here, and test_shapes_match_core
    q, k, v, mask, state = _inputs(B, H, N, N, d, e, masked=masked, state_m=None)
    if kind == "relu":
        # relu(q) . z can be ~1e-8 for early causal queries, where out = num / (den + eps) turns
        # float32 rounding into gradient differences of 1e-3 in any two correct implementations
        q, k = q + 1.0, k + 1.0
    phi = _phi(kind, opts, H, d)
    fast = _run(None, q, k, v, phi, causal=causal, mask=mask)
    core = _run("agnostic", q, k, v, phi, causal=causal, mask=mask)
    _compare(fast, core, TOL[jnp.float32])
    if masked:  # the sequence with no valid key gets zeros
        assert float(jnp.max(jnp.abs(fast[0][-1]))) == 0.0


@pytest.mark.slow  # quick: state in test_edges.py::test_returned_state_matches_definition
@pytest.mark.parametrize("kind,opts", [("glu", {}), ("favor", {}), ("elu", {})], ids=["glu", "favor", "elu"])
def test_cross_attention_with_state_matches_core(kind, opts):
    B, H, N, L, d, e = 2, 2, 9, 23, 4, 3
    phi = _phi(kind, opts, H, d)
    m = 4
    q, k, v, mask, state = _inputs(B, H, N, L, d, e, masked=True, state_m=m)
    fast = _run(None, q, k, v, phi, causal=False, mask=mask, state=state)
    core = _run("agnostic", q, k, v, phi, causal=False, mask=mask, state=state)
    _compare(fast, core, TOL[jnp.float32])
    assert len(fast[2]) == len(jax.tree_util.tree_leaves(_trainable(phi))) + 5  # ... q, k, v, S0, z0


@pytest.mark.parametrize("B,H,N,d,chunk,masked", [
    (1, 1, 1, 3, 64, False),   # one token
    (3, 2, 17, 5, 1, True),    # chunks of one token
    (1, 4, 64, 8, 64, False),  # one full chunk
    (2, 1, 50, 3, 7, True),    # awkward everything
    (2, 2, 300, 4, 16, False), # several blocks of several chunks, padded
])
@pytest.mark.slow  # quick: test_forward_and_gradients_match_core
def test_shapes_match_core(B, H, N, d, chunk, masked):
    q, k, v, mask, state = _inputs(B, H, N, N, d, d + 1, masked=masked, state_m=d)
    phi = _phi("glu", {}, H, d)
    fast = _run(None, q, k, v, phi, causal=True, mask=mask, state=state, chunk=chunk)
    core = _run("agnostic", q, k, v, phi, causal=True, mask=mask, state=state, chunk=chunk)
    _compare(fast, core, TOL[jnp.float32])


def test_blocks_of_chunks_match_core(monkeypatch):
    # scan steps of 3 chunks of 4 tokens: the exclusive prefix inside a block and across blocks
    monkeypatch.setattr(_jax_chunked, "BLOCK_TOKENS", 12)
    q, k, v, mask, state = _inputs(2, 2, 41, 41, 4, 3, masked=True, state_m=4)
    phi = _phi("aoglu", {"bias": True}, 2, 4)
    fast = _run(None, q, k, v, phi, causal=True, mask=mask, state=state, chunk=4)
    core = _run("agnostic", q, k, v, phi, causal=True, mask=mask, state=state, chunk=4)
    _compare(fast, core, TOL[jnp.float32])


@pytest.mark.slow  # quick: half precision on jax in test_edges.py
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_half_precision_matches_core(dtype, causal):
    B, H, N, d = 2, 2, 70, 8
    q, k, v, mask, state = _inputs(B, H, N, N, d, d, dtype=dtype, masked=True, state_m=d)
    phi = _phi("glu", {"depth": 2}, H, d)
    fast = _run(None, q, k, v, phi, causal=causal, mask=mask, state=state, chunk=16)
    core = _run("agnostic", q, k, v, phi, causal=causal, mask=mask, state=state, chunk=16)
    _compare(fast, core, TOL[dtype])
    out, (S, z), _ = fast
    assert out.dtype == dtype and S.dtype == jnp.float32 and z.dtype == jnp.float32


@pytest.mark.slow_where(causal=False)
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_float64_matches_numpy_reference(causal):
    B, H, N, d = 2, 2, 19, 4
    q, k, v, mask, state = _inputs(B, H, N, N, d, 3, dtype=jnp.float64, masked=True, state_m=d)
    phi = _phi("aoglu", {"depth": 2, "bias": True}, H, d, dtype=jnp.float64)
    out, (S, z) = ka.linear_attention(q, k, v, feature_map=phi, causal=causal, key_mask=mask, chunk_size=5,
                                      initial_state=state, return_state=True)
    ref, (S_ref, z_ref) = reference_linear_attention(q, k, v, feature_map=phi, causal=causal, key_mask=mask,
                                                     initial_state=state, return_state=True)
    assert out.dtype == jnp.float64
    assert rel_rms_error(out, ref) <= TOL[jnp.float64]
    assert rel_rms_error(S, S_ref) <= TOL[jnp.float64] and rel_rms_error(z, z_ref) <= TOL[jnp.float64]


@pytest.mark.slow  # quick tier: jax against the float64 definition in test_edges.py and test_isolation.py
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "masked"])
def test_custom_vjp_matches_finite_differences(with_mask):
    """The hand-written backward of the chunked kernel, in float64, vs central differences."""
    B, H, N, d, e = 1, 2, 11, 3, 2
    q, k, v, mask, state = _inputs(B, H, N, N, d, e, dtype=jnp.float64, masked=with_mask, state_m=d)
    phi = _phi("glu", {"bias": True}, H, d, dtype=jnp.float64)

    def f(phi, q, k, v, S0, z0):
        out, (S, z) = _jax_chunked.causal_linear_attention(
            jax_backend._apply_map, phi, q, k, v, key_mask=mask, initial_state=(S0, z0), chunk_size=3)
        return jnp.sum(out * jnp.cos(out)) + jnp.sum(jnp.sin(S)) + jnp.sum(z * z)

    check_grads(jax.jit(f), (phi, q, k, v, *state), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------- semantics


@pytest.mark.slow  # quick tier: jax against the float64 definition in test_edges.py and test_isolation.py
def test_padded_keys_change_nothing_and_get_no_gradient():
    B, H, N, d = 2, 2, 30, 4
    q, k, v, mask, _ = _inputs(B, H, N, N, d, d, masked=True)
    phi = _phi("glu", {}, H, d)
    rng = np.random.default_rng(3)
    k2 = jnp.where(mask[:, None, :, None], k, jnp.asarray(rng.standard_normal(k.shape) * 50, jnp.float32))
    v2 = jnp.where(mask[:, None, :, None], v, jnp.asarray(rng.standard_normal(v.shape) * 50, jnp.float32))
    for causal in (False, True):
        @jax.jit
        def run(k, v, causal=causal):
            return ka.linear_attention(q, k, v, feature_map=phi, causal=causal, key_mask=mask, chunk_size=8)

        out1, out2 = run(k, v), run(k2, v2)
        np.testing.assert_allclose(np.asarray(out1), np.asarray(out2), rtol=1e-5, atol=1e-6)
        gk, gv = jax.jit(jax.grad(lambda k, v: jnp.sum(run(k, v) ** 2), argnums=(0, 1)))(k, v)
        padded = ~np.asarray(mask)[:, None, :, None]
        assert np.all(np.asarray(gk) * padded == 0) and np.all(np.asarray(gv) * padded == 0)
        assert float(jnp.max(jnp.abs(gk))) > 0


@pytest.mark.slow  # quick tier: jax against the float64 definition in test_edges.py and test_isolation.py
def test_future_tokens_do_not_change_causal_outputs():
    q, k, v, _, _ = _inputs(1, 2, 40, 40, 4, 4)
    phi = _phi("ffn", {}, 2, 4)
    full = ka.linear_attention(q, k, v, feature_map=phi, causal=True, chunk_size=8)
    head = ka.linear_attention(q[:, :, :23], k[:, :, :23], v[:, :, :23], feature_map=phi, causal=True,
                               chunk_size=8)
    np.testing.assert_allclose(np.asarray(full[:, :, :23]), np.asarray(head), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # quick tier: jax decoding in test_decoding.py and test_new_kind.py
def test_decoding_step_by_step_matches_the_full_call():
    q, k, v, _, _ = _inputs(2, 2, 12, 12, 4, 3)
    phi = _phi("glu", {}, 2, 4)
    full, final = ka.linear_attention(q, k, v, feature_map=phi, causal=True, return_state=True)
    # a prompt of 5 tokens, then one token at a time
    out, state = ka.linear_attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], feature_map=phi, causal=True,
                                     return_state=True)
    outs = [out]
    step = jax.jit(lambda q, k, v, state: ka.linear_attention_step(q, k, v, feature_map=phi, state=state))
    for t in range(5, 12):
        o, state = step(q[:, :, t], k[:, :, t], v[:, :, t], state)
        outs.append(o[:, :, None])
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, axis=2)), np.asarray(full), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.S), np.asarray(final.S), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- jit, vmap


def test_public_api_under_jit_traces_once_and_uses_the_custom_vjp(jax_path):
    q, k, v, mask, _ = _inputs(2, 2, 20, 20, 4, 4, masked=True)
    phi = _phi("glu", {}, 2, 4)
    traces = []

    def f(phi, q, k, v, mask):
        traces.append(1)
        return ka.linear_attention(q, k, v, feature_map=phi, causal=True, key_mask=mask, chunk_size=8)

    jf = jax.jit(f)
    first = jf(phi, q, k, v, mask)
    for s in range(3):
        q2, k2, v2, mask2, _ = _inputs(2, 2, 20, 20, 4, 4, masked=True, seed=s + 1)
        jf(phi, q2, k2, v2, mask2)
    assert len(traces) == 1
    np.testing.assert_allclose(np.asarray(first), np.asarray(f(phi, q, k, v, mask)), rtol=1e-6)

    def loss(phi, q, k, v, mask):
        return jnp.sum(f(phi, q, k, v, mask) ** 2)

    traces.clear()
    jg = jax.jit(jax.grad(loss, argnums=(0, 1)))
    jg(phi, q, k, v, mask)
    jg(phi, 2 * q, k, v, mask)
    assert len(traces) == 1
    # what jit compiles: the fast path (the chunked scan's custom_vjp call; short inputs: the masked
    # product, plain ops), under one cond on whether the inputs are finite; no host callback
    text = str(jax.make_jaxpr(f)(phi, q, k, v, mask))
    assert ("custom_vjp_call" in text) == (jax_path == "chunked") and "callback" not in text
    assert text.count("cond[") == 1


@pytest.mark.slow  # quick: vmap in test_autodiff.py::test_jax_float32_default_and_vmap
def test_vmap_over_the_batch_matches_the_batched_call():
    B, H, N, d = 3, 2, 21, 4
    q, k, v, mask, _ = _inputs(B, H, N, N, d, d, masked=True)
    phi = _phi("glu", {}, H, d)

    def one(q, k, v, mask):  # one example: (H, N, d)
        return ka.linear_attention(q[None], k[None], v[None], feature_map=phi, causal=True,
                                   key_mask=mask[None], chunk_size=8)[0]

    batched = ka.linear_attention(q, k, v, feature_map=phi, causal=True, key_mask=mask, chunk_size=8)
    mapped = jax.jit(jax.vmap(one))(q, k, v, mask)
    assert rel_rms_error(mapped, batched) <= 1e-6

    def loss_vmap(phi, q):
        return jnp.sum(jax.vmap(lambda q, k, v, m: ka.linear_attention(
            q[None], k[None], v[None], feature_map=phi, causal=True, key_mask=m[None], chunk_size=8)[0])(
                q, k, v, mask) ** 2)

    def loss_batched(phi, q):
        return jnp.sum(ka.linear_attention(q, k, v, feature_map=phi, causal=True, key_mask=mask,
                                           chunk_size=8, backend="agnostic") ** 2)

    g1 = jax.tree_util.tree_leaves(jax.jit(jax.grad(loss_vmap, argnums=(0, 1)))(phi, q))
    g0 = jax.tree_util.tree_leaves(jax.jit(jax.grad(loss_batched, argnums=(0, 1)))(phi, q))
    for a, b in zip(g1, g0):
        assert rel_rms_error(a, b) <= TOL[jnp.float32]


# ---------------------------------------------------------------------------- memory


def _largest_intermediate(jaxpr):
    """Largest number of elements of any value inside a (closed) jaxpr, sub-jaxprs included."""
    biggest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            shape = getattr(var.aval, "shape", ())
            biggest = max(biggest, int(np.prod(shape)) if shape else 1)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            biggest = max(biggest, _largest_intermediate(sub))
    return biggest


@pytest.mark.slow
def test_backward_stores_no_n_by_m_by_e_tensor_and_scales_linearly():
    B, H, d = 1, 2, 16  # m = e = d

    def grad_fn(backend):
        def loss(phi, q, k, v):
            return jnp.sum(ka.linear_attention(q, k, v, feature_map=phi, causal=True, backend=backend) ** 2)

        return jax.grad(loss, argnums=(0, 1, 2, 3))

    phi = _phi("glu", {}, H, d)
    temps = {}
    for N in (2048, 4096):
        q, k, v, _, _ = _inputs(B, H, N, N, d, d)
        args = (phi, q, k, v)
        fast_jaxpr = jax.make_jaxpr(grad_fn(None))(*args).jaxpr
        # nothing as large as (N, m, e) per head, or (N, N); inputs are (B, H, N, d)
        assert _largest_intermediate(fast_jaxpr) < N * d * d
        assert _largest_intermediate(fast_jaxpr) <= 4 * B * H * N * (d + 1)
        for backend in (None, "agnostic"):
            compiled = jax.jit(grad_fn(backend)).lower(*args).compile()
            temps[backend, N] = compiled.memory_analysis().temp_size_in_bytes
    for N in (2048, 4096):  # XLA's temporary buffers: the fast path needs less than the core
        assert temps[None, N] < temps["agnostic", N]
    assert temps[None, 4096] < 2.5 * temps[None, 2048]  # O(N), not O(N^2)


# ---------------------------------------------------------------------------- softmax


@pytest.mark.slow_where(dtype=jnp.bfloat16)
@pytest.mark.slow_where(causal=False)  # quick: causal float32, masked and not
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "masked"])
def test_softmax_attention_matches_core(causal, masked, dtype):
    B, H, N, d = 2, 2, 13, 8
    q, k, v, mask, _ = _inputs(B, H, N, N, d, 5, dtype=dtype, masked=masked)
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((B, H, N, 5)), jnp.float32)

    def loss(q, k, v, backend):
        out = ka.softmax_attention(q, k, v, causal=causal, key_mask=mask, backend=backend)
        return jnp.sum(out.astype(jnp.float32) * w)

    out = ka.softmax_attention(q, k, v, causal=causal, key_mask=mask)
    core = ka.softmax_attention(q, k, v, causal=causal, key_mask=mask, backend="agnostic")
    assert out.dtype == dtype
    assert rel_rms_error(out, core) <= TOL[dtype]
    if dtype == jnp.float32:
        ref = reference_softmax_attention(q, k, v, causal=causal, key_mask=mask)
        assert rel_rms_error(out, ref) <= 1e-5
    g1 = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, None)
    g0 = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, "agnostic")
    for a, b in zip(g1, g0):
        assert np.all(np.isfinite(np.asarray(a, dtype=np.float64)))
        assert rel_rms_error(a, b) <= TOL[dtype]
    if masked:
        assert float(jnp.max(jnp.abs(out[-1].astype(jnp.float32)))) == 0.0
