"""Optimisers (kernelattn.optim): the same updates as torch.optim and optax, on every backend."""

from __future__ import annotations

import math

import numpy as np
import pytest

import kernelattn as ka
from kernelattn.testing import to_numpy
from kernelattn import _tree
from kernelattn.optim import Adam, AdamW, constant, inverse_sqrt_warmup

import torch
import jax
import jax.numpy as jnp
import optax

jax.config.update("jax_enable_x64", True)


def _tree_np(seed=0):
    rng = np.random.default_rng(seed)
    return {"a": [{"W": rng.standard_normal((2, 3, 4)), "b": rng.standard_normal((2, 4))}], "z": rng.standard_normal(5)}


def _grads(tree, step):
    # deterministic, step-dependent gradients of the same shapes
    return _tree.tree_map(lambda a: np.sin(a * (step + 1)) + 0.1 * step, tree)


def _run_ours(opt, steps=6, seed=0):
    params = _tree_np(seed)
    state = opt.init(params)
    for t in range(steps):
        params, state = opt.update(params, _grads(params, t), state)
    return params, state


def _run_torch(cls, lr, steps=6, seed=0, schedule=None, **kw):
    leaves = [torch.tensor(a, requires_grad=True) for a in _tree.leaves(_tree_np(seed))]
    opt = cls(leaves, lr=lr, **kw)
    sched = None if schedule is None else torch.optim.lr_scheduler.LambdaLR(opt, lambda e: schedule(e + 1))
    for t in range(steps):
        current = _tree.with_leaves(_tree_np(seed), [p.detach().numpy().copy() for p in leaves])
        for p, g in zip(leaves, _tree.leaves(_grads(current, t))):
            p.grad = torch.tensor(g)
        opt.step()
        if sched is not None:
            sched.step()
    return [p.detach().numpy() for p in leaves]


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("warmup", [None, 3])
def test_adam_matches_torch(wd, warmup):
    sched = None if warmup is None else inverse_sqrt_warmup(warmup)
    ours, state = _run_ours(Adam(0.05, weight_decay=wd, schedule=sched))
    ref = _run_torch(torch.optim.Adam, 0.05, schedule=sched, weight_decay=wd)
    assert state.step == 6
    for a, b in zip(_tree.leaves(ours), ref):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("wd", [0.01, 0.1])
@pytest.mark.parametrize("warmup", [None, 4])
def test_adamw_matches_torch(wd, warmup):
    sched = None if warmup is None else inverse_sqrt_warmup(warmup)
    ours, _ = _run_ours(AdamW(0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd, schedule=sched))
    ref = _run_torch(torch.optim.AdamW, 0.05, schedule=sched, weight_decay=wd, betas=(0.8, 0.99), eps=1e-6)
    for a, b in zip(_tree.leaves(ours), ref):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.slow  # quick: the schedule against torch in test_adam_matches_torch, test_adamw_matches_torch
def test_adamw_matches_optax_with_the_papers_schedule():
    warmup = 3
    sched = inverse_sqrt_warmup(warmup)
    ours, _ = _run_ours(AdamW(0.05, weight_decay=0.1, schedule=sched), steps=8)
    # optax counts from 0; the paper's multiplier is for steps 1, 2, ...
    def lr(count):
        t = jnp.asarray(count, dtype=jnp.float64) + 1.0
        return 0.05 * jnp.minimum(1.0, t / warmup) / jnp.sqrt(jnp.maximum(t, warmup))

    tx = optax.adamw(lr, weight_decay=0.1)
    params = _tree.tree_map(jnp.asarray, _tree_np())
    state = tx.init(params)
    for t in range(8):
        g = _tree.tree_map(jnp.asarray, _grads(_tree.tree_map(np.asarray, params), t))
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    for a, b in zip(_tree.leaves(ours), _tree.leaves(params)):
        np.testing.assert_allclose(a, np.asarray(b), rtol=1e-10, atol=1e-12)


def test_inverse_sqrt_warmup_is_the_papers_multiplier():
    s = inverse_sqrt_warmup(1000)
    for t in (1, 10, 500, 999, 1000, 1001, 4000, 20000):
        assert s(t) == pytest.approx(min(1.0, t / 1000) / math.sqrt(max(t, 1000)), rel=1e-15)
    values = [s(t) for t in range(1, 3000)]
    peak = int(np.argmax(values)) + 1
    assert peak == 1000
    assert all(a <= b for a, b in zip(values[:999], values[1:1000]))  # rises during warm-up
    assert all(a >= b for a, b in zip(values[999:], values[1000:]))  # then decays
    assert constant()(7) == 1.0
    opt = AdamW(0.005, schedule=s)
    assert opt.learning_rate(1000) == pytest.approx(0.005 / math.sqrt(1000))


def test_deterministic():
    a, sa = _run_ours(AdamW(0.02, weight_decay=0.1, schedule=inverse_sqrt_warmup(2)))
    b, sb = _run_ours(AdamW(0.02, weight_decay=0.1, schedule=inverse_sqrt_warmup(2)))
    for x, y in zip(_tree.leaves(a) + _tree.leaves(sa.m), _tree.leaves(b) + _tree.leaves(sb.m)):
        np.testing.assert_array_equal(x, y)


def test_updates_a_feature_map_and_leaves_the_original_alone():
    phi = ka.feature_map("glu", num_heads=2, head_dim=4, depth=2, seed=0)
    before = [np.array(p) for p in phi.parameters()]
    opt = Adam(0.1)
    state = opt.init(phi)
    grads = phi.replace(params=_tree.tree_map(np.ones_like, phi.params))
    new, state = opt.update(phi, grads, state)
    assert isinstance(new, ka.FeatureMap) and new.spec == phi.spec
    for p, b in zip(phi.parameters(), before):
        np.testing.assert_array_equal(p, b)
    # the first Adam step moves every coordinate by lr against the gradient's sign
    for p, b in zip(new.parameters(), before):
        np.testing.assert_allclose(p, b - 0.1, rtol=0, atol=1e-6)
        assert p.dtype == b.dtype


def test_every_backend_matches_float64_numpy(xp_backend):
    ref, _ = _run_ours(AdamW(0.05, weight_decay=0.1, schedule=inverse_sqrt_warmup(2)), steps=4)
    a = xp_backend.asarray
    params = _tree.tree_map(a, _tree_np())
    opt = AdamW(0.05, weight_decay=0.1, schedule=inverse_sqrt_warmup(2))
    state = opt.init(params)
    for t in range(4):
        g = _tree.tree_map(a, _grads(_tree.tree_map(to_numpy, params), t))
        params, state = opt.update(params, g, state)
    for x, r in zip(_tree.leaves(params), _tree.leaves(ref)):
        assert type(x) is type(a(r)) and x.dtype == a(r).dtype
        np.testing.assert_allclose(to_numpy(x), r, rtol=1e-5, atol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="lr"):
        Adam(-1.0)
    with pytest.raises(ValueError, match="betas"):
        Adam(0.1, betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="schedule"):
        Adam(0.1, schedule=3)
    with pytest.raises(ValueError, match="warmup"):
        inverse_sqrt_warmup(0)
    opt = Adam(0.1)
    params = _tree_np()
    state = opt.init(params)
    with pytest.raises(ValueError, match="structure and shapes"):
        opt.update(params, {"a": params["a"]}, state)
    with pytest.raises(ValueError, match="nothing to optimise"):
        opt.init(ka.feature_map("elu"))
