"""The PyTorch modules (kernelattn.backends.torch_nn): what a user of torch.nn expects of them."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import kernelattn as ka
from kernelattn.backends.torch_nn import FeatureMap, LinearTransformerEncoderLayer, MultiheadLinearAttention
from kernelattn.testing import reference_feature_map, reference_linear_attention, rel_rms_error


@pytest.fixture(autouse=True)
def _autograd_on():
    """These tests need autograd on; a command run in-process earlier may have switched it off."""
    with torch.enable_grad():
        yield


def _x(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _n(module):
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------
# FeatureMap


@pytest.mark.parametrize("kind,opts", [("glu", {"depth": 2}), ("aoglu", {"depth": 3, "bias": True}),
                                       ("ffn", {"tied": False}), ("hedgehog", {}), ("favor", {}), ("elu", {})])
def test_feature_map_module_is_the_papers_kernel(kind, opts):
    H, d = 3, 8
    phi = FeatureMap(kind, H, d, seed=0, **opts)
    same = ka.feature_map(kind, num_heads=H, head_dim=d, seed=0, **opts) if kind != "elu" else ka.feature_map("elu")
    x = _x(2, H, 5, d)
    assert ka.num_params(phi) == _n(phi) == (ka.num_params(same) if kind != "elu" else 0)
    for role in ("query", "key"):
        got = phi(x, role=role)
        assert got.shape == (2, H, 5, same.feature_dim or d) and got.dtype == torch.float32
        assert rel_rms_error(got.detach(), reference_feature_map(same, x, role=role)) < 1e-6
    if kind == "favor":  # the random projection travels with the state dict
        assert "omega" in phi.state_dict()


def test_feature_map_parameters_train_and_carry_the_orthogonality_penalty():
    phi = FeatureMap("glu", 2, 6, depth=2, seed=1)
    names = sorted(name for name, _ in phi.named_parameters())
    assert names == ["params.shared.0.G", "params.shared.0.W", "params.shared.1.G", "params.shared.1.W"]
    assert phi.orthogonality_penalty().item() < 1e-12  # orthogonal at init
    with torch.no_grad():
        phi.params["shared"][0]["W"].mul_(1.5)
    pen = phi.orthogonality_penalty(weight=0.1)
    want = 0.1 * ka.orthogonality_penalty(phi.as_feature_map()).item()
    assert math.isclose(pen.item(), want, rel_tol=1e-6) and want > 0
    pen.backward()
    assert phi.params["shared"][0]["W"].grad.abs().sum() > 0
    assert phi.params["shared"][0]["G"].grad is None  # gates are not penalised


def test_feature_map_module_errors_are_clear():
    phi = FeatureMap("glu", 4, 8, seed=0)
    with pytest.raises(ValueError, match="num_heads=4"):
        phi(torch.zeros(1, 3, 2, 8))
    with pytest.raises(ValueError, match="role"):
        phi(torch.zeros(1, 4, 2, 8), role="value")
    with pytest.raises(ValueError, match="4 dimensions"):
        phi(torch.zeros(4, 2, 8))


# ---------------------------------------------------------------------------
# MultiheadLinearAttention


def _manual(attn, q_in, k_in, v_in, *, key_mask=None, causal=None):
    """The layer written out by hand, with the core and float64 reference."""
    B, N, E = q_in.shape
    H, d = attn.num_heads, attn.head_dim

    def heads(x, proj):
        return proj(x).view(x.shape[0], x.shape[1], H, d).transpose(1, 2)

    out = ka.linear_attention(heads(q_in, attn.q_proj), heads(k_in, attn.k_proj), heads(v_in, attn.v_proj),
                              feature_map=attn.feature_map.as_feature_map(), key_mask=key_mask,
                              causal=attn.causal if causal is None else causal, backend="agnostic")
    ref = reference_linear_attention(heads(q_in, attn.q_proj), heads(k_in, attn.k_proj), heads(v_in, attn.v_proj),
                                     feature_map=attn.feature_map.as_feature_map(), key_mask=key_mask,
                                     causal=attn.causal if causal is None else causal)
    assert rel_rms_error(out.detach(), ref) < 1e-5
    return attn.out_proj(out.transpose(1, 2).reshape(B, N, E))


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_multihead_linear_attention_computes_the_layer(causal):
    attn = MultiheadLinearAttention(24, 3, feature_map="aoglu", depth=2, causal=causal, seed=0)
    x = _x(2, 13, 24)
    out, weights = attn(x, x, x)
    assert weights is None and out.shape == (2, 13, 24)
    assert rel_rms_error(out.detach(), _manual(attn, x, x, x).detach()) < 1e-5
    with torch.no_grad():  # the fused inference path
        assert rel_rms_error(attn(x)[0], _manual(attn, x, x, x)) < 1e-5


def test_cross_attention_layouts_and_widths():
    attn = MultiheadLinearAttention(16, 2, feature_map="ffn", kdim=5, vdim=7, seed=0)
    q, k, v = _x(3, 4, 16), _x(3, 9, 5, seed=1), _x(3, 9, 7, seed=2)
    out, _ = attn(q, k, v)
    assert out.shape == (3, 4, 16)
    assert rel_rms_error(out.detach(), _manual(attn, q, k, v).detach()) < 1e-5
    seq_first = MultiheadLinearAttention(16, 2, feature_map="ffn", kdim=5, vdim=7, batch_first=False, seed=0)
    seq_first.load_state_dict(attn.state_dict())
    out_sf, _ = seq_first(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
    assert torch.allclose(out_sf.transpose(0, 1), out, atol=1e-6)
    out_1, _ = attn(q[1], k[1], v[1])  # unbatched (N, E)
    assert torch.allclose(out_1, out[1], atol=1e-6)


def test_key_padding_mask_true_marks_padding_as_in_torch():
    attn = MultiheadLinearAttention(16, 4, feature_map="glu", seed=0)
    x = _x(2, 11, 16)
    pad = torch.zeros(2, 11, dtype=torch.bool)
    pad[0, 8:] = True
    out, _ = attn(x, key_padding_mask=pad)
    assert rel_rms_error(out.detach(), _manual(attn, x, x, x, key_mask=~pad).detach()) < 1e-5
    # what sits in the padded positions does not matter
    y = x.clone()
    y[0, 8:] = 100.0
    out_y, _ = attn(x, y, y, key_padding_mask=pad)
    assert torch.allclose(out_y, out, atol=1e-5)
    # torch's own layer reads the mask the same way: padding changes neither
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    a, _ = mha(x, x, x, key_padding_mask=pad)
    b, _ = mha(x, y, y, key_padding_mask=pad)
    assert torch.allclose(a, b, atol=1e-5)


def test_unsupported_arguments_fail_clearly():
    attn = MultiheadLinearAttention(8, 2, seed=0)
    x = _x(1, 4, 8)
    with pytest.raises(ValueError, match="need_weights=True is not supported"):
        attn(x, x, x, need_weights=True)
    with pytest.raises(ValueError, match="attn_mask is not supported"):
        attn(x, x, x, attn_mask=torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="boolean"):
        attn(x, key_padding_mask=torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"shape \(batch, source length\)"):
        attn(x, key_padding_mask=torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        MultiheadLinearAttention(10, 3)
    with pytest.raises(ValueError, match="causal=False"):
        attn.step(x[:, 0])
    with pytest.raises(ValueError, match="num_heads=4"):
        MultiheadLinearAttention(8, 2, feature_map=FeatureMap("glu", 4, 2, seed=0))
    # the causal mask itself, flagged as such, is accepted (as nn.TransformerEncoderLayer passes it)
    mask = nn.Transformer.generate_square_subsequent_mask(4)
    out, _ = attn(x, attn_mask=mask, is_causal=True)
    causal = MultiheadLinearAttention(8, 2, causal=True, seed=0)
    causal.load_state_dict(attn.state_dict())
    assert torch.allclose(causal(x)[0], out, atol=1e-6)


def test_state_dict_round_trip():
    layer = LinearTransformerEncoderLayer(16, 2, 32, feature_map="aoglu", depth=2, feature_map_bias=True, seed=0).eval()
    other = LinearTransformerEncoderLayer(16, 2, 32, feature_map="aoglu", depth=2, feature_map_bias=True, seed=1).eval()
    x = _x(2, 7, 16)
    assert not torch.allclose(layer(x), other(x))
    other.load_state_dict(layer.state_dict())
    assert torch.equal(layer(x), other(x))
    keys = set(layer.state_dict())
    assert {"self_attn.feature_map.params.shared.1.A", "self_attn.q_proj.weight", "norm1.weight"} <= keys
    fav = MultiheadLinearAttention(8, 2, feature_map="favor", seed=0)
    fav2 = MultiheadLinearAttention(8, 2, feature_map="favor", seed=5)
    fav2.load_state_dict(fav.state_dict())
    assert torch.equal(fav(x[:, :, :8])[0], fav2(x[:, :, :8])[0])


# ---------------------------------------------------------------------------
# decoding


@pytest.mark.parametrize("kernel", ["glu", "elu"])
def test_step_decoding_equals_the_parallel_causal_output(kernel):
    attn = MultiheadLinearAttention(16, 4, feature_map=kernel, causal=True, seed=0).eval()
    x = _x(2, 12, 16)
    with torch.no_grad():
        full, _ = attn(x)
        prompt, state = attn.step(x[:, :5])  # a prompt in one call ...
        outs = [prompt]
        for t in range(5, 12):  # ... then token by token
            o, state = attn.step(x[:, t], state=state)
            assert o.shape == (2, 16)
            outs.append(o[:, None])
    assert rel_rms_error(torch.cat(outs, dim=1), full) < 1e-5
    assert state.S.shape == (2, 4, 4, 4) and state.z.shape == (2, 4, 4)


def test_step_skips_padded_tokens_and_the_encoder_block_decodes():
    layer = LinearTransformerEncoderLayer(16, 2, 32, feature_map="glu", causal=True, seed=0).eval()
    x = _x(1, 9, 16)
    with torch.no_grad():
        full = layer(x)
        state, outs = None, []
        for t in range(9):
            o, state = layer.step(x[:, t], state=state)
            outs.append(o)
        assert rel_rms_error(torch.stack(outs, dim=1), full) < 1e-5
        # a padded token leaves the state as it was
        _, s1 = layer.step(x[:, 0], state=None)
        _, s2 = layer.step(x[:, 1], state=s1, key_padding_mask=torch.tensor([True]))
        assert torch.equal(s1.S, s2.S) and torch.equal(s1.z, s2.z)


# ---------------------------------------------------------------------------
# the encoder block and training


def test_encoder_block_is_pre_layernorm():
    layer = LinearTransformerEncoderLayer(16, 2, 32, dropout=0.0, feature_map="glu", seed=0)
    x = _x(2, 6, 16)
    h = x + layer.self_attn(layer.norm1(x))[0]
    want = h + layer.linear2(torch.nn.functional.gelu(layer.linear1(layer.norm2(h))))
    assert torch.allclose(layer(x), want, atol=1e-6)


@pytest.mark.parametrize("kernel,depth,rank,total", [
    ("glu", 1, None, 21_412_874), ("glu", 2, None, 21_806_090), ("aoglu", 3, 16, 21_904_394)])
def test_the_papers_listops_model_has_the_papers_parameter_count(kernel, depth, rank, total):
    """The paper's ListOps encoder (Yorsh & Kovalenko 2022): hidden 512, 8 heads, 6 layers, MLP 2048;
    embeddings and classifier added by hand."""
    layer = LinearTransformerEncoderLayer(512, 8, 2048, feature_map=kernel, depth=depth, rank=rank, seed=0,
                                          device="meta")
    outside = 17 * 512 + 2000 * 512 + 512 + 1024 + (512 * 2048 + 2048) + (2048 * 10 + 10)
    assert 6 * _n(layer) + outside == total


def test_dropout_regularises_the_kernel_in_training_only():
    attn = MultiheadLinearAttention(16, 2, feature_map="glu", feature_map_dropout=0.5, seed=0)
    x = _x(2, 8, 16)
    a, b = attn(x)[0], attn(x)[0]
    assert not torch.allclose(a, b)
    attn.eval()
    assert torch.equal(attn(x)[0], attn(x)[0])


def test_half_precision_module():
    attn = MultiheadLinearAttention(16, 2, feature_map="glu", causal=True, seed=0, dtype=torch.bfloat16)
    x = _x(2, 10, 16, dtype=torch.bfloat16)
    out, _ = attn(x)
    assert out.dtype == torch.bfloat16
    ref = MultiheadLinearAttention(16, 2, feature_map="glu", causal=True, seed=0)
    ref.load_state_dict({k: v.float() for k, v in attn.state_dict().items()})
    assert rel_rms_error(out.detach().float(), ref(x.float())[0].detach()) < 3e-2


def test_a_small_model_trains():
    """A causal model learns to output the running mean of its inputs; the loss falls 10x."""
    torch.manual_seed(0)
    block = LinearTransformerEncoderLayer(32, 4, 64, feature_map="glu", causal=True, dropout=0.0, seed=0)
    model = nn.Sequential(nn.Linear(4, 32), block, nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        x = torch.randn(8, 16, 4, generator=g)
        target = x.cumsum(1) / torch.arange(1, 17).view(1, -1, 1)
        loss = nn.functional.mse_loss(model(x), target) + 0.01 * block.orthogonality_penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.1 * first, (first, last)


# ---------------------------------------------------------------------------
# torch.compile (cold compiles cost ~20 s each: two, small)


@pytest.mark.slow  # torch.compile
def test_compile_fullgraph_training_step_matches_eager():
    layer = LinearTransformerEncoderLayer(16, 2, 32, feature_map="glu", causal=True, dropout=0.0, seed=0)
    x = _x(2, 20, 16)
    pad = torch.zeros(2, 20, dtype=torch.bool)
    pad[1, 15:] = True
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x, src_key_padding_mask=pad)
    out.square().sum().backward()
    got = [out.detach()] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    out = layer(x, src_key_padding_mask=pad)
    out.square().sum().backward()
    want = [out.detach()] + [p.grad.clone() for p in layer.parameters()]
    for a, b in zip(got, want):
        assert rel_rms_error(a, b) < 1e-5


@pytest.mark.slow  # torch.compile
def test_compile_fullgraph_inference_matches_eager():
    attn = MultiheadLinearAttention(16, 2, feature_map="ffn", seed=0).eval()
    x = _x(2, 20, 16)
    pad = torch.zeros(2, 20, dtype=torch.bool)
    pad[0, 3:] = True
    compiled = torch.compile(attn, fullgraph=True)
    with torch.no_grad():
        assert rel_rms_error(compiled(x, key_padding_mask=pad)[0], attn(x, key_padding_mask=pad)[0]) < 1e-5
