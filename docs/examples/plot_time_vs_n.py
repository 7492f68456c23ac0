"""
Time against sequence length
============================

Linear attention costs O(N); softmax attention O(N²). Here both run with NumPy on the embedded
example inputs at small sizes (the docs build must stay quick), causal and non-causal. For the
full report on your machine run ``python -m kernelattn bench``.

Each point is the **median** of 7 rounds taken after 2 warm-up calls; a round times the four
calls one after the other (a fast call repeated until it lasts 10 ms), so a burst of load from
elsewhere hits all four alike and single noisy timings do not make the curves zig-zag. BLAS runs
on one thread (when ``threadpoolctl`` is installed): on a shared machine, threads that wait for a
busy core are the largest source of noise.
"""

import contextlib
import statistics
import time

import matplotlib.pyplot as plt
import numpy as np

import kernelattn as ka
from kernelattn.data import default_inputs

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # optional: timings are noisier with several BLAS threads
    threadpool_limits = lambda limits: contextlib.nullcontext()  # noqa: E731


def median_times(fns, rounds=7, warmup=2, min_seconds=0.01):
    """Median seconds per call of each function, timed in interleaved rounds after warm-up."""
    numbers = []
    for fn in fns:
        for _ in range(warmup):
            t0 = time.perf_counter()
            fn()
            single = time.perf_counter() - t0
        numbers.append(max(1, int(min_seconds / max(single, 1e-9))))
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, number, out in zip(fns, numbers, times):
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            out.append((time.perf_counter() - t0) / number)
    return [statistics.median(t) for t in times]


sizes = [64, 128, 256, 512, 1024, 2048]
phi = ka.feature_map("glu", num_heads=4, head_dim=32, seed=0)
rows = {key: [] for key in ("softmax", "softmax causal", "linear", "linear causal")}
with threadpool_limits(limits=1):
    for n in sizes:
        q, k, v = default_inputs(n, num_heads=4, head_dim=32)
        calls = [lambda: ka.softmax_attention(q, k, v),
                 lambda: ka.softmax_attention(q, k, v, causal=True),
                 lambda: ka.linear_attention(q, k, v, feature_map=phi),
                 lambda: ka.linear_attention(q, k, v, feature_map=phi, causal=True)]
        for key, t in zip(rows, median_times(calls)):
            rows[key].append(t)

fig, ax = plt.subplots(figsize=(6, 4))
for key, style in zip(rows, ("--", "--", "-o", "-o")):
    ax.plot(sizes, rows[key], style, label=key, ms=3)
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("sequence length N")
ax.set_ylabel("seconds per call, median of 7\n(B=1, H=4, d=32, GLU kernel, 1 thread)")
ax.legend()
ax.grid(True, which="both", alpha=0.3)
fig.tight_layout()

# ratio = time of causal softmax / time of causal linear attention: above 1 = linear is faster
print("N      causal softmax   causal linear   softmax time / linear time (above 1 = linear faster)")
for n, s, lin in zip(sizes, rows["softmax causal"], rows["linear causal"]):
    print(f"{n:5d}  {s * 1e3:11.2f} ms  {lin * 1e3:11.2f} ms   {s / lin:5.2f}")
