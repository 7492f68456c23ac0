"""``compare``: error and time of linear attention against softmax attention.

Runs on the embedded default inputs
(:func:`kernelattn.data.default_inputs`): for each feature map it prints the
error of linear attention against exact softmax attention, then the time of
both at growing sequence length N and the crossover N from which linear
attention is faster.
"""

from __future__ import annotations

import sys

import numpy as np

from .. import __version__, _dispatch
from .._timing import crossover_text, median_time
from ..attention import linear_attention, softmax_attention
from ..data import default_inputs
from ..feature_maps import feature_map, num_params
from ..testing import rel_rms_error, to_numpy
from ._args import UsageError, int_list, positive_int, require_library, seconds

HELP = "error and time of linear attention against softmax on the embedded default inputs"
DESCRIPTION = """\
Error and time of linear attention against exact softmax attention.

On the embedded default inputs (synthetic, seeded), for each feature map it
prints the error of linear attention against softmax attention (kernels at
their seeded initialisation, not fitted), then the time of both at growing
sequence length N and the crossover N from which linear attention is faster."""
EXAMPLES = ("python -m kernelattn compare --sizes 256,1024",
            "python -m kernelattn compare --backend torch --heads 4 --head-dim 32")
BACKENDS = ("numpy", "torch", "jax", "array_api_strict")

# label -> (kind, options)
KERNELS = {
    "elu+1": ("elu", {}),
    "relu": ("relu", {}),
    "favor": ("favor", {}),
    "ffn": ("ffn", {}),
    "glu": ("glu", {}),
    "glu x2": ("glu", {"depth": 2}),
    "aoglu x3": ("aoglu", {"depth": 3}),
    "hedgehog": ("hedgehog", {}),
}
TIMED = ("elu+1", "glu", "aoglu x3")


def _backend(name: str):
    """(to_array, wrap) for a backend name: convert NumPy inputs, and jit where it applies."""
    if name == "numpy":
        return (lambda a: a), (lambda f: f)
    if name in ("torch", "jax"):
        adapter = _dispatch.load_adapter(name)  # the library's own conversion and jit (backends/)
        adapter.inference()
        return adapter.from_numpy, adapter.jit
    if name == "array_api_strict":
        import array_api_strict as xps

        return xps.asarray, (lambda f: f)
    raise UsageError("--backend", f"unknown backend {name!r}; choose {', '.join(BACKENDS)}")


def _make_phi(label, heads, dim, like):
    kind, opts = KERNELS[label]
    return feature_map(kind, num_heads=heads, head_dim=dim, seed=0, like=like, **opts)


def run(args) -> int:
    require_library("--backend", args.backend)
    to_array, wrap = _backend(args.backend)
    H, d = args.heads, args.head_dim
    out = sys.stdout
    np.seterr(all="ignore")
    print(f"kernelattn {__version__}: linear attention against exact softmax attention", file=out)
    print(f"embedded default inputs (B=1, H={H}, d={d}, float32, seed 0), backend {args.backend}\n", file=out)

    # 1. approximation error at one length
    q, k, v = default_inputs(args.error_n, num_heads=H, head_dim=d)
    Q, K, V = (to_array(a) for a in (q, k, v))
    print(f"Approximation error at N={args.error_n} (kernels at their seeded initialisation, "
          f"not fitted): relative RMS error of the output", file=out)
    print(f"  {'kernel':<10} {'params':>8} {'non-causal':>11} {'causal':>8}", file=out)
    ref = {c: softmax_attention(q, k, v, causal=c) for c in (False, True)}
    for label in KERNELS:
        phi = _make_phi(label, H, d, Q)
        errs = [rel_rms_error(to_numpy(linear_attention(Q, K, V, feature_map=phi, causal=c)), ref[c])
                for c in (False, True)]
        print(f"  {label:<10} {num_params(phi):>8,} {errs[0]:>11.3f} {errs[1]:>8.3f}", file=out)
    print("  (random-feature and untrained maps are far from softmax; fitting them is what the paper's "
          "kernels are for)\n", file=out)

    # 2. time against softmax at growing N
    sizes = args.sizes
    for causal in (False, True):
        title = "causal" if causal else "non-causal"
        print(f"Time, {title} (median of {args.repeats}; ratio = softmax time / linear time, >1 means faster)",
              file=out)
        header = f"  {'N':>6} {'softmax':>10}" + "".join(f" {lab:>18}" for lab in TIMED)
        print(header, file=out)
        rows = {lab: [] for lab in TIMED}
        soft = []
        for n in sizes:
            q, k, v = default_inputs(n, num_heads=H, head_dim=d, seed=1)
            Q, K, V = (to_array(a) for a in (q, k, v))
            sm = wrap(lambda Q, K, V: softmax_attention(Q, K, V, causal=causal))
            ts = median_time(lambda: sm(Q, K, V), repeats=args.repeats, budget=args.budget)
            soft.append(ts)
            cells = []
            for lab in TIMED:
                phi = _make_phi(lab, H, d, Q)
                la = wrap(lambda Q, K, V, phi: linear_attention(Q, K, V, feature_map=phi, causal=causal))
                tl = median_time(lambda: la(Q, K, V, phi), repeats=args.repeats, budget=args.budget)
                rows[lab].append(tl)
                cells.append(f"{tl * 1e3:9.1f} ms x{ts / tl:5.2f}")
            print(f"  {n:>6} {ts * 1e3:7.1f} ms" + "".join(f" {c:>18}" for c in cells), file=out)
        for lab in TIMED:
            print(f"  crossover {lab:<9}: {crossover_text(sizes, soft, rows[lab])}", file=out)
        print(file=out)
    return 0


def add_arguments(p) -> None:
    p.add_argument("--backend", default="numpy", choices=BACKENDS,
                   help="numpy (default), torch, jax or array_api_strict")
    p.add_argument("--sizes", type=int_list(), default=[256, 512, 1024, 2048, 4096], metavar="N,N,...",
                   help="comma-separated N to time (default 256,512,1024,2048,4096)")
    p.add_argument("--error-n", type=positive_int, default=512, help="N for the error table (default 512)")
    p.add_argument("--heads", type=positive_int, default=8, help="attention heads (default 8)")
    p.add_argument("--head-dim", type=positive_int, default=64, help="width of each head (default 64)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timing repeats per size (default 3)")
    p.add_argument("--budget", type=seconds, default=5.0,
                   help="seconds per measurement before stopping early (default 5)")
