"""
Time against sequence length
============================

Linear attention costs O(N); softmax attention O(N²). Here both run with NumPy on the embedded
example inputs at small sizes (the docs build must stay quick), causal and non-causal. For the
full report on your machine run ``python -m kernelattn bench``.
"""

import time

import matplotlib.pyplot as plt
import numpy as np

import kernelattn as ka
from kernelattn.data import default_inputs


def best_time(fn, repeats=3):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


sizes = [64, 128, 256, 512, 1024, 2048]
phi = ka.feature_map("glu", num_heads=4, head_dim=32, seed=0)
rows = {key: [] for key in ("softmax", "softmax causal", "linear", "linear causal")}
for n in sizes:
    q, k, v = default_inputs(n, num_heads=4, head_dim=32)
    rows["softmax"].append(best_time(lambda: ka.softmax_attention(q, k, v)))
    rows["softmax causal"].append(best_time(lambda: ka.softmax_attention(q, k, v, causal=True)))
    rows["linear"].append(best_time(lambda: ka.linear_attention(q, k, v, feature_map=phi)))
    rows["linear causal"].append(best_time(lambda: ka.linear_attention(q, k, v, feature_map=phi, causal=True)))

fig, ax = plt.subplots(figsize=(6, 4))
for key, style in zip(rows, ("--", "--", "-o", "-o")):
    ax.plot(sizes, rows[key], style, label=key, ms=3)
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("sequence length N")
ax.set_ylabel("seconds per call (B=1, H=4, d=32, GLU kernel)")
ax.legend()
ax.grid(True, which="both", alpha=0.3)
fig.tight_layout()

for n, s, lin in zip(sizes, rows["softmax causal"], rows["linear causal"]):
    print(f"N={n:5d}  causal softmax {s * 1e3:7.2f} ms   causal linear {lin * 1e3:7.2f} ms   "
          f"ratio {s / lin:5.2f}")
