"""Decode-step targets, measured side by side in one process.

Per-token time at B=1, H=8, d=e=64, float32 (torch in inference mode; JAX
jit-compiled) of

(a) ``LinearAttentionDecoder.step`` with the ffn map,
(b) a minimal recurrent elu+1 step in plain torch / JAX
    (S += outer(phi_k, v); out = phi_q S / phi_q z),
(c) ``ka.linear_attention_step`` (under ``jax.jit`` for JAX),
(d) softmax attention of one query over a preallocated KV cache of 128,
    1024 and 8192 tokens (one slot written per step): torch SDPA and
    ``jax.nn.dot_product_attention``.

Rounds of every case are interleaved after a warm-up and the medians
reported, so that a load change on the machine hits all cases alike.
Targets: (a) <= 1.5x (b); (a) faster than (d) from 1,024 tokens on.

    python asv_benchmarks/decode_targets.py [--rounds 15] [--steps 50] [--only torch|jax] [--rst FILE]

``--rst`` also writes the table as reStructuredText (docs/_static/decode_targets.rst, which
docs/benchmarks.rst includes).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import kernelattn as ka

B, H, D, E = 1, 8, 64, 64
PROMPT = 128
CONTEXTS = (128, 1024, 8192)
WARM = 5  # untimed steps before each timed run of a case


def measure(cases, *, rounds, steps, sync):
    """Median seconds per token of each case: {name: fn(t) -> out}."""
    for fn in cases.values():  # warm-up (compiles, caches)
        for t in range(2 * steps):
            out = fn(t % steps)
        sync(out)
    times = {name: [] for name in cases}
    names = list(cases)
    for r in range(rounds):
        # a decoding loop runs in steady state: the order rotates every round, and each case runs a few
        # untimed steps first, so no case always follows the 8192-token cache (which evicts the others)
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = cases[name]
            for t in range(WARM):
                out = fn(t)
            sync(out)
            t0 = time.perf_counter()
            for t in range(steps):
                out = fn(t)
            sync(out)
            times[name].append((time.perf_counter() - t0) / steps)
    measure.best = {name: min(ts) for name, ts in times.items()}  # less load-sensitive, printed beside
    return {name: statistics.median(ts) for name, ts in times.items()}


def report(lib, med):
    best = measure.best
    print(f"\n{lib}: per-token time of interleaved rounds (B={B}, H={H}, d=e={D}, float32): median (best)")
    for name, s in med.items():
        print(f"  {name:<34s} {s * 1e6:9.1f} us  ({best[name] * 1e6:8.1f})")
    a, b = med["(a) decoder, ffn"], med["(b) minimal elu+1"]
    print(f"  (a)/(b) decoder vs minimal recurrent step: {a / b:5.2f}x   (target <= 1.5x: "
          f"{'met' if a / b <= 1.5 else 'NOT met'})")
    print(f"  (c)/(a) linear_attention_step vs decoder:  {med['(c) linear_attention_step, ffn'] / a:5.2f}x")
    for n in CONTEXTS:
        d = med[f"(d) softmax KV cache, {n}"]
        want = "" if n < 1024 else f"   (target < 1: {'met' if a / d < 1 else 'NOT met'})"
        print(f"  (a)/(d) decoder vs softmax cache at {n:>5d}:  {a / d:5.2f}x{want}")


def inputs(steps, rng):
    q, k, v = rng.standard_normal((3, B, H, PROMPT + steps, D), dtype=np.float32)
    return q, k, v


def torch_cases(steps):
    import torch
    import torch.nn.functional as F

    torch.set_grad_enabled(False)
    q, k, v = (torch.from_numpy(a) for a in inputs(steps, np.random.default_rng(0)))
    phi = ka.feature_map("ffn", num_heads=H, head_dim=D, seed=0, like=q)
    _, state = ka.linear_attention(q[:, :, :PROMPT], k[:, :, :PROMPT], v[:, :, :PROMPT], feature_map=phi,
                                   causal=True, return_state=True)
    toks = [(q[:, :, PROMPT + t].contiguous(), k[:, :, PROMPT + t].contiguous(), v[:, :, PROMPT + t].contiguous())
            for t in range(steps)]
    cases = {}
    with torch.inference_mode():
        dec = ka.LinearAttentionDecoder(phi, like=toks[0][0], state=state)
        cases["(a) decoder, ffn"] = lambda t: dec.step(*toks[t])

        S, z = torch.zeros(B, H, D, E), torch.zeros(B, H, D)

        def minimal(t):
            qt, kt, vt = toks[t]
            fq, fk = F.elu(qt) + 1, F.elu(kt) + 1
            S.add_(fk[..., :, None] * vt[..., None, :])
            z.add_(fk)
            return (fq[..., None, :] @ S)[..., 0, :] / (fq * z).sum(-1, keepdim=True)

        cases["(b) minimal elu+1"] = minimal
        st = [state]

        def step_today(t):
            out, st[0] = ka.linear_attention_step(*toks[t], feature_map=phi, state=st[0])
            return out

        cases["(c) linear_attention_step, ffn"] = step_today
        for n in CONTEXTS:
            Kc, Vc = torch.randn(B, H, n, D), torch.randn(B, H, n, E)

            def sdpa(t, Kc=Kc, Vc=Vc, n=n):
                qt, kt, vt = toks[t]
                Kc[:, :, n - 1] = kt
                Vc[:, :, n - 1] = vt
                return F.scaled_dot_product_attention(qt[:, :, None], Kc, Vc)[:, :, 0]

            cases[f"(d) softmax KV cache, {n}"] = sdpa
    return cases


def run_torch(rounds, steps):
    import torch

    cases = torch_cases(steps)
    with torch.inference_mode():
        return measure(cases, rounds=rounds, steps=steps, sync=lambda out: None)


def run_jax(rounds, steps):
    import jax
    import jax.numpy as jnp

    q, k, v = (jnp.asarray(a) for a in inputs(steps, np.random.default_rng(0)))
    phi = ka.feature_map("ffn", num_heads=H, head_dim=D, seed=0, like=q)
    _, state = ka.linear_attention(q[:, :, :PROMPT], k[:, :, :PROMPT], v[:, :, :PROMPT], feature_map=phi,
                                   causal=True, return_state=True)
    toks = [(q[:, :, PROMPT + t], k[:, :, PROMPT + t], v[:, :, PROMPT + t]) for t in range(steps)]
    cases = {}
    dec = ka.LinearAttentionDecoder(phi, like=toks[0][0], state=state)
    cases["(a) decoder, ffn"] = lambda t: dec.step(*toks[t])

    @jax.jit
    def minimal_step(S, z, q, k, v):
        fq, fk = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1
        S = S + fk[..., :, None] * v[..., None, :]
        z = z + fk
        return jnp.einsum("bhm,bhme->bhe", fq, S) / jnp.sum(fq * z, -1, keepdims=True), S, z

    mst = [jnp.zeros((B, H, D, E)), jnp.zeros((B, H, D))]

    def minimal(t):
        out, mst[0], mst[1] = minimal_step(mst[0], mst[1], *toks[t])
        return out

    cases["(b) minimal elu+1"] = minimal
    step_jit = jax.jit(lambda q, k, v, state, phi: ka.linear_attention_step(q, k, v, feature_map=phi, state=state))
    st = [state]

    def step_today(t):
        out, st[0] = step_jit(*toks[t], st[0], phi)
        return out

    cases["(c) linear_attention_step, ffn"] = step_today

    @jax.jit
    def cache_step(Kc, Vc, q, k, v):  # (B, L, H, d) caches, one slot written
        n = Kc.shape[1]
        Kc = jax.lax.dynamic_update_slice(Kc, k[:, None], (0, n - 1, 0, 0))
        Vc = jax.lax.dynamic_update_slice(Vc, v[:, None], (0, n - 1, 0, 0))
        return jax.nn.dot_product_attention(q[:, None], Kc, Vc)[:, 0], Kc, Vc

    cache_step_donated = jax.jit(cache_step.__wrapped__, donate_argnums=(0, 1))
    for n in CONTEXTS:
        cache = [jnp.asarray(np.random.default_rng(n).standard_normal((B, n, H, D), dtype=np.float32)),
                 jnp.asarray(np.random.default_rng(n + 1).standard_normal((B, n, H, E), dtype=np.float32))]

        def softmax(t, cache=cache):
            qt, kt, vt = toks[t]
            out, cache[0], cache[1] = cache_step_donated(cache[0], cache[1], qt, kt, vt)
            return out

        cases[f"(d) softmax KV cache, {n}"] = softmax
    return measure(cases, rounds=rounds, steps=steps, sync=lambda out: out.block_until_ready())


def rst(results) -> str:
    """{library: medians} as one reStructuredText table, microseconds per token and ratios to (a)."""
    import os
    import platform

    libs = list(results)
    names = list(next(iter(results.values())))
    lines = [f".. generated by asv_benchmarks/decode_targets.py on {platform.machine()}, {os.cpu_count()} cores "
             f"(load average {os.getloadavg()[0]:.1f}); do not edit", "",
             f".. list-table:: per-token time, B={B}, H={H}, d=e={D}, float32 (medians of interleaved rounds); "
             "ratio = this / the decoder (a)", "   :header-rows: 1", "", "   * - step"]
    for lib in libs:
        lines += [f"     - {lib} µs", f"     - {lib} ratio"]
    for name in names:
        lines.append(f"   * - {name}")
        for lib in libs:
            med = results[lib]
            lines += [f"     - {med[name] * 1e6:.1f}", f"     - {med[name] / med['(a) decoder, ffn']:.2f}"]
    return "\n".join(lines + [""])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=50, help="tokens per timed round")
    p.add_argument("--only", choices=("torch", "jax"))
    p.add_argument("--rst", help="also write the table as reStructuredText to this file")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        p.error(f"--rounds and --steps must be positive integers; got {args.rounds} and {args.steps}")
    results = {}
    for lib, run in (("torch", run_torch), ("jax", run_jax)):
        if args.only in (None, lib):
            results[lib] = run(args.rounds, args.steps)
            report(lib, results[lib])
    if args.rst:
        with open(args.rst, "w") as f:
            f.write(rst(results))


if __name__ == "__main__":
    main()
