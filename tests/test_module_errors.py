"""Wrong calls of the PyTorch and Flax modules: one clear line naming the argument.

Flags must be real booleans (``is_causal="False"`` was accepted, and
``need_weights="False"`` read as True); inputs of the wrong kind, dtype or
width are refused before any projection runs.
"""

from __future__ import annotations

import numpy as np
import pytest

import flax.nnx as nnx
import jax.numpy as jnp
import torch

from kernelattn.backends.jax_nn import EncoderBlock
from kernelattn.backends.jax_nn import MultiheadLinearAttention as JaxAttention
from kernelattn.backends.torch_nn import FeatureMap, LinearTransformerEncoderLayer, MultiheadLinearAttention

B, N, E = 2, 5, 16


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


X = _x(B, N, E)

# (call, kwargs, error type, message pattern)
TORCH_CASES = [
    ("forward", dict(query=X, is_causal="False"), TypeError, r"^is_causal must be a bool \(True or False\); got 'False'$"),
    ("forward", dict(query=X, need_weights="False"), TypeError, r"^need_weights must be a bool .*got 'False'$"),
    ("forward", dict(query=X, need_weights=None), TypeError, r"^need_weights must be a bool .*got None$"),
    ("forward", dict(query=X, average_attn_weights=1), TypeError, r"^average_attn_weights must be a bool .*got 1$"),
    ("forward", dict(query=X.tolist()), TypeError, r"^query must be a torch\.Tensor; got a list "),
    ("forward", dict(query=None), TypeError, r"^query must be a torch\.Tensor; got None$"),
    ("forward", dict(query=X, key=np.zeros((B, N, E))), TypeError, r"^key must be a torch\.Tensor; got a ndarray"),
    ("forward", dict(query=X, key=X, value="v"), TypeError, r"^value must be a torch\.Tensor; got 'v'$"),
    ("forward", dict(query=X.int()), TypeError, r"^query must be a floating tensor .*got torch\.int32$"),
    ("forward", dict(query=_x(B, N, 8)), ValueError, r"^query must have embed_dim=16 features in its last dimension; "
                                                     r"got shape \(2, 5, 8\)$"),
    ("forward", dict(query=X, key=_x(B, N, 8)), ValueError, r"^key must have kdim=16 features"),
    ("forward", dict(query=X, key=_x(3, N, E)), ValueError, r"^query, key and value must have one batch size"),
    ("forward", dict(query=X, key=_x(B, 4, E), value=X), ValueError, r"^key and value must have the same sequence length"),
    ("forward", dict(query=X, key=X[0]), ValueError, r"^query, key and value must all be batched \(3-D\) or all "),
    ("forward", dict(query=_x(B, N, 1, E)), ValueError, r"^query must be \(batch, seq, feature\)"),
    ("forward", dict(query=X, key_padding_mask=[[True] * N] * B), TypeError, r"^key_padding_mask must be a boolean "
                                                                             r"tensor .*got list$"),
    ("forward", dict(query=X, key_padding_mask=torch.zeros(B, N)), TypeError, r"^key_padding_mask must be a boolean "
                                                                              r"tensor .*got torch\.float32$"),
    ("forward", dict(query=X, need_weights=True), ValueError, r"^need_weights=True is not supported"),
    ("step", dict(query=X.tolist()), TypeError, r"^query must be a torch\.Tensor; got a list "),
    ("step", dict(query=X[:, 0], key=None, value=[1.0]), TypeError, r"^value must be a torch\.Tensor; got a list"),
    ("step", dict(query=X, key_padding_mask=[True]), TypeError, r"^key_padding_mask must be a boolean tensor"),
    ("layer", dict(src=None), TypeError, r"^src must be a torch\.Tensor; got None$"),
    ("layer", dict(src=X, is_causal="True"), TypeError, r"^is_causal must be a bool .*got 'True'$"),
    ("layer", dict(src=_x(B, N, 4)), ValueError, r"^src must have d_model=16 features"),
    ("layer_step", dict(x=X.tolist()), TypeError, r"^x must be a torch\.Tensor; got a list"),
    ("fmap", dict(x=[1.0]), TypeError, r"^x must be a torch\.Tensor; got a list"),
]


def _torch_call(which):
    attn = MultiheadLinearAttention(E, 2, feature_map="glu", causal=True, seed=0)
    layer = LinearTransformerEncoderLayer(E, 2, 32, causal=True, seed=0)
    return {"forward": attn, "step": attn.step, "layer": layer, "layer_step": layer.step,
            "fmap": FeatureMap("glu", 2, 8, seed=0)}[which]


@pytest.mark.parametrize("which, kwargs, kind, pattern", TORCH_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(TORCH_CASES)])
def test_torch_module_errors(which, kwargs, kind, pattern):
    with pytest.raises(kind, match=pattern) as info:
        _torch_call(which)(**kwargs)
    assert "\n" not in str(info.value)


def test_torch_flags_still_take_numpy_bools():
    attn = MultiheadLinearAttention(E, 2, feature_map="glu", seed=0)
    want = attn(X, is_causal=True)[0]
    got = attn(X, is_causal=np.bool_(True), need_weights=np.bool_(False))[0]
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------
# Flax NNX


def _jax_cases():
    x = jnp.ones((B, N, E), jnp.float32)
    return [
        ("attn", dict(x=None), TypeError, r"^x must be a JAX array of shape \(B, N, D\), D = in_features = 16; got None$"),
        ("attn", dict(x=[[1.0] * E]), TypeError, r"^x must be a JAX array .*got a list"),
        ("attn", dict(x=jnp.ones((B, N, 8))), ValueError, r"^x must have shape \(B, N, D\), D = in_features = 16; "
                                                          r"got \(2, 5, 8\)$"),
        ("attn", dict(x=jnp.ones((N, E))), ValueError, r"^x must have shape \(B, N, D\)"),
        ("attn", dict(x=jnp.ones((B, N, E), jnp.int32)), TypeError, r"^x must have a floating dtype; got int32$"),
        ("attn", dict(x=x, context="c"), TypeError, r"^context must be a JAX array"),
        ("attn", dict(x=x, context=jnp.ones((3, 4, E))), ValueError, r"^x and context must have one batch size"),
        ("attn", dict(x=x, key_mask=[True]), TypeError, r"^key_mask must be an array"),
        ("attn", dict(x=x, key_mask=jnp.ones((B, 4), bool)), ValueError, r"^key_mask must have shape \(B, L\) = \(2, 5\)"),
        ("block", dict(x=None), TypeError, r"^x must be a JAX array of shape \(B, N, D\), D = features = 16; got None$"),
        ("block", dict(x=jnp.ones((B, N, 4))), ValueError, r"^x must have shape \(B, N, D\), D = features = 16"),
    ]


JAX_IDS = ["attn-none", "attn-list", "attn-width", "attn-2d", "attn-int", "attn-context-str", "attn-context-batch",
           "attn-mask-list", "attn-mask-shape", "block-none", "block-width"]


@pytest.mark.parametrize("case", range(len(JAX_IDS)), ids=JAX_IDS)
def test_flax_module_errors(case):
    which, kwargs, kind, pattern = _jax_cases()[case]
    module = (JaxAttention(E, 2, rngs=nnx.Rngs(0)) if which == "attn"
              else EncoderBlock(E, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(kind, match=pattern) as info:
        module(**kwargs)
    assert "\n" not in str(info.value)


def test_flax_module_takes_numpy_and_traced_inputs():
    attn = JaxAttention(E, 2, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).standard_normal((B, N, E)).astype(np.float32)
    eager = attn(jnp.asarray(x))
    assert np.allclose(attn(x), eager, atol=1e-6)
    assert np.allclose(nnx.jit(lambda m, x: m(x))(attn, jnp.asarray(x)), eager, atol=1e-5)
