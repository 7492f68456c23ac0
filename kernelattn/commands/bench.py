"""``bench``: the speed report. Each path against softmax attention and against its floor.

For every installed library (NumPy, PyTorch, JAX) and N, one process measures
side by side:

* linear attention, non-causal and causal, through dispatch (``fast``: the
  library's fast path where it has one) and forced onto the array-API core
  (``agnostic``) where the two differ;
* softmax attention: torch ``scaled_dot_product_attention``,
  ``jax.nn.dot_product_attention``, or :func:`kernelattn.softmax_attention`
  for NumPy;
* the arithmetic floor F of linear attention in that library: the two
  feature-map products and the two attention products alone, on preallocated
  inputs (the time no implementation of this kernel can beat by much).

It prints the ratio table (``x softmax`` = softmax time / path time, above 1
is faster; ``x floor`` = path time / F) and the crossover N per path, and
writes a log-log plot (one line per path, softmax dashed), a JSON file and a
Markdown table with the machine they came from. Compare ratios, not seconds:
shared machines are noisy.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys

import numpy as np

from .. import __version__, _dispatch
from .._timing import crossover_text, median_time
from ..attention import linear_attention, softmax_attention
from ..data import default_inputs
from ..feature_maps import KINDS, feature_map
from ._args import UsageError, choice_list, int_list, output_folder, positive_int, seconds

HELP = "speed report: linear attention vs softmax and vs its arithmetic floor, per backend"
DESCRIPTION = """\
The speed report: each path of linear attention against softmax attention and
against its arithmetic floor.

For every installed library (NumPy, PyTorch, JAX) and N it measures linear
attention, non-causal and causal, through dispatch (the library's fast path
where it has one) and forced onto the array-API core; softmax attention (torch
scaled_dot_product_attention, jax.nn.dot_product_attention, or kernelattn's
own for NumPy); and the floor F: the four matrix products of linear attention
alone. It prints the ratio table ("x softmax" = softmax time / path time, above
1 is faster; "x F" = path time / F) and the crossover N per path, and writes a
log-log plot, a JSON file and Markdown and reST tables. Compare ratios, not
seconds: shared machines are noisy."""
EXAMPLES = ("python -m kernelattn bench --backends numpy,torch --sizes 256,1024,4096",)
BACKENDS = ("numpy", "torch", "jax")


def add_arguments(p) -> None:
    p.add_argument("--backends", type=choice_list(BACKENDS), default=list(BACKENDS), metavar="NAME,...",
                   help="comma-separated: numpy, torch, jax (default all three; missing ones are skipped)")
    p.add_argument("--sizes", type=int_list(), default=[256, 512, 1024, 2048, 4096, 8192], metavar="N,N,...",
                   help="comma-separated N (default 256,512,1024,2048,4096,8192)")
    p.add_argument("--kernel", default="ffn", choices=sorted(KINDS), help="feature map kind (default the paper's ffn)")
    p.add_argument("--heads", type=positive_int, default=8, help="attention heads (default 8)")
    p.add_argument("--head-dim", type=positive_int, default=64, help="width of each head (default 64)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timing repeats per size (default 5)")
    p.add_argument("--budget", type=seconds, default=3.0,
                   help="seconds per measurement before stopping early (default 3)")
    p.add_argument("--softmax-limit", type=seconds, default=4.0,
                   help="skip softmax at larger N once one call takes longer than this many seconds (default 4)")
    p.add_argument("--out", default="kernelattn_out",
                   help="folder for bench.png, bench.json, bench.md and bench.rst (default kernelattn_out)")
    p.add_argument("--no-plot", action="store_true", help="no plot")


class _Lib:
    """How to run one library: convert inputs, wrap for jit, softmax, and the floor products."""

    def __init__(self, name):
        self.name = name
        if name == "numpy":
            self.to, self.wrap = (lambda a: a), (lambda f: f)
            self.softmax_name = "kernelattn.softmax_attention"
            self.softmax = lambda q, k, v, causal: softmax_attention(q, k, v, causal=causal)
            self.matmul = np.matmul
        elif name in ("torch", "jax"):
            adapter = _dispatch.load_adapter(name)  # the library's own conversion, jit and softmax (backends/)
            adapter.inference()
            self.to, self.wrap = adapter.from_numpy, adapter.jit
            self.softmax_name, self.softmax = adapter.native_softmax()
            self.matmul = adapter.jit(adapter.namespace().matmul)
        else:
            raise UsageError("--backends", f"unknown backend {name!r}; choose {', '.join(BACKENDS)}")

    def floor(self, q, k, v, W):
        """The four matrix products of linear attention alone: x W twice, phi(K)^T V, phi(Q) S."""
        mm = self.matmul
        fq = mm(q, W)
        fk = mm(k, W)
        S = mm(fk.transpose(0, 1, 3, 2) if self.name != "torch" else fk.transpose(-1, -2), v)
        return mm(fq, S)


def _machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "date": datetime.date.today().isoformat()}


def _versions(libs):
    out = {"kernelattn": __version__, "numpy": np.__version__}
    for name in libs:
        if name != "numpy":
            out[name] = sys.modules[name].__version__
    return out


def run(args) -> int:
    output_folder("--out", args.out)
    sizes = args.sizes
    names = list(dict.fromkeys(args.backends))  # in order, once each
    H, d = args.heads, args.head_dim
    libs = []
    for name in names:
        try:
            libs.append(_Lib(name))
        except ImportError:
            print(f"(skipping {name}: not installed)")
    machine = _machine()
    print(f"kernelattn {__version__} speed report: {args.kernel} kernel, B=1, H={H}, d=m={d}, float32, "
          f"median of {args.repeats}")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['platform']}, {machine['date']}\n")

    results = {}  # (lib, path) -> [time or None per size]
    for lib in libs:
        paths = ["softmax", "floor", "non-causal", "causal"]
        has_fast = False
        times = {p: [] for p in paths + ["non-causal agnostic", "causal agnostic"]}
        softmax_off = {False: False, True: False}
        for n in sizes:
            q, k, v = default_inputs(n, num_heads=H, head_dim=d, seed=1)
            Q, K, V = (lib.to(a) for a in (q, k, v))
            phi = feature_map(args.kernel, num_heads=H, head_dim=d, seed=0, like=Q)
            W = lib.to(np.ascontiguousarray(np.random.default_rng(0).standard_normal((H, d, d)), dtype=np.float32))
            t = lambda f: median_time(f, repeats=args.repeats, budget=args.budget)  # noqa: E731
            times["floor"].append(t(lambda: lib.floor(Q, K, V, W)))
            for causal in (False, True):
                label = "causal" if causal else "non-causal"
                fast = lib.wrap(lambda Q, K, V, phi, c=causal: linear_attention(Q, K, V, feature_map=phi, causal=c))
                core = lib.wrap(lambda Q, K, V, phi, c=causal: linear_attention(Q, K, V, feature_map=phi, causal=c,
                                                                                 backend="agnostic"))
                times[label].append(t(lambda: fast(Q, K, V, phi)))
                from .. import explain_dispatch

                res = explain_dispatch("linear_attention", Q, causal=causal, method="auto", masked=False,
                                       kind=getattr(phi, "kind", phi))
                if res.backend != "agnostic":
                    has_fast = True
                    times[f"{label} agnostic"].append(t(lambda: core(Q, K, V, phi)))
                else:
                    times[f"{label} agnostic"].append(None)
            sm = []
            for causal in (False, True):
                if softmax_off[causal]:
                    sm.append(None)
                    continue
                ts = t(lambda: lib.softmax(Q, K, V, causal))
                sm.append(ts)
                if ts > args.softmax_limit:
                    softmax_off[causal] = True
            times["softmax"].append(sm)
            print(f"  measured {lib.name} N={n}", file=sys.stderr)
        results[lib.name] = {"times": times, "has_fast": has_fast, "softmax_name": lib.softmax_name}

    versions = _versions([lib.name for lib in libs])  # the libraries measured, not the skipped ones
    report = _report(results, sizes, args, machine, versions)
    print(report)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(report + "\n")
    with open(os.path.join(args.out, "bench.rst"), "w") as f:
        f.write(_report_rst(results, sizes, args, machine, versions))
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump({"machine": machine, "versions": versions, "sizes": sizes, "kernel": args.kernel,
                   "results": results}, f, indent=1)
    if not args.no_plot:
        path = _plot(results, sizes, args, machine)
        if path:
            print(f"\nplot written to {path}")
    print(f"table and raw times written to {os.path.join(args.out, 'bench.md')}, bench.rst and bench.json")
    return 0


def _fmt(t):
    if t is None:
        return "–"
    return f"{t * 1e3:.1f} ms" if t < 10 else f"{t:.1f} s"


def _report(results, sizes, args, machine, versions):
    lines = [f"Speed report: {args.kernel} kernel, B=1, H={args.heads}, d=m={args.head_dim}, float32",
             f"Machine: {machine['cpu']} ({machine['cores']} cores), {machine['date']}; "
             + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    for lib, res in results.items():
        times = res["times"]
        lines.append(f"### {lib} (softmax = {res['softmax_name']})")
        lines.append("")
        header = "| N | softmax non-causal | softmax causal | floor F |"
        paths = ["non-causal", "causal"] + (["non-causal agnostic", "causal agnostic"] if res["has_fast"] else [])
        header += "".join(f" {p} (x softmax, x F) |" for p in paths)
        lines.append(header)
        lines.append("|" + "---|" * (4 + len(paths)))
        for i, n in enumerate(sizes):
            sm_nc, sm_c = times["softmax"][i]
            F = times["floor"][i]
            row = f"| {n} | {_fmt(sm_nc)} | {_fmt(sm_c)} | {_fmt(F)} |"
            for p in paths:
                tp = times[p][i]
                sm = sm_c if p.startswith("causal") else sm_nc
                if tp is None:
                    row += " – |"
                    continue
                ratio = f"x{sm / tp:.2f}" if sm else "–"
                row += f" {_fmt(tp)} ({ratio}, x{tp / F:.1f}) |"
            lines.append(row)
        lines.append("")
        for p in paths:
            sm = [s[1] if p.startswith("causal") else s[0] for s in times["softmax"]]
            text = crossover_text(sizes, sm, times[p])
            lines.append(f"- crossover with softmax, {p}: {text}")
        lines.append("")
    lines.append("x softmax: softmax time / path time (above 1 = faster than softmax); "
                 "x F: path time / time of its matrix products alone.")
    return "\n".join(lines)


def _report_rst(results, sizes, args, machine, versions):
    """The same tables as reST list-tables, for the docs."""
    out = [f"Measured on {machine['cpu']} ({machine['cores']} cores), {machine['date']}: {args.kernel} kernel, "
           f"B=1, H={args.heads}, d=m={args.head_dim}, float32; "
           + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".", ""]
    for lib, res in results.items():
        times = res["times"]
        paths = ["non-causal", "causal"] + (["non-causal agnostic", "causal agnostic"] if res["has_fast"] else [])
        out += [f".. list-table:: {lib} (softmax = {res['softmax_name']}); cells: time (x softmax = softmax time / this time, x floor F = this time / F)",
                "   :header-rows: 1", "", "   * - N", "     - softmax non-causal", "     - softmax causal",
                "     - floor F"] + [f"     - {p}" for p in paths]
        for i, n in enumerate(sizes):
            sm_nc, sm_c = times["softmax"][i]
            F = times["floor"][i]
            out += [f"   * - {n}", f"     - {_fmt(sm_nc)}", f"     - {_fmt(sm_c)}", f"     - {_fmt(F)}"]
            for p in paths:
                tp = times[p][i]
                sm = sm_c if p.startswith("causal") else sm_nc
                cell = "–" if tp is None else f"{_fmt(tp)} ({'x%.2f' % (sm / tp) if sm else '–'}, x{tp / F:.1f})"
                out.append(f"     - {cell}")
        out.append("")
        for p in paths:
            sm = [s[1] if p.startswith("causal") else s[0] for s in times["softmax"]]
            text = crossover_text(sizes, sm, times[p], unicode=True)
            out.append(f"- {lib}, crossover with softmax, {p}: {text}")
        out.append("")
    return "\n".join(out) + "\n"


def _plot(results, sizes, args, machine):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = {"numpy": "tab:blue", "torch": "tab:orange", "jax": "tab:green"}
    for ax, causal in zip(axes, (False, True)):
        label = "causal" if causal else "non-causal"
        for lib, res in results.items():
            c = colors.get(lib, None)
            times = res["times"]
            sm = [s[1 if causal else 0] for s in times["softmax"]]
            pts = [(n, t) for n, t in zip(sizes, sm) if t is not None]
            if pts:
                ax.plot(*zip(*pts), "--", color=c, label=f"{lib} softmax")
            ax.plot(sizes, times[label], "-o", color=c, ms=3, label=f"{lib} linear")
            if res["has_fast"]:
                pts = [(n, t) for n, t in zip(sizes, times[f"{label} agnostic"]) if t is not None]
                ax.plot(*zip(*pts), ":", color=c, label=f"{lib} linear (agnostic core)")
            ax.plot(sizes, times["floor"], linestyle=(0, (1, 3)), color=c, alpha=0.5, label=f"{lib} floor F")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_title(f"{label}, {args.kernel} kernel")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("time per call (s)")
    axes[1].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"kernelattn {__version__}: time vs N, B=1 H={args.heads} d={args.head_dim} float32 — "
                 f"{machine['cpu']}, {machine['cores']} cores", fontsize=9)
    fig.tight_layout()
    path = os.path.join(args.out, "bench.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
