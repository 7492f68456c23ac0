"""Training on ListOps: the loss falls, runs are deterministic, resuming equals not stopping, the CLI works."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernelattn.listops.data import build
from kernelattn.listops.model import ListOpsClassifier
from kernelattn.listops.train import PRESETS, TrainConfig, evaluate, preset, train
from kernelattn.optim import inverse_sqrt_warmup

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("listops-data"))
    build(TINY.data, path, verbose=False)
    return path


def _state(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)


def _quiet(cfg, out, data_dir, **kw):
    return train(cfg, str(out), data_dir=data_dir, progress=False, plot=False, verbose=False, **kw)


def test_presets():
    assert set(PRESETS) == {"cpu", "lra", "tiny"}
    lra = PRESETS["lra"]
    assert (lra.model.hidden, lra.model.heads, lra.model.layers, lra.model.mlp, lra.model.max_length) == \
        (512, 8, 6, 2048, 2000)
    assert (lra.data.max_length, lra.data.max_depth, lra.data.max_args) == (2000, 10, 10)
    assert (lra.base_lr, lra.warmup, lra.weight_decay, lra.batch_size * lra.accumulate) == (0.005, 1000, 0.1, 32)
    cpu = PRESETS["cpu"]
    assert cpu.data.train >= 10_000 and cpu.data.max_length < 2000 and cpu.model.hidden < 512
    assert preset("cpu", attention="softmax", seed=2).seed == 2
    with pytest.raises(ValueError, match="preset"):
        preset("gpu")


def test_config_validation():
    with pytest.raises(ValueError, match="attention"):
        TrainConfig(attention="cos")
    with pytest.raises(ValueError, match="steps"):
        replace(TINY, steps=0)
    with pytest.raises(ValueError, match="max_length"):
        replace(TINY, model=replace(TINY.model, max_length=10))
    assert TrainConfig.from_dict(json.loads(json.dumps(TINY.to_dict()))) == TINY


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    splits = build(TINY.data, None, verbose=False)
    model = ListOpsClassifier(TINY.model, "glu", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    tr = splits["train"]
    tokens = torch.from_numpy(tr.tokens[:32].astype(np.int64))
    labels = torch.from_numpy(tr.labels[:32])
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(model(tokens), labels) + model.orthogonality_penalty(0.01)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0]


def test_training_run_writes_results_and_follows_the_schedule(tmp_path, data_dir):
    cfg = replace(TINY, attention="glu", ortho_weight=0.01)
    res = _quiet(cfg, tmp_path, data_dir)
    assert res["status"] == "finished" and res["steps"] == cfg.steps
    assert [row["step"] for row in res["history"]] == [10, 20]
    # lr after step s is the one step s + 1 will use
    mult = inverse_sqrt_warmup(cfg.warmup)
    for row in res["history"]:
        assert row["lr"] == pytest.approx(cfg.base_lr * mult(row["step"] + 1), rel=1e-9)
    # test accuracy is the best validation checkpoint's
    best = max(res["history"], key=lambda r: r["val_accuracy"])
    assert res["best_step"] == best["step"] and res["best_val_accuracy"] == best["val_accuracy"]
    model = ListOpsClassifier(cfg.model, cfg.attention, seed=cfg.seed)
    model.load_state_dict(torch.load(tmp_path / "best.pt", weights_only=True))
    splits = build(cfg.data, data_dir, verbose=False)
    assert evaluate(model, splits["validation"])["accuracy"] == res["best_val_accuracy"]
    assert evaluate(model, splits["test"])["accuracy"] == res["test_accuracy"]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["test_accuracy"] == res["test_accuracy"] and len(on_disk["train_curve"]) == cfg.steps
    assert "| GLU | 0 |" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("attention", ["softmax", "aoglu3"])
@pytest.mark.slow  # ListOps training
def test_deterministic_for_a_seed(tmp_path, data_dir, attention):
    cfg = replace(TINY, attention=attention, steps=12)  # dropout 0.1 in the tiny model: the RNG matters
    a = _quiet(cfg, tmp_path / "a", data_dir)
    b = _quiet(cfg, tmp_path / "b", data_dir)
    c = _quiet(replace(cfg, seed=1), tmp_path / "c", data_dir)
    assert a["train_curve"] == b["train_curve"] and a["history"][-1]["val_loss"] == b["history"][-1]["val_loss"]
    sa, sb = _state(tmp_path / "a")["model"], _state(tmp_path / "b")["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["train_curve"] != c["train_curve"]


@pytest.mark.slow  # ListOps training
def test_resume_equals_uninterrupted(tmp_path, data_dir):
    cfg = replace(TINY, attention="glu2", accumulate=2, ortho_weight=0.05, steps=16, eval_every=5)
    full = _quiet(cfg, tmp_path / "full", data_dir)
    part = _quiet(cfg, tmp_path / "cut", data_dir, stop_after=7)
    assert part["status"] == "interrupted" and part["steps"] == 7 and part["test_accuracy"] is None
    assert part["train_curve"] == full["train_curve"][:7]
    resumed = _quiet(cfg, tmp_path / "cut", data_dir)
    assert resumed["status"] == "finished"
    assert resumed["train_curve"] == full["train_curve"]
    assert [r["val_loss"] for r in resumed["history"]] == [r["val_loss"] for r in full["history"]]
    assert resumed["test_accuracy"] == full["test_accuracy"] and resumed["best_step"] == full["best_step"]
    s_full, s_res = _state(tmp_path / "full"), _state(tmp_path / "cut")
    assert all(torch.equal(s_full["model"][k], s_res["model"][k]) for k in s_full["model"])
    # a different configuration refuses the checkpoint
    with pytest.raises(ValueError, match="different configuration"):
        _quiet(replace(cfg, steps=20), tmp_path / "cut", data_dir)


@pytest.mark.slow  # ListOps training
def test_ctrl_c_mid_step_resumes_from_the_last_checkpoint(tmp_path, data_dir, monkeypatch, capsys):
    import kernelattn.listops.train as lt

    cfg = replace(TINY, attention="aoglu3", accumulate=2, steps=12, eval_every=5)
    full = _quiet(cfg, tmp_path / "full", data_dir)
    original = lt._micro_batch_indices

    def interrupt_in_step_8(n, batch_size, seed, micro):
        if micro == 15:  # the second micro-batch of step 8: its first backward has run
            raise KeyboardInterrupt
        return original(n, batch_size, seed, micro)

    monkeypatch.setattr(lt, "_micro_batch_indices", interrupt_in_step_8)
    with pytest.raises(KeyboardInterrupt):
        _quiet(cfg, tmp_path / "cut", data_dir)
    assert "resumes from step 5" in capsys.readouterr().out
    monkeypatch.setattr(lt, "_micro_batch_indices", original)
    resumed = _quiet(cfg, tmp_path / "cut", data_dir)
    assert resumed["train_curve"] == full["train_curve"] and resumed["test_accuracy"] == full["test_accuracy"]
    s_full, s_res = _state(tmp_path / "full")["model"], _state(tmp_path / "cut")["model"]
    assert all(torch.equal(s_full[k], s_res[k]) for k in s_full)


@pytest.mark.slow  # ListOps training
def test_gradient_accumulation_equals_a_big_batch(tmp_path, data_dir):
    base = replace(TINY, attention="glu", steps=3, model=replace(TINY.model, dropout=0.0, attention_dropout=0.0))
    big = _quiet(replace(base, batch_size=16, accumulate=1), tmp_path / "big", data_dir)
    acc = _quiet(replace(base, batch_size=8, accumulate=2), tmp_path / "acc", data_dir)
    np.testing.assert_allclose(acc["train_curve"], big["train_curve"], rtol=1e-5)
    s_big, s_acc = _state(tmp_path / "big")["model"], _state(tmp_path / "acc")["model"]
    for k in s_big:
        torch.testing.assert_close(s_acc[k], s_big[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # ListOps training
def test_time_budget_stops_and_still_tests(tmp_path, data_dir):
    res = _quiet(replace(TINY, steps=10_000), tmp_path, data_dir, max_time=0.0)
    assert res["status"] == "time budget" and res["steps"] == 0
    assert res["test_accuracy"] is not None and res["history"][-1]["step"] == 0
