"""The hand VJP and the core forward of two checkouts, measured side by side.

NumPy, float32, B=2, H=8, d=64, the "glu" kernel: ``ka.linear_attention_vjp`` forward + backward
(causal N=1024 and 4096 by chunks of 64, non-causal N=1024) and ``ka.linear_attention(...,
backend="agnostic")`` on the same inputs; and the attention part of the VJP alone
(``kernelattn._agnostic.grad.attention_on_features_vjp`` on fixed features). Each checkout runs in its own worker process (each imports
its own ``kernelattn``); after a warm-up the cases run in interleaved rounds, before and after in
turn, so load changes hit both alike. Also reports the traced peak memory of one VJP call.

Run, with the other checkout in a git worktree::

    git worktree add /tmp/before_grad HEAD
    python asv_benchmarks/hand_vjp_side_by_side.py --before /tmp/before_grad [--repeats 7]

Ratios are after / before (below 1: faster, or less memory).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, function, causal, N)
CASES = [
    ("vjp causal N=1024", "vjp", True, 1024),
    ("vjp causal N=4096", "vjp", True, 4096),
    ("vjp non-causal N=1024", "vjp", False, 1024),
    ("fwd causal N=1024", "forward", True, 1024),
    ("fwd causal N=4096", "forward", True, 4096),
    ("fwd non-causal N=1024", "forward", False, 1024),
    # the attention part of the VJP alone, on fixed features (the feature-map VJP dominates above)
    ("att vjp causal N=1024", "att", True, 1024),
    ("att vjp causal N=4096", "att", True, 4096),
    ("att vjp non-causal N=1024", "att", False, 1024),
]


def _worker(root):
    """Serve 'time <case>' and 'peak <case>' requests on stdin, one JSON line each on stdout."""
    sys.path.insert(0, root)
    import time
    import tracemalloc

    import numpy as np

    import array_api_compat.numpy as xp

    import kernelattn as ka
    from kernelattn._agnostic import grad as core_grad

    assert os.path.dirname(os.path.dirname(os.path.abspath(ka.__file__))) == os.path.abspath(root), ka.__file__
    B, H, d, C = 2, 8, 64, 64
    phi = ka.feature_map("glu", num_heads=H, head_dim=d, seed=0)
    rng = np.random.default_rng(0)
    inputs = {n: tuple(rng.standard_normal((B, H, n, d), dtype=np.float32) * 0.5 for _ in range(4))
              for n in sorted({c[3] for c in CASES})}
    features = {n: (phi(q), phi(k)) for n, (q, k, _, _) in inputs.items()}

    def call(i):
        _, fn, causal, n = CASES[i]
        q, k, v, w = inputs[n]
        if fn == "vjp":
            out, vjp = ka.linear_attention_vjp(q, k, v, feature_map=phi, causal=causal, chunk_size=C)
            return vjp(w)
        if fn == "att":
            fq, fk = features[n]
            out, state, vjp = core_grad.attention_on_features_vjp(fq, fk, v, causal=causal, eps=1e-6, chunk_size=C,
                                                                  xp=xp)
            return vjp(w)
        return ka.linear_attention(q, k, v, feature_map=phi, causal=causal, chunk_size=C, backend="agnostic")

    for i in range(len(CASES)):  # warm-up
        call(i)
    for line in sys.stdin:
        what, i = line.split()
        i = int(i)
        if what == "time":
            t0 = time.perf_counter()
            call(i)
            result = time.perf_counter() - t0
        else:
            tracemalloc.start()
            tracemalloc.reset_peak()
            call(i)
            result = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        print(json.dumps(result), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--before", required=True, help="root of the other checkout (e.g. a git worktree)")
    p.add_argument("--after", default=HERE, help="root of this checkout (default: this one)")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    env = dict(os.environ, PYTHONPATH="")
    workers = {}
    for label, root in (("before", args.before), ("after", args.after)):
        workers[label] = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", root],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(label, what, i):
        w = workers[label]
        w.stdin.write(f"{what} {i}\n")
        w.stdin.flush()
        return json.loads(w.stdout.readline())

    times = {(label, i): [] for label in workers for i in range(len(CASES))}
    for r in range(args.repeats):  # interleaved rounds; the order of before/after alternates
        for i in range(len(CASES)):
            for label in (("before", "after") if r % 2 == 0 else ("after", "before")):
                times[label, i].append(ask(label, "time", i))
    peaks = {(label, i): ask(label, "peak", i) for label in workers for i in range(len(CASES)) if CASES[i][1] != "forward"}
    for w in workers.values():
        w.stdin.close()
        w.wait()

    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])

    print(f"NumPy float32, B=2, H=8, d=64, glu kernel, chunk 64; median of {args.repeats} interleaved rounds")
    print(f"  before: {args.before}\n  after:  {args.after}")
    print(f"  {'case':<26} {'before ms':>10} {'after ms':>10} {'after/before':>13} {'(of minima)':>12}")
    for i, (name, *_rest) in enumerate(CASES):
        tb, ta = median(times["before", i]), median(times["after", i])
        mb, ma = min(times["before", i]), min(times["after", i])
        print(f"  {name:<26} {tb * 1e3:10.1f} {ta * 1e3:10.1f} {ta / tb:13.2f} {ma / mb:12.2f}")
    print(f"  {'traced peak (one VJP)':<26} {'before MiB':>10} {'after MiB':>10}")
    for i, (name, fn, *_rest) in enumerate(CASES):
        if fn != "forward":
            pb, pa = peaks["before", i], peaks["after", i]
            print(f"  {name:<26} {pb / 2**20:10.1f} {pa / 2**20:10.1f} {pa / pb:13.2f}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        main()
