"""The CuPy fast path. Its algorithm is the NumPy one (kernelattn.backends._blocked), tested here
on NumPy with the fused-kernel hooks; the CuPy runs need a CUDA device and skip cleanly without."""

from __future__ import annotations

import numpy as np
import pytest

import kernelattn as ka
from kernelattn.backends import _blocked
from kernelattn.testing import reference_linear_attention, rel_rms_error


def _cupy_usable():
    try:
        import cupy

        return bool(cupy.cuda.is_available())
    except Exception:
        return False


def _numpy_kernels():
    """NumPy stand-ins with the CuPy kernels' contract (in place, same formulas)."""
    def softplus_(y):
        y[...] = np.maximum(y, 0) + np.log1p(np.exp(-np.abs(y)))

    def gate_(y, g):
        y[...] = y / (1 + np.exp(-g))

    return {"softplus_": softplus_, "gate_": gate_}


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("kind", ["ffn", "glu", "aoglu"])
def test_fused_kernel_hooks_give_the_same_answer(causal, kind):
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, 2, 2, 300, 8))
    phi = ka.feature_map(kind, num_heads=2, head_dim=8, depth=2, seed=0, dtype="float64")
    out, _ = _blocked.linear_attention(np, q, k, v, feature_map=phi, causal=causal, key_mask=None, eps=1e-6,
                                       chunk_size=32, initial_state=None, return_state=False, block=128,
                                       kernels=_numpy_kernels())
    np.testing.assert_allclose(out, reference_linear_attention(q, k, v, feature_map=phi, causal=causal),
                               rtol=1e-10, atol=1e-12)


gpu = pytest.mark.skipif(not _cupy_usable(), reason="cupy: no usable CUDA device on this machine")


@gpu
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cupy_fast_path_matches_reference(causal, dtype):
    import cupy

    rng = np.random.default_rng(1)
    q, k, v = (a.astype(dtype) for a in rng.standard_normal((3, 2, 4, 1000, 32)))
    mask = rng.random((2, 1000)) > 0.2
    cq, ck, cv = (cupy.asarray(a) for a in (q, k, v))
    phi = ka.feature_map("glu", num_heads=4, head_dim=32, depth=2, seed=0, like=cq)
    assert ka.explain_dispatch("linear_attention", cq, causal=causal, method="auto", masked=True,
                               kind="glu").backend == "cupy"
    out, state = ka.linear_attention(cq, ck, cv, feature_map=phi, causal=causal, key_mask=cupy.asarray(mask),
                                     return_state=True)
    assert isinstance(out, cupy.ndarray) and out.dtype == cq.dtype and state.S.dtype == cupy.float32
    ref = reference_linear_attention(*(a.astype(np.float64) for a in (q, k, v)), feature_map=phi,
                                     causal=causal, key_mask=mask)
    assert rel_rms_error(out, ref) < (1e-5 if dtype == "float32" else 5e-3)
    core = ka.linear_attention(cq, ck, cv, feature_map=phi, causal=causal, key_mask=cupy.asarray(mask),
                               backend="agnostic")
    assert rel_rms_error(out, core) < (1e-5 if dtype == "float32" else 5e-3)


@gpu
def test_fit_feature_map_trains_on_cupy():
    import cupy

    sample = ka.data.minilm(layer=0)
    q, k, v = (cupy.asarray(a) for a in (sample.q, sample.k, sample.v))
    phi = ka.feature_map("glu", num_heads=q.shape[1], head_dim=q.shape[3], seed=0, like=q)
    before = ka.approximation_error(phi, q, k, v)
    fitted, history = ka.fit_feature_map(phi, q, k, v, steps=30, lr=0.02)
    after = ka.approximation_error(fitted, q, k, v)
    assert isinstance(fitted.parameters()[0], cupy.ndarray)
    assert float(after.attention_kl) < float(before.attention_kl)
