"""One vocabulary across frameworks: the torch and Flax modules share kernelattn's argument names and defaults.

The torch modules' old names (``kernel=``, ``kernel_bias=``, ``kernel_dropout=``) and Flax's ``kernel_bias=``
stay as deprecated aliases: they warn, naming the new argument, and build the same module; old and new
together are a TypeError. docs/guide/modules.rst lists every argument.
"""

from __future__ import annotations

import inspect
import pathlib
import re
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nnx = pytest.importorskip("flax.nnx")
jax = pytest.importorskip("jax")

from kernelattn.backends import jax_nn, torch_nn  # noqa: E402

#: kernelattn's own arguments: one name and one default in both frameworks
SHARED = {"feature_map", "feature_dim", "depth", "rank", "tied", "feature_map_bias", "causal", "eps", "chunk_size"}
#: kernelattn's arguments only the torch modules have (docs/guide/modules.rst says why)
TORCH_ONLY = {"feature_map_dropout", "seed"}
#: the frameworks' own arguments, spelled as torch.nn.MultiheadAttention / TransformerEncoderLayer and
#: flax.nnx.MultiHeadAttention spell them
TORCH_NATIVE = {
    torch_nn.MultiheadLinearAttention: {"embed_dim", "num_heads", "batch_first", "dropout", "bias", "kdim", "vdim",
                                        "device", "dtype"},
    torch_nn.LinearTransformerEncoderLayer: {"d_model", "nhead", "dim_feedforward", "dropout", "activation",
                                             "layer_norm_eps", "batch_first", "bias", "device", "dtype"},
}
FLAX_NATIVE = {
    jax_nn.MultiheadLinearAttention: {"in_features", "num_heads", "head_dim", "out_features", "use_bias", "rngs"},
    jax_nn.EncoderBlock: {"features", "num_heads", "mlp_features", "dropout", "rngs", "attention_options"},
}
PAIRS = [(torch_nn.MultiheadLinearAttention, jax_nn.MultiheadLinearAttention),
         (torch_nn.LinearTransformerEncoderLayer, jax_nn.EncoderBlock)]
PAIR_IDS = ["MultiheadLinearAttention", "encoder"]
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "guide" / "modules.rst"


def _params(cls):
    return {name: p for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self"}


# ---------------------------------------------------------------------------- signatures


@pytest.mark.parametrize("torch_cls,flax_cls", PAIRS, ids=PAIR_IDS)
def test_shared_arguments_have_one_name_and_one_default(torch_cls, flax_cls):
    t, f = _params(torch_cls), _params(flax_cls)
    assert SHARED <= set(t) and SHARED <= set(f), (SHARED - set(t), SHARED - set(f))
    for name in SHARED:
        assert t[name].default == f[name].default, (name, t[name].default, f[name].default)
        assert t[name].kind is f[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    # any name the two share means the same and defaults the same (dropout: the feedforward sublayer's)
    for name in (set(t) & set(f)) - {"num_heads"}:
        assert t[name].default == f[name].default, name


@pytest.mark.parametrize("torch_cls,flax_cls", PAIRS, ids=PAIR_IDS)
def test_every_argument_is_shared_native_or_documented_torch_only(torch_cls, flax_cls):
    # a new kernel option added to one framework only fails here until it is added to the other (or listed)
    assert set(_params(torch_cls)) - TORCH_NATIVE[torch_cls] - SHARED == TORCH_ONLY
    assert set(_params(flax_cls)) - FLAX_NATIVE[flax_cls] == SHARED


@pytest.mark.parametrize("cls", [c for pair in PAIRS for c in pair], ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_old_names_are_not_in_the_signatures(cls):
    assert not [name for name in _params(cls) if name.startswith("kernel")]


def test_the_docs_page_lists_every_argument_and_alias():
    listed = set(re.findall(r"``(\w+)=?``", DOCS.read_text(encoding="utf-8")))
    names = {name for pair in PAIRS for cls in pair for name in _params(cls)} - {"attention_options"}
    assert names <= listed, names - listed
    assert {"kernel", "kernel_bias", "kernel_dropout"} <= listed


def test_torch_positional_order_is_kept():
    names = list(_params(torch_nn.LinearTransformerEncoderLayer))
    assert names[:4] == ["d_model", "nhead", "dim_feedforward", "dropout"]
    layer = torch_nn.LinearTransformerEncoderLayer(16, 2, 32, 0.25, seed=0)
    assert layer.linear1.out_features == 32 and layer.dropout1.p == 0.25 and layer.self_attn.dropout == 0.25


# ---------------------------------------------------------------------------- deprecated aliases


def _torch_state(build):
    torch.manual_seed(0)  # the projections use torch's RNG; the kernel its seed
    return build().state_dict()


def _same_torch(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


TORCH_ALIASES = [
    (torch_nn.MultiheadLinearAttention, "kernel", "feature_map", "aoglu"),
    (torch_nn.MultiheadLinearAttention, "kernel_bias", "feature_map_bias", True),
    (torch_nn.LinearTransformerEncoderLayer, "kernel", "feature_map", "ffn"),
    (torch_nn.LinearTransformerEncoderLayer, "kernel_bias", "feature_map_bias", True),
    (torch_nn.LinearTransformerEncoderLayer, "kernel_dropout", "feature_map_dropout", 0.3),
]


@pytest.mark.parametrize("cls,old,new,value", TORCH_ALIASES,
                         ids=[f"{c.__name__}-{o}" for c, o, _, _ in TORCH_ALIASES])
def test_torch_alias_warns_and_builds_the_same_module(cls, old, new, value):
    with pytest.warns(DeprecationWarning, match=rf"^{old}= is deprecated; use {new}=$") as record:
        via_old = _torch_state(lambda: cls(16, 2, depth=2, seed=3, **{old: value}))
    assert len(record) == 1 and record[0].filename == __file__  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        via_new = _torch_state(lambda: cls(16, 2, depth=2, seed=3, **{new: value}))
    _same_torch(via_old, via_new)
    if old == "kernel_dropout":
        with pytest.warns(DeprecationWarning):
            assert cls(16, 2, **{old: value}).self_attn.dropout == value


@pytest.mark.parametrize("cls,old,new,value", TORCH_ALIASES,
                         ids=[f"{c.__name__}-{o}" for c, o, _, _ in TORCH_ALIASES])
def test_torch_old_and_new_together_is_a_type_error(cls, old, new, value):
    with pytest.raises(TypeError, match=rf"^{old}= and {new}= were both given; {old}= is the deprecated name"):
        cls(16, 2, **{old: value, new: value})


def test_torch_attention_dropout_is_the_nn_multiheadattention_spelling_of_feature_map_dropout():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not deprecated: ported nn.MultiheadAttention code passes dropout=
        a = torch_nn.MultiheadLinearAttention(16, 2, dropout=0.3)
    b = torch_nn.MultiheadLinearAttention(16, 2, feature_map_dropout=0.3)
    assert a.dropout == b.dropout == 0.3
    assert torch_nn.MultiheadLinearAttention(16, 2).dropout == 0.0
    with pytest.raises(TypeError, match=r"^dropout= and feature_map_dropout= were both given"):
        torch_nn.MultiheadLinearAttention(16, 2, dropout=0.1, feature_map_dropout=0.1)


def test_torch_errors_name_the_new_arguments():
    with pytest.raises(TypeError, match=r"^feature_map must be a kind name"):
        torch_nn.MultiheadLinearAttention(16, 2, feature_map=3)
    with pytest.raises(ValueError, match=r"^feature_map was built for num_heads=4"):
        torch_nn.MultiheadLinearAttention(8, 2, feature_map=torch_nn.FeatureMap("glu", 4, 2, seed=0))
    with pytest.raises(TypeError, match=r"^feature_map_bias must be"):
        torch_nn.MultiheadLinearAttention(16, 2, feature_map_bias="yes")
    with pytest.raises(ValueError, match=r"^feature_map_dropout must be"), pytest.warns(DeprecationWarning):
        torch_nn.LinearTransformerEncoderLayer(16, 2, 32, kernel_dropout=1.5)


FLAX_CLASSES = [jax_nn.MultiheadLinearAttention, jax_nn.EncoderBlock]


def _flax_leaves(module):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(nnx.state(module, nnx.Param))]


@pytest.mark.parametrize("cls", FLAX_CLASSES, ids=lambda c: c.__name__)
def test_flax_kernel_bias_warns_and_builds_the_same_module(cls):
    with pytest.warns(DeprecationWarning, match=r"^kernel_bias= is deprecated; use feature_map_bias=$") as record:
        via_old = cls(16, 2, feature_map="glu", depth=2, kernel_bias=True, rngs=nnx.Rngs(0))
    assert len(record) == 1 and record[0].filename == __file__  # past Flax's metaclass
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        via_new = cls(16, 2, feature_map="glu", depth=2, feature_map_bias=True, rngs=nnx.Rngs(0))
    a, b = _flax_leaves(via_old), _flax_leaves(via_new)
    assert len(a) == len(b) > len(_flax_leaves(cls(16, 2, feature_map="glu", depth=2, rngs=nnx.Rngs(0))))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(TypeError, match=r"^kernel_bias= and feature_map_bias= were both given"):
        cls(16, 2, kernel_bias=True, feature_map_bias=True, rngs=nnx.Rngs(0))


@pytest.mark.slow  # builds Flax modules (compiles); the signatures are compared in the quick tier
def test_flax_block_passes_the_shared_options_to_its_attention():
    block = jax_nn.EncoderBlock(16, 2, feature_map="aoglu", depth=2, rank=3, tied=False, causal=True, eps=1e-5,
                                chunk_size=8, head_dim=4, rngs=nnx.Rngs(0))
    attn = block.attention
    assert (attn.causal, attn.eps, attn.chunk_size, attn.head_dim) == (True, 1e-5, 8, 4)
    spec = attn.feature_map.spec
    assert (spec.kind, spec.depth, spec.rank, spec.tied) == ("aoglu", 2, 3, False)
