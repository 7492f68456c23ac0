"""On a machine with an NVIDIA GPU: check every CuPy path and time it against torch and JAX.

Run: ``python asv_benchmarks/gpu_cupy_check.py [--sizes 2048,8192,32768,65536]``. Needs CuPy
with a usable CUDA device; torch (CUDA) and JAX (GPU) are timed on the same card when importable.

Checks, each against the NumPy float64 reference (relative RMS, float32 <= 1e-5, float16 <= 5e-3):
the CuPy fast path (non-causal, causal, key-masked, float16 with float32 state), the array-API
core on CuPy (``backend="agnostic"``), the hand-derived gradients (``linear_attention_vjp``
against a float64 NumPy run), and ``fit_feature_map`` lowering the attention KL on the shipped
MiniLM data. Then times, B=1, H=8, d=m=64, glu kernel: CuPy fast / CuPy core / torch fast path /
torch SDPA / JAX fast path / jax.nn.dot_product_attention, and prints the card.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import kernelattn as ka
from kernelattn._timing import median_time
from kernelattn.data import default_inputs
from kernelattn.testing import reference_linear_attention, rel_rms_error, to_numpy


def check(label, err, tol):
    ok = err <= tol
    print(f"  {'ok ' if ok else 'BAD'} {label:<55} rel. RMS {err:.2e} (tol {tol:g})")
    return ok


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="2048,8192,32768,65536")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    import cupy

    if not cupy.cuda.is_available():
        sys.exit("no usable CUDA device for CuPy")
    props = cupy.cuda.runtime.getDeviceProperties(0)
    print(f"card: {props['name'].decode()}, CuPy {cupy.__version__}, kernelattn {ka.__version__}")

    ok = True
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, 2, 4, 700, 32))
    mask = rng.random((2, 700)) > 0.2
    phi64 = ka.feature_map("aoglu", num_heads=4, head_dim=32, depth=2, seed=0, dtype="float64")
    for dtype, tol in (("float32", 1e-5), ("float16", 5e-3)):
        cq, ck, cv = (cupy.asarray(a.astype(dtype)) for a in (q, k, v))
        phi = phi64.to(like=cq)
        for causal in (False, True):
            for m in (None, mask):
                ref = reference_linear_attention(*(to_numpy(a).astype(np.float64) for a in (cq, ck, cv)),
                                                 feature_map=phi, causal=causal, key_mask=m)
                cm = None if m is None else cupy.asarray(m)
                for backend in (None, "agnostic"):
                    out = ka.linear_attention(cq, ck, cv, feature_map=phi, causal=causal, key_mask=cm,
                                              backend=backend)
                    ok &= check(f"{dtype} causal={causal} masked={m is not None} {backend or 'fast'}",
                                rel_rms_error(out, ref), tol)
    # hand-derived gradients on CuPy against NumPy float64
    cq, ck, cv = (cupy.asarray(a) for a in (q, k, v))
    cphi = phi64.to(like=cq)
    for causal in (False, True):
        _, vjp = ka.linear_attention_vjp(cq, ck, cv, feature_map=cphi, causal=causal)
        _, vjp_np = ka.linear_attention_vjp(q, k, v, feature_map=phi64, causal=causal)
        g = rng.standard_normal(v.shape)
        got, want = vjp(cupy.asarray(g)), vjp_np(g)
        for name in ("q", "k", "v"):
            ok &= check(f"vjp d{name} causal={causal}", rel_rms_error(getattr(got, name), getattr(want, name)),
                        1e-10)
    sample = ka.data.minilm(layer=0)
    sq, sk, sv = (cupy.asarray(a) for a in (sample.q, sample.k, sample.v))
    sphi = ka.feature_map("glu", num_heads=12, head_dim=32, seed=0, like=sq)
    before = float(ka.approximation_error(sphi, sq, sk, sv).attention_kl)
    fitted, _ = ka.fit_feature_map(sphi, sq, sk, sv, steps=50, lr=0.02)
    after = float(ka.approximation_error(fitted, sq, sk, sv).attention_kl)
    print(f"  {'ok ' if after < before else 'BAD'} fit_feature_map on CuPy: attention KL {before:.3f} -> {after:.3f}")
    ok &= after < before

    print("\ntimes (ms), B=1, H=8, d=m=64, glu kernel, float32, forward:")
    libs = {"cupy": cupy}
    try:
        import torch

        if torch.cuda.is_available():
            libs["torch"] = torch
    except ImportError:
        pass
    try:
        import jax

        if jax.devices("gpu"):
            libs["jax"] = jax
    except Exception:
        pass
    print(f"  {'N':>6} " + " ".join(f"{c:>14}" for c in ("cupy fast", "cupy core", "torch fast", "torch SDPA",
                                                      "jax fast", "jax dpa")))
    for n in (int(s) for s in args.sizes.split(",")):
        qn, kn, vn = default_inputs(n, num_heads=8, head_dim=64, seed=1)
        row = []
        for causal in (True,):
            cq, ck, cv = (cupy.asarray(a) for a in (qn, kn, vn))
            phi = ka.feature_map("glu", num_heads=8, head_dim=64, seed=0, like=cq)
            row.append(median_time(lambda: ka.linear_attention(cq, ck, cv, feature_map=phi, causal=causal),
                                   repeats=args.repeats))
            row.append(median_time(lambda: ka.linear_attention(cq, ck, cv, feature_map=phi, causal=causal,
                                                               backend="agnostic"), repeats=args.repeats))
            if "torch" in libs:
                torch = libs["torch"]
                tq, tk, tv = (torch.as_tensor(a, device="cuda") for a in (qn, kn, vn))
                tphi = ka.feature_map("glu", num_heads=8, head_dim=64, seed=0, like=tq)
                with torch.no_grad():
                    row.append(median_time(lambda: ka.linear_attention(tq, tk, tv, feature_map=tphi, causal=causal),
                                           repeats=args.repeats))
                    sdpa = torch.nn.functional.scaled_dot_product_attention
                    row.append(median_time(lambda: sdpa(tq, tk, tv, is_causal=causal), repeats=args.repeats))
            else:
                row += [None, None]
            if "jax" in libs:
                jax = libs["jax"]
                jq, jk, jv = (jax.device_put(a, jax.devices("gpu")[0]) for a in (qn, kn, vn))
                jphi = ka.feature_map("glu", num_heads=8, head_dim=64, seed=0, like=jq)
                f = jax.jit(lambda q, k, v, p: ka.linear_attention(q, k, v, feature_map=p, causal=causal))
                row.append(median_time(lambda: f(jq, jk, jv, jphi), repeats=args.repeats))
                dpa = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
                    q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), is_causal=causal))
                row.append(median_time(lambda: dpa(jq, jk, jv), repeats=args.repeats))
            else:
                row += [None, None]
        print(f"  {n:>6} " + " ".join(f"{'–' if t is None else f'{t * 1e3:.2f}':>14}" for t in row))
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
