"""Training the ListOps classifier: the paper's recipe, resumable and deterministic.

The recipe (Yorsh & Kovalenko, ICANN 2022; the authors' ``LraLightningWrapper``): AdamW
(betas 0.9, 0.98; weight decay 0.1 on every parameter), the learning-rate
multiplier ``min(1, t / warmup) / sqrt(max(t, warmup))``
(:func:`kernelattn.optim.inverse_sqrt_warmup`), cross-entropy plus the
orthogonality penalty of the kernels once per phi call (weight lambda),
gradient accumulation to the effective batch, validation every epoch (or every
``eval_every`` steps), and test accuracy at the best validation checkpoint.

Presets (:data:`PRESETS`):

* ``lra``: the paper's ListOps setting (LRA data, lengths 500-2000; hidden
  512, 8 heads, 6 layers, MLP 2048; lr 0.005, warmup 1000, batch 32). Needs a
  GPU.
* ``cpu``: a few minutes per run on a 2-core CPU: shallower, shorter
  expressions (operators nested at most 3 deep, 2-4 arguments, 8-64 tokens;
  48,000 training examples), a 2-layer width-64 model with 4 heads, no
  dropout; 4000 steps of batch 32 (peak learning rate 2.9e-3 after 300
  warm-up steps), validation every 250 steps.
* ``tiny``: seconds; for tests and smoke runs.

A run is deterministic for its seed (data order, initialisation, dropout),
and resumable: the checkpoint holds the model, the optimiser, the schedule,
the RNG state and the history, so an interrupted run resumed gives the same
result as an uninterrupted one.

Outputs in the run folder: ``checkpoint.pt``, ``best.pt`` (the model at the
best validation accuracy), ``results.json``, ``results.md`` and
``curves.png`` (learning curves, when matplotlib is installed).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..optim import inverse_sqrt_warmup
from .data import ListOpsConfig, Split, build
from .model import ATTENTIONS, LABELS, ListOpsClassifier, ModelConfig, count_parameters

__all__ = ["PRESETS", "TrainConfig", "evaluate", "load_results", "preset", "train"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run.

    Attributes
    ----------
    attention : str
        One of :data:`kernelattn.listops.model.ATTENTIONS`.
    seed : int
        Seeds the initialisation, the data order and dropout.
    data : ListOpsConfig
        The dataset (generated once, then cached).
    model : ModelConfig
    batch_size : int
        Examples per micro-batch.
    accumulate : int
        Micro-batches per optimiser step (effective batch ``batch_size * accumulate``).
    steps : int
        Optimiser steps.
    base_lr, warmup : float, int
        Learning rate ``base_lr * min(1, t / warmup) / sqrt(max(t, warmup))`` at step t.
    weight_decay : float
    betas : (float, float)
    ortho_weight : float
        lambda of the orthogonality penalty (added once per phi call).
    eval_every : int or None
        Optimiser steps between validations; None: once per epoch (a pass
        over the training split).
    eval_batch_size : int
    """

    attention: str = "glu"
    seed: int = 0
    data: ListOpsConfig = field(default_factory=ListOpsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    batch_size: int = 32
    accumulate: int = 1
    steps: int = 10_000
    base_lr: float = 0.005
    warmup: int = 1000
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.98)
    ortho_weight: float = 0.0
    eval_every: int | None = None
    eval_batch_size: int = 64

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {list(ATTENTIONS)}; got {self.attention!r}")
        for name in ("batch_size", "accumulate", "steps", "warmup", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if self.eval_every is not None and (not isinstance(self.eval_every, int) or self.eval_every < 1):
            raise ValueError(f"eval_every must be a positive integer or None; got {self.eval_every!r}")
        if not self.base_lr > 0:
            raise ValueError(f"base_lr must be positive; got {self.base_lr!r}")
        if self.weight_decay < 0 or self.ortho_weight < 0:
            raise ValueError("weight_decay and ortho_weight must be non-negative")
        if self.model.max_length < self.data.max_length:
            raise ValueError(f"model.max_length ({self.model.max_length}) is shorter than the data's "
                             f"max_length ({self.data.max_length})")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d["data"] = ListOpsConfig(**d["data"])
        d["model"] = ModelConfig(**d["model"])
        return cls(**d)


#: The LRA ListOps configuration of the paper (GPU).
_LRA = TrainConfig(data=ListOpsConfig(), model=ModelConfig(), batch_size=32, accumulate=1, steps=10_000,
                   base_lr=0.005, warmup=1000, eval_every=1000)
#: A few minutes per run on a 2-core CPU.
_CPU = TrainConfig(
    data=ListOpsConfig(max_depth=4, max_args=4, min_length=8, max_length=64, train=48_000, validation=1_000,
                       test=2_000),
    model=ModelConfig(max_length=64, hidden=64, heads=4, layers=2, mlp=128, dropout=0.0, attention_dropout=0.0),
    batch_size=32, steps=4000, base_lr=0.05, warmup=300, eval_every=250)
#: Seconds per run: tests and smoke runs.
_TINY = TrainConfig(
    data=ListOpsConfig(max_depth=3, max_args=3, min_length=4, max_length=24, train=256, validation=64, test=64),
    model=ModelConfig(max_length=24, hidden=16, heads=2, layers=1, mlp=32),
    batch_size=16, steps=20, base_lr=0.01, warmup=5, eval_every=10, eval_batch_size=32)
PRESETS = {"cpu": _CPU, "lra": _LRA, "tiny": _TINY}


def preset(name: str, **overrides) -> TrainConfig:
    """A preset of :data:`PRESETS` with fields replaced (``attention="glu", seed=1, steps=...``)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}; got {name!r}")
    return replace(PRESETS[name], **overrides)


# -- data ----------------------------------------------------------------------------------------------------

def _batch(split: Split, idx, device):
    """Tokens of ``idx`` cut to the longest of them (padding never changes the output), and labels."""
    n = int(split.lengths[idx].max())
    tokens = torch.from_numpy(split.tokens[idx, :n].astype(np.int64)).to(device)
    return tokens, torch.from_numpy(split.labels[idx]).to(device)


def _micro_batch_indices(n: int, batch_size: int, seed: int, micro_step: int) -> np.ndarray:
    """Indices of micro-batch ``micro_step`` (0, 1, ...): a fresh permutation every epoch, last partial batch dropped.

    Stateless (a function of the seed and the step), so a resumed run sees the same batches.
    """
    per_epoch = n // batch_size
    epoch, i = divmod(micro_step, per_epoch)
    perm = np.random.default_rng([seed, epoch, 0x115]).permutation(n)
    return perm[i * batch_size:(i + 1) * batch_size]


@torch.no_grad()
def evaluate(model, split: Split, *, batch_size: int = 64, device="cpu") -> dict:
    """Accuracy and mean cross-entropy of ``model`` on ``split`` (eval mode; order-independent).

    Examples are batched by length (sorted), so little padding is computed.
    """
    was_training = model.training
    model.eval()
    order = np.argsort(split.lengths, kind="stable")
    correct, loss_sum = 0, 0.0
    for start in range(0, len(order), batch_size):
        tokens, labels = _batch(split, order[start:start + batch_size], device)
        logits = model(tokens).float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
    model.train(was_training)
    n = max(1, len(order))
    return {"accuracy": correct / n, "loss": loss_sum / n}


# -- training ------------------------------------------------------------------------------------------------

class CheckpointMismatch(ValueError):
    """The run folder holds a checkpoint of another configuration (args: message, checkpoint path)."""

    def __str__(self):
        return str(self.args[0])


def _device(device):
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _rng_state(device):
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state, device):
    torch.set_rng_state(state["torch"].cpu())  # map_location may have moved them
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind


def train(cfg: TrainConfig, out_dir: str, *, data_dir: str | None = None, resume: bool = True,
          stop_after: int | None = None, max_time: float | None = None, device=None, progress: bool = True,
          plot: bool = True, verbose: bool = True) -> dict:
    """Train, validate, test at the best validation checkpoint; write the results into ``out_dir``.

    Parameters
    ----------
    cfg : TrainConfig
    out_dir : str
        Run folder (created): checkpoint, best model, results, plot.
    data_dir : str, optional
        Cache folder of the generated data; None generates it in memory.
    resume : bool, default True
        Continue from ``out_dir/checkpoint.pt`` if there is one (its config
        must equal ``cfg``); False starts afresh.
    stop_after : int, optional
        Stop after this optimiser step (saving a checkpoint), as an
        interruption would; resume later with the same call. (Ctrl-C also
        stops a run; it resumes from the last validation's checkpoint.)
    max_time : float, optional
        Stop training after this many seconds of this call (a time budget),
        then validate and test. The result then depends on the machine's speed.
    device : str or torch.device, optional
        Default: CUDA when available, else CPU.
    progress : bool, default True
        tqdm progress bars, shown only when stderr is a terminal.
    plot : bool, default True
        Draw ``curves.png`` (needs matplotlib).

    Returns
    -------
    dict
        The results (also written to ``results.json``): ``status``
        ("finished", "time budget" or "interrupted" by ``stop_after``), the config, parameter count,
        ``best_step``, ``best_val_accuracy``, ``test_accuracy``,
        ``test_loss``, ``history`` (one row per validation), ``train_curve``
        and timing.
    """
    from tqdm.auto import tqdm

    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig; got {type(cfg).__name__}")
    device = _device(device)
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path, best_path = os.path.join(out_dir, "checkpoint.pt"), os.path.join(out_dir, "best.pt")
    splits = build(cfg.data, data_dir, verbose=verbose)
    train_split = splits["train"]
    per_epoch = len(train_split) // cfg.batch_size
    if per_epoch < 1:
        raise ValueError(f"the training split ({len(train_split)}) is smaller than one batch ({cfg.batch_size})")
    eval_every = cfg.eval_every or max(1, per_epoch // cfg.accumulate)

    torch.manual_seed(cfg.seed)
    model = ListOpsClassifier(cfg.model, cfg.attention, seed=cfg.seed).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.base_lr, betas=cfg.betas,
                                  weight_decay=cfg.weight_decay)
    multiplier = inverse_sqrt_warmup(cfg.warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: multiplier(s + 1))
    state = {"step": 0, "history": [], "train_curve": [], "best_val_accuracy": -1.0, "best_step": 0,
             "train_seconds": 0.0, "window": [0.0, 0, 0]}  # window: loss sum, correct, examples

    if resume and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ckpt["config"] != cfg.to_dict():
            raise CheckpointMismatch(f"{ckpt_path} was written by a different configuration; pass resume=False "
                                     f"(--restart) to start afresh or use another output folder", ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state = ckpt["state"]
        _set_rng_state(ckpt["rng"], device)
        if verbose:
            print(f"resumed {out_dir} at step {state['step']}/{cfg.steps}")

    def checkpoint():
        _save({"config": cfg.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "state": state, "rng": _rng_state(device)}, ckpt_path)

    def validate():
        val = evaluate(model, splits["validation"], batch_size=cfg.eval_batch_size, device=device)
        loss_sum, correct, seen = state["window"]
        row = {"step": state["step"], "epoch": state["step"] * cfg.accumulate / per_epoch,
               "lr": optimizer.param_groups[0]["lr"],
               "train_loss": loss_sum / max(1, seen), "train_accuracy": correct / max(1, seen),
               "val_loss": val["loss"], "val_accuracy": val["accuracy"], "seconds": state["train_seconds"]}
        state["history"].append(row)
        state["window"] = [0.0, 0, 0]
        if val["accuracy"] > state["best_val_accuracy"]:
            state["best_val_accuracy"], state["best_step"] = val["accuracy"], state["step"]
            _save(model.state_dict(), best_path)
        return row

    status, start = "finished", time.perf_counter()
    model.train()
    bar = tqdm(total=cfg.steps, initial=state["step"], desc=f"{cfg.attention} seed {cfg.seed}",
               disable=None if progress else True,  # None: only when stderr is a terminal
               dynamic_ncols=True, leave=verbose)
    try:
        while state["step"] < cfg.steps:
            if stop_after is not None and state["step"] >= stop_after:
                status = "interrupted"
                break
            if max_time is not None and time.perf_counter() - start >= max_time:
                status = "time budget"
                break
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for k in range(cfg.accumulate):
                micro = state["step"] * cfg.accumulate + k
                tokens, labels = _batch(train_split, _micro_batch_indices(len(train_split), cfg.batch_size,
                                                                          cfg.seed, micro), device)
                logits = model(tokens)
                task = F.cross_entropy(logits.float(), labels)
                loss = task
                if cfg.ortho_weight:
                    loss = loss + model.orthogonality_penalty(cfg.ortho_weight)
                (loss / cfg.accumulate).backward()
                step_loss += float(task.detach()) / cfg.accumulate
                w = state["window"]
                w[0] += float(task.detach()) * len(labels)
                w[1] += int((logits.argmax(-1) == labels).sum())
                w[2] += len(labels)
            optimizer.step()
            scheduler.step()
            state["step"] += 1
            state["train_curve"].append(step_loss)
            state["train_seconds"] += time.perf_counter() - t0
            bar.update(1)
            if state["step"] % eval_every == 0 or state["step"] == cfg.steps:
                row = validate()
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", val=f"{row['val_accuracy']:.3f}")
                checkpoint()
    except KeyboardInterrupt:
        # the step in flight may be half done: keep the last checkpoint (saved at every validation)
        done = torch.load(ckpt_path, weights_only=False)["state"]["step"] if os.path.exists(ckpt_path) else 0
        print(f"\ninterrupted; the same call resumes from step {done} (the last checkpoint)")
        raise
    finally:
        bar.close()

    if status != "finished" and state["step"] < cfg.steps:
        checkpoint()
        if status == "interrupted":
            return _results(cfg, model, state, out_dir, status, eval_every, plot=plot)
    if not state["history"] or state["history"][-1]["step"] != state["step"]:
        validate()  # the time budget stopped between validations
        checkpoint()
    best = ListOpsClassifier(cfg.model, cfg.attention, seed=cfg.seed).to(device)
    best.load_state_dict(torch.load(best_path, map_location=device, weights_only=True))
    test = evaluate(best, splits["test"], batch_size=cfg.eval_batch_size, device=device)
    state["test_accuracy"], state["test_loss"] = test["accuracy"], test["loss"]
    return _results(cfg, model, state, out_dir, status, eval_every, plot=plot)


def _results(cfg, model, state, out_dir, status, eval_every, *, plot) -> dict:
    steps_timed = max(1, len(state["train_curve"]))
    res = {
        "status": status,
        "attention": cfg.attention,
        "label": LABELS[cfg.attention],
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "parameters": count_parameters(model),
        "steps": state["step"],
        "eval_every": eval_every,
        "best_step": state["best_step"],
        "best_val_accuracy": state["best_val_accuracy"],
        "test_accuracy": state.get("test_accuracy"),
        "test_loss": state.get("test_loss"),
        "train_seconds": state["train_seconds"],
        "seconds_per_step": state["train_seconds"] / steps_timed,
        "history": state["history"],
        "train_curve": state["train_curve"],
        "torch": torch.__version__,
        "device": str(next(model.parameters()).device),
    }
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(results_markdown(res))
    if plot:
        plot_curves([res], os.path.join(out_dir, "curves.png"))
    return res


def load_results(out_dir: str) -> dict | None:
    """``out_dir/results.json`` if it exists, else None."""
    path = os.path.join(out_dir, "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def results_markdown(res: dict) -> str:
    """A Markdown summary of one run: the result, then the validation history."""
    cfg = res["config"]
    pct = (lambda x: "–" if x is None else f"{100 * x:.2f}")
    lines = [f"# ListOps: {res['label']} (seed {res['seed']})", "",
             f"status: {res['status']}; {res['steps']} steps of batch {cfg['batch_size']} x {cfg['accumulate']}; "
             f"{res['parameters']:,} parameters; {1e3 * res['seconds_per_step']:.1f} ms/step on {res['device']}",
             "", "| attention | seed | best step | val acc (%) | test acc (%) | test loss |",
             "|---|---|---|---|---|---|",
             f"| {res['label']} | {res['seed']} | {res['best_step']} | {pct(res['best_val_accuracy'])} | "
             f"{pct(res['test_accuracy'])} | "
             f"{'–' if res['test_loss'] is None else format(res['test_loss'], '.4f')} |",
             "", "## Validation history", "",
             "| step | epoch | lr | train loss | train acc (%) | val loss | val acc (%) |",
             "|---|---|---|---|---|---|---|"]
    for row in res["history"]:
        lines.append(f"| {row['step']} | {row['epoch']:.2f} | {row['lr']:.2e} | {row['train_loss']:.4f} | "
                     f"{pct(row['train_accuracy'])} | {row['val_loss']:.4f} | {pct(row['val_accuracy'])} |")
    return "\n".join(lines) + "\n"


def plot_curves(runs: list[dict], path: str, *, smooth: int = 50) -> str | None:
    """Learning curves: training loss (smoothed) and validation accuracy against step; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {name: f"C{i}" for i, name in enumerate(ATTENTIONS)}
    labelled = set()
    for res in runs:
        curve = np.asarray(res["train_curve"], dtype=float)
        label = res["label"] if res["attention"] not in labelled else None
        labelled.add(res["attention"])
        colour = colours[res["attention"]]
        if len(curve):
            k = max(1, min(smooth, len(curve) // 10 or 1))
            smoothed = np.convolve(curve, np.ones(k) / k, mode="valid")
            ax_loss.plot(np.arange(k, len(curve) + 1), smoothed, color=colour, alpha=0.8, lw=1, label=label)
        hist = res["history"]
        ax_acc.plot([r["step"] for r in hist], [100 * r["val_accuracy"] for r in hist], color=colour,
                    marker="o", ms=2, lw=1, alpha=0.8, label=label)
    ax_loss.set(xlabel="step", ylabel="training loss (moving average)", title="ListOps: training loss")
    ax_acc.set(xlabel="step", ylabel="validation accuracy (%)", title="ListOps: validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def describe_config(cfg: TrainConfig) -> str:
    """A few lines describing ``cfg`` (data, model, schedule)."""
    d, m = cfg.data, cfg.model
    peak = cfg.base_lr * inverse_sqrt_warmup(cfg.warmup)(cfg.warmup)
    return (f"data: depth <= {d.max_depth}, <= {d.max_args} arguments, {d.min_length}-{d.max_length} tokens, "
            f"{d.train}/{d.validation}/{d.test} examples (seed {d.seed})\n"
            f"model: hidden {m.hidden}, {m.heads} heads, {m.layers} layers, MLP {m.mlp}, length {m.max_length}, "
            f"dropout {m.dropout}/{m.attention_dropout}\n"
            f"training: {cfg.steps} steps of {cfg.batch_size} x {cfg.accumulate}, AdamW wd {cfg.weight_decay}, "
            f"lr {cfg.base_lr} x min(1, t/{cfg.warmup})/sqrt(max(t, {cfg.warmup})) (peak {peak:.2e}), "
            f"lambda {cfg.ortho_weight}")

