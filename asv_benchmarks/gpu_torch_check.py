"""GPU check of the torch CUDA paths: correctness against the CPU float64 reference, then timings.

For a session with a GPU (none was available when this was written, so its
numbers are pending). Run from the repository root, on a machine with CUDA,
torch and triton installed::

    python asv_benchmarks/gpu_torch_check.py            # checks + timings (a few minutes)
    python asv_benchmarks/gpu_torch_check.py --check    # correctness only

1. Correctness. Every CUDA path of :mod:`kernelattn.backends.torch` -- the
   Triton kernels (default on CUDA), the blocked torch path
   (``KERNELATTN_TORCH_TRITON=0``), ``torch.compile`` of a module, the modules
   and SDPA for softmax -- forward and gradients, causal and not, with key
   masks and initial states, float32 / float16 / bfloat16, against float64 on
   the CPU (:mod:`kernelattn.testing` and the core with ``backend="agnostic"``).
   Tolerances: relative RMS 1e-5 (float32), 5e-3 (half). Exit status 1 if any fails.
2. Timings (bfloat16, d = 64 and 128, N = 2K ... 64K): our Triton kernels on
   features, the whole ``linear_attention`` with the paper's ffn kernel,
   ``torch.nn.functional.scaled_dot_product_attention`` (is_causal) and, if it
   imports, flash-linear-attention's ``chunk_linear_attn``; forward and
   forward+backward, with the card's name.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import kernelattn as ka
from kernelattn import _timing
from kernelattn.testing import reference_linear_attention, reference_softmax_attention, rel_rms_error

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 5e-3}
FAILURES = []


def report(name, err, tol):
    ok = err <= tol
    print(f"  {'ok  ' if ok else 'FAIL'} {name:70s} rel RMS {err:.1e} (tol {tol:.0e})")
    if not ok:
        FAILURES.append(name)


def _data(B, H, N, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, d, generator=g, dtype=torch.float64) * 0.7 for _ in range(3))
    mask = torch.rand(B, N, generator=g) > 0.25
    mask[:, 0] = True
    state = (torch.rand(B, H, d, d, generator=g, dtype=torch.float64),
             torch.rand(B, H, d, generator=g, dtype=torch.float64) + 0.5)
    w = torch.randn(B, H, N, d, generator=g, dtype=torch.float64)
    return q, k, v, mask, state, w


def _grads_of(fn, q, k, v, state, phi, w, *, device, dtype):
    """out, S, z and d(loss)/d(q, k, v, S0, z0, params) for loss = <out, w> + sum(S) + sum(z)."""
    leaves = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    st = [s.to(device, sdt).requires_grad_() for s in state]
    phi_d = phi.to(xp=torch, device=device, dtype=sdt)
    params = [p.requires_grad_() for p in phi_d.parameters()]
    out, S = fn(*leaves, phi_d, tuple(st))
    loss = (out.double() * w.to(device)).sum() + S.S.double().sum() + S.z.double().sum()
    grads = torch.autograd.grad(loss, leaves + st + params)
    return [out.detach().double().cpu(), S.S.detach().double().cpu(), S.z.detach().double().cpu()] + \
        [x.double().cpu() for x in grads]


def check_linear_attention(device):
    B, H, N, d = 2, 4, 300, 48  # d not a power of two, N not a multiple of the chunk
    q, k, v, mask, state, w = _data(B, H, N, d)
    phi = ka.feature_map("glu", num_heads=H, head_dim=d, seed=0, dtype="float64")
    for causal in (False, True):
        def ref_fn(q_, k_, v_, phi_, st):
            return ka.linear_attention(q_, k_, v_, feature_map=phi_, causal=causal, key_mask=mask.to(q_.device),
                                       initial_state=st, return_state=True, backend="agnostic")

        oracle = reference_linear_attention(q, k, v, feature_map=phi, causal=causal, key_mask=mask,
                                            initial_state=state)
        refs = {}
        for dtype in (torch.float32, torch.float16, torch.bfloat16):  # the same (rounded) inputs, in float64
            rq, rk, rv = (t.to(dtype).double() for t in (q, k, v))
            refs[dtype] = _grads_of(ref_fn, rq, rk, rv, state, phi, w, device="cpu", dtype=torch.float64)
        report(f"core float64 vs kernelattn.testing (causal={causal})",
               rel_rms_error(_grads_of(ref_fn, q, k, v, state, phi, w, device="cpu", dtype=torch.float64)[0],
                             oracle), 1e-12)
        for setting in ("1", "0"):  # Triton kernels, then the blocked torch path
            os.environ["KERNELATTN_TORCH_TRITON"] = setting
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                ref = refs[dtype]
                def fast(q_, k_, v_, phi_, st):
                    return ka.linear_attention(q_, k_, v_, feature_map=phi_, causal=causal,
                                               key_mask=mask.to(device), initial_state=st, return_state=True)

                with torch.no_grad():  # the inference path
                    out = fast(*(t.to(device, dtype) for t in (q, k, v)), phi.to(xp=torch, device=device),
                               tuple(s.to(device, torch.float32) for s in state))[0]
                path = "triton" if setting == "1" else "torch blocked"
                report(f"{path} {str(dtype)[6:]} causal={causal} forward (no_grad)",
                       rel_rms_error(out.double().cpu(), ref[0]), TOL[dtype])
                got = _grads_of(fast, q, k, v, state, phi, w, device=device, dtype=dtype)
                worst = max(rel_rms_error(a, b) for a, b in zip(got, ref))
                report(f"{path} {str(dtype)[6:]} causal={causal} forward+gradients (worst of 9)", worst, TOL[dtype])
    os.environ["KERNELATTN_TORCH_TRITON"] = "1"


def check_softmax(device):
    q, k, v, mask, _, _ = _data(2, 4, 200, 64)
    mask[0] = False
    for causal in (False, True):
        want = reference_softmax_attention(q, k, v, causal=causal, key_mask=mask)
        for dtype in (torch.float32, torch.bfloat16):
            got = ka.softmax_attention(*(t.to(device, dtype) for t in (q, k, v)), causal=causal,
                                       key_mask=mask.to(device))
            tol = 1e-3 if dtype == torch.float32 else 1e-2  # SDPA on CUDA may use TF32 / flash kernels
            report(f"softmax SDPA {str(dtype)[6:]} causal={causal}", rel_rms_error(got.double().cpu(), want), tol)


def check_modules(device):
    from kernelattn.backends.torch_nn import LinearTransformerEncoderLayer

    torch.manual_seed(0)
    cpu = LinearTransformerEncoderLayer(64, 4, 128, feature_map="glu", causal=True, dropout=0.0, seed=0).double().eval()
    gpu = LinearTransformerEncoderLayer(64, 4, 128, feature_map="glu", causal=True, dropout=0.0, seed=0).to(device).eval()
    gpu.load_state_dict({k_: t.float() for k_, t in cpu.state_dict().items()})
    x = torch.randn(2, 150, 64, dtype=torch.float64)
    want = cpu(x).detach()
    report("encoder layer on CUDA vs CPU float64", rel_rms_error(gpu(x.float().to(device)).detach().cpu(), want), 1e-5)
    with torch.no_grad():
        state, outs = None, []
        for t in range(20):
            o, state = gpu.step(x[:, t].float().to(device), state=state)
            outs.append(o.cpu())
    report("encoder layer step decoding on CUDA", rel_rms_error(torch.stack(outs, 1), want[:, :20]), 1e-5)
    compiled = torch.compile(gpu, fullgraph=True)
    report("torch.compile(fullgraph=True) encoder layer on CUDA",
           rel_rms_error(compiled(x.float().to(device)).detach().cpu(), want), 1e-5)


# ---------------------------------------------------------------------------


def timings(device, ns, dims, B, H):
    from kernelattn.backends import _triton_linear

    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception as exc:  # noqa: BLE001
        chunk_linear_attn = None
        print(f"flash-linear-attention not importable ({type(exc).__name__}: {exc}); its column is left out")
    F = torch.nn.functional
    print(f"\nbfloat16, B={B}, H={H}, causal; median times (ms), forward | forward+backward")
    cols = ["ours: kernels on features", "ours: linear_attention(ffn)", "SDPA (is_causal)"]
    if chunk_linear_attn is not None:
        cols.append("fla chunk_linear_attn")
    print(f"{'d':>4s} {'N':>6s}  " + "  ".join(f"{c:>30s}" for c in cols))
    for d in dims:
        phi = ka.feature_map("ffn", num_heads=H, head_dim=d, seed=0, xp=torch, device=device)
        for n in ns:
            q, k, v = (torch.randn(B, H, n, d, device=device, dtype=torch.bfloat16) for _ in range(3))
            fq, fk = (F.softplus(t.float()).to(torch.bfloat16) for t in (q, k))

            # (function, its input tensors): forward+backward differentiates with respect to those
            fns = [(lambda: _triton_linear.attend(fq, fk, v, causal=True, eps=1e-6)[0], (fq, fk, v)),
                   (lambda: ka.linear_attention(q, k, v, feature_map=phi, causal=True), (q, k, v)),
                   (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v))]
            if chunk_linear_attn is not None:
                tq, tk, tv = (t.transpose(1, 2).contiguous() for t in (fq, fk, v))  # fla: (B, T, H, d)

                def fla():
                    out = chunk_linear_attn(tq, tk, tv, normalize=True)
                    return out[0] if isinstance(out, tuple) else out

                fns.append((fla, (tq, tk, tv)))
            cells = []
            for fn, inputs in fns:
                try:
                    with torch.no_grad():
                        t_f = _timing.median_time(fn, repeats=5)
                    for t in inputs:
                        t.requires_grad_(True)

                    def fb():
                        out = fn()
                        out.float().sum().backward()
                        return out

                    t_fb = _timing.median_time(fb, repeats=5)
                    cells.append(f"{t_f * 1e3:9.2f} | {t_fb * 1e3:9.2f}")
                except Exception as exc:  # noqa: BLE001
                    cells.append(f"failed: {type(exc).__name__}"[:30])
                finally:
                    for t in inputs:
                        t.requires_grad_(False)
                        t.grad = None
            print(f"{d:4d} {n:6d}  " + "  ".join(f"{c:>30s}" for c in cells))


def main(argv=None):
    p = argparse.ArgumentParser(description="GPU check of kernelattn's torch CUDA paths")
    p.add_argument("--check", action="store_true", help="correctness only")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (the CPU tests cover the kernels under TRITON_INTERPRET=1)")
        return 2
    device = "cuda"
    import triton

    print(f"card: {torch.cuda.get_device_name(0)}; torch {torch.__version__}, triton {triton.__version__}, "
          f"CUDA {torch.version.cuda}")
    print("correctness (against CPU float64):")
    check_linear_attention(device)
    check_softmax(device)
    check_modules(device)
    print(f"{len(FAILURES)} check(s) failed" + (f": {FAILURES}" if FAILURES else ""))
    if not args.check:
        timings(device, [2048, 4096, 8192, 16384, 32768, 65536], [64, 128], args.batch, args.heads)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
