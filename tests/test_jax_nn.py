"""Flax NNX modules (kernelattn.backends.jax_nn), optax on plain FeatureMap pytrees, and the training example."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import numpy as np
import pytest

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import optax

import kernelattn as ka
from kernelattn import _dispatch
from kernelattn.backends.jax_nn import Buffer, EncoderBlock, FeatureMap, MultiheadLinearAttention
from kernelattn.testing import reference_feature_map, rel_rms_error

jax.config.update("jax_enable_x64", True)  # as the jax backend fixture does; arrays below are float32

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "examples" / "train_flax_optax.py"
KINDS = [("ffn", {}), ("glu", {"depth": 2, "bias": True}), ("aoglu", {"depth": 3}), ("hedgehog", {}),
         ("favor", {"feature_dim": 12}), ("glu", {"tied": False})]
KIND_IDS = [k + ("-" + "-".join(f"{a}={b}" for a, b in o.items()) if o else "") for k, o in KINDS]


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# ---------------------------------------------------------------------------- FeatureMap module


@pytest.mark.slow_where(kind=("ffn", "aoglu", "hedgehog"))  # quick: glu (trainable), favor (fixed)
@pytest.mark.slow_where(kind="glu", opts={"tied": False})
@pytest.mark.parametrize("kind,opts", KINDS, ids=KIND_IDS)
def test_seeded_module_equals_the_core_map(kind, opts):
    H, d = 2, 8
    module = FeatureMap(kind, num_heads=H, head_dim=d, seed=5, **opts)
    phi = ka.feature_map(kind, num_heads=H, head_dim=d, seed=5, **opts)  # NumPy arrays
    x = _x((2, H, 7, d))
    ref_q = reference_feature_map(phi, x, role="query")
    ref_k = reference_feature_map(phi, x, role="key")
    assert module(x).dtype == jnp.float32
    assert rel_rms_error(module(x), ref_q) <= 1e-6 and rel_rms_error(module.key(x), ref_k) <= 1e-6
    assert module.as_feature_map().spec == phi.spec
    wrapped = FeatureMap(phi)  # wrapping an existing map
    assert rel_rms_error(wrapped(x), ref_q) <= 1e-6
    n_params = sum(p.size for p in jax.tree_util.tree_leaves(nnx.state(module, nnx.Param)))
    assert n_params == ka.num_params(phi)


@pytest.mark.slow_where(kind=("ffn", "aoglu", "hedgehog", "favor"))  # quick: glu (favor: the test above)
@pytest.mark.slow_where(kind="glu", opts={"tied": False})
@pytest.mark.parametrize("kind,opts", KINDS, ids=KIND_IDS)
def test_rngs_initialisation_follows_the_paper(kind, opts):
    H, d = 8, 64
    module = FeatureMap(kind, num_heads=H, head_dim=d, rngs=nnx.Rngs(0), **opts)
    again = FeatureMap(kind, num_heads=H, head_dim=d, rngs=nnx.Rngs(0), **opts)
    other = FeatureMap(kind, num_heads=H, head_dim=d, rngs=nnx.Rngs(1), **opts)
    phi = module.as_feature_map()
    leaves = jax.tree_util.tree_leaves((phi.params, phi.buffers))
    assert all(a.dtype == jnp.float32 for a in leaves)
    same = jax.tree_util.tree_leaves(again.as_feature_map())
    assert all(np.array_equal(a, b) for a, b in zip(leaves, same))
    if kind != "hedgehog":  # hedgehog starts deterministic (identity blocks)
        diff = jax.tree_util.tree_leaves(other.as_feature_map())
        assert not all(np.array_equal(a, b) for a, b in zip(leaves, diff))
    for role in phi.params:
        for block in phi.params[role]:
            W = np.asarray(block["W"], np.float64)
            if kind == "hedgehog":
                np.testing.assert_array_equal(W[0], np.eye(d, W.shape[-1]))
                continue
            small = min(W.shape[1:])  # semi-orthogonal per head
            gram = W @ W.transpose(0, 2, 1) if W.shape[1] <= W.shape[2] else W.transpose(0, 2, 1) @ W
            np.testing.assert_allclose(gram, np.broadcast_to(np.eye(small), gram.shape), atol=1e-5)
            for name in ("G", "A", "B"):  # He-normal gates
                if name in block:
                    g = np.asarray(block[name], np.float64)
                    assert abs(g.std() / math.sqrt(2.0 / g.shape[1]) - 1) < 0.05
                    assert abs(g.mean()) < 0.05 * g.std()
            for name in ("b", "c"):
                if name in block:
                    assert not np.any(np.asarray(block[name]))
    if kind == "favor":
        omega = np.asarray(phi.buffers["omega"], np.float64)  # (H, d, m): columns = random features
        assert omega.shape == (H, d, 12)
        directions = omega / np.linalg.norm(omega, axis=1, keepdims=True)
        gram = directions.transpose(0, 2, 1) @ directions  # m <= d: one orthogonal block
        np.testing.assert_allclose(gram, np.broadcast_to(np.eye(12), gram.shape), atol=1e-5)
        norms = np.linalg.norm(omega, axis=1)  # chi(d) lengths: mean about sqrt(d)
        assert abs(norms.mean() / math.sqrt(d) - 1) < 0.1
        assert float(ka.orthogonality_penalty(module)) == 0.0  # no trainable weights
        assert isinstance(module.buffers["omega"], Buffer) and not nnx.state(module, nnx.Param)


def test_abstract_initialisation_under_eval_shape():
    abstract = nnx.eval_shape(lambda: EncoderBlock(32, 4, feature_map="aoglu", depth=3, rngs=nnx.Rngs(0)))
    W = abstract.attention.feature_map.params["shared"][0]["W"]
    assert W.shape == (4, 8, 8)


def test_module_arguments_are_checked():
    with pytest.raises(ValueError, match="rngs=nnx.Rngs"):
        FeatureMap("glu", num_heads=2, head_dim=4)
    with pytest.raises(ValueError, match="not both"):
        FeatureMap("glu", num_heads=2, head_dim=4, seed=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs num_heads and head_dim"):
        FeatureMap("glu", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="not a multiple of num_heads"):
        MultiheadLinearAttention(30, 4, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="feature_map must be"):
        MultiheadLinearAttention(32, 4, feature_map=3, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="expects a kernelattn.FeatureMap"):
        FeatureMap.from_feature_map("glu")
    attn = MultiheadLinearAttention(16, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, D\)"):
        attn(jnp.ones((2, 2, 5, 8), jnp.float32))


# ---------------------------------------------------------------------------- attention and block


def _manual_attention(attn, x, context, key_mask, causal):
    """Projections and kernelattn's core, written out."""
    B, N, _ = x.shape
    H, d = attn.num_heads, attn.head_dim

    def heads(y):
        return jnp.swapaxes(jnp.reshape(y, (B, y.shape[1], H, d)), 1, 2)

    q = heads(x @ attn.query.kernel[...] + attn.query.bias[...])
    k = heads(context @ attn.key.kernel[...] + attn.key.bias[...])
    v = heads(context @ attn.value.kernel[...] + attn.value.bias[...])
    out = ka.linear_attention(q, k, v, feature_map=attn.feature_map.as_feature_map(), causal=causal,
                              key_mask=key_mask, backend="agnostic")
    out = jnp.reshape(jnp.swapaxes(out, 1, 2), (B, N, H * d))
    return out @ attn.out.kernel[...] + attn.out.bias[...]


# jitted (one compilation each instead of many small eager ones)
_call = nnx.jit(lambda module, *args, **kwargs: module(*args, **kwargs))
_manual = nnx.jit(lambda attn, x, context, key_mask, causal: _manual_attention(attn, x, context, key_mask, causal),
                  static_argnums=4)


@pytest.mark.slow_where(causal=True)  # quick: causal in test_modules_reference.py::test_flax_module_matches_definition
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_multihead_attention_equals_the_formula(causal):
    attn = MultiheadLinearAttention(24, 3, feature_map="glu", depth=2, causal=causal, rngs=nnx.Rngs(0))
    x = _x((2, 11, 24))
    mask = jnp.asarray(np.random.default_rng(1).random((2, 11)) > 0.3)
    out = _call(attn, x, key_mask=mask)
    assert out.shape == (2, 11, 24) and out.dtype == jnp.float32
    assert rel_rms_error(out, _manual(attn, x, x, mask, causal)) <= 1e-5
    if causal:  # appending tokens never changes earlier outputs
        longer = jnp.concatenate([x, _x((2, 5, 24), seed=3)], axis=1)
        assert rel_rms_error(_call(attn, longer)[:, :11], _call(attn, x)) <= 1e-5


def test_cross_attention_and_padding():
    attn = MultiheadLinearAttention(16, 2, head_dim=5, out_features=7, feature_map="favor", rngs=nnx.Rngs(2))
    x, context = _x((2, 6, 16)), _x((2, 13, 16), seed=1)
    mask = np.ones((2, 13), bool)
    mask[1, 9:] = False
    mask = jnp.asarray(mask)
    out = _call(attn, x, context, key_mask=mask)
    assert out.shape == (2, 6, 7)
    assert rel_rms_error(out, _manual(attn, x, context, mask, False)) <= 1e-5
    noisy = context.at[1, 9:].set(100.0)  # padded tokens' content never matters
    assert rel_rms_error(_call(attn, x, noisy, key_mask=mask), out) <= 1e-6


@pytest.mark.slow  # the torch block's twin in test_torch_nn.py stays quick
def test_encoder_block_is_pre_layernorm():
    block = EncoderBlock(16, 2, mlp_features=24, dropout=0.5, feature_map="aoglu", rank=2, rngs=nnx.Rngs(0))
    x = _x((2, 9, 16))
    block.eval()
    out = _call(block, x)

    @nnx.jit
    def formula(block, x):
        h = x + block.attention(block.norm1(x))
        return h + block.mlp_out(jax.nn.gelu(block.mlp_in(block.norm2(h))))

    assert rel_rms_error(out, formula(block, x)) <= 1e-6
    block.train()  # dropout on: a different output, still finite
    noisy = _call(block, x)
    assert np.all(np.isfinite(np.asarray(noisy))) and rel_rms_error(noisy, out) > 1e-3


@pytest.mark.slow  # quick tier: jax.grad through the core (test_autodiff.py), which the module's gradient is
def test_module_gradients_match_the_core(monkeypatch):
    """nnx.grad through the modules with the JAX fast path equals the array-API core's."""
    block = EncoderBlock(16, 2, feature_map="glu", causal=True, dropout=0.0, rngs=nnx.Rngs(0))
    x = _x((2, 37, 16))
    mask = jnp.asarray(np.random.default_rng(1).random((2, 37)) > 0.2)

    def loss(block):
        return jnp.sum(block(x, key_mask=mask) ** 2)

    def grads():  # a new jitted function each time: the dispatch decision is taken while tracing
        _dispatch.clear_cache()
        return jax.tree_util.tree_leaves(nnx.jit(nnx.grad(loss))(block))

    fast = grads()
    assert ka.explain_dispatch("linear_attention", x, causal=True, method="auto", masked=True,
                               kind="glu").backend == "jax"
    monkeypatch.setenv(_dispatch.DISABLE_ENV, "1")
    core = grads()
    monkeypatch.delenv(_dispatch.DISABLE_ENV)
    _dispatch.clear_cache()
    assert len(fast) == len(core) == 18  # 4 projections, 2 norms, 2 MLP layers (kernel + bias each), W and G
    for a, b in zip(fast, core):
        assert rel_rms_error(a, b) <= 1e-5
    kernel_grads = jax.tree_util.tree_leaves(nnx.state(nnx.jit(nnx.grad(loss))(block).attention.feature_map))
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in kernel_grads)


@pytest.mark.slow  # a training loop; quick: test_module_gradients_match_the_core
def test_nnx_optimizer_trains_the_kernel_and_skips_buffers():
    model = MultiheadLinearAttention(16, 2, feature_map="favor", rngs=nnx.Rngs(0))
    glu = MultiheadLinearAttention(16, 2, feature_map="glu", rngs=nnx.Rngs(0))
    x, target = _x((4, 10, 16)), _x((4, 10, 16), seed=1)
    for m in (model, glu):
        optimizer = nnx.Optimizer(m, optax.adam(1e-2), wrt=nnx.Param)
        before = jax.tree_util.tree_map(np.asarray, nnx.state(m.feature_map))

        @nnx.jit
        def step(m, optimizer):
            loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(m)
            optimizer.update(m, grads)
            return loss

        losses = [float(step(m, optimizer)) for _ in range(30)]
        assert losses[-1] < 0.9 * losses[0]
        after = jax.tree_util.tree_map(np.asarray, nnx.state(m.feature_map))
        changed = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before),
                                                             jax.tree_util.tree_leaves(after))]
        if m is model:  # FAVOR+'s projection is a Buffer: not trained
            assert changed == [False]
        else:
            assert changed and all(changed)


# ---------------------------------------------------------------------------- plain pytrees + optax


@pytest.mark.slow  # a training loop; quick: test_nnx_optimizer_trains_the_kernel_and_skips_buffers
def test_optax_trains_a_plain_feature_map():
    H, d = 2, 8
    q, k, v = (_x((4, H, 16, d), seed=s) for s in range(3))
    target = ka.softmax_attention(q, k, v, causal=True)
    phi = ka.feature_map("aoglu", num_heads=H, head_dim=d, depth=2, seed=0, xp=jnp)
    tx = optax.adam(1e-2)
    state = tx.init(phi)

    def loss_fn(phi):
        out = ka.linear_attention(q, k, v, feature_map=phi, causal=True, chunk_size=4)
        return jnp.mean((out - target) ** 2) + ka.orthogonality_penalty(phi, weight=1e-3)

    @jax.jit
    def step(phi, state):
        loss, grads = jax.value_and_grad(loss_fn)(phi)
        updates, state = tx.update(grads, state, phi)
        return optax.apply_updates(phi, updates), state, loss, grads

    first = None
    for _ in range(40):
        phi, state, loss, grads = step(phi, state)
        first = float(loss) if first is None else first
    assert isinstance(grads, ka.FeatureMap) and grads.spec == phi.spec
    assert isinstance(phi, ka.FeatureMap) and all(a.dtype == jnp.float32 for a in phi.parameters())
    assert float(loss) < 0.8 * first


def _load_example():
    spec = importlib.util.spec_from_file_location("train_flax_optax", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # a long end-to-end run
def test_training_example_runs_and_learns(capsys):
    example = _load_example()
    result = example.main(["--steps", "60", "--fit-steps", "30"])
    clf, fit = result["classifier"], result["fit"]
    assert clf["last_loss"] < 0.5 * clf["first_loss"]
    assert clf["accuracy"] > 0.8
    assert fit["last_loss"] < 0.9 * fit["first_loss"]
    assert isinstance(fit["feature_map"], ka.FeatureMap)
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed and "done in" in printed
