"""Sequence parallelism: kernelattn.backends.jax.sharded_linear_attention on 8 simulated CPU devices.

tests/conftest.py sets ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
before JAX is imported. Every result is compared with the single-device call
(``kernelattn.linear_attention``), forward and gradients, including sequence
lengths that do not split evenly over the devices (padded with masked keys).
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import kernelattn as ka
from kernelattn.backends.jax import sharded_linear_attention
from kernelattn.testing import reference_linear_attention, rel_rms_error

jax.config.update("jax_enable_x64", True)  # as the jax backend fixture does; arrays below are float32

TOL = 1e-5


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() >= 8, (
        f"the mesh tests need 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX is "
        f"imported, as tests/conftest.py sets); JAX sees {jax.device_count()}")
    return jax.make_mesh((8,), ("seq",), axis_types=(AxisType.Auto,))


def _inputs(B, H, N, L, d, e, *, masked, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, H, N, d)) * 0.7, dtype)
    k = jnp.asarray(rng.standard_normal((B, H, L, d)) * 0.7, dtype)
    v = jnp.asarray(rng.standard_normal((B, H, L, e)), dtype)
    w = jnp.asarray(rng.standard_normal((B, H, N, e)), jnp.float32)
    mask = None
    if masked:
        m = rng.random((B, L)) > 0.3
        m[:, 0] = True
        mask = jnp.asarray(m)
    return q, k, v, w, mask


def _replicated(tree, mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))


def _grads(fn, phi, q, k, v, w):
    def loss(phi, q, k, v):
        return jnp.sum(fn(phi, q, k, v).astype(jnp.float32) * w)

    return jax.tree_util.tree_leaves(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(phi, q, k, v))


# quick tier (-m "not slow"): one mesh variant (causal, uneven N) and the argument checks; the rest is slow
@pytest.mark.slow_where(N=(64, 5))
@pytest.mark.slow_where(causal=False)
@pytest.mark.parametrize("N", [64, 37, 5], ids=["N=64", "N=37-uneven", "N=5-fewer-tokens-than-devices"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_sharded_matches_single_device(mesh, causal, N):
    B, H, d = 2, 3, 6
    q, k, v, w, mask = _inputs(B, H, N, N, d, 5, masked=True)
    phi = ka.feature_map("glu", num_heads=H, head_dim=d, depth=2, seed=0, xp=jnp)

    def single(phi, q, k, v):
        return ka.linear_attention(q, k, v, feature_map=phi, causal=causal, key_mask=mask, chunk_size=4)

    def sharded(phi, q, k, v):
        return sharded_linear_attention(q, k, v, mesh=mesh, axis="seq", feature_map=phi, causal=causal,
                                        key_mask=mask, chunk_size=4)

    out = sharded(phi, q, k, v)
    want = jax.jit(single)(phi, q, k, v)
    assert out.shape == want.shape and out.dtype == want.dtype
    assert rel_rms_error(out, want) <= TOL
    ref = reference_linear_attention(q, k, v, feature_map=phi, causal=causal, key_mask=mask)
    assert rel_rms_error(out, ref) <= 1e-5
    if N % 8 == 0:  # the output stays split over the devices
        assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(None, None, "seq", None)), 4)
        assert {s.data.shape[2] for s in out.addressable_shards} == {N // 8}
    phi_mesh = _replicated(phi, mesh)  # jit needs every argument on the mesh's devices
    for a, b in zip(_grads(sharded, phi_mesh, q, k, v, w), _grads(single, phi, q, k, v, w)):
        assert a.shape == b.shape
        assert rel_rms_error(a, b) <= TOL


@pytest.mark.slow
def test_padding_never_enters_the_sums(mesh):
    # N = 37 is padded to 40 with masked keys: huge values there would show if they leaked
    B, H, N, d = 1, 2, 37, 4
    q, k, v, w, _ = _inputs(B, H, N, N, d, d, masked=False)
    for kind in ("elu", "favor"):  # both give phi(0) != 0
        phi = ka.feature_map(kind, num_heads=H, head_dim=d, seed=1, xp=jnp) if kind == "favor" else kind
        for causal in (False, True):
            out = sharded_linear_attention(q, k, v, mesh=mesh, axis="seq", feature_map=phi, causal=causal)
            want = ka.linear_attention(q, k, v, feature_map=phi, causal=causal)
            assert rel_rms_error(out, want) <= TOL


@pytest.mark.slow
def test_cross_attention_and_callable_map(mesh):
    B, H, N, L, d = 2, 2, 19, 45, 4
    q, k, v, w, mask = _inputs(B, H, N, L, d, 3, masked=True)
    fns = (jax.nn.softplus, lambda x: jnp.exp(-0.5 * x * x))
    out = sharded_linear_attention(q, k, v, mesh=mesh, axis="seq", feature_map=fns, key_mask=mask)
    want = ka.linear_attention(q, k, v, feature_map=fns, key_mask=mask)
    assert rel_rms_error(out, want) <= TOL

    def loss(q, k, v, fn):
        return jnp.sum(fn(q, k, v) * w)

    g1 = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, lambda q, k, v: sharded_linear_attention(
        q, k, v, mesh=mesh, axis="seq", feature_map=fns, key_mask=mask))
    g0 = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, lambda q, k, v: ka.linear_attention(
        q, k, v, feature_map=fns, key_mask=mask))
    for a, b in zip(g1, g0):
        assert rel_rms_error(a, b) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_initial_and_final_state(mesh, causal):
    B, H, N, d = 2, 2, 30, 4
    q, k, v, w, mask = _inputs(B, H, N, N, d, 3, masked=True)
    phi = ka.feature_map("aoglu", num_heads=H, head_dim=d, bias=True, seed=2, xp=jnp)
    rng = np.random.default_rng(5)
    state = ka.LinearAttentionState(jnp.asarray(rng.random((B, H, d, 3)), jnp.float32),
                                    jnp.asarray(rng.random((B, H, d)) + 0.5, jnp.float32))
    out, st = sharded_linear_attention(q, k, v, mesh=mesh, axis="seq", feature_map=phi, causal=causal,
                                       key_mask=mask, initial_state=state, return_state=True)
    want, want_st = ka.linear_attention(q, k, v, feature_map=phi, causal=causal, key_mask=mask,
                                        initial_state=state, return_state=True)
    assert isinstance(st, ka.LinearAttentionState)
    assert rel_rms_error(out, want) <= TOL
    assert rel_rms_error(st.S, want_st.S) <= TOL and rel_rms_error(st.z, want_st.z) <= TOL

    def loss(fn, S0):
        out, (S, z) = fn(ka.LinearAttentionState(S0, state.z))
        return jnp.sum(out * w) + jnp.sum(S * 0.1)

    g1 = jax.grad(loss, argnums=1)(lambda s: sharded_linear_attention(
        q, k, v, mesh=mesh, axis="seq", feature_map=phi, causal=causal, key_mask=mask, initial_state=s,
        return_state=True), state.S)
    g0 = jax.grad(loss, argnums=1)(lambda s: ka.linear_attention(
        q, k, v, feature_map=phi, causal=causal, key_mask=mask, initial_state=s, return_state=True), state.S)
    assert rel_rms_error(g1, g0) <= TOL


@pytest.mark.slow
def test_data_and_sequence_parallel_2d_mesh():
    mesh2 = jax.make_mesh((2, 4), ("data", "seq"), axis_types=(AxisType.Auto, AxisType.Auto))
    B, H, N, d = 4, 2, 26, 4
    q, k, v, w, mask = _inputs(B, H, N, N, d, d, masked=True)
    phi = ka.feature_map("glu", num_heads=H, head_dim=d, seed=0, xp=jnp)
    out = sharded_linear_attention(q, k, v, mesh=mesh2, axis="seq", batch_axis="data", feature_map=phi,
                                   causal=True, key_mask=mask)
    want = ka.linear_attention(q, k, v, feature_map=phi, causal=True, key_mask=mask)
    assert rel_rms_error(out, want) <= TOL

    def single(phi, q, k, v):
        return ka.linear_attention(q, k, v, feature_map=phi, causal=True, key_mask=mask)

    def sharded(phi, q, k, v):
        return sharded_linear_attention(q, k, v, mesh=mesh2, axis="seq", batch_axis="data", feature_map=phi,
                                        causal=True, key_mask=mask)

    for a, b in zip(_grads(sharded, _replicated(phi, mesh2), q, k, v, w), _grads(single, phi, q, k, v, w)):
        assert rel_rms_error(a, b) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_explicit_mesh_axes(causal):
    """jax.make_mesh's default axis type (Explicit): inputs are placed, ragged outputs cut, gradients flow."""
    explicit = jax.make_mesh((8,), ("seq",), axis_types=(AxisType.Explicit,))
    B, H, N, d = 2, 2, 37, 4
    q, k, v, w, mask = _inputs(B, H, N, N, d, d, masked=True)
    phi = ka.feature_map("glu", num_heads=H, head_dim=d, seed=0, xp=jnp)
    out = sharded_linear_attention(q, k, v, mesh=explicit, axis="seq", feature_map=phi, causal=causal,
                                   key_mask=mask)
    want = ka.linear_attention(q, k, v, feature_map=phi, causal=causal, key_mask=mask)
    assert rel_rms_error(out, want) <= TOL
    with jax.set_mesh(explicit):  # JAX's rule for explicit axes: computations that mix in such arrays
        g1 = jax.grad(lambda q: jnp.sum(sharded_linear_attention(
            q, k, v, mesh=explicit, axis="seq", feature_map=phi, causal=causal, key_mask=mask) * w))(q)
    g0 = jax.grad(lambda q: jnp.sum(ka.linear_attention(
        q, k, v, feature_map=phi, causal=causal, key_mask=mask) * w))(q)
    assert rel_rms_error(g1, g0) <= TOL


@pytest.mark.slow
def test_bfloat16_inputs(mesh):
    q, k, v, w, mask = _inputs(2, 2, 40, 40, 8, 8, masked=True, dtype=jnp.bfloat16)
    phi = ka.feature_map("glu", num_heads=2, head_dim=8, seed=0, xp=jnp)
    out = sharded_linear_attention(q, k, v, mesh=mesh, axis="seq", feature_map=phi, causal=True, key_mask=mask)
    want = ka.linear_attention(q, k, v, feature_map=phi, causal=True, key_mask=mask)
    assert out.dtype == jnp.bfloat16
    assert rel_rms_error(out, want) <= 5e-3


@pytest.mark.slow
def test_inside_jit_with_inputs_placed_on_the_mesh(mesh):
    B, H, N, d = 1, 2, 64, 4
    q, k, v, w, mask = _inputs(B, H, N, N, d, d, masked=False)
    spec = NamedSharding(mesh, P(None, None, "seq", None))
    qs, ks, vs = jax.device_put((q, k, v), spec)
    phi = _replicated(ka.feature_map("ffn", num_heads=H, head_dim=d, seed=0, xp=jnp), mesh)
    traces = []

    @jax.jit
    def f(phi, q, k, v):
        traces.append(1)
        return sharded_linear_attention(q, k, v, mesh=mesh, axis="seq", feature_map=phi, causal=True)

    out = f(phi, qs, ks, vs)
    f(phi, 2 * qs, ks, vs)
    assert len(traces) == 1
    assert out.sharding.is_equivalent_to(spec, 4)
    want = ka.linear_attention(q, k, v, feature_map=ka.feature_map("ffn", num_heads=H, head_dim=d, seed=0,
                                                                   xp=jnp), causal=True)
    assert rel_rms_error(out, want) <= TOL
    # the communication: one all-gather of the per-device states, one all-reduce for the total
    hlo = f.lower(phi, qs, ks, vs).compile().as_text()
    assert "all-gather" in hlo


def test_errors_name_the_argument(mesh):
    q = jnp.zeros((2, 2, 16, 4), jnp.float32)
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        sharded_linear_attention(q, q, q, mesh="seq", axis="seq")
    with pytest.raises(ValueError, match="axis='rows' is not an axis of the mesh"):
        sharded_linear_attention(q, q, q, mesh=mesh, axis="rows")
    with pytest.raises(TypeError, match="needs JAX arrays; k is a ndarray"):
        sharded_linear_attention(q, np.zeros((2, 2, 16, 4), np.float32), q, mesh=mesh, axis="seq")
    with pytest.raises(ValueError, match="causal attention needs as many queries as keys"):
        sharded_linear_attention(q, q[:, :, :8], q[:, :, :8], mesh=mesh, axis="seq", causal=True)
    with pytest.raises(ValueError, match="key_mask must have shape"):
        sharded_linear_attention(q, q, q, mesh=mesh, axis="seq", key_mask=jnp.ones((2, 15), bool))
    with pytest.raises(ValueError, match="num_heads"):
        phi = ka.feature_map("glu", num_heads=3, head_dim=4, seed=0, xp=jnp)
        sharded_linear_attention(q, q, q, mesh=mesh, axis="seq", feature_map=phi)
    with pytest.raises(ValueError, match="chunk_size"):
        sharded_linear_attention(q, q, q, mesh=mesh, axis="seq", chunk_size=0)
    mesh2 = jax.make_mesh((2, 4), ("data", "seq"), axis_types=(AxisType.Auto, AxisType.Auto))
    with pytest.raises(ValueError, match="does not split over batch_axis='data'"):
        sharded_linear_attention(q[:1], q[:1], q[:1], mesh=mesh2, axis="seq", batch_axis="data")
    with pytest.raises(ValueError, match="must differ"):
        sharded_linear_attention(q, q, q, mesh=mesh2, axis="seq", batch_axis="seq")
