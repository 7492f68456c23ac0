"""Distillation (kernelattn.fit, kernelattn.losses) and the shipped real data (kernelattn.data)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

import kernelattn as ka
from kernelattn.testing import (reference_feature_map, reference_linear_attention, reference_softmax_attention,
                                rel_rms_error, to_numpy)

import torch
import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", True)


@pytest.fixture(scope="module")
def sample():
    return ka.data.minilm(layer=1, heads=[0, 3, 7])


def _phi(kind, H=3, d=32, dtype="float32", **opts):
    return ka.feature_map(kind, num_heads=H, head_dim=d, seed=0, dtype=dtype, **opts)


# ---------------------------------------------------------------------------
# the shipped data


def test_minilm_data_is_small_real_and_well_formed():
    path = os.path.join(os.path.dirname(ka.data.__file__), "minilm.npz")
    assert os.path.getsize(path) < 6e6
    s = ka.data.minilm(layer=3)
    assert s.q.shape == s.k.shape == s.v.shape == (4, 12, 96, 32)
    assert s.q.dtype == np.float32 and s.layer == 3 and s.heads == tuple(range(12))
    assert all(row[0] == "[CLS]" and row[-1] == "[SEP]" for row in s.tokens)
    assert s.sources == ("heapq", "shelve", "turtle", "sched")
    assert s.texts[0].startswith("Heap queue algorithm")
    # real attention is far from uniform: the heads concentrate on few keys
    p = to_numpy(ka.softmax_attention_weights(s.q, s.k))
    assert p.max(-1).mean() > 5 / 96
    # layers differ, and heads are selected in the order asked
    assert not np.allclose(ka.data.minilm(layer=2).q, s.q)
    np.testing.assert_array_equal(ka.data.minilm(layer=3, heads=[5, 1]).q[:, 0], s.q[:, 5])
    train, test = s.split(held_out=1)
    assert train.q.shape[0] == 3 and test.q.shape[0] == 1 and test.sources == ("sched",)
    with pytest.raises(ValueError, match="layer"):
        ka.data.minilm(layer=6)
    with pytest.raises(ValueError, match="heads"):
        ka.data.minilm(heads=[12])
    with pytest.raises(ValueError, match="held_out"):
        s.split(held_out=4)


def test_synthetic_default_inputs_still_importable():
    from kernelattn.data import default_inputs

    q, k, v = default_inputs(40, num_heads=2, head_dim=8)
    assert q.shape == (1, 2, 40, 8) and q.dtype == np.float32


def test_reading_the_data_needs_neither_torch_nor_the_model():
    code = ("import sys, kernelattn as ka; s = ka.data.minilm(layer=0); import kernelattn.data.make_minilm; "
            "assert not {'torch', 'transformers', 'jax'} & set(sys.modules), sorted(sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------------------
# losses and approximation_error against independent float64 references


def _ref_kl(phi, q, k, floor=1e-8, eps=1e-6):
    fq, fk = reference_feature_map(phi, q), reference_feature_map(phi, k, role="key")
    A = np.einsum("bhnm,bhlm->bhnl", fq, fk)
    a = A / (A.sum(-1, keepdims=True) + eps)
    s = np.einsum("bhnd,bhld->bhnl", np.float64(q), np.float64(k)) / math.sqrt(q.shape[-1])
    logp = s - s.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return float(np.mean(np.sum(np.exp(logp) * (logp - np.log(a + floor)), axis=-1)))


@pytest.mark.parametrize("kind", ["elu", "relu", "glu", "hedgehog"])
def test_approximation_error_against_references(sample, kind):
    phi = kind if kind in ("elu", "relu") else _phi(kind)
    q, k, v = sample.q[:2], sample.k[:2], sample.v[:2]
    err = ka.approximation_error(phi, q, k, v)
    lin = reference_linear_attention(q, k, v, feature_map=phi)
    assert err.output_error == pytest.approx(rel_rms_error(lin, reference_softmax_attention(q, k, v)), rel=1e-4)
    assert err.attention_kl == pytest.approx(_ref_kl(phi, q, k), rel=1e-4)
    assert isinstance(err.output_error, float) and isinstance(err.attention_kl, float)


def test_kl_is_zero_only_for_equal_weights():
    # identical keys: softmax and linear attention are both uniform, whatever the map
    q = np.random.default_rng(0).standard_normal((1, 1, 5, 4))
    k = np.repeat(np.random.default_rng(1).standard_normal((1, 1, 1, 4)), 6, axis=2)
    kl = float(ka.losses.attention_kl("elu", q, k))
    assert abs(kl) < 1e-6  # both distributions are uniform over identical keys
    assert float(ka.losses.attention_kl("elu", q, np.random.default_rng(2).standard_normal((1, 1, 6, 4)))) > 1e-3


# ---------------------------------------------------------------------------
# fitting


@pytest.mark.parametrize("kind,opts", [("hedgehog", {}), ("glu", {}), ("aoglu", {"depth": 3})])
def test_fitting_reduces_held_out_error_on_the_shipped_data(sample, kind, opts):
    train, test = sample.split(held_out=1)
    phi0 = _phi(kind, **opts)
    before = ka.approximation_error(phi0, test.q, test.k, test.v)
    phi, hist = ka.fit_feature_map(phi0, train.q, train.k, train.v, steps=40, lr=0.02,
                                   eval_data=(test.q, test.k, test.v), eval_every=10)
    after = ka.approximation_error(phi, test.q, test.k, test.v)
    assert after.attention_kl < 0.7 * before.attention_kl
    assert after.output_error < 0.95 * before.output_error
    assert hist.loss[-1] < 0.6 * hist.loss[0]
    assert hist.eval_steps == [0, 10, 20, 30, 40] and len(hist.loss) == 40
    assert hist.eval_output_error[-1] == pytest.approx(after.output_error, rel=1e-6)
    assert hist.grad == "manual" and hist.seconds > 0
    # the input map is untouched; the fitted one has its spec
    np.testing.assert_array_equal(phi0.parameters()[0], _phi(kind, **opts).parameters()[0])
    assert phi.spec == phi0.spec


def test_output_mse_loss_reduces_output_error(sample):
    train, test = sample.split(held_out=1)
    phi0 = _phi("glu", depth=2)
    before = ka.approximation_error(phi0, test.q, test.k, test.v).output_error
    phi, hist = ka.fit_feature_map(phi0, train.q, train.k, train.v, loss="output_mse", steps=40, lr=0.01)
    assert ka.approximation_error(phi, test.q, test.k, test.v).output_error < 0.95 * before
    assert hist.loss[-1] < 0.7 * hist.loss[0]


def test_fit_is_deterministic_for_a_seed(sample):
    train, _ = sample.split(held_out=1)
    kw = dict(steps=6, lr=0.02, batch_size=2, ortho_weight=0.01)
    a, ha = ka.fit_feature_map(_phi("aoglu"), train.q, train.k, seed=3, **kw)
    b, hb = ka.fit_feature_map(_phi("aoglu"), train.q, train.k, seed=3, **kw)
    c, _ = ka.fit_feature_map(_phi("aoglu"), train.q, train.k, seed=4, **kw)
    assert ha.loss == hb.loss
    for x, y in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


def test_orthogonality_penalty_keeps_weights_orthogonal(sample):
    train, _ = sample.split(held_out=1)
    free, _ = ka.fit_feature_map(_phi("glu"), train.q, train.k, steps=20, lr=0.03)
    held, _ = ka.fit_feature_map(_phi("glu"), train.q, train.k, steps=20, lr=0.03, ortho_weight=10.0)
    assert float(ka.orthogonality_penalty(held)) < 0.5 * float(ka.orthogonality_penalty(free))


@pytest.mark.parametrize("lib", ["torch", "jax"])
@pytest.mark.parametrize("loss", ["attention_kl", "output_mse"])
@pytest.mark.slow_where(lib="jax")  # path against path; jax's fit against the definition stays quick
def test_manual_and_autodiff_paths_give_the_same_fit(sample, lib, loss):
    train, _ = sample.split(held_out=1)
    conv = torch.from_numpy if lib == "torch" else jnp.asarray
    q, k, v = (conv(np.float64(a[:2])) for a in (train.q, train.k, train.v))
    phi0 = _phi("glu", dtype="float64", bias=True).to(like=q)
    fits = [ka.fit_feature_map(phi0, q, k, v, loss=loss, steps=5, lr=0.02, ortho_weight=0.1, grad=g)
            for g in ("manual", "autodiff")]
    assert fits[0][1].grad == "manual" and fits[1][1].grad == "autodiff"
    np.testing.assert_allclose(fits[0][1].loss, fits[1][1].loss, rtol=1e-10)
    for x, y in zip(fits[0][0].parameters(), fits[1][0].parameters()):
        np.testing.assert_allclose(to_numpy(x), to_numpy(y), rtol=1e-8, atol=1e-10)


@pytest.mark.slow_where(xp_backend="jax")  # quick: jax fits in test_manual_and_autodiff_paths_give_the_same_fit
def test_fit_on_every_backend(xp_backend, sample):
    train, test = sample.split(held_out=1)
    mask = np.ones((3, 96), bool)
    mask[2, 80:] = False
    kw = dict(steps=4, lr=0.02, causal=True, key_mask=None)
    ref_phi, ref = ka.fit_feature_map(_phi("hedgehog"), train.q, train.k, **{**kw, "key_mask": mask})
    a = xp_backend.asarray
    phi, hist = ka.fit_feature_map(_phi("hedgehog").to(like=a(train.q)), a(train.q), a(train.k),
                                   **{**kw, "key_mask": a(mask)},
                                   eval_data=(a(test.q), a(test.k), a(test.v)), eval_every=2)
    np.testing.assert_allclose(hist.loss, ref.loss, rtol=2e-4)
    for x, r in zip(phi.parameters(), ref_phi.parameters()):
        assert type(x) is type(a(r))
        np.testing.assert_allclose(to_numpy(x), r, rtol=1e-3, atol=1e-5)
    assert len(hist.eval_output_error) == 3


def test_progress_and_callback(sample, capsys):
    train, _ = sample.split(held_out=1)
    seen = []
    ka.fit_feature_map(_phi("ffn"), train.q, train.k, steps=3, progress=True,
                       callback=lambda step, phi, loss: seen.append((step, loss)))
    assert [s for s, _ in seen] == [1, 2, 3] and all(isinstance(loss, float) for _, loss in seen)


def test_fit_errors(sample):
    q, k, v = sample.q, sample.k, sample.v
    with pytest.raises(ValueError, match="trainable"):
        ka.fit_feature_map("elu", q, k)
    with pytest.raises(ValueError, match="trainable"):
        ka.fit_feature_map(_phi("favor"), q, k)
    with pytest.raises(ValueError, match="needs the values"):
        ka.fit_feature_map(_phi("glu"), q, k, loss="output_mse")
    with pytest.raises(ValueError, match="loss must be"):
        ka.fit_feature_map(_phi("glu"), q, k, loss="mse")
    with pytest.raises(ValueError, match="batch_size"):
        ka.fit_feature_map(_phi("glu"), q, k, batch_size=9)
    with pytest.raises(ValueError, match="steps"):
        ka.fit_feature_map(_phi("glu"), q, k, steps=0)
    with pytest.raises(ValueError, match="grad must be"):
        ka.fit_feature_map(_phi("glu"), q, k, grad="finite")
    with pytest.raises(ValueError, match="autodiff"):
        ka.fit_feature_map(_phi("glu"), q, k, grad="autodiff", steps=1)
    with pytest.raises(ValueError, match="num_heads"):
        ka.fit_feature_map(_phi("glu", H=4), q, k)
    with pytest.raises(ValueError, match="eval_data"):
        ka.fit_feature_map(_phi("glu"), q, k, eval_data=(q, k))
    with np.errstate(all="ignore"), pytest.raises(FloatingPointError, match="lower lr"):
        ka.fit_feature_map(_phi("glu"), q * 1e30, k * 1e30, steps=2)
