"""Check the JAX fast paths on an accelerator against the CPU, then time them; also the CPU targets.

Written for a session with a GPU (none was available when it was written, so
the GPU numbers are pending). Run from the repository root::

    python asv_benchmarks/gpu_jax_check.py               # GPU: checks + timings, N = 2K ... 64K
    python asv_benchmarks/gpu_jax_check.py --check       # correctness only
    python asv_benchmarks/gpu_jax_check.py --cpu         # the CPU targets of issue 5 (a few minutes)

1. Correctness (default device). The fast paths of :mod:`kernelattn.backends.jax`
   -- causal chunked (custom VJP) and non-causal linear attention, with key
   masks, initial states and the paper's kernels, and softmax attention --
   forward and gradients (q, k, v, the kernel's parameters) in float32 and
   bfloat16, against the array-API core (``backend="agnostic"``) run on the
   CPU device on the same inputs. float32 matrix products use full precision
   for this check (``jax_default_matmul_precision="highest"``: the GPU default
   is TF32). Tolerances: relative RMS 1e-5 (float32), 5e-3 (bfloat16). Exit
   status 1 if any fails.
2. Timings (B = 1, H = 8, d = m = 64, N = 2K ... 64K, float32 and bfloat16,
   default matmul precision): the causal fast path forward and forward+backward
   with the paper's ``glu`` kernel, the non-causal one, ``jax.grad`` through the
   core under ``jit``, and ``jax.nn.dot_product_attention`` (``is_causal``;
   cuDNN's flash attention where JAX offers it, else XLA), each with XLA's
   temporary memory (``compiled.memory_analysis()``). Sizes that run out of
   memory or time are reported as such. The card's name is printed first.

``--cpu``: float32, B = 1, H = 8, d = m = 64, N = 16384 (and ``--sizes``), the
causal fast path forward+backward against ``jax.grad`` through the core under
``jit`` (target: at least 2x faster), timed in interleaved rounds in one
process (medians), with the temporary memory XLA allocates for each compiled
program (target: lower for the fast path); the forward passes alone too.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import kernelattn as ka
from kernelattn.testing import reference_linear_attention, rel_rms_error

FAILURES = []
TOL = {"float32": 1e-5, "bfloat16": 5e-3}


def report(name, err, tol):
    ok = err <= tol
    print(f"  {'ok  ' if ok else 'FAIL'} {name:64s} rel RMS {err:.1e} (tol {tol:.0e})", flush=True)
    if not ok:
        FAILURES.append(name)


def describe(device):
    return f"{device.platform}:{device.id} {getattr(device, 'device_kind', '')}".strip()


# ---------------------------------------------------------------------------- 1. correctness


def _data(B, H, N, d, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, H, N, d)) * 0.7 for _ in range(3))
    mask = rng.random((B, N)) > 0.25
    mask[:, 0] = True
    S0, z0 = rng.random((B, H, d, d)), rng.random((B, H, d)) + 0.5
    w = rng.standard_normal((B, H, N, d))
    return q, k, v, mask, (S0, z0), w


def _value_and_grads(device, dtype, arrays, phi, *, causal, backend, softmax=False):
    q, k, v, mask, (S0, z0), w = arrays
    put = lambda a, dt: jax.device_put(jnp.asarray(a, dt), device)  # noqa: E731
    args = [put(a, dtype) for a in (q, k, v)] + [put(S0, jnp.float32), put(z0, jnp.float32)]
    km, wd = jax.device_put(jnp.asarray(mask), device), put(w, jnp.float32)
    fm = jax.device_put(phi, device) if isinstance(phi, ka.FeatureMap) else phi

    def loss(fm, q, k, v, S0, z0):
        if softmax:
            out = ka.softmax_attention(q, k, v, causal=causal, key_mask=km, backend=backend)
            return jnp.sum(out.astype(jnp.float32) * wd), out
        out, (S, z) = ka.linear_attention(q, k, v, feature_map=fm, causal=causal, key_mask=km, chunk_size=64,
                                          initial_state=(S0, z0), return_state=True, backend=backend)
        return jnp.sum(out.astype(jnp.float32) * wd) + 0.01 * jnp.sum(S) + 0.1 * jnp.sum(z), out

    argnums = (1, 2, 3) if softmax else (0, 1, 2, 3, 4, 5)
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(fm, *args)
    return [np.asarray(out.astype(jnp.float32))] + [np.asarray(g, np.float64)
                                                    for g in jax.tree_util.tree_leaves(grads)]


def check(device):
    cpu = jax.devices("cpu")[0]
    print(f"1. correctness on {describe(device)} against the core on {describe(cpu)}")
    B, H, N, d = 2, 4, 1000, 32  # N not a multiple of the chunk (64)
    arrays = _data(B, H, N, d)
    with jax.default_matmul_precision("highest"):
        for kind, opts in (("glu", {"depth": 2}), ("aoglu", {"depth": 3, "bias": True}), ("favor", {}), ("elu", {})):
            phi = (ka.feature_map(kind, num_heads=H, head_dim=d, seed=0, xp=jnp, **opts) if kind != "elu"
                   else ka.feature_map("elu"))
            for causal in (False, True):
                for dtype in ("float32", "bfloat16"):
                    fast = _value_and_grads(device, jnp.dtype(dtype), arrays, phi, causal=causal, backend=None)
                    core = _value_and_grads(cpu, jnp.dtype(dtype), arrays, phi, causal=causal,
                                            backend="agnostic")
                    err = max(rel_rms_error(a, b) for a, b in zip(fast, core))
                    report(f"{kind} {opts or ''} {'causal' if causal else 'non-causal'} {dtype} out+grads",
                           err, TOL[dtype])
            if kind == "glu":  # and the float64 NumPy oracle, forward
                out = ka.linear_attention(jax.device_put(jnp.asarray(arrays[0], jnp.float32), device),
                                          jax.device_put(jnp.asarray(arrays[1], jnp.float32), device),
                                          jax.device_put(jnp.asarray(arrays[2], jnp.float32), device),
                                          feature_map=jax.device_put(phi, device), causal=True,
                                          key_mask=jax.device_put(jnp.asarray(arrays[3]), device))
                ref = reference_linear_attention(*arrays[:3], feature_map=phi, causal=True, key_mask=arrays[3])
                report("glu causal float32 vs float64 NumPy reference", rel_rms_error(out, ref), 1e-5)
        for causal in (False, True):
            for dtype in ("float32", "bfloat16"):
                fast = _value_and_grads(device, jnp.dtype(dtype), arrays, None, causal=causal, backend=None,
                                        softmax=True)
                core = _value_and_grads(cpu, jnp.dtype(dtype), arrays, None, causal=causal, backend="agnostic",
                                        softmax=True)
                err = max(rel_rms_error(a, b) for a, b in zip(fast, core))
                report(f"softmax {'causal' if causal else 'non-causal'} {dtype} out+grads", err, TOL[dtype])


# ---------------------------------------------------------------------------- 2. timings


def _median_time(fn, args, repeats, budget):
    jax.block_until_ready(fn(*args))  # compile + warm up
    times, start = [], time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget:
            break
    return statistics.median(times)


def _methods(phi, w):
    def lin(causal, backend):
        return lambda phi, q, k, v: ka.linear_attention(q, k, v, feature_map=phi, causal=causal, backend=backend)

    def sdpa(implementation):
        def f(phi, q, k, v):  # (B, T, heads, d)
            out = jax.nn.dot_product_attention(jnp.swapaxes(q, 1, 2), jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2),
                                               is_causal=True, implementation=implementation)
            return jnp.swapaxes(out, 1, 2)

        return f

    def with_grad(f):
        def loss(phi, q, k, v):
            return jnp.sum(f(phi, q, k, v).astype(jnp.float32) * w)

        return jax.grad(loss, argnums=(0, 1, 2, 3))

    rows = [("linear causal, fast", lin(True, None)), ("linear causal, core", lin(True, "agnostic")),
            ("linear non-causal, fast", lin(False, None))]
    if jax.default_backend() == "gpu":
        rows.append(("dot_product_attention causal, cudnn", sdpa("cudnn")))
    rows.append(("dot_product_attention causal, xla", sdpa("xla")))
    for name, f in rows:
        yield name + " fwd", f
        if "non-causal" not in name:
            yield name + " fwd+bwd", with_grad(f)


def timings(device, sizes, dtypes, repeats, budget):
    print(f"\n2. timings on {describe(device)}: B=1, H=8, d=m=64, glu kernel; median of up to {repeats} calls")
    print(f"  {'method':48s} {'dtype':9s} " + " ".join(f"{'N=' + str(n):>16s}" for n in sizes))
    H, d = 8, 64
    for dtype in dtypes:
        rows = {}
        for n in sizes:
            rng = np.random.default_rng(0)
            q, k, v = (jax.device_put(jnp.asarray(rng.standard_normal((1, H, n, d)), dtype), device)
                       for _ in range(3))
            w = jax.device_put(jnp.asarray(rng.standard_normal((1, H, n, d)), jnp.float32), device)
            phi = jax.device_put(ka.feature_map("glu", num_heads=H, head_dim=d, seed=0, xp=jnp), device)
            for name, f in _methods(phi, w):
                if name.startswith("dot_product_attention") and "cudnn" in name and dtype == jnp.float32:
                    rows.setdefault(name, []).append("needs half")
                    continue
                try:
                    jf = jax.jit(f)
                    temp = jf.lower(phi, q, k, v).compile().memory_analysis().temp_size_in_bytes
                    t = _median_time(jf, (phi, q, k, v), repeats, budget)
                    cell = f"{t * 1e3:8.1f}ms/{temp / 2**20:5.0f}M"
                except Exception as exc:  # out of memory, cudnn unavailable, ...
                    text = str(exc)
                    cell = "OOM" if "RESOURCE_EXHAUSTED" in text or "memory" in text.lower() else \
                        re.sub(r"\s+", " ", text)[:14]
                rows.setdefault(name, []).append(cell)
                print(f"    N={n} {name} {dtype.__name__ if hasattr(dtype, '__name__') else dtype}: {cell}",
                      flush=True)
        for name, cells in rows.items():
            print(f"  {name:48s} {jnp.dtype(dtype).name:9s} " + " ".join(f"{c:>16s}" for c in cells))
    print("  (cells: median time / XLA temporary memory in MiB)")


# ---------------------------------------------------------------------------- --cpu: the issue-5 targets


def cpu_targets(sizes, rounds, kinds):
    device = jax.devices("cpu")[0]
    print(f"CPU targets (issue 5) on {describe(device)}: float32, B=1, H=8, d=m=64, causal, forward+backward "
          f"(grads of q, k, v and the kernel), both under jit; {rounds} interleaved rounds")
    H, d = 8, 64
    results = []
    for kind in kinds:
        for n in sizes:
            rng = np.random.default_rng(0)
            q, k, v, w = (jnp.asarray(rng.standard_normal((1, H, n, d)), jnp.float32) for _ in range(4))
            phi = ka.feature_map(kind, num_heads=H, head_dim=d, seed=0, xp=jnp) if kind != "elu" else \
                ka.feature_map("elu")

            def grad_fn(backend):
                def loss(phi, q, k, v):
                    return jnp.sum(ka.linear_attention(q, k, v, feature_map=phi, causal=True, backend=backend) * w)

                return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))

            def fwd_fn(backend):
                return jax.jit(lambda phi, q, k, v: ka.linear_attention(q, k, v, feature_map=phi, causal=True,
                                                                         backend=backend))

            fns = {"fast fwd+bwd": grad_fn(None), "core fwd+bwd": grad_fn("agnostic"),
                   "fast fwd": fwd_fn(None), "core fwd": fwd_fn("agnostic")}
            args = (phi, q, k, v)
            temp = {name: f.lower(*args).compile().memory_analysis().temp_size_in_bytes for name, f in fns.items()}
            for f in fns.values():
                jax.block_until_ready(f(*args))
            times = {name: [] for name in fns}
            for _ in range(rounds):
                for name, f in fns.items():
                    t0 = time.perf_counter()
                    jax.block_until_ready(f(*args))
                    times[name].append(time.perf_counter() - t0)
            med = {name: statistics.median(t) for name, t in times.items()}
            for what in ("fwd+bwd", "fwd"):
                fast, core = f"fast {what}", f"core {what}"
                results.append((kind, n, what, med[fast], med[core], temp[fast], temp[core]))
                print(f"  {kind:5s} N={n:6d} {what:8s} fast {med[fast] * 1e3:8.1f} ms  core {med[core] * 1e3:8.1f} ms"
                      f"  speed-up x{med[core] / med[fast]:4.2f} | XLA temporary memory fast "
                      f"{temp[fast] / 2**20:6.1f} MiB, core {temp[core] / 2**20:6.1f} MiB", flush=True)
    target = [r for r in results if r[1] == 16384 and r[2] == "fwd+bwd"]
    for kind, n, what, tf, tc, mf, mc in target:
        ok = tc / tf >= 2 and mf < mc
        print(f"  target N=16384 {kind}: fwd+bwd x{tc / tf:.2f} faster (>= 2: {'yes' if tc / tf >= 2 else 'NO'}), "
              f"XLA temporary memory {mf / 2**20:.0f} vs {mc / 2**20:.0f} MiB "
              f"(lower: {'yes' if mf < mc else 'NO'}) -> {'met' if ok else 'NOT MET'}")
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="correctness only")
    p.add_argument("--cpu", action="store_true", help="the CPU targets of issue 5 instead")
    p.add_argument("--sizes", default=None, help="comma-separated N (GPU default 2048..65536; --cpu 16384)")
    p.add_argument("--kinds", default="glu,elu", help="--cpu: feature maps")
    p.add_argument("--rounds", type=int, default=5, help="--cpu: interleaved rounds")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per cell (GPU)")
    p.add_argument("--budget", type=float, default=20.0, help="seconds per cell at most (GPU)")
    args = p.parse_args(argv)
    print(f"jax {jax.__version__}, kernelattn {ka.__version__}; devices: "
          + ", ".join(describe(dv) for dv in jax.devices()))
    if args.cpu:
        sizes = [int(s) for s in (args.sizes or "16384").split(",")]
        cpu_targets(sizes, args.rounds, args.kinds.split(","))
        return 0
    device = jax.devices()[0]
    if device.platform == "cpu":
        print("  no accelerator: the checks below compare the CPU with itself (run on a GPU machine)")
    check(device)
    if not args.check:
        sizes = [int(s) for s in (args.sizes or "2048,4096,8192,16384,32768,65536").split(",")]
        timings(device, sizes, [jnp.bfloat16, jnp.float32], args.repeats, args.budget)
    if FAILURES:
        print(f"\n{len(FAILURES)} check(s) FAILED: {FAILURES}")
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
