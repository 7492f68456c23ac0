"""Library-specific promises: the caller's array type, device and dtype come back;
Dask stays lazy; torch autograd and devices; JAX arrays."""

from __future__ import annotations

import numpy as np
import pytest

import kernelattn as ka
from kernelattn._compat import device
from kernelattn.testing import reference_linear_attention, to_numpy


def test_output_type_device_dtype(xp_backend, rng):
    q = xp_backend.asarray(rng.standard_normal((1, 2, 9, 4)))
    phi = ka.feature_map("glu", num_heads=2, head_dim=4, seed=0, like=q)
    for out in (ka.linear_attention(q, q, q, feature_map=phi, causal=True), ka.softmax_attention(q, q, q),
                ka.linear_attention_step(q, q, q, feature_map=phi)[0], phi(q)):
        assert type(out) is type(q)
        assert out.dtype == q.dtype
        assert str(device(out)) == str(device(q))


def test_dask_stays_lazy_until_compute(rng):
    da = pytest.importorskip("dask.array")
    import dask

    q_np, k_np, v_np = (rng.standard_normal((1, 2, 40, 8)) for _ in range(3))
    chunks = (1, 2, 10, 8)
    q, k, v = (da.from_array(a, chunks=chunks) for a in (q_np, k_np, v_np))
    mask_np = np.ones((1, 40), bool)
    mask_np[0, 30:] = False
    mask = da.from_array(mask_np, chunks=(1, 10))
    phi = ka.feature_map("aoglu", num_heads=2, head_dim=8, depth=2, seed=0, like=q)
    computed = []

    class Counter(dask.callbacks.Callback):
        def _start(self, dsk):
            computed.append(1)

    with Counter():
        outs = {
            (causal, method): ka.linear_attention(q, k, v, feature_map=phi, causal=causal, key_mask=mask,
                                                  method=method, chunk_size=16)
            for causal in (False, True) for method in ("auto", "naive")
        }
        sm = ka.softmax_attention(q, k, v, causal=True, key_mask=mask)
    assert not computed, "kernelattn computed a Dask graph before .compute()"
    for (causal, method), out in outs.items():
        assert isinstance(out, da.Array)
        ref = reference_linear_attention(q_np, k_np, v_np, feature_map=phi, causal=causal, key_mask=mask_np)
        np.testing.assert_allclose(out.compute(), ref, rtol=1e-9, atol=1e-12)
    assert isinstance(sm, da.Array)


def test_torch_autograd_and_no_grad(rng):
    torch = pytest.importorskip("torch")
    q = torch.tensor(rng.standard_normal((1, 2, 7, 4)), dtype=torch.float32, requires_grad=True)
    phi = ka.feature_map("glu", num_heads=2, head_dim=4, seed=0, like=q)
    for p in phi.parameters():
        p.requires_grad_(True)
    out = ka.linear_attention(q, q, q, feature_map=phi, causal=True)
    assert out.requires_grad
    out.sum().backward()
    assert q.grad is not None and all(p.grad is not None for p in phi.parameters())
    with torch.no_grad():
        assert not ka.linear_attention(q, q, q, feature_map=phi).requires_grad


def test_jax_arrays_and_pytree(rng):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    q = jnp.asarray(rng.standard_normal((1, 2, 7, 4)), dtype=jnp.float32)
    phi = ka.feature_map("aoglu", num_heads=2, head_dim=4, seed=0, like=q)
    leaves, treedef = jax.tree_util.tree_flatten(phi)
    assert len(leaves) == len(phi.parameters())
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.spec == phi.spec
    doubled = jax.tree_util.tree_map(lambda a: a * 2, phi)
    assert isinstance(doubled, ka.FeatureMap)
    out = ka.linear_attention(q, q, q, feature_map=phi)
    assert isinstance(out, jax.Array) and out.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(out), reference_linear_attention(to_numpy(q), to_numpy(q), to_numpy(q), feature_map=phi),
        rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # a fresh interpreter that imports JAX
def test_feature_map_made_before_jax_import_is_a_pytree_after(tmp_path):
    import subprocess
    import sys

    code = (
        "import numpy as np, kernelattn as ka\n"
        "phi = ka.feature_map('glu', num_heads=2, head_dim=4, seed=0)\n"
        "import jax, jax.numpy as jnp\n"
        "q = jnp.ones((1, 2, 3, 4))\n"
        "phi = phi.to(like=q)\n"
        "g = jax.grad(lambda p: ka.linear_attention(q, q, q, feature_map=p).sum())(phi)\n"
        "assert isinstance(g, ka.FeatureMap), type(g)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
