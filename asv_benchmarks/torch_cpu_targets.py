"""The CPU targets of the torch fast paths (issue 4), measured side by side in ONE process.

Setup: float32, B=1, H=8, d=m=64, the paper's ``"ffn"`` kernel, N=16384, forward
passes under ``torch.no_grad`` (inference), torch's default thread count.

F is the time of the matrix products alone, on preallocated inputs and
outputs: the two feature-map products ``q @ W`` and ``k @ W`` and the two
attention products ``phi(K)^T V`` and ``phi(Q) S``. Every method is timed in
interleaved rounds (one call of each per round, medians over rounds), so that
the load of a shared machine falls on all of them alike.

Targets (issue 4) and what this prints for each:

* non-causal forward <= 1.5 F;
* causal forward <= 1.5 x our non-causal forward, and >= 15x faster than
  ``scaled_dot_product_attention(is_causal=True)``;
* causal forward: peak extra memory <= 2x the output's size;
  forward+backward never holds an (N, m, d) tensor (the largest tensor any op
  returns is printed), and N = 1,000,000 runs in bounded memory (time and
  peak extra memory printed);
* crossover with SDPA at N <= 256 non-causal and N <= 512 causal.

On Linux the script reruns itself with glibc's malloc thresholds pinned
(``kernelattn._timing.STEADY_MALLOC``): freed memory is then reused, as F's
preallocated buffers are, instead of every call's 32 MiB output arriving in
fresh pages whose first write costs what the kernel and the hypervisor make
of it (on the project's VM anywhere from 3 to 50 ms in one process).
``--system-malloc`` keeps the defaults.

Run from the repository root::

    python asv_benchmarks/torch_cpu_targets.py            # about 3-5 minutes
    python asv_benchmarks/torch_cpu_targets.py --quick    # fewer rounds, no N = 1e6
    python asv_benchmarks/torch_cpu_targets.py --quick --system-malloc
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import kernelattn as ka
from kernelattn import _timing
from kernelattn.testing import rel_rms_error, watch_torch_sizes


# ---------------------------------------------------------------------------
# helpers


def _status():
    text = open("/proc/self/status").read()
    return {key: int(re.search(key + r":\s+(\d+)", text).group(1)) * 1024 for key in ("VmRSS", "VmHWM")}


def _trim():
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_bytes(fn):
    """Peak resident memory during ``fn()`` above what was resident before (Linux), in bytes.

    The kernel's high-water mark is reset first (``/proc/self/clear_refs``),
    so this is the transient working set of the call, for any allocator.
    """
    _trim()
    base = _status()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    result = fn()
    peak = _status()["VmHWM"]
    del result
    return max(0, peak - base)


def interleaved(fns: dict, rounds: int, slow=()):
    """Median wall time of each function, timed in interleaved rounds (``slow`` ones in fewer)."""
    times = {name: [] for name in fns}
    for name, fn in fns.items():  # warm-up
        _timing.block(fn())
    for r in range(rounds):
        for name, fn in fns.items():
            if name in slow and r >= max(2, rounds // 3):
                continue
            times[name].append(_timing.median_time(fn, repeats=1, warmup=0))
    return {name: statistics.median(t) for name, t in times.items()}


def fmt_ms(t):
    return f"{t * 1e3:9.1f} ms" if t < 10 else f"{t:9.2f} s "


def verdict(ok):
    return "MET   " if ok else "MISSED"


# ---------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="fewer rounds, skip N = 1,000,000")
    p.add_argument("--million-heads", type=int, default=8, help="H of the N = 1e6 causal forward")
    p.add_argument("--system-malloc", action="store_true",
                   help="keep glibc's default thresholds (by default the script reruns itself with "
                        "kernelattn._timing.STEADY_MALLOC)")
    args = p.parse_args(argv)
    malloc = _timing.rerun_with_steady_malloc(__file__, keep_system=args.system_malloc or argv is not None)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 3 if args.quick else args.rounds
    B, H, N, d = 1, 8, args.n, 64
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores (other processes distort timings: compare ratios, run on a quiet machine)")
    if os.getloadavg()[0] > 1.0 and torch.get_num_threads() > 1:
        print("WARNING: the machine is busy. Multi-threaded torch ops then wait on descheduled OpenMP threads "
              "(milliseconds per op), which distorts every method made of many small ops; rerun on a quiet "
              "machine, or compare with --threads 1.")
    print(malloc)
    print(f"float32, B={B}, H={H}, d=m={d}, kernel 'ffn', N={N}, forward under torch.no_grad\n")

    q, k, v = (torch.randn(B, H, N, d) for _ in range(3))
    phi = ka.feature_map("ffn", num_heads=H, head_dim=d, seed=0, like=q)
    W = phi.params["shared"][0]["W"]
    q3, k3, v3 = (t.view(B * H, N, d) for t in (q, k, v))
    fq, fk, o = (torch.empty(B * H, N, d) for _ in range(3))
    S = torch.empty(B * H, d, d)

    def matrix_products():
        torch.bmm(q3, W, out=fq)
        torch.bmm(k3, W, out=fk)
        torch.bmm(fk.transpose(1, 2), v3, out=S)
        return torch.bmm(fq, S, out=o)

    def ours(causal):
        return lambda: ka.linear_attention(q, k, v, feature_map=phi, causal=causal)

    def core(causal):
        return lambda: ka.linear_attention(q, k, v, feature_map=phi, causal=causal, backend="agnostic")

    def sdpa(causal):
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    fns = {"F (matrix products)": matrix_products, "ours non-causal": ours(False), "ours causal": ours(True),
           "core non-causal": core(False), "core causal": core(True),
           "SDPA non-causal": sdpa(False), "SDPA causal": sdpa(True)}
    with torch.no_grad():
        ref = ka.linear_attention(q, k, v, feature_map=phi, causal=True, backend="agnostic")
        err = rel_rms_error(ours(True)(), ref)
        t = interleaved(fns, rounds, slow=("SDPA non-causal", "SDPA causal", "core non-causal", "core causal"))
    print(f"{'method':24s} {'time':>12s}   (median of interleaved rounds)")
    for name, value in t.items():
        print(f"{name:24s} {fmt_ms(value)}")
    print(f"(ours causal vs the core: relative RMS error {err:.1e})\n")

    Fm, nc, c = t["F (matrix products)"], t["ours non-causal"], t["ours causal"]
    rows = [
        ("non-causal forward / F", nc / Fm, "<= 1.5", nc / Fm <= 1.5),
        ("causal forward / our non-causal forward", c / nc, "<= 1.5", c / nc <= 1.5),
        ("SDPA causal / our causal forward", t["SDPA causal"] / c, ">= 15", t["SDPA causal"] / c >= 15),
        ("SDPA non-causal / our non-causal", t["SDPA non-causal"] / nc, "(info)", True),
        ("core non-causal / ours", t["core non-causal"] / nc, "(info)", True),
        ("core causal / ours", t["core causal"] / c, "(info)", True),
    ]

    # memory of the causal forward
    out_bytes = B * H * N * d * 4
    with torch.no_grad():
        extra = peak_extra_bytes(ours(True))
        extra_nc = peak_extra_bytes(ours(False))
        extra_core = peak_extra_bytes(core(True))
    rows.append(("causal fwd peak extra memory / output size", extra / out_bytes, "<= 2", extra / out_bytes <= 2))
    rows.append(("non-causal fwd peak extra memory / output", extra_nc / out_bytes, "(info)", True))
    rows.append(("core causal fwd peak extra memory / output", extra_core / out_bytes, "(info)", True))

    # forward + backward: the largest tensor, against an (N, m, d) one
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    for p_ in phi.parameters():
        p_.requires_grad_(True)
    with watch_torch_sizes() as watch:
        ka.linear_attention(qg, kg, vg, feature_map=phi, causal=True).sum().backward()
    nmd = B * H * N * d * d
    rows.append(("fwd+bwd largest tensor / (B H N d) elements", watch.largest / (B * H * N * d),
                 f"< {d} (= an (N,m,d) tensor)", watch.largest < nmd))
    t_fb = _timing.median_time(lambda: ka.linear_attention(qg, kg, vg, feature_map=phi, causal=True).sum().backward(),
                               repeats=3)
    for p_ in phi.parameters():
        p_.requires_grad_(False)
    print(f"causal forward+backward (N={N}): {fmt_ms(t_fb).strip()}\n")

    print(f"{'target':46s} {'measured':>10s}  {'target':>26s}")
    for name, value, target, ok in rows:
        flag = verdict(ok) if target != "(info)" else "      "
        print(f"{name:46s} {value:10.2f}  {target:>26s}  {flag}")
    print(f"  (output {out_bytes / 2**20:.0f} MiB; causal peak extra {extra / 2**20:.0f} MiB, non-causal "
          f"{extra_nc / 2**20:.0f} MiB, core causal {extra_core / 2**20:.0f} MiB)")
    print()

    # crossover with SDPA
    sizes = [64, 128, 256, 512, 1024, 2048]
    times = {key: [] for key in ("nc", "c", "sdpa_nc", "sdpa_c")}
    with torch.no_grad():
        for n in sizes:
            qs, ks, vs = (t[:, :, :n].contiguous() for t in (q, k, v))
            got = interleaved({
                "nc": lambda: ka.linear_attention(qs, ks, vs, feature_map=phi),
                "c": lambda: ka.linear_attention(qs, ks, vs, feature_map=phi, causal=True),
                "sdpa_nc": lambda: F.scaled_dot_product_attention(qs, ks, vs),
                "sdpa_c": lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True),
            }, rounds=max(5, rounds))
            for key in times:
                times[key].append(got[key])
    print(f"{'N':>6s} " + " ".join(f"{h:>14s}" for h in ("ours nc", "SDPA nc", "ours causal", "SDPA causal")))
    for i, n in enumerate(sizes):
        print(f"{n:6d} " + " ".join(f"{fmt_ms(times[key][i]):>14s}" for key in ("nc", "sdpa_nc", "c", "sdpa_c")))
    for label, ours_key, ref_key, limit in (("non-causal", "nc", "sdpa_nc", 256), ("causal", "c", "sdpa_c", 512)):
        n_x, exact = _timing.crossover(sizes, times[ref_key], times[ours_key])
        if n_x is None:
            text, ok = f"> {sizes[-1]}", False
        else:
            text, ok = (f"~{n_x}" if exact else f"<= {n_x}"), n_x <= limit
        print(f"crossover with SDPA, {label:10s}: N {text:>8s}   (target <= {limit})  {verdict(ok)}")
    print()

    if args.quick:
        return
    # N = 1,000,000
    del fq, fk, o
    n6 = 1_000_000
    for heads, grad in ((args.million_heads, False), (1, True)):
        _trim()
        qm, km, vm = (torch.randn(1, heads, n6, d) for _ in range(3))
        phim = ka.feature_map("ffn", num_heads=heads, head_dim=d, seed=0, like=qm)
        if grad:
            qm, km, vm = (t.requires_grad_() for t in (qm, km, vm))

            def run():
                ka.linear_attention(qm, km, vm, feature_map=phim, causal=True).sum().backward()
        else:
            def run():
                with torch.no_grad():
                    return ka.linear_attention(qm, km, vm, feature_map=phim, causal=True)
        t0 = time.perf_counter()
        extra = peak_extra_bytes(run)
        dt = time.perf_counter() - t0
        one = heads * n6 * d * 4
        what = "forward+backward" if grad else "forward (no_grad)"
        print(f"N = 1,000,000, H={heads}, causal {what}: {dt:.1f} s, peak extra memory {extra / 2**20:,.0f} MiB "
              f"= {extra / one:.1f}x one (N, d) tensor of {one / 2**20:,.0f} MiB; an (N, m, d) tensor would be "
              f"{heads * n6 * d * d * 4 / 2**30:,.0f} GiB")
        del qm, km, vm


if __name__ == "__main__":
    sys.exit(main())
