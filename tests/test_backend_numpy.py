"""The NumPy fast path against the array-API core on the same inputs (shapes chosen to cross
block and chunk boundaries)."""

from __future__ import annotations

import numpy as np
import pytest

import kernelattn as ka
from kernelattn.backends import numpy as np_backend
from kernelattn.testing import rel_rms_error

SHAPES = [(1, 1, 1, 1, 4, 4), (2, 3, 37, 37, 12, 5), (1, 2, 700, 700, 8, 8), (2, 2, 50, 1300, 6, 6)]
KINDS = [("elu", {}), ("relu", {}), ("ffn", {"depth": 2}), ("glu", {"bias": True}), ("aoglu", {"depth": 3}),
         ("favor", {}), ("hedgehog", {}), ("glu", {"tied": False})]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(np_backend, "BLOCK", 256)  # several blocks even at small N


@pytest.mark.parametrize("shape", SHAPES, ids=["B{}H{}N{}L{}d{}e{}".format(*s) for s in SHAPES])
@pytest.mark.parametrize("kind,opts", KINDS, ids=[k + "".join(f"-{a}" for a in o) for k, o in KINDS])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_fast_equals_core(shape, kind, opts, masked):
    B, H, N, L, d, e = shape
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((B, H, N, d)), rng.standard_normal((B, H, L, d)), rng.standard_normal((B, H, L, e))
    mask = None
    if masked:
        mask = rng.random((B, L)) > 0.3
    phi = kind if kind in ("elu", "relu") else ka.feature_map(kind, num_heads=H, head_dim=d, seed=0, dtype="float64",
                                                               **opts)
    init = (rng.random((B, H, d if kind not in ("hedgehog",) else 2 * d, e)),
            rng.random((B, H, d if kind != "hedgehog" else 2 * d)))
    for causal in ([False, True] if N == L else [False]):
        for state in (None, ka.LinearAttentionState(*init)):
            kw = dict(feature_map=phi, causal=causal, key_mask=mask, initial_state=state, return_state=True,
                      chunk_size=16)
            fast, fs = ka.linear_attention(q, k, v, **kw)
            core, cs = ka.linear_attention(q, k, v, backend="agnostic", **kw)
            np.testing.assert_allclose(fast, core, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(fs.S, cs.S, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(fs.z, cs.z, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_float32_and_half(dtype):
    rng = np.random.default_rng(1)
    q, k, v = (a.astype(dtype) for a in rng.standard_normal((3, 1, 2, 600, 16)))
    phi = ka.feature_map("glu", num_heads=2, head_dim=16, seed=0, like=q)
    for causal in (False, True):
        fast, st = ka.linear_attention(q, k, v, feature_map=phi, causal=causal, return_state=True)
        core = ka.linear_attention(q, k, v, feature_map=phi, causal=causal, backend="agnostic")
        assert fast.dtype == dtype and st.S.dtype == np.float32
        assert rel_rms_error(fast, core) < (1e-5 if dtype == np.float32 else 5e-3)


def test_chosen_automatically_and_declines_references():
    q = np.zeros((1, 1, 4, 4), np.float32)
    assert ka.explain_dispatch("linear_attention", q, causal=False, method="auto").backend == "numpy"
    assert ka.explain_dispatch("linear_attention", q, causal=True, method="recurrent").backend == "agnostic"
