"""Bad input gets a clear error naming the argument and what was expected."""

from __future__ import annotations

import numpy as np
import pytest

import kernelattn as ka

rng = np.random.default_rng(0)
Q = rng.standard_normal((2, 4, 6, 8)).astype(np.float32)
K = rng.standard_normal((2, 4, 6, 8)).astype(np.float32)
V = rng.standard_normal((2, 4, 6, 8)).astype(np.float32)
PHI = ka.feature_map("glu", num_heads=4, head_dim=8, seed=0)


def call(**over):
    args = dict(q=Q, k=K, v=V)
    kw = dict(feature_map=PHI)
    for name, value in over.items():
        (args if name in args else kw)[name] = value
    return ka.linear_attention(args["q"], args["k"], args["v"], **kw)


BAD = [
    # (overrides, exception, words that must appear in the message)
    (dict(q=Q[0]), ValueError, ["q", "4 dimensions", "(B, H, N, d)"]),
    (dict(k=K[None]), ValueError, ["k", "4 dimensions"]),
    (dict(k=K[:1]), ValueError, ["batch"]),
    (dict(v=V[:, :2]), ValueError, ["head"]),
    (dict(k=np.ones((2, 4, 6, 5), np.float32)), ValueError, ["head dim d"]),
    (dict(v=V[:, :, :4]), ValueError, ["same length L"]),
    (dict(k=K[:, :, :5], v=V[:, :, :5], causal=True), ValueError, ["causal", "N = L", "N=6", "L=5"]),
    (dict(key_mask=np.ones((2, 5), bool)), ValueError, ["key_mask", "(B, L)", "(2, 6)"]),
    (dict(key_mask=np.ones((2, 6), np.float32)), TypeError, ["key_mask", "bool"]),
    (dict(q=Q.astype(np.int32)), TypeError, ["q", "real floating", "int32"]),
    (dict(v=V.astype(np.complex64)), TypeError, ["v", "real floating", "complex64"]),
    (dict(k=K.astype(np.float64)), TypeError, ["share one dtype"]),
    (dict(q=Q.tolist()), TypeError, ["q must be an array", "list"]),
    (dict(feature_map="softmax"), ValueError, ["unknown feature map", "'softmax'"]),
    (dict(feature_map="glu"), ValueError, ["has parameters", "ka.feature_map"]),
    (dict(feature_map=3), TypeError, ["feature_map"]),
    (dict(feature_map=ka.feature_map("glu", num_heads=2, head_dim=8, seed=0)), ValueError,
     ["num_heads=2", "4 heads"]),
    (dict(feature_map=ka.feature_map("glu", num_heads=4, head_dim=16, seed=0)), ValueError,
     ["head_dim=16", "d=8"]),
    (dict(eps=-1.0), ValueError, ["eps"]),
    (dict(chunk_size=0), ValueError, ["chunk_size", "positive integer"]),
    (dict(method="fast"), ValueError, ["method", "'fast'"]),
    (dict(backend="tensorflow"), ValueError, ["unknown backend", "'tensorflow'", "agnostic"]),
    (dict(backend="torch"), ValueError, ["backend='torch'", "numpy arrays"]),
    (dict(initial_state=(np.zeros((2, 4, 8)), np.zeros((2, 4, 8)))), ValueError, ["state.S", "(B, H, m, e)"]),
]


@pytest.mark.parametrize("over,exc,words", BAD, ids=[f"{i}-{'-'.join(o)}" for i, (o, _, _) in enumerate(BAD)])
def test_bad_input_is_named(over, exc, words):
    with pytest.raises(exc) as info:
        call(**over)
    msg = str(info.value)
    for word in words:
        assert word in msg, f"{word!r} not in {msg!r}"


def test_mixed_libraries_are_rejected():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"different libraries.*k is torch"):
        ka.linear_attention(Q, torch.asarray(K), V)
    with pytest.raises(TypeError, match=r"key_mask is torch"):
        ka.linear_attention(Q, K, V, key_mask=torch.ones((2, 6), dtype=torch.bool))
    with pytest.raises(TypeError, match=r"feature map parameters are numpy arrays but q is a torch"):
        tq = torch.asarray(Q)
        ka.linear_attention(tq, tq, tq, feature_map=PHI)
    with pytest.raises(TypeError, match=r"different libraries"):
        ka.softmax_attention(Q, K, torch.asarray(V))


def test_two_devices_are_rejected():
    xps = pytest.importorskip("array_api_strict")
    a = xps.asarray(Q)
    b = xps.asarray(K, device=xps.Device("device1"))
    with pytest.raises(ValueError, match=r"k is on device .*device1.* q is on"):
        ka.linear_attention(a, b, a)
    phi = ka.feature_map("glu", num_heads=4, head_dim=8, seed=0, like=b)
    with pytest.raises(ValueError, match="feature map parameters"):
        ka.linear_attention(a, a, a, feature_map=phi)


def test_feature_map_construction_errors():
    with pytest.raises(ValueError, match="unknown feature-map kind 'mlp'"):
        ka.feature_map("mlp", num_heads=2, head_dim=4)
    with pytest.raises(ValueError, match="needs num_heads and head_dim"):
        ka.feature_map("glu")
    with pytest.raises(ValueError, match="depth must be a positive integer"):
        ka.feature_map("glu", num_heads=2, head_dim=4, depth=0)
    with pytest.raises(ValueError, match="depth applies to"):
        ka.feature_map("favor", num_heads=2, head_dim=4, depth=2)
    with pytest.raises(ValueError, match="rank applies to 'aoglu' only"):
        ka.feature_map("glu", num_heads=2, head_dim=4, rank=2)
    with pytest.raises(ValueError, match="even"):
        ka.feature_map("hedgehog", num_heads=2, head_dim=4, feature_dim=5)
    with pytest.raises(TypeError, match="seed"):
        ka.feature_map("glu", num_heads=2, head_dim=4, seed="zero")
    with pytest.raises(TypeError, match="real floating"):
        ka.feature_map("glu", num_heads=2, head_dim=4, dtype="int32")
    with pytest.raises(ValueError, match="no weights, so no bias"):
        ka.feature_map("elu", bias=True)
    with pytest.raises(TypeError, match="num_heads must be a positive integer; got 2.5"):
        ka.feature_map("glu", num_heads=2.5, head_dim=4)


def test_feature_map_call_errors():
    with pytest.raises(ValueError, match=r"x must have 4 dimensions"):
        PHI(Q[0])
    with pytest.raises(TypeError, match=r"x must have a real floating dtype"):
        PHI(Q.astype(np.int64))
    with pytest.raises(ValueError, match=r"num_heads=4, but x has 2 heads"):
        PHI(Q[:, :2])


def test_step_shape_errors():
    with pytest.raises(ValueError, match="q is one token"):
        ka.linear_attention_step(Q[:, :, 0], K, V[:, :, 0])
    with pytest.raises(TypeError, match="LinearAttentionState"):
        ka.linear_attention_step(Q, K, V, state=np.zeros(3))


def test_softmax_errors():
    with pytest.raises(ValueError, match="scale"):
        ka.softmax_attention(Q, K, V, scale=-1.0)
    with pytest.raises(ValueError, match="N = L"):
        ka.softmax_attention(Q, K[:, :, :3], V[:, :, :3], causal=True)
