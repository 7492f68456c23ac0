"""Clear errors at the edges of the Python API, and valid inputs accepted.

Every refused input raises ValueError or TypeError in one line naming the
argument, the value received and what is allowed. Each row of the tables
below failed before (an unclear error from deep inside, or a bad input
accepted silently); the last tests hold inputs that used to be refused.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import kernelattn as ka
from kernelattn import losses, optim
from kernelattn._convert import to_numpy

rng = np.random.default_rng(0)
Q, K, V = rng.standard_normal((3, 2, 4, 6, 8)).astype(np.float32)
PHI = ka.feature_map("glu", num_heads=4, head_dim=8, seed=0)
PHI16 = ka.feature_map("glu", num_heads=4, head_dim=8, feature_dim=16, seed=0)
STATE = (np.zeros((2, 4, 8, 8), np.float32), np.zeros((2, 4, 8), np.float32))
STRING_WEIGHTS = PHI.replace(params={"shared": [{"W": "abc", "G": PHI.params["shared"][0]["G"]}]})
Q1, K1, V1 = Q[:, :, 0], K[:, :, 0], V[:, :, 0]
ARRAY = r"must be an array \(NumPy, PyTorch, JAX"
BOOL = r"must be a bool \(True or False\); got "
SEED = r"seed must be None, a non-negative integer or a numpy\.random\.Generator; got "


def _state(dtype, m=8):
    return np.zeros((2, 4, m, 8), dtype), np.zeros((2, 4, m), dtype)


def _fit(**kw):
    return ka.fit_feature_map(PHI, Q, K, **{"steps": 2, **kw})


# (id, call, exception, regex that the one-line message must match)
BAD = [
    # arrays that are not arrays
    ("linear_attention q=None", lambda: ka.linear_attention(None, K, V), TypeError, rf"^q {ARRAY}.*got None$"),
    ("linear_attention_step q=None", lambda: ka.linear_attention_step(None, K, V), TypeError, rf"^q {ARRAY}.*got None"),
    ("softmax_attention q=None", lambda: ka.softmax_attention(None, K, V), TypeError, rf"^q {ARRAY}.*got None"),
    ("attention_kl q=None", lambda: losses.attention_kl(PHI, None, K), TypeError, rf"^q {ARRAY}.*got None"),
    ("fit_feature_map q=None", lambda: ka.fit_feature_map(PHI, None, K, steps=2),
     TypeError, rf"^q {ARRAY}.*got None"),
    ("linear_attention_vjp q=None", lambda: ka.linear_attention_vjp(None, K, V), TypeError, rf"^q {ARRAY}.*got None"),
    ("linear_attention q list", lambda: ka.linear_attention(Q.tolist(), K, V), TypeError,
     rf"^q {ARRAY}.*got a list \[\[\[\[0\.12"),
    ("FeatureMap call x=None", lambda: PHI(None), TypeError, rf"^x {ARRAY}.*got None"),
    ("feature_map_vjp x=None", lambda: ka.feature_map_vjp(PHI, None), TypeError, rf"^x {ARRAY}.*got None"),
    ("explain_dispatch q=None", lambda: ka.explain_dispatch("linear_attention", None), TypeError,
     rf"^q {ARRAY}.*got None"),
    ("explain_dispatch op list", lambda: ka.explain_dispatch(["linear_attention"], Q), TypeError,
     r"unknown operation \['linear_attention'\]; known: \['linear_attention', 'softmax_attention'\]"),
    ("linear_attention_vjp g_out=None", lambda: ka.linear_attention_vjp(Q, K, V)[1](None), TypeError,
     rf"^g_out {ARRAY}.*got None"),
    # decoding states
    ("linear_attention int state", lambda: ka.linear_attention(Q, K, V, initial_state=_state(np.int64)), TypeError,
     r"^state\.S must have a real floating dtype \(float16, bfloat16, float32 or float64\); got int64$"),
    ("linear_attention complex state", lambda: ka.linear_attention(Q, K, V, initial_state=_state(np.complex64)),
     TypeError, r"^state\.S must have a real floating dtype .*; got complex64$"),
    ("linear_attention state.S=None", lambda: ka.linear_attention(Q, K, V, initial_state=(None, STATE[1])),
     TypeError, rf"^state\.S {ARRAY}.*got None"),
    ("linear_attention_step state.S=None", lambda: ka.linear_attention_step(Q, K, V, state=(None, None)),
     TypeError, rf"^state\.S {ARRAY}.*got None"),
    ("linear_attention state triple", lambda: ka.linear_attention(Q, K, V, initial_state=(*STATE, STATE[1])),
     TypeError, r"^state must be a LinearAttentionState \(S, z\) of two arrays; got \(ndarray of shape"),
    ("linear_attention_vjp state m != phi's", lambda: ka.linear_attention_vjp(
        Q, K, V, feature_map=PHI16, initial_state=STATE), ValueError,
     r"^state\.S must have shape \(B, H, m, e\) = \(2, 4, 16, 8\) \(m is the feature map's feature size, 16\); "
     r"got \(2, 4, 8, 8\)$"),
    ("linear_attention_vjp state m != d (elu)", lambda: ka.linear_attention_vjp(
        Q, K, V, initial_state=_state(np.float32, m=5)), ValueError,
     r"^state\.S must have shape \(B, H, m, e\) = \(2, 4, 8, 8\) .*got \(2, 4, 5, 8\)$"),
    ("linear_attention_vjp int state", lambda: ka.linear_attention_vjp(Q, K, V, initial_state=_state(np.int32)),
     TypeError, r"^state\.S must have a real floating dtype .*; got int32$"),
    ("linear_attention_vjp g_state not arrays", lambda: ka.linear_attention_vjp(
        Q, K, V, causal=True, return_state=True)[1](V, g_state=(1, 2)), TypeError, rf"^g_state\.S {ARRAY}.*got 1$"),
    # callable feature maps that return the wrong thing
    ("callable map drops the batch", lambda: ka.linear_attention(Q, K, V, feature_map=lambda x: x[0]), ValueError,
     r"^feature_map must map \(B, H, N, d\) = \(2, 4, 6, 8\) to \(B, H, N, m\) = \(2, 4, 6, m\); "
     r"got shape \(4, 6, 8\)$"),
    ("callable map wrong heads", lambda: ka.linear_attention(Q, K, V, feature_map=lambda x: x[:, :2]), ValueError,
     r"^feature_map must map .* got shape \(2, 2, 6, 8\)$"),
    ("callable map returns None", lambda: ka.linear_attention(Q, K, V, feature_map=lambda x: None), TypeError,
     r"^feature_map must return an array of shape \(B, H, N, m\) = \(2, 4, 6, m\); got None$"),
    ("callable map returns a list", lambda: ka.linear_attention(Q, K, V, feature_map=lambda x: x.tolist()),
     TypeError, r"^feature_map must return an array .*; got \[\[\[\["),
    ("callable map returns ints", lambda: ka.linear_attention(Q, K, V, feature_map=lambda x: x.astype(np.int32)),
     TypeError, r"^feature_map must return a real floating array .*; got dtype int32$"),
    ("callable pair, two widths", lambda: ka.linear_attention(
        Q, K, V, feature_map=(lambda x: x, lambda x: x[..., :4])), ValueError,
     r"^feature_map's query and key maps must give the same feature size m; got m=8 for queries and m=4 for keys$"),
    ("callable key map wrong shape", lambda: ka.linear_attention(
        Q, K, V, feature_map=(lambda x: x, lambda x: x[0])), ValueError,
     r"^feature_map's key map must map .* got shape \(4, 6, 8\)$"),
    ("linear_attention_weights callable wrong shape", lambda: ka.linear_attention_weights(
        Q, K, feature_map=lambda x: x[0]), ValueError, r"^feature_map must map .* got shape \(4, 6, 8\)$"),
    ("feature_map tuple of non-callables", lambda: ka.linear_attention(Q, K, V, feature_map=(1, 2)), TypeError,
     r"^feature_map as a tuple must be a \(query map, key map\) pair of callables; got \(1, 2\)$"),
    ("feature_map list", lambda: ka.linear_attention(Q, K, V, feature_map=["elu"]), TypeError,
     r"^feature_map must be a FeatureMap, .*; got \['elu'\]$"),
    # numbers: eps, scale, chunk_size
    ("linear_attention eps=inf", lambda: ka.linear_attention(Q, K, V, eps=float("inf")), ValueError,
     r"^eps must be a finite number >= 0; got inf$"),
    ("linear_attention eps=nan", lambda: ka.linear_attention(Q, K, V, eps=float("nan")), ValueError,
     r"^eps must be a finite number >= 0; got nan$"),
    ("linear_attention eps=-1", lambda: ka.linear_attention(Q, K, V, eps=-1.0), ValueError,
     r"^eps must be a finite number >= 0; got -1\.0$"),
    ("linear_attention eps string", lambda: ka.linear_attention(Q, K, V, eps="1e-6"), TypeError,
     r"^eps must be a finite number >= 0; got '1e-6'$"),
    ("linear_attention_step eps=inf", lambda: ka.linear_attention_step(Q1, K1, V1, eps=float("inf")), ValueError,
     r"^eps must be a finite number >= 0; got inf$"),
    ("linear_attention_weights eps=inf", lambda: ka.linear_attention_weights(Q, K, eps=float("inf")), ValueError,
     r"^eps must be a finite number >= 0; got inf$"),
    ("linear_attention_vjp eps=inf", lambda: ka.linear_attention_vjp(Q, K, V, eps=float("inf")), ValueError,
     r"^eps must be a finite number >= 0; got inf$"),
    ("linear_attention chunk_size=4.0", lambda: ka.linear_attention(Q, K, V, causal=True, chunk_size=4.0),
     TypeError, r"^chunk_size must be a positive integer; got 4\.0$"),
    ("linear_attention chunk_size=True", lambda: ka.linear_attention(Q, K, V, causal=True, chunk_size=True),
     TypeError, r"^chunk_size must be a positive integer; got True$"),
    ("linear_attention method list", lambda: ka.linear_attention(Q, K, V, method=["naive"]), TypeError,
     r"^method must be one of \['auto', 'chunked', 'naive', 'recurrent'\] \(a string\); got \['naive'\]$"),
    ("softmax_attention scale=inf", lambda: ka.softmax_attention(Q, K, V, scale=float("inf")), ValueError,
     r"^scale must be a finite number > 0; got inf$"),
    ("softmax_attention scale=0", lambda: ka.softmax_attention(Q, K, V, scale=0.0), ValueError,
     r"^scale must be a finite number > 0; got 0\.0$"),
    ("softmax_attention_weights scale=-1", lambda: ka.softmax_attention_weights(Q, K, scale=-1.0), ValueError,
     r"^scale must be a finite number > 0; got -1\.0$"),
    ("softmax_attention_weights scale string", lambda: ka.softmax_attention_weights(Q, K, scale="a"), TypeError,
     r"^scale must be a finite number > 0; got 'a'$"),
    ("approximation_error eps=inf", lambda: ka.approximation_error(PHI, Q, K, V, eps=float("inf")), ValueError,
     r"^eps must be a finite number >= 0; got inf$"),
    ("approximation_error scale=inf", lambda: ka.approximation_error(PHI, Q, K, V, scale=float("inf")), ValueError,
     r"^scale must be a finite number > 0; got inf$"),
    ("approximation_error v=None", lambda: ka.approximation_error(PHI, Q, K, None), ValueError,
     r"^approximation_error needs the values v \(B, H, L, e\) .*; got None$"),
    ("attention_kl floor string", lambda: losses.attention_kl(PHI, Q, K, floor="1e-8"), TypeError,
     r"^floor must be a finite number >= 0; got '1e-8'$"),
    ("output_mse chunk_size=2.5", lambda: losses.output_mse(PHI, Q, K, V, chunk_size=2.5), TypeError,
     r"^chunk_size must be a positive integer; got 2\.5$"),
    # booleans
    *[(f"{name} causal='False'", call, TypeError, rf"^causal {BOOL}'False'$") for name, call in [
        ("linear_attention", lambda: ka.linear_attention(Q, K, V, causal="False")),
        ("softmax_attention", lambda: ka.softmax_attention(Q, K, V, causal="False")),
        ("softmax_attention_weights", lambda: ka.softmax_attention_weights(Q, K, causal="False")),
        ("linear_attention_weights", lambda: ka.linear_attention_weights(Q, K, causal="False")),
        ("fit_feature_map", lambda: _fit(causal="False")),
        ("approximation_error", lambda: ka.approximation_error(PHI, Q, K, V, causal="False")),
        ("attention_kl", lambda: losses.attention_kl(PHI, Q, K, causal="False")),
        ("output_mse", lambda: losses.output_mse(PHI, Q, K, V, causal="False")),
        ("linear_attention_vjp", lambda: ka.linear_attention_vjp(Q, K, V, causal="False")),
        ("value_and_grad", lambda: ka.value_and_grad("attention_kl", PHI, Q, K, causal="False")),
    ]],
    ("linear_attention causal=1", lambda: ka.linear_attention(Q, K, V, causal=1), TypeError, rf"^causal {BOOL}1$"),
    ("linear_attention_vjp return_state string", lambda: ka.linear_attention_vjp(Q, K, V, return_state="False"),
     TypeError, rf"^return_state {BOOL}'False'$"),
    ("feature_map bias string", lambda: ka.feature_map("glu", num_heads=4, head_dim=8, bias="False"), TypeError,
     rf"^bias {BOOL}'False'$"),
    ("feature_map tied string", lambda: ka.feature_map("glu", num_heads=4, head_dim=8, tied="False"), TypeError,
     rf"^tied {BOOL}'False'$"),
    ("fit_feature_map progress string", lambda: _fit(progress="yes"), TypeError, rf"^progress {BOOL}'yes'$"),
    # feature_map construction
    ("feature_map kind list", lambda: ka.feature_map(["glu"], num_heads=4, head_dim=8), TypeError,
     r"^kind must be one of \['aoglu', 'elu', .*\] \(a string\); got \['glu'\]$"),
    ("feature_map seed=-1", lambda: ka.feature_map("glu", num_heads=4, head_dim=8, seed=-1), ValueError,
     rf"^{SEED}-1$"),
    ("feature_map seed=1.5", lambda: ka.feature_map("glu", num_heads=4, head_dim=8, seed=1.5), TypeError,
     rf"^{SEED}1\.5$"),
    ("feature_map seed string", lambda: ka.feature_map("glu", num_heads=4, head_dim=8, seed="0"), TypeError,
     rf"^{SEED}'0'$"),
    ("feature_map num_heads string", lambda: ka.feature_map("glu", num_heads="4", head_dim=8), TypeError,
     r"^num_heads must be a positive integer; got '4'$"),
    ("feature_map head_dim=-1", lambda: ka.feature_map("glu", num_heads=4, head_dim=-1), ValueError,
     r"^head_dim must be a positive integer; got -1$"),
    ("feature_map depth string", lambda: ka.feature_map("glu", num_heads=4, head_dim=8, depth="2"), TypeError,
     r"^depth must be a positive integer; got '2'$"),
    ("feature_map feature_dim=8.0", lambda: ka.feature_map("glu", num_heads=4, head_dim=8, feature_dim=8.0),
     TypeError, r"^feature_dim must be a positive integer; got 8\.0$"),
    # string weights
    ("linear_attention string weights", lambda: ka.linear_attention(Q, K, V, feature_map=STRING_WEIGHTS),
     TypeError, r"^feature map params\['shared'\]\[0\]\['W'\] must be an array; got 'abc'$"),
    ("orthogonality_penalty string weights", lambda: ka.orthogonality_penalty(STRING_WEIGHTS), TypeError,
     r"^feature map params\['shared'\]\[0\]\['W'\] must be an array; got 'abc'$"),
    ("num_params string weights", lambda: ka.num_params(STRING_WEIGHTS), TypeError,
     r"^feature map params\['shared'\]\[0\]\['W'\] must be an array; got 'abc'$"),
    ("orthogonality_penalty weight string", lambda: ka.orthogonality_penalty(PHI, weight="1"), TypeError,
     r"^weight must be a finite number >= 0; got '1'$"),
    ("orthogonality_penalty weight=nan", lambda: ka.orthogonality_penalty(PHI, weight=float("nan")), ValueError,
     r"^weight must be a finite number >= 0; got nan$"),
    ("orthogonality_penalty weight=-1", lambda: ka.orthogonality_penalty(PHI, weight=-1.0), ValueError,
     r"^weight must be a finite number >= 0; got -1\.0$"),
    ("num_params None", lambda: ka.num_params(None), TypeError, r"^num_params expects a FeatureMap; got None$"),
    # fit_feature_map
    ("fit lr=-1", lambda: _fit(lr=-1.0), ValueError, r"^lr must be a finite number >= 0; got -1\.0$"),
    ("fit lr=nan", lambda: _fit(lr=float("nan")), ValueError, r"^lr must be a finite number >= 0; got nan$"),
    ("fit ortho_weight=-1", lambda: _fit(ortho_weight=-1.0), ValueError,
     r"^ortho_weight must be a finite number >= 0; got -1\.0$"),
    ("fit ortho_weight=nan", lambda: _fit(ortho_weight=float("nan")), ValueError,
     r"^ortho_weight must be a finite number >= 0; got nan$"),
    ("fit ortho_weight string", lambda: _fit(ortho_weight="0.1"), TypeError,
     r"^ortho_weight must be a finite number >= 0; got '0\.1'$"),
    ("fit eps=-1", lambda: _fit(eps=-1.0), ValueError, r"^eps must be a finite number >= 0; got -1\.0$"),
    ("fit eps=inf", lambda: _fit(eps=float("inf")), ValueError, r"^eps must be a finite number >= 0; got inf$"),
    ("fit scale=-1", lambda: _fit(scale=-1.0), ValueError, r"^scale must be a finite number > 0; got -1\.0$"),
    ("fit scale=nan", lambda: _fit(scale=float("nan")), ValueError, r"^scale must be a finite number > 0; got nan$"),
    ("fit steps=-1", lambda: _fit(steps=-1), ValueError, r"^steps must be a positive integer; got -1$"),
    ("fit steps=2.0", lambda: _fit(steps=2.0), TypeError, r"^steps must be a positive integer; got 2\.0$"),
    ("fit batch_size=1.0", lambda: _fit(batch_size=1.0), TypeError,
     r"^batch_size must be a positive integer; got 1\.0$"),
    ("fit seed=-1", lambda: _fit(seed=-1), ValueError, rf"^{SEED}-1$"),
    ("fit seed string", lambda: _fit(seed="a"), TypeError, rf"^{SEED}'a'$"),
    ("fit seed=1.5", lambda: _fit(seed=1.5), TypeError, rf"^{SEED}1\.5$"),
    ("fit optimizer string", lambda: _fit(optimizer="adam"), TypeError,
     r"^optimizer must be a kernelattn\.optim optimiser \(Adam, AdamW\) or None; got 'adam'$"),
    ("fit loss list", lambda: _fit(loss=["attention_kl"]), TypeError,
     r"^loss must be one of \['attention_kl', 'output_mse'\] \(a string\); got \['attention_kl'\]$"),
    ("fit callback not callable", lambda: _fit(callback=3), TypeError,
     r"^callback must be a callable \(step, phi, loss\) or None; got 3$"),
    ("fit eval_data v=None", lambda: _fit(eval_data=(Q, K, None)), TypeError, rf"^eval_data's v {ARRAY}.*got None$"),
    ("fit phi=None", lambda: ka.fit_feature_map(None, Q, K), TypeError,
     r"^phi must be a trainable FeatureMap \(ffn, glu, aoglu, hedgehog\); got None$"),
    # optimisers
    ("Adam lr=inf", lambda: optim.Adam(float("inf")), ValueError, r"^lr must be a finite number >= 0; got inf$"),
    ("Adam lr=nan", lambda: optim.Adam(float("nan")), ValueError, r"^lr must be a finite number >= 0; got nan$"),
    ("AdamW weight_decay string", lambda: optim.AdamW(0.1, weight_decay="0.1"), TypeError,
     r"^weight_decay must be a finite number >= 0; got '0\.1'$"),
    ("Adam betas (None, 0.9)", lambda: optim.Adam(0.1, betas=(None, 0.9)), TypeError,
     r"^betas\[0\] must be a number in \[0, 1\); got None$"),
    ("Adam betas string", lambda: optim.Adam(0.1, betas="ab"), TypeError,
     r"^betas must be two numbers in \[0, 1\); got 'ab'$"),
    ("Adam init string", lambda: optim.Adam(0.1).init("abc"), TypeError,
     r"^params must be a FeatureMap or a tree .* of arrays; got a leaf 'abc'$"),
    ("Adam update string grads", lambda: optim.Adam(0.1).update(PHI, "g", optim.Adam(0.1).init(PHI)), TypeError,
     r"^grads must be a FeatureMap or a tree .* of arrays; got a leaf 'g'$"),
    ("Adam update state=None", lambda: optim.Adam(0.1).update(PHI, PHI, None), TypeError,
     r"^state must be the AdamState from Adam\.init; got None$"),
    ("inverse_sqrt_warmup 10.0", lambda: optim.inverse_sqrt_warmup(10.0), TypeError,
     r"^warmup must be a positive integer; got 10\.0$"),
    # hand VJPs
    ("value_and_grad ortho_weight=nan", lambda: ka.value_and_grad("attention_kl", PHI, Q, K, ortho_weight=float("nan")),
     ValueError, r"^ortho_weight must be a finite number >= 0; got nan$"),
    ("value_and_grad wrt=None", lambda: ka.value_and_grad("attention_kl", PHI, Q, K, wrt=None), TypeError,
     r"^wrt must be a sequence of names from \['feature_map', 'q', 'k', 'v'\]; got None$"),
    ("value_and_grad loss list", lambda: ka.value_and_grad(["attention_kl"], PHI, Q, K), TypeError,
     r"^loss must be one of \['attention_kl', 'output_mse'\] \(a string\); got \['attention_kl'\]$"),
    ("feature_map_vjp role", lambda: ka.feature_map_vjp(PHI, Q, role="value"), ValueError,
     r"^role must be one of \['query', 'key'\]; got 'value'$"),
    ("linear_attention_vjp plain callable", lambda: ka.linear_attention_vjp(Q, K, V, feature_map=abs), TypeError,
     r"^feature_map must be a FeatureMap .* not a plain callable .*; got <built-in function abs>$"),
]


def _check(call, exc, pattern):
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    assert "\n" not in msg, f"message on several lines: {msg!r}"
    assert re.search(pattern, msg), f"{pattern!r} does not match {msg!r}"


@pytest.mark.parametrize("call,exc,pattern", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_refused_with_a_clear_one_line_message(call, exc, pattern):
    _check(call, exc, pattern)


# Checks made inside linear_attention itself (phi's feature size m, return_state).
PENDING = [
    pytest.param(lambda: ka.linear_attention(Q, K, V, feature_map=PHI16, initial_state=STATE), ValueError,
                 r"^state\.S must have shape \(B, H, m, e\) = \(2, 4, 16, 8\) .*got \(2, 4, 8, 8\)$",
                 id="linear_attention state m != phi's"),
    pytest.param(lambda: ka.linear_attention(Q, K, V, initial_state=_state(np.float32, m=5)), ValueError,
                 r"^state\.S must have shape \(B, H, m, e\) = \(2, 4, 8, 8\) .*got \(2, 4, 5, 8\)$",
                 id="linear_attention state m != d (elu)"),
    pytest.param(lambda: ka.linear_attention_step(Q, K, V, feature_map=PHI16, state=STATE), ValueError,
                 r"^state\.S must have shape \(B, H, m, e\) = \(2, 4, 16, 8\) .*got \(2, 4, 8, 8\)$",
                 id="linear_attention_step state m != phi's"),
    pytest.param(lambda: ka.linear_attention(Q, K, V, return_state="False"), TypeError,
                 rf"^return_state {BOOL}'False'$", id="linear_attention return_state string"),
]


@pytest.mark.parametrize("call,exc,pattern", PENDING)
def test_refused_inside_linear_attention(call, exc, pattern):
    _check(call, exc, pattern)


def test_table_ids_are_unique():
    ids = [c[0] for c in BAD]
    assert len(ids) == len(set(ids))


# -- modules ------------------------------------------------------------------------------------------


def _torch_cases():
    from kernelattn.backends.torch_nn import FeatureMap as F
    from kernelattn.backends.torch_nn import LinearTransformerEncoderLayer as L
    from kernelattn.backends.torch_nn import MultiheadLinearAttention as M

    pos = "must be a positive integer; got "
    return [
        ("M width not divisible", lambda: M(10, 3), ValueError,
         r"^embed_dim must be divisible by num_heads; got embed_dim=10, num_heads=3$"),
        ("M embed_dim=8.0", lambda: M(8.0, 2), TypeError, rf"^embed_dim {pos}8\.0$"),
        ("M num_heads=0", lambda: M(8, 0), ValueError, rf"^num_heads {pos}0$"),
        ("M kdim=0", lambda: M(8, 2, kdim=0), ValueError, rf"^kdim {pos}0$"),
        ("M vdim string", lambda: M(8, 2, vdim="4"), TypeError, rf"^vdim {pos}'4'$"),
        ("M dropout string", lambda: M(8, 2, dropout="0.1"), TypeError, r"^dropout must be a number in \[0, 1\); got '0\.1'$"),
        ("M eps=inf", lambda: M(8, 2, eps=float("inf")), ValueError, r"^eps must be a finite number >= 0; got inf$"),
        ("M eps=-1", lambda: M(8, 2, eps=-1.0), ValueError, r"^eps must be a finite number >= 0; got -1\.0$"),
        ("M chunk_size=0", lambda: M(8, 2, chunk_size=0), ValueError, rf"^chunk_size {pos}0$"),
        *[(f"M {flag} string", (lambda flag=flag: M(8, 2, **{flag: "False"})), TypeError, rf"^{flag} {BOOL}'False'$")
          for flag in ("causal", "batch_first", "bias", "feature_map_bias", "tied")],
        ("M seed=-1", lambda: M(8, 2, seed=-1), ValueError, rf"^{SEED}-1$"),
        ("M feature_map unknown", lambda: M(8, 2, feature_map="mlp"), ValueError,
         r"^unknown feature-map kind 'mlp'; expected"),
        ("M feature_map list", lambda: M(8, 2, feature_map=["glu"]), TypeError,
         r"^feature_map must be a kind name or a kernelattn FeatureMap module; got \['glu'\]$"),
        ("M feature_map_dropout=1", lambda: M(8, 2, feature_map_dropout=1.0), ValueError,
         r"^feature_map_dropout must be a number in \[0, 1\); got 1\.0$"),
        ("L dim_feedforward=0", lambda: L(8, 2, 0), ValueError, rf"^dim_feedforward {pos}0$"),
        ("L dim_feedforward=-1", lambda: L(8, 2, -1), ValueError, rf"^dim_feedforward {pos}-1$"),
        ("L layer_norm_eps=-1", lambda: L(8, 2, 16, layer_norm_eps=-1.0), ValueError,
         r"^layer_norm_eps must be a finite number > 0; got -1\.0$"),
        ("L feature_map_dropout=2", lambda: L(8, 2, 16, feature_map_dropout=2.0), ValueError,
         r"^feature_map_dropout must be a number in \[0, 1\); got 2\.0$"),
        ("L causal string", lambda: L(8, 2, 16, causal="False"), TypeError, rf"^causal {BOOL}'False'$"),
        ("L activation list", lambda: L(8, 2, 16, activation=["gelu"]), TypeError,
         r"^activation must be one of \['gelu', 'relu'\] or a callable; got \['gelu'\]$"),
        ("L width not divisible", lambda: L(10, 3), ValueError, r"^embed_dim must be divisible by num_heads"),
        ("F kind list", lambda: F(["glu"], 2, 4), TypeError, r"^kind must be one of .* \(a string\); got \['glu'\]$"),
        ("F seed=-1", lambda: F("glu", 2, 4, seed=-1), ValueError, rf"^{SEED}-1$"),
        ("F tied string", lambda: F("glu", 2, 4, tied="False"), TypeError, rf"^tied {BOOL}'False'$"),
    ]


def _flax_cases():
    import flax.nnx as nnx

    from kernelattn.backends.jax_nn import EncoderBlock as E
    from kernelattn.backends.jax_nn import FeatureMap as F
    from kernelattn.backends.jax_nn import MultiheadLinearAttention as M

    def R():
        return nnx.Rngs(0)

    pos = "must be a positive integer; got "
    return [
        ("M width not divisible", lambda: M(30, 4, rngs=R()), ValueError,
         r"^in_features=30 is not a multiple of num_heads=4; pass head_dim$"),
        ("M in_features=0", lambda: M(0, 4, rngs=R()), ValueError, rf"^in_features {pos}0$"),
        ("M num_heads=0", lambda: M(8, 0, rngs=R()), ValueError, rf"^num_heads {pos}0$"),
        ("M in_features=8.0", lambda: M(8.0, 2, rngs=R()), TypeError, rf"^in_features {pos}8\.0$"),
        ("M in_features string", lambda: M("8", 2, rngs=R()), TypeError, rf"^in_features {pos}'8'$"),
        ("M head_dim=0", lambda: M(8, 2, head_dim=0, rngs=R()), ValueError, rf"^head_dim {pos}0$"),
        ("M out_features=0", lambda: M(8, 2, out_features=0, rngs=R()), ValueError, rf"^out_features {pos}0$"),
        ("M chunk_size=0", lambda: M(8, 2, chunk_size=0, rngs=R()), ValueError, rf"^chunk_size {pos}0$"),
        ("M eps=inf", lambda: M(8, 2, eps=float("inf"), rngs=R()), ValueError,
         r"^eps must be a finite number >= 0; got inf$"),
        *[(f"M {flag} string", (lambda flag=flag: M(8, 2, rngs=R(), **{flag: "False"})), TypeError,
           rf"^{flag} {BOOL}'False'$") for flag in ("causal", "use_bias", "tied", "feature_map_bias")],
        ("M rngs=None", lambda: M(8, 2, rngs=None), TypeError,
         r"^rngs must be a flax\.nnx\.Rngs \(for instance nnx\.Rngs\(0\)\); got None$"),
        ("M feature_map unknown", lambda: M(8, 2, feature_map="mlp", rngs=R()), ValueError,
         r"^unknown feature-map kind 'mlp'; expected"),
        ("M feature_map list", lambda: M(8, 2, feature_map=["glu"], rngs=R()), TypeError,
         r"^feature_map must be a kind name, .*; got \['glu'\]$"),
        ("E features=0", lambda: E(0, 2, rngs=R()), ValueError, rf"^features {pos}0$"),
        ("E mlp_features=0", lambda: E(8, 2, mlp_features=0, rngs=R()), ValueError, rf"^mlp_features {pos}0$"),
        ("E dropout=2", lambda: E(8, 2, dropout=2.0, rngs=R()), ValueError,
         r"^dropout must be a number in \[0, 1\); got 2\.0$"),
        ("E causal string", lambda: E(8, 2, causal="False", rngs=R()), TypeError, rf"^causal {BOOL}'False'$"),
        ("F kind list", lambda: F(["glu"], num_heads=2, head_dim=4, rngs=R()), TypeError,
         r"^kind must be one of .* \(a string\); got \['glu'\]$"),
        ("F seed=-1", lambda: F("glu", num_heads=2, head_dim=4, seed=-1), ValueError, rf"^{SEED}-1$"),
        ("F rngs=3", lambda: F("glu", num_heads=2, head_dim=4, rngs=3), TypeError,
         r"^rngs must be a flax\.nnx\.Rngs .*; got 3$"),
    ]


def test_torch_module_arguments_are_checked():
    pytest.importorskip("torch")
    cases = _torch_cases()
    for name, call, exc, pattern in cases:
        try:
            _check(call, exc, pattern)
        except BaseException as e:  # name the row that failed
            raise AssertionError(f"{name}: {e}") from e


def test_flax_module_arguments_are_checked():
    pytest.importorskip("flax.nnx")
    for name, call, exc, pattern in _flax_cases():
        try:
            _check(call, exc, pattern)
        except BaseException as e:
            raise AssertionError(f"{name}: {e}") from e


# -- valid inputs that used to be refused ----------------------------------------------------------------


@pytest.mark.parametrize("eps", [np.float32(1e-6), np.float64(1e-6), np.array(1e-6), 0])
@pytest.mark.parametrize("chunk_size", [np.int64(4), np.int32(4), np.array(4)])
def test_numpy_scalars_and_0d_arrays_are_accepted(eps, chunk_size):
    ref = ka.linear_attention(Q, K, V, feature_map=PHI, causal=True, eps=float(eps), chunk_size=4)
    out = ka.linear_attention(Q, K, V, feature_map=PHI, causal=True, eps=eps, chunk_size=chunk_size)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ka.linear_attention_weights(Q, K, feature_map=PHI, eps=eps),
                               ka.linear_attention_weights(Q, K, feature_map=PHI, eps=float(eps)), rtol=1e-6)
    kl = losses.attention_kl(PHI, Q, K, eps=eps, scale=np.float32(0.25), floor=np.float64(1e-8))
    assert np.isfinite(float(kl))
    losses.output_mse(PHI, Q, K, V, eps=eps, chunk_size=chunk_size, scale=np.array(0.25))
    ka.value_and_grad("output_mse", PHI, Q, K, V, eps=eps, chunk_size=chunk_size, ortho_weight=np.float32(0.1))


def test_numpy_scalars_for_sizes_seeds_and_optimiser_settings():
    phi = ka.feature_map("aoglu", num_heads=np.int64(4), head_dim=np.array(8), feature_dim=np.int32(8),
                         depth=np.int64(2), rank=np.int64(2), seed=np.int64(0), tied=np.bool_(True))
    assert (phi.num_heads, phi.head_dim, phi.depth) == (4, 8, 2) and type(phi.num_heads) is int
    assert ka.softmax_attention(Q, K, V, scale=np.float32(0.5)).shape == V.shape
    opt = optim.AdamW(np.float32(0.01), betas=(np.float32(0.9), np.float64(0.99)), weight_decay=np.float64(0.1),
                      schedule=optim.inverse_sqrt_warmup(np.int64(10)))
    assert opt.lr == pytest.approx(0.01) and type(opt.lr) is float
    fitted, hist = ka.fit_feature_map(PHI, Q, K, steps=np.int64(2), lr=np.float32(0.01), batch_size=np.int64(1),
                                      eps=np.float32(1e-6), ortho_weight=np.float32(0.01), seed=np.int64(1))
    assert len(hist.loss) == 2
    assert float(ka.orthogonality_penalty(PHI, weight=np.float32(2.0))) >= 0
    ka.linear_attention(Q, K, V, causal=np.bool_(True))


def test_value_and_grad_takes_one_name_for_wrt():
    _, grads = ka.value_and_grad("attention_kl", PHI, Q, K, wrt="feature_map")
    assert grads.feature_map is not None and grads.q is None


@pytest.mark.parametrize("method", ["naive", "recurrent"])
def test_backend_with_reference_methods(xp_backend, method):
    b = xp_backend
    if b.name not in ka.KNOWN_BACKENDS:
        pytest.skip(f"{b.name} has no adapter to name")
    q, k, v = (b.asarray(a) for a in (Q, K, V))
    phi = ka.feature_map("glu", num_heads=4, head_dim=8, seed=0, like=q)
    ref = ka.linear_attention(q, k, v, feature_map=phi, causal=True, method=method, backend="agnostic")
    out = ka.linear_attention(q, k, v, feature_map=phi, causal=True, method=method, backend=b.name)
    np.testing.assert_allclose(np.asarray(to_numpy(out)), np.asarray(to_numpy(ref)),
                               rtol=1e-6, atol=1e-7)
    res = ka.explain_dispatch("linear_attention", q, backend=b.name, causal=True, method=method, masked=False,
                              kind="glu")
    assert res.backend == "agnostic" and "reference strategy" in res.reason


def test_named_backend_without_a_fast_path_runs_the_core():
    out = ka.softmax_attention(Q, K, V, backend="numpy")
    np.testing.assert_allclose(out, ka.softmax_attention(Q, K, V, backend="agnostic"), rtol=1e-6)


@pytest.mark.parametrize("chunk_size", [np.int64(4), np.array(4)])
def test_numpy_integer_chunk_size_on_every_backend(xp_backend, chunk_size):
    b = xp_backend
    q, k, v = (b.asarray(a) for a in (Q, K, V))
    ref = ka.linear_attention(q, k, v, causal=True, chunk_size=4)
    out = ka.linear_attention(q, k, v, causal=True, chunk_size=chunk_size, eps=np.float32(1e-6))
    np.testing.assert_allclose(np.asarray(to_numpy(out)), np.asarray(to_numpy(ref)),
                               rtol=1e-5, atol=1e-6)
