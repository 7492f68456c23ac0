"""The causal language model (kernelattn.backends.torch_lm): prefill + decode equal the parallel
forward, and both equal a float64 definition with the O(N²) references of kernelattn.testing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kernelattn.backends.torch_lm import CausalLM, GenerationCache
from kernelattn.testing import reference_linear_attention, reference_softmax_attention, rel_rms_error

V = 61
ATTENTIONS = ("linear", "softmax")


def _model(attention, **kw):
    opts = dict(d_model=32, nhead=4, num_layers=2, seed=0)
    opts.update(kw)
    return CausalLM(V, attention=attention, **opts).eval()


def _ids(B, T, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------
# the float64 definition: explicit formulas, attention by kernelattn.testing's O(N L) references


def _reference_logits(model, ids):
    f64 = {name: p.detach().double() for name, p in model.state_dict().items()}
    ids = ids.numpy()
    B, T = ids.shape
    D, H = model.d_model, model.nhead
    d = D // H

    def lin(x, name):
        return x @ f64[name + ".weight"].numpy().T + f64[name + ".bias"].numpy()

    def ln(x, name, eps=1e-5):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * f64[name + ".weight"].numpy() + f64[name + ".bias"].numpy()

    def gelu(x):
        return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))

    def heads(x):
        return x.reshape(B, T, H, d).transpose(0, 2, 1, 3)

    emb = f64["embed.weight"].numpy()
    pe = np.zeros((T, D))
    for p in range(T):
        for i in range(0, D, 2):
            pe[p, i] = math.sin(p / 10000 ** (i / D))
            pe[p, i + 1] = math.cos(p / 10000 ** (i / D))
    x = emb[ids] * math.sqrt(D) + pe
    for i, layer in enumerate(model.layers):
        pre = f"layers.{i}."
        h = ln(x, pre + "norm1")
        q, k, v = (heads(lin(h, pre + "self_attn." + p)) for p in ("q_proj", "k_proj", "v_proj"))
        if model.attention == "linear":
            a = reference_linear_attention(q, k, v, feature_map=layer.self_attn.feature_map.as_feature_map(),
                                           causal=True, eps=layer.self_attn.eps)
        else:
            a = reference_softmax_attention(q, k, v, causal=True)
        x = x + lin(a.transpose(0, 2, 1, 3).reshape(B, T, D), pre + "self_attn.out_proj")
        x = x + lin(gelu(lin(ln(x, pre + "norm2"), pre + "linear1")), pre + "linear2")
    return ln(x, "norm") @ emb.T


def _stepwise(model, ids, prompt):
    logits, cache = model.prefill(ids[:, :prompt])
    out = [logits]
    for t in range(prompt, ids.shape[1]):
        logits, cache = model.decode(ids[:, t], cache)
        out.append(logits)
    return torch.stack(out, dim=1), cache


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_prefill_then_decode_equals_forward_and_the_float64_definition(attention):
    model = _model(attention)
    ids = _ids(2, 14)
    with torch.inference_mode():
        full = model(ids)
    ref = _reference_logits(model, ids)
    assert full.shape == (2, 14, V) and full.dtype == torch.float32
    assert rel_rms_error(full, ref) < 1e-5
    stepped, cache = _stepwise(model, ids, prompt=5)
    assert cache.length == 14
    torch.testing.assert_close(stepped, full[:, 4:], rtol=1e-4, atol=1e-4)
    assert rel_rms_error(stepped, ref[:, 4:]) < 1e-5


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_greedy_generate_equals_argmax_of_forward_on_the_growing_sequence(attention):
    model = _model(attention)
    ids = _ids(2, 6, seed=1)
    got = model.generate(ids, 5)
    seq = ids
    with torch.inference_mode():
        for _ in range(5):
            seq = torch.cat((seq, model(seq)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(got, seq)
    assert torch.equal(got[:, :6], ids)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_rows_of_a_batch_are_independent(attention):
    model = _model(attention)
    ids = _ids(2, 9, seed=2)
    both, _ = _stepwise(model, ids, prompt=4)
    for b in range(2):
        one, _ = _stepwise(model, ids[b:b + 1], prompt=4)
        torch.testing.assert_close(one[0], both[b], rtol=1e-5, atol=1e-5)
        assert torch.equal(model.generate(ids[b:b + 1], 3), model.generate(ids, 3)[b:b + 1])


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_zero_new_tokens_returns_the_prompt(attention):
    model = _model(attention)
    ids = _ids(2, 4)
    out = model.generate(ids, 0)
    assert torch.equal(out, ids) and out is not ids


def test_softmax_kv_cache_grows_by_doubling():
    model = _model("softmax")
    ids = _ids(1, 12, seed=3)
    _, cache = model.prefill(ids[:, :3])
    assert [kv.capacity for kv in cache.layers] == [3, 3]
    stepped, cache = _stepwise(model, ids, prompt=3)
    assert [kv.capacity for kv in cache.layers] == [12, 12] and cache.layers[0].length == 12
    with torch.inference_mode():
        torch.testing.assert_close(stepped, model(ids)[:, 2:], rtol=1e-4, atol=1e-4)
    _, cache = model.prefill(ids[:, :3], max_new_tokens=20)  # sized up front: no copies
    assert cache.layers[0].capacity == 23


def test_linear_state_has_a_fixed_size():
    model = _model("linear")
    _, short = model.prefill(_ids(1, 3))
    _, long = model.prefill(_ids(1, 300))
    assert [tuple(d.state.S.shape) for d in short.layers] == [tuple(d.state.S.shape) for d in long.layers]


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = _model("linear")
    ids = _ids(2, 5)
    draw = [model.generate(ids, 6, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert torch.equal(draw[0], draw[1])
    top1 = model.generate(ids, 6, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(top1, model.generate(ids, 6))


def test_seed_fixes_the_weights_and_leaves_torchs_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = _model("linear"), _model("linear")
    assert torch.equal(torch.random.get_rng_state(), before)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_weights_move_between_linear_and_softmax_models():
    lin, soft = _model("linear"), _model("softmax", seed=1)
    missing, unexpected = soft.load_state_dict(lin.state_dict(), strict=False)
    assert missing == [] and unexpected and all(".feature_map." in k for k in unexpected)
    assert torch.equal(soft.embed.weight, lin.embed.weight)
    assert torch.equal(soft.layers[1].linear2.weight, lin.layers[1].linear2.weight)


def test_max_len_bounds_the_sequence():
    model = _model("linear", max_len=8)
    ids = _ids(1, 6)
    assert model.generate(ids, 2).shape == (1, 8)
    with pytest.raises(ValueError, match="max_len=8"):
        model.generate(ids, 3)
    _, cache = model.prefill(_ids(1, 8))
    with pytest.raises(ValueError, match="max_len=8"):
        model.decode(torch.tensor([1]), cache)


# ---------------------------------------------------------------------------
# errors: one line, naming the argument


def _bad_calls():
    lin = _model("linear")
    soft = _model("softmax")
    ids = _ids(2, 4)
    _, cache = lin.prefill(ids)
    return [
        ("attention", lambda: CausalLM(V, attention="flash"), ValueError),
        ("vocab_size", lambda: CausalLM(0), ValueError),
        ("d_model", lambda: CausalLM(V, d_model=30, nhead=4), ValueError),
        ("num_layers", lambda: CausalLM(V, num_layers=1.5), TypeError),
        ("dropout", lambda: CausalLM(V, dropout=2.0), ValueError),
        ("max_len", lambda: CausalLM(V, max_len=0), ValueError),
        ("ids", lambda: lin(ids.float()), TypeError),
        ("ids", lambda: lin(ids[0]), ValueError),
        ("ids", lambda: lin([[1, 2]]), TypeError),
        ("ids", lambda: lin(ids + V), ValueError),
        ("ids", lambda: lin.generate(-ids - 1, 2), ValueError),
        ("ids", lambda: lin.prefill(ids[:, :0]), ValueError),
        ("max_new_tokens", lambda: lin.generate(ids, -1), ValueError),
        ("max_new_tokens", lambda: lin.generate(ids, 2.0), TypeError),
        ("temperature", lambda: lin.generate(ids, 2, temperature=-1.0), ValueError),
        ("top_k", lambda: lin.generate(ids, 2, top_k=0), ValueError),
        ("top_k", lambda: lin.generate(ids, 2, top_k=V + 1), ValueError),
        ("generator", lambda: lin.generate(ids, 2, temperature=1.0, generator=0), TypeError),
        ("token_ids", lambda: lin.decode(ids, cache), ValueError),
        ("token_ids", lambda: lin.decode(ids[:1, 0], cache), ValueError),
        ("token_ids", lambda: lin.decode(torch.tensor([0, V]), cache), ValueError),
        ("cache", lambda: soft.decode(ids[:, 0], cache), TypeError),
        ("cache", lambda: lin.decode(ids[:, 0], None), TypeError),
    ]


def test_bad_arguments_give_one_line_errors_naming_them():
    for name, call, exc in _bad_calls():
        with pytest.raises(exc) as info:
            call()
        msg = str(info.value)
        assert msg.startswith(name) and "\n" not in msg, (name, msg)


def test_cache_type_is_exported():
    _, cache = _model("softmax").prefill(_ids(1, 2))
    assert isinstance(cache, GenerationCache) and cache.attention == "softmax" and cache.batch == 1
