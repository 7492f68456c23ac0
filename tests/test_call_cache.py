"""The call cache of ``linear_attention`` (kernelattn/attention.py): a repeat of an earlier call skips
validation and dispatch, and nothing it skips could have come out differently.

Every result is compared with the float64 definition (kernelattn.testing), on the first call and
on the cached ones.
"""

from __future__ import annotations

import numpy as np
import pytest

import kernelattn as ka
from kernelattn import _dispatch, _validation
from kernelattn import attention as attention_module
from kernelattn.testing import reference_linear_attention

torch = pytest.importorskip("torch")

B, H, N, D = 2, 2, 9, 4


@pytest.fixture
def checks(monkeypatch):
    """How often the full input checks ran."""
    calls = []
    real = _validation.check_attention_inputs

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    x = torch.zeros(1, 1, 1, 1)
    ka.linear_attention(x, x, x)  # the first torch call of a process registers the adapter's call_key
    monkeypatch.setattr(_validation, "check_attention_inputs", counting)
    attention_module._CALLS.clear()
    return calls


def _qkv(seed=0, dtype=np.float64):
    return [torch.from_numpy(a.astype(dtype)) for a in np.random.default_rng(seed).standard_normal((3, B, H, N, D))]


def _ref(q, k, v, **kw):
    return reference_linear_attention(*(a.detach().double().numpy() for a in (q, k, v)), **kw)


def test_a_repeat_skips_the_checks_and_gives_the_definition(checks):
    phi = ka.feature_map("glu", num_heads=H, head_dim=D, seed=0, like=_qkv()[0])
    for seed in range(3):  # new values, the same kind of call
        q, k, v = _qkv(seed)
        with torch.no_grad():
            out = ka.linear_attention(q, k, v, feature_map=phi, causal=True)
        np.testing.assert_allclose(out.numpy(), _ref(q, k, v, feature_map=phi.to(xp=np), causal=True), rtol=1e-10)
    assert len(checks) == 1


@pytest.mark.parametrize("change", ["dtype", "shape", "device_of_mask", "causal", "eps", "feature_map", "layout"])
def test_any_change_checks_again(checks, change):
    q, k, v = _qkv()
    ka.linear_attention(q, k, v)
    ka.linear_attention(q, k, v)
    assert len(checks) == 1
    kw = {}
    if change == "dtype":
        q, k, v = (a.float() for a in (q, k, v))
    elif change == "shape":
        q, k, v = (a[:, :, :5] for a in (q, k, v))
    elif change == "device_of_mask":
        kw["key_mask"] = torch.ones(B, N, dtype=torch.bool)
    elif change == "causal":
        kw["causal"] = True
    elif change == "eps":
        kw["eps"] = 1e-3
    elif change == "feature_map":
        kw["feature_map"] = "relu"
    elif change == "layout":
        kw["layout"] = "BNHD"
    ka.linear_attention(q, k, v, **kw)
    assert len(checks) == 2, change


def test_bad_options_after_a_good_call_are_still_refused(checks):
    q, k, v = _qkv()
    ka.linear_attention(q, k, v)
    for kw, match in [({"eps": -1.0}, "eps"), ({"method": "fast"}, "method"), ({"causal": "yes"}, "causal"),
                      ({"chunk_size": 0}, "chunk_size"), ({"return_state": 2}, "return_state")]:
        with pytest.raises((ValueError, TypeError), match=match):
            ka.linear_attention(q, k, v, **kw)
    with pytest.raises((ValueError, TypeError), match="key_mask"):
        ka.linear_attention(q, k, v, key_mask=torch.ones(B, N))  # float, not bool
    with pytest.raises(ValueError):
        ka.linear_attention(q, k[:, :1], v)  # H differs


def test_gradient_flags_are_part_of_the_key(checks):
    """An inference call first, then the same inputs needing gradients: they get gradients."""
    phi = ka.feature_map("ffn", num_heads=H, head_dim=D, seed=1, xp=torch, dtype=torch.float64)
    q, k, v = _qkv()
    with torch.no_grad():
        ka.linear_attention(q, k, v, feature_map=phi, causal=True)
    leaves = [a.clone().requires_grad_(True) for a in (q, k, v)]
    out = ka.linear_attention(*leaves, feature_map=phi, causal=True)
    assert out.requires_grad
    for p in phi.parameters():  # then the map's own parameters
        p.requires_grad_(True)
    out = ka.linear_attention(q, k, v, feature_map=phi, causal=True)
    assert out.requires_grad
    grads = torch.autograd.grad(out.sum(), phi.parameters())
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert len(checks) == 3


def test_the_environment_switch_is_read_on_every_call(checks, monkeypatch):
    q, k, v = _qkv()
    ka.linear_attention(q, k, v)
    monkeypatch.setenv(_dispatch.DISABLE_ENV, "1")
    with _dispatch.recording() as names:
        ka.linear_attention(q, k, v)
    assert names == ["agnostic:noncausal"]


def test_a_cached_call_still_keeps_future_nan_away(checks):
    q, k, v = _qkv()
    ka.linear_attention(q, k, v, causal=True)
    dirty = [a.clone() for a in (q, k, v)]
    for a in dirty:
        a[:, :, 6:] = float("nan")
    out = ka.linear_attention(*dirty, causal=True)
    assert len(checks) == 1
    np.testing.assert_allclose(out[:, :, :6].numpy(), _ref(q, k, v, causal=True)[:, :, :6], rtol=1e-10)
    assert torch.isnan(out[:, :, 6:]).all()


def test_modules_and_tracing_stay_off_the_cache(checks):
    from kernelattn.backends import torch_nn

    fm = torch_nn.FeatureMap("ffn", num_heads=H, head_dim=D, seed=0, dtype=torch.float64)
    q, k, v = _qkv()
    with torch.no_grad():
        for _ in range(2):
            ka.linear_attention(q, k, v, feature_map=fm)
    assert len(checks) == 2  # a module builds its map from its current parameters on every call
    f = torch.func.grad(lambda q: ka.linear_attention(q, k, v).sum())
    for _ in range(2):
        f(q)
    assert len(checks) == 4  # torch.func's wrapped tensors are never cached
