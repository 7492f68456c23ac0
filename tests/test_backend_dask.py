"""The Dask fast path: block-wise, lazy, O(blocks) graphs, equal to NumPy; and on a LocalCluster."""

from __future__ import annotations

import numpy as np
import pytest

import kernelattn as ka
from kernelattn.testing import reference_linear_attention, rel_rms_error

da = pytest.importorskip("dask.array")
import dask  # noqa: E402

B, H, d = 2, 3, 8


def _data(n, l=None, e=8, seed=0):
    rng = np.random.default_rng(seed)
    l = n if l is None else l
    return (rng.standard_normal((B, H, n, d)), rng.standard_normal((B, H, l, d)),
            rng.standard_normal((B, H, l, e)))


def _dask(a, block):
    return da.from_array(a, chunks=(1, H, block, a.shape[-1]))


class _Counter(dask.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.n = 0

    def _start(self, dsk):
        self.n += 1


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("kind", ["elu", "glu", "aoglu", "favor"])
@pytest.mark.parametrize("block", [7, 16, 64])
def test_fast_path_equals_reference(causal, kind, block):
    q, k, v = _data(45, e=5)
    mask = np.ones((B, 45), bool)
    mask[1, 30:] = False
    mask[0, :4] = False
    Q, K, V = (_dask(a, block) for a in (q, k, v))
    M = da.from_array(mask, chunks=(1, 10))
    phi = "elu" if kind == "elu" else ka.feature_map(kind, num_heads=H, head_dim=d, seed=0, like=Q, dtype="float64")
    assert ka.explain_dispatch("linear_attention", Q, causal=causal, method="auto", masked=True,
                               kind=kind).backend == "dask"
    with _Counter() as counter:
        out, state = ka.linear_attention(Q, K, V, feature_map=phi, causal=causal, key_mask=M, return_state=True,
                                         chunk_size=8)
    assert counter.n == 0, "the call computed something before .compute()"
    assert isinstance(out, da.Array) and isinstance(state.S, da.Array)
    ref, (S, z) = reference_linear_attention(q, k, v, feature_map=phi, causal=causal, key_mask=mask,
                                             return_state=True)
    np.testing.assert_allclose(out.compute(), ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(state.S.compute(), S, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(state.z.compute(), z, rtol=1e-10, atol=1e-12)


def test_cross_attention_with_different_blocks():
    q, k, v = _data(20, 53)
    Q = _dask(q, 6)
    K, V = _dask(k, 11), _dask(v, 9)   # v blocked differently from k: realigned
    out = ka.linear_attention(Q, K, V)
    np.testing.assert_allclose(out.compute(), reference_linear_attention(q, k, v), rtol=1e-10)


def test_initial_state_continues_across_calls():
    q, k, v = _data(40)
    Q, K, V = (_dask(a, 8) for a in (q, k, v))
    first, state = ka.linear_attention(Q[:, :, :24], K[:, :, :24], V[:, :, :24], causal=True, return_state=True)
    second = ka.linear_attention(Q[:, :, 24:], K[:, :, 24:], V[:, :, 24:], causal=True, initial_state=state)
    whole = reference_linear_attention(q, k, v, causal=True)
    np.testing.assert_allclose(np.concatenate([first.compute(), second.compute()], axis=2), whole, rtol=1e-10)


def test_graph_grows_linearly_with_blocks():
    sizes = {}
    for blocks in (4, 8, 16, 32):
        q, k, v = _data(blocks * 4)
        Q, K, V = (_dask(a, 4) for a in (q, k, v))
        for causal in (False, True):
            out = ka.linear_attention(Q, K, V, causal=causal)
            sizes[causal, blocks] = len(out.__dask_graph__())
    for causal in (False, True):
        per_block = [(sizes[causal, 2 * b] - sizes[causal, b]) / b for b in (4, 8, 16)]
        assert max(per_block) <= 16 and max(per_block) - min(per_block) <= 2, per_block


def test_half_precision_and_float32():
    q, k, v = (a.astype(np.float16) for a in _data(33))
    Q, K, V = (_dask(a, 10) for a in (q, k, v))
    out, state = ka.linear_attention(Q, K, V, causal=True, return_state=True)
    assert out.dtype == np.float16 and state.S.dtype == np.float32
    ref = reference_linear_attention(*(a.astype(np.float64) for a in (q, k, v)), causal=True)
    assert rel_rms_error(out.compute(), ref) < 2e-3


def test_reference_strategies_stay_on_the_core():
    q, k, v = _data(12)
    Q = _dask(q, 4)
    res = ka.explain_dispatch("linear_attention", Q, causal=True, method="naive")
    assert res.backend == "agnostic" and "reference strategy" in res.reason


def test_two_worker_local_cluster():
    distributed = pytest.importorskip("distributed")
    q, k, v = _data(96)
    Q, K, V = (_dask(a, 16) for a in (q, k, v))
    phi = ka.feature_map("aoglu", num_heads=H, head_dim=d, depth=2, seed=0, like=Q, dtype="float64")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  memory_limit="1GiB") as cluster, distributed.Client(cluster) as client:
        out = ka.linear_attention(Q, K, V, feature_map=phi, causal=True)
        got = client.compute(out).result()
        who = client.run(lambda: 1)
    assert len(who) == 2
    np.testing.assert_allclose(got, reference_linear_attention(q, k, v, feature_map=phi, causal=True), rtol=1e-10)
