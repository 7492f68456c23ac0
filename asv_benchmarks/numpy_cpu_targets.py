"""The NumPy fast path against its targets, measured side by side in one process.

Issue targets (this CPU, float32, B=1, H=8, d=m=64, the paper's "ffn" kernel, N=16,384):
F = the four matrix products alone (two in the feature map, two in the attention) on
preallocated inputs; non-causal forward <= 2 x F; causal <= 2 x our own non-causal and at least
1.5 x faster than the generic array-API core.

Run: ``python asv_benchmarks/numpy_cpu_targets.py [--n 16384] [--repeats 7]``. Compare the ratios,
not the seconds: they are measured interleaved, in the same process.
"""

from __future__ import annotations

import argparse

import numpy as np

import kernelattn as ka
from kernelattn._timing import median_time
from kernelattn.data import default_inputs


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--kernel", default="ffn")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    N, H, d = args.n, args.heads, args.dim
    q, k, v = default_inputs(N, num_heads=H, head_dim=d, seed=1)
    phi = ka.feature_map(args.kernel, num_heads=H, head_dim=d, seed=0, like=q)
    W = np.ascontiguousarray(phi.main_weights()[0])
    fq, fk = np.empty((1, H, N, d), np.float32), np.empty((1, H, N, d), np.float32)
    S = np.empty((1, H, d, d), np.float32)
    out = np.empty((1, H, N, d), np.float32)

    def floor():
        np.matmul(q, W, out=fq)
        np.matmul(k, W, out=fk)
        np.matmul(fk.swapaxes(-1, -2), v, out=S)
        np.matmul(fq, S, out=out)

    runs = {
        "F (4 products)": floor,
        "fast non-causal": lambda: ka.linear_attention(q, k, v, feature_map=phi),
        "fast causal": lambda: ka.linear_attention(q, k, v, feature_map=phi, causal=True),
        "core non-causal": lambda: ka.linear_attention(q, k, v, feature_map=phi, backend="agnostic"),
        "core causal": lambda: ka.linear_attention(q, k, v, feature_map=phi, causal=True, backend="agnostic"),
    }
    times = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved rounds, so load changes hit every row alike
        for name, fn in runs.items():
            times[name].append(median_time(fn, repeats=1, warmup=0))
    t = {name: float(np.median(ts)) for name, ts in times.items()}
    print(f"NumPy {np.__version__}, {args.kernel} kernel, B=1, H={H}, d=m={d}, N={N}, float32, "
          f"median of {args.repeats} interleaved rounds")
    for name, value in t.items():
        print(f"  {name:<18} {value * 1e3:8.1f} ms   {value / t['F (4 products)']:5.2f} x F")
    F = t["F (4 products)"]
    checks = [
        ("non-causal <= 2 x F", t["fast non-causal"] / F, 2.0),
        ("causal <= 2 x our non-causal", t["fast causal"] / t["fast non-causal"], 2.0),
        ("causal >= 1.5 x faster than the core", t["core causal"] / t["fast causal"], 1.5),
        ("non-causal faster than the core", t["core non-causal"] / t["fast non-causal"], 1.0),
    ]
    for label, ratio, target in checks:
        ok = ratio <= target if "<=" in label else ratio >= target
        print(f"  {label:<40} {ratio:6.2f}  (target {target})  {'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
