"""``demo`` (the default command): trainable kernels distilled from a real transformer's attention.

Uses the real queries, keys and values shipped with kernelattn
(:func:`kernelattn.data.minilm`: the sentence transformer all-MiniLM-L6-v2
on passages of English text). For one layer it

1. fits each trainable kernel (FFN, GLU, GLU x2, AOGLU x3, Hedgehog) so that
   linear attention imitates the layer's softmax heads, on the held-in
   passages, with :func:`kernelattn.fit_feature_map`;
2. prints a table of parameters, output error and attention KL on the
   held-out passage, for the fitted kernels and the fixed maps elu+1, relu and
   FAVOR+, and says whether every trainable kernel beats every fixed map;
3. times softmax attention against linear attention with fitted kernels at
   growing N and reports the crossover length;
4. draws a figure (attention maps of softmax, the best fitted kernel and
   elu+1; held-out error against training step) when matplotlib is installed.

Runs on NumPy alone (through the hand-derived gradients); ``--backend torch``
or ``jax`` runs the same on that library.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import sys
import time

import numpy as np

from .. import __version__, _dispatch, kinds
from .._timing import crossover_text, median_time
from .._tree import tree_map
from ..attention import linear_attention, linear_attention_weights, softmax_attention, softmax_attention_weights
from ..data import minilm
from ..data._minilm import HEADS, LAYERS
from ..feature_maps import FeatureMap, feature_map, num_params
from ..fit import approximation_error, fit_feature_map
from ..testing import to_numpy
from ._args import (UsageError, int_list, nonnegative_float, nonnegative_int, output_file, positive_float,
                    positive_int, require_library, seconds)

HELP = "fit trainable kernels to a real transformer's softmax attention; error table, timing, figure (default)"

#: label -> (kind, options) of the trainable kernels, in table order.
TRAINABLE = {
    "ffn": ("ffn", {}),
    "glu": ("glu", {}),
    "glu x2": ("glu", {"depth": 2}),
    "aoglu x3": ("aoglu", {"depth": 3}),
    "hedgehog": ("hedgehog", {}),
}
#: label -> kind of the fixed maps compared against.
FIXED = {"elu+1": "elu", "relu": "relu", "favor+": "favor"}
#: kernels timed against softmax (the figure's reference map and two fitted ones).
TIMED = ("elu+1", "glu", "aoglu x3", "hedgehog")


def _kinds(text: str):
    """``--kinds``: 'all', or comma-separated table labels or registered kind names -> (trainable, fixed).

    A kind name that is no label of the tables (``aoglu``, or one added with
    ``ka.register_feature_map``) gets a row of its own, with default options.
    """
    if text.strip() == "all":
        return dict(TRAINABLE), dict(FIXED)
    by_kind = {kind: lab for lab, kind in FIXED.items()}
    by_kind.update({kind: lab for lab, (kind, opts) in TRAINABLE.items() if not opts})
    trainable, fixed = {}, {}
    for token in (t.strip() for t in text.split(",")):
        label = by_kind.get(token, token)
        if label in TRAINABLE:
            trainable[label] = TRAINABLE[label]
        elif label in FIXED:
            fixed[label] = FIXED[label]
        elif kinds.get(token) is not None:
            if kinds.get(token).trainable:
                trainable[token] = (token, {})
            else:
                fixed[token] = token
        else:
            raise argparse.ArgumentTypeError(
                f"expected 'all' or comma-separated kernels from {list(TRAINABLE) + list(FIXED)} or kinds "
                f"{kinds.names()}; got {token!r}")
    return trainable, fixed
DEFAULT_OUT = os.path.join("kernelattn_out", "demo.png")
#: plain-text --help (the module docstring above is reStructuredText, for the docs).
DESCRIPTION = """\
Trainable kernels distilled from a real transformer's attention (default command).

Uses the real queries, keys and values shipped with kernelattn (the sentence
transformer all-MiniLM-L6-v2 on passages of English text). For one layer it
  1. fits each trainable kernel (FFN, GLU, GLU x2, AOGLU x3, Hedgehog) so that
     linear attention imitates the layer's softmax heads, on held-in passages;
  2. prints parameters, output error and attention KL on the held-out passage,
     for the fitted kernels and the fixed maps elu+1, relu and FAVOR+;
  3. times softmax against linear attention at growing N (the crossover length);
  4. draws a figure (attention maps, held-out error per step) with matplotlib.
Runs on NumPy alone; --backend torch or jax runs the same on that library."""
EXAMPLES = ("python -m kernelattn demo --steps 150 --layer 0 --heads all",
            "python -m kernelattn --backend numpy --sizes 256,1024 --out demo.png")


def _backend(name: str):
    """(library name, NumPy -> array conversion) for ``--backend``."""
    if name == "auto":
        name = "torch" if importlib.util.find_spec("torch") is not None else "numpy"
    if name == "numpy":
        return name, (lambda a: a)
    if name not in ("torch", "jax"):
        raise UsageError("--backend", f"unknown backend {name!r}; choose auto, numpy, torch or jax")
    adapter = _dispatch.load_adapter(name)  # the library's own conversions and settings (backends/)
    adapter.inference()  # the manual gradients need no graph; timing neither
    return name, (lambda a: adapter.from_numpy(np.asarray(a, dtype=np.float32)))


@contextlib.contextmanager
def _one_thread(lib):
    """Run the fits with one BLAS / intra-op thread.

    Their matrices are tiny (96 x 32 per head), where a second thread costs
    more in synchronisation than it saves, and costs 10x or more when another
    process is using the cores. Timing runs with the library's defaults.
    """
    adapter = _dispatch.adapter_for(lib)
    try:
        from threadpoolctl import threadpool_limits  # optional; limits NumPy's BLAS
    except ImportError:
        limits = contextlib.nullcontext()
    else:
        limits = threadpool_limits(1, user_api="blas")
    with limits, (contextlib.nullcontext() if adapter is None else adapter.threads(1)):
        yield


def _heads(text: str):
    """'all' -> None, else the distinct head indices of the shipped data."""
    if text.strip() == "all":
        return None
    try:
        heads = [int(h) for h in text.split(",")]
    except ValueError:
        heads = None
    if not heads or any(not 0 <= h < HEADS for h in heads) or len(set(heads)) != len(heads):
        raise argparse.ArgumentTypeError(f"expected 'all' or distinct comma-separated head indices 0-{HEADS - 1} "
                                         f"such as 0,4, got {text!r}")
    return heads


def _tile(a, n):
    """(B, H, N, d) passages laid end to end and repeated to length n: (1, H, n, d)."""
    seq = np.concatenate(list(a), axis=1)  # (H, B*N, d)
    reps = -(-n // seq.shape[1])
    return np.concatenate([seq] * reps, axis=1)[None, :, :n, :]


def _verdict(rows, trainable, fixed):
    trained = {lab: r for lab, r in rows.items() if lab in trainable}
    fixed = {lab: r for lab, r in rows.items() if lab in fixed}
    if not trained or not fixed:
        return "(no trainable kernel or no fixed map chosen with --kinds: nothing to compare)"
    best_fixed_out = min(r[1] for r in fixed.values())
    best_fixed_kl = min(r[2] for r in fixed.values())
    losers = [lab for lab, r in trained.items() if not (r[1] < best_fixed_out and r[2] < best_fixed_kl)]
    if not losers:
        return ("Every trainable kernel beats every fixed map on the held-out passage, in output error "
                "and in attention KL.")
    return (f"Not every trainable kernel beats every fixed map on the held-out passage: {', '.join(losers)} "
            f"does not beat the best fixed map (output error {best_fixed_out:.3f}, attention KL "
            f"{best_fixed_kl:.3f}) in both measures.")


def _figure(path, sample, head, maps, histories, fixed_rows, best_label, to_array):
    """Attention maps (softmax, best fitted kernel, elu+1) and held-out error against training step."""
    try:
        from matplotlib.colors import PowerNorm
        from matplotlib.figure import Figure
    except ImportError:
        return None
    q, k = (to_array(a[-1:, head:head + 1]) for a in (sample.q, sample.k))
    panels = [("softmax (exact)", to_numpy(softmax_attention_weights(q, k))[0, 0])]
    for label in ([] if best_label is None else [best_label]) + ["elu+1"]:
        phi = maps.get(label, "elu")
        if not isinstance(phi, str):
            phi = _one_head(phi, head)
        panels.append((f"{label} ({'fitted' if label in histories else 'fixed'})",
                       to_numpy(linear_attention_weights(q, k, feature_map=phi))[0, 0]))
    fig = Figure(figsize=(13, 8.2), layout="constrained")
    grid = fig.add_gridspec(2, len(panels), height_ratios=[1.0, 0.8])
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=float(max(w.max() for _, w in panels)))  # small weights visible
    for i, (title, w) in enumerate(panels):
        ax = fig.add_subplot(grid[0, i])
        im = ax.imshow(w, cmap="magma", norm=norm)
        ax.set_title(title)
        ax.set_xlabel("key token")
        if i == 0:
            ax.set_ylabel("query token")
    fig.colorbar(im, ax=fig.axes, shrink=0.6, label="attention weight (square-root scale)")
    ax = fig.add_subplot(grid[1, :])
    for label, hist in histories.items():
        ax.plot(hist.eval_steps, hist.eval_output_error, marker="o", ms=3, label=f"{label} (fitted)")
    for j, (label, (_, out_err, _kl)) in enumerate(fixed_rows.items()):
        ax.axhline(out_err, ls="--", lw=1, color=f"C{len(histories) + j}", label=f"{label} (fixed)")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out output error (relative RMS)")
    ax.legend(ncol=4, fontsize="small")
    ax.grid(alpha=0.3)
    fig.suptitle(f"all-MiniLM-L6-v2 layer {sample.layer}, head {sample.heads[head]}: held-out passage "
                 f"'{sample.sources[-1]}'")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _peaked_head(sample):
    """Index of the head whose softmax attention on the held-out passage has the lowest entropy."""
    p = to_numpy(softmax_attention_weights(sample.q, sample.k))  # (1, H, N, N), NumPy
    entropy = -np.sum(p * np.log(np.where(p > 0, p, 1.0)), axis=-1).mean(axis=(0, 2))
    return int(np.argmin(entropy))


def _one_head(phi, head):
    """The map restricted to one head (parameters sliced on the head axis)."""
    def sl(a):
        return a[head:head + 1]

    return FeatureMap(dataclasses.replace(phi.spec, num_heads=1), tree_map(sl, phi.params), tree_map(sl, phi.buffers))


def run(args) -> int:
    t_start = time.perf_counter()
    if args.backend != "auto":
        require_library("--backend", args.backend)
    if args.out and not os.path.isdir(args.out) and not os.path.splitext(args.out)[1]:
        args.out += ".png"  # what matplotlib would write; say so in the output
    output_file("--out", args.out, _figure_types(args.out))
    lib, to_array = _backend(args.backend)
    out = sys.stdout
    np.seterr(all="ignore")
    sample = minilm(args.layer, heads=args.heads)
    train, test = sample.split(held_out=1)
    B, H, N, d = sample.q.shape
    print(f"kernelattn {__version__}: trainable feedforward kernels distilled from real softmax attention", file=out)
    print(f"data: all-MiniLM-L6-v2 layer {sample.layer}, {H} head(s) of width {d}; passages of {N} tokens "
          f"from standard-library docstrings: held-in {', '.join(train.sources)}; held-out {test.sources[0]}",
          file=out)
    print(f"fit: loss {args.loss}, Adam lr {args.lr}, {args.steps} steps, full batch; backend {lib}\n", file=out)

    tq, tk, tv = (to_array(a) for a in (train.q, train.k, train.v))
    eq, ek, ev = (to_array(a) for a in (test.q, test.k, test.v))
    trainable, fixed = args.kinds
    rows, maps, histories = {}, {}, {}
    with _one_thread(lib):
        for label, (kind, opts) in trainable.items():
            phi0 = feature_map(kind, num_heads=H, head_dim=d, seed=args.seed, like=tq, **opts)
            phi, hist = fit_feature_map(
                phi0, tq, tk, tv, loss=args.loss, steps=args.steps, lr=args.lr, ortho_weight=args.ortho_weight,
                eval_data=(eq, ek, ev), eval_every=max(1, args.steps // 15), seed=args.seed,
                progress={"desc": f"fitting {label}"} if args.progress else False)
            err = approximation_error(phi, eq, ek, ev)
            rows[label] = (num_params(phi), err.output_error, err.attention_kl, hist.seconds)
            maps[label], histories[label] = phi, hist
    fixed_rows = {}
    for label, kind in fixed.items():
        phi = feature_map(kind, num_heads=H, head_dim=d, seed=args.seed, like=eq)
        err = approximation_error(phi, eq, ek, ev)
        rows[label] = fixed_rows[label] = (0, err.output_error, err.attention_kl)
        maps[label] = phi

    print(f"Held-out passage '{test.sources[0]}' ({N} tokens x {H} heads): linear attention against the "
          f"model's softmax attention", file=out)
    print(f"  {'kernel':<10} {'params':>8} {'output error':>13} {'attention KL':>13} {'fit time':>9}", file=out)
    for label, row in rows.items():
        fit_time = f"{row[3]:7.1f} s" if len(row) > 3 else f"{'(fixed)':>9}"
        print(f"  {label:<10} {row[0]:>8,} {row[1]:>13.3f} {row[2]:>13.3f} {fit_time}", file=out)
    print("  output error: relative RMS error of the output; attention KL: mean KL(softmax || linear) per "
          "query row, nats", file=out)
    print(f"  before fitting (seeded initialisation) the trainable kernels had output errors "
          + ", ".join(f"{lab} {histories[lab].eval_output_error[0]:.3f}" for lab in trainable), file=out)
    print(_verdict(rows, trainable, fixed) + "\n", file=out)
    timed = [lab for lab in TIMED if lab in rows] + [lab for lab in rows if lab not in TRAINABLE and lab not in FIXED]

    if args.sizes and timed:
        sizes = args.sizes
        print(f"Time, non-causal, {H} heads (median of {args.repeats}; ratio = softmax time / linear time, "
              f">1 means linear attention is faster); inputs: the passages tiled to length N", file=out)
        print(f"  {'N':>6} {'softmax':>10}" + "".join(f" {lab:>19}" for lab in timed), file=out)
        times = {lab: [] for lab in timed}
        soft = []
        for n in sizes:
            Q, K, V = (to_array(_tile(a, n)) for a in (sample.q, sample.k, sample.v))
            ts = median_time(lambda: softmax_attention(Q, K, V), repeats=args.repeats, budget=args.budget)
            soft.append(ts)
            cells = []
            for lab in timed:
                phi = maps[lab]
                tl = median_time(lambda: linear_attention(Q, K, V, feature_map=phi), repeats=args.repeats,
                                 budget=args.budget)
                times[lab].append(tl)
                cells.append(f"{tl * 1e3:9.1f} ms x{ts / tl:5.2f}")
            print(f"  {n:>6} {ts * 1e3:7.1f} ms" + "".join(f" {c:>19}" for c in cells), file=out)
        for lab in timed:
            print(f"  crossover {lab:<9}: {crossover_text(sizes, soft, times[lab])}", file=out)
        print(file=out)

    if args.out:
        best = min(trainable, key=lambda lab: rows[lab][1]) if trainable else None
        path = _figure(args.out, sample, _peaked_head(test), maps, histories, fixed_rows, best, to_array)
        if path is None:
            print("figure: matplotlib is not installed (pip install matplotlib to draw it)", file=out)
        else:
            print(f"figure: {os.path.abspath(path)}", file=out)
    print(f"done in {time.perf_counter() - t_start:.1f} s", file=out)
    return 0


def _figure_types(path):
    """File types matplotlib can write (None: any, when it is missing or the path is a PNG)."""
    if not path or os.path.splitext(path)[1].lower() in ("", ".png"):
        return None
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        return None
    return set(FigureCanvasBase.get_supported_filetypes())


def add_arguments(p) -> None:
    p.add_argument("--steps", type=positive_int, default=150, help="optimiser steps per kernel (default 150)")
    p.add_argument("--lr", type=positive_float, default=2e-2, help="Adam learning rate (default 0.02)")
    p.add_argument("--loss", default="attention_kl", choices=["attention_kl", "output_mse"],
                   help="distillation loss (default attention_kl, as Hedgehog)")
    p.add_argument("--ortho-weight", type=nonnegative_float, default=0.0,
                   help="orthogonality penalty lambda (default 0)")
    p.add_argument("--layer", type=int, default=0, choices=range(LAYERS), metavar=f"{{0-{LAYERS - 1}}}",
                   help=f"MiniLM layer 0-{LAYERS - 1} (default 0)")
    p.add_argument("--heads", type=_heads, default=None, metavar="HEADS",
                   help=f"'all' (default) or comma-separated head indices 0-{HEADS - 1}")
    p.add_argument("--backend", default="auto", choices=["auto", "numpy", "torch", "jax"],
                   help="auto (torch if installed, else numpy; default), numpy, torch or jax")
    p.add_argument("--sizes", type=int_list(allow_empty=True), default=[256, 512, 1024, 2048, 4096],
                   metavar="N,N,...", help="comma-separated N to time (default 256,512,1024,2048,4096; "
                                           "empty string: skip timing)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timing repeats per size (default 5)")
    p.add_argument("--budget", type=seconds, default=3.0, help="seconds per timing before stopping early (default 3)")
    p.add_argument("--kinds", type=_kinds, default="all", metavar="KERNELS",
                   help="'all' (default) or comma-separated kernels: table labels (glu, 'glu x2', elu+1...) or "
                        "feature-map kind names, including kinds added with ka.register_feature_map")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the initial kernels (default 0)")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"figure path (default {DEFAULT_OUT}; empty string: no figure)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
