"""The torch and Flax attention modules against the float64 definition, gradients included.

The reference layer is the module's own projections in float64 around the
definition of linear attention (kernelattn.testing), differentiated by the
framework's autodiff in float64; the module runs in float32 on its fast paths.
Left padding with a causal mask gives rows with nothing to attend to.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import kernelattn as ka
from kernelattn import testing

B, N, E, H = 3, 19, 16, 2
D = E // H


def _mask():
    keep = np.ones((B, N), dtype=bool)
    keep[0, :5] = False       # left padding: causal rows 0..4 attend to nothing
    keep[1, N - 6:] = False   # right padding
    return keep


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_torch_module_matches_definition(causal):
    import array_api_compat.torch as txp
    import torch
    from kernelattn.backends.torch_nn import MultiheadLinearAttention

    attn = MultiheadLinearAttention(E, H, feature_map="glu", depth=2, causal=causal, seed=0)
    attn.eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, N, E))
    w = rng.standard_normal((B, N, E))
    keep = _mask()
    with torch.enable_grad():
        xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
        out, _ = attn(xt, key_padding_mask=torch.tensor(~keep))
        (out * torch.tensor(w, dtype=torch.float32)).sum().backward()
        ref = copy.deepcopy(attn).double()
        x64 = torch.tensor(x, requires_grad=True)
        heads = [ref._heads(x64, p) for p in (ref.q_proj, ref.k_proj, ref.v_proj)]
        o, _ = testing._ref_forward(*heads, ref.feature_map.as_feature_map(), causal, torch.tensor(keep), 1e-6,
                                    None, None, lambda a: a, txp)
        y = ref.out_proj(o.transpose(1, 2).reshape(B, N, E))
        (y * torch.tensor(w)).sum().backward()
    assert rel(out.detach(), y.detach()) < 1e-5
    # valid query rows: padded query rows are the user's padding, their outputs are not read
    assert rel(xt.grad, x64.grad) < 1e-4
    for (name, p), (_, p64) in zip(attn.named_parameters(), ref.named_parameters()):
        assert torch.isfinite(p.grad).all(), name
        assert rel(p.grad, p64.grad) < 1e-4, f"{name}: {rel(p.grad, p64.grad):.2e}"


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.slow  # quick tier: test_jax_nn.py's formula test and the new-kind Flax test (causal)
def test_flax_module_matches_definition(causal):
    import flax.nnx as nnx  # flax, like torch, is in the test extra: missing means failing
    import jax
    import jax.numpy as jnp
    import jax.numpy as jxp  # JAX arrays carry the array API themselves
    from kernelattn.backends.jax_nn import MultiheadLinearAttention

    jax.config.update("jax_enable_x64", True)
    attn = MultiheadLinearAttention(E, H, feature_map="glu", depth=2, causal=causal, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, N, E))
    w = rng.standard_normal((B, N, E))
    keep = jnp.asarray(_mask())
    graph, params = nnx.split(attn)

    def loss(params, x):
        model = nnx.merge(graph, params)
        return jnp.sum(model(x, key_mask=keep) * w)

    def ref_loss(params, x):
        model = nnx.merge(graph, params)
        heads = [model._heads(lin(x)) for lin in (model.query, model.key, model.value)]
        o, _ = testing._ref_forward(*heads, model.feature_map.as_feature_map(), causal, keep, 1e-6, None, None,
                                    lambda a: a, jxp)
        y = model.out(jnp.reshape(jnp.swapaxes(o, 1, 2), (B, N, E)))
        return jnp.sum(y * w)

    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    p64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
    val, (g, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(p32, jnp.asarray(x, jnp.float32))
    want, (g64, gx64) = jax.value_and_grad(ref_loss, argnums=(0, 1))(p64, jnp.asarray(x, jnp.float64))
    assert abs(float(val) - float(want)) <= 1e-4 * abs(float(want)) + 1e-4
    assert rel(gx, gx64) < 1e-4
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g64)):
        assert np.isfinite(np.asarray(a)).all()
        assert rel(a, b) < 1e-4
