"""The paper's LRA classifier: exact parameter counts, shapes, padding invariance, the penalty."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernelattn.listops.data import PAD, encode
from kernelattn.listops.model import (ATTENTIONS, LRA, ListOpsClassifier, ModelConfig, count_parameters,
                                      parameter_table)

ALL = list(ATTENTIONS)
TINY = ModelConfig(max_length=40, hidden=32, heads=4, layers=2, mlp=48)


# -- parameter counts (Yorsh & Kovalenko 2022: the ListOps setup of the authors' notebooks) --------------

AUTHORS = {"softmax": 21_019_658, "glu": 21_412_874, "glu2": 21_806_090, "aoglu3": 21_904_394}


@pytest.mark.parametrize("attention", list(AUTHORS))
def test_lra_parameter_counts_match_the_authors(attention):
    assert (LRA.vocab_size, LRA.max_length, LRA.hidden, LRA.heads, LRA.layers, LRA.mlp, LRA.num_classes) == \
        (17, 2000, 512, 8, 6, 2048, 10)
    model = ListOpsClassifier(LRA, attention, device="meta")
    assert count_parameters(model) == AUTHORS[attention]
    assert all(p.device.type == "meta" for p in model.parameters())


def test_lra_parameter_count_decomposes_as_the_paper_says():
    model = ListOpsClassifier(LRA, "softmax", device="meta")
    n = {name: count_parameters(m) for name, m in model.named_children()}
    assert n["embedding"] == 17 * 512
    assert model.pos_embedding.numel() == 2000 * 512 and model.cls.numel() == 512
    block = model.blocks[0]
    assert count_parameters(block.norm1) + count_parameters(block.norm2) == 2048
    assert count_parameters(block.attn) == 1_050_624
    assert count_parameters(block.ffn) == 2_099_712
    assert n["norm"] + n["classifier"] == 1024 + 1_050_624 + 20_490


def test_kernel_overheads_per_layer():
    counts = parameter_table(LRA)
    H, d, layers = 8, 64, 6
    assert counts["elu"] == counts["favor"] == counts["softmax"]  # fixed maps: no weights
    assert counts["ffn"] - counts["softmax"] == layers * H * d * d
    assert counts["glu"] - counts["softmax"] == layers * 2 * H * d * d
    assert counts["aoglu3"] - counts["softmax"] == layers * 3 * H * (d * d + 2 * d * (d // 4))
    assert counts["hedgehog"] - counts["softmax"] == layers * H * d * d


# -- forward ----------------------------------------------------------------------------------------------

def _tokens(rng, batch, lengths, width):
    out = np.zeros((batch, width), dtype=np.int64)
    for i, n in enumerate(lengths):
        out[i, :n] = rng.integers(1, 16, size=n)
    return torch.from_numpy(out)


@pytest.mark.parametrize("attention", ALL)
def test_forward_shape_and_finite(attention):
    torch.manual_seed(0)
    model = ListOpsClassifier(TINY, attention, seed=1)
    tokens = _tokens(np.random.default_rng(0), 3, [12, 7, 30], 30)
    logits = model(tokens)
    assert logits.shape == (3, 10) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for name, p in model.named_parameters() if name != "pos_embedding")


@pytest.mark.parametrize("attention", ALL)
def test_appending_padding_changes_nothing(attention):
    torch.manual_seed(0)
    model = ListOpsClassifier(TINY, attention, seed=2)
    with torch.no_grad():  # non-zero positions, so padded positions would differ if they leaked
        model.pos_embedding.normal_()
    model.eval()
    rng = np.random.default_rng(3)
    lengths = [5, 17, 11]
    tokens = _tokens(rng, 3, lengths, 17)
    padded = torch.cat([tokens, torch.full((3, 23), PAD)], dim=1)
    with torch.no_grad():
        ref = model(tokens)
        out = model(padded)
        alone = torch.cat([model(tokens[i:i + 1, :n]) for i, n in enumerate(lengths)])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone, ref, rtol=1e-5, atol=1e-5)
    # and the test can fail: a real token where padding was changes the output
    changed = padded.clone()
    changed[0, lengths[0]] = 7
    with torch.no_grad():
        assert not torch.allclose(model(changed)[0], ref[0], atol=1e-4)


def test_padding_gets_no_gradient_through_attention():
    torch.manual_seed(0)
    model = ListOpsClassifier(TINY, "glu", seed=0)
    tokens = torch.cat([_tokens(np.random.default_rng(1), 2, [9, 9], 9), torch.full((2, 6), PAD)], dim=1)
    model(tokens).sum().backward()
    grad = model.pos_embedding.grad[0]
    assert grad[:9].abs().sum() > 0
    assert torch.equal(grad[9:15], torch.zeros_like(grad[9:15]))


def test_classifier_example_from_the_data_module():
    model = ListOpsClassifier(TINY, "aoglu3", seed=0).eval()
    tokens = torch.from_numpy(encode("[MAX 4 3 [MIN 2 3 ] 1 0 ]", 16))[None]
    assert model(tokens).shape == (1, 10)


# -- the orthogonality penalty: once per phi call (queries and keys) --------------------------------------------

@pytest.mark.parametrize("attention", ["ffn", "glu", "glu2", "aoglu3", "hedgehog"])
def test_orthogonality_penalty_counts_each_phi_call(attention):
    model = ListOpsClassifier(TINY, attention, seed=0)
    assert float(model.orthogonality_penalty(1.0).detach()) < 1e-10  # orthogonal at init
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    expected = 0.0
    for block in model.blocks:
        fmap = block.attn.attn.feature_map
        for role_blocks in fmap.params.values():
            for b in role_blocks:
                W = b["W"].detach().double().numpy()  # (H, d_in, d_out)
                gram = W @ W.transpose(0, 2, 1)
                expected += 2 * np.mean((gram - np.eye(W.shape[1])) ** 2)  # q pass + k pass
    got = model.orthogonality_penalty(0.3)
    assert got.ndim == 0
    np.testing.assert_allclose(float(got.detach()), 0.3 * expected, rtol=1e-4)
    got.backward()
    assert model.blocks[0].attn.attn.feature_map.params["shared"][0]["W"].grad.abs().sum() > 0


@pytest.mark.parametrize("attention", ["softmax", "elu", "favor"])
def test_no_penalty_without_trainable_kernel(attention):
    model = ListOpsClassifier(TINY, attention)
    assert float(model.orthogonality_penalty(1.0)) == 0.0


# -- errors ---------------------------------------------------------------------------------------------------

def test_bad_input():
    with pytest.raises(ValueError, match="attention must be one of"):
        ListOpsClassifier(TINY, "cosine")
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(hidden=30, heads=4)
    with pytest.raises(ValueError, match="layers"):
        ModelConfig(layers=0)
    with pytest.raises(TypeError, match="ModelConfig"):
        ListOpsClassifier({"hidden": 8})
    model = ListOpsClassifier(TINY, "glu")
    with pytest.raises(ValueError, match="max_length"):
        model(torch.ones(1, 41, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.ones(1, 5))
