"""The Triton kernels (kernelattn.backends._triton_linear) against the torch path and the core.

Without a GPU they run on CPU tensors in Triton's interpreter: ``TRITON_INTERPRET=1``
is set here, before the kernels are defined (Triton reads it when ``@triton.jit``
runs). With a CUDA device the same tests run the compiled kernels on it.
Shapes stay small: the interpreter executes every program in Python.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402  (a missing triton fails the run: it is in the test extra)

import kernelattn as ka  # noqa: E402
from kernelattn.backends import _torch_ops  # noqa: E402
from kernelattn.backends import _triton_linear  # noqa: E402
from kernelattn.backends import torch as torch_backend  # noqa: E402
from kernelattn.testing import reference_linear_attention, rel_rms_error  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 5e-3}


@pytest.fixture(autouse=True)
def _autograd_on():
    """These tests need autograd on; a command run in-process earlier may have switched it off."""
    with torch.enable_grad():
        yield


def test_kernels_run_in_the_mode_this_machine_allows():
    assert triton.__version__.startswith("3.")
    assert triton.knobs.runtime.interpret is (not CUDA)


def _case(B, H, N, L, m, e, seed=0, state=False):
    g = torch.Generator().manual_seed(seed)
    fq = torch.rand(B, H, N, m, generator=g, dtype=torch.float64) + 0.05
    fk = torch.rand(B, H, L, m, generator=g, dtype=torch.float64) + 0.05
    v = torch.randn(B, H, L, e, generator=g, dtype=torch.float64)
    S = torch.rand(B, H, m, e + 1, generator=g, dtype=torch.float64) if state else None
    w = torch.randn(B, H, N, e, generator=g, dtype=torch.float64)
    wS = torch.randn(B, H, m, e + 1, generator=g, dtype=torch.float64)
    return fq, fk, v, S, w, wS


def _grads(fn, fq, fk, v, S, w, wS, dtype):
    """Output, final state and the gradients of <out, w> + <state, wS> to features, values and state."""
    leaves = [t.to(DEVICE, dtype).requires_grad_() for t in (fq, fk, v)]
    state = S.to(DEVICE, torch.float32).requires_grad_() if S is not None else None
    out, St = fn(*leaves, state)
    loss = (out.float() * w.to(DEVICE, torch.float32)).sum() + (St.float() * wS.to(DEVICE, torch.float32)).sum()
    grads = torch.autograd.grad(loss, leaves + ([state] if state is not None else []))
    return [out.detach().float().cpu(), St.detach().float().cpu()] + [x.float().cpu() for x in grads]


def _compare(a, b, tol):
    for i, (x, y) in enumerate(zip(a, b)):
        err = rel_rms_error(x, y)
        assert err <= tol, f"item {i}: relative RMS error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("B,H,N,L,m,e,state", [
    (1, 2, 37, 37, 5, 3, False),      # widths not powers of two, N not a multiple of the chunk
    (2, 1, 64, 64, 16, 16, True),     # exactly four chunks, with an initial state
    (1, 2, 50, 50, 20, 33, True),
    (1, 1, 2, 2, 4, 4, False),        # shorter than a chunk
])
@pytest.mark.slow_where(N=(37, 64))  # quick: one shape (Triton interpreter)
def test_kernels_match_the_torch_path_forward_and_backward(B, H, N, L, m, e, state, causal):
    case = _case(B, H, N, L, m, e, state=state)

    def tri(fq, fk, v, S):
        return _triton_linear.attend(fq, fk, v, S, causal=causal, eps=1e-6, chunk=16)

    def ref(fq, fk, v, S):
        return _torch_ops.attend(fq.float(), fk.float(), v.float(), S, causal, 1e-6, 16)[:2]

    _compare(_grads(tri, *case, torch.float32), _grads(ref, *case, torch.float32), TOL[torch.float32])


def test_cross_attention_kernels():
    case = _case(2, 2, 7, 29, 6, 5, state=True)

    def tri(fq, fk, v, S):
        return _triton_linear.attend(fq, fk, v, S, causal=False, eps=1e-6)

    def ref(fq, fk, v, S):
        return _torch_ops.attend(fq, fk, v, S, False, 1e-6, 64)[:2]

    _compare(_grads(tri, *case, torch.float32), _grads(ref, *case, torch.float32), TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.slow_where(dtype=torch.bfloat16)
def test_half_precision_features_accumulate_in_float32(dtype, causal):
    case = _case(1, 2, 40, 40, 16, 16, state=True)

    def tri(fq, fk, v, S):
        out, S = _triton_linear.attend(fq, fk, v, S, causal=causal, eps=1e-6, chunk=16)
        assert out.dtype == S.dtype == torch.float32
        return out, S

    def ref(fq, fk, v, S):  # float32 math on the same (rounded) inputs
        return _torch_ops.attend(fq.float(), fk.float(), v.float(), S, causal, 1e-6, 16)[:2]

    _compare(_grads(tri, *case, dtype), _grads(ref, *case, dtype), TOL[dtype])


def test_one_token_forward():
    fq, fk, v, S, _, _ = _case(1, 1, 1, 1, 4, 4, state=True)
    for causal in (True, False):
        out, St = _triton_linear.attend(fq.float(), fk.float(), v.float(), S.float(), causal=causal, eps=1e-6)
        want, wS = _torch_ops.attend(fq.float(), fk.float(), v.float(), S.float(), causal, 1e-6, 64)[:2]
        assert rel_rms_error(out, want) < 1e-6 and rel_rms_error(St, wS) < 1e-6


# ---------------------------------------------------------------------------
# end to end: the adapter on the Triton kernels


@pytest.fixture
def triton_everywhere(monkeypatch):
    """Send every linear_attention call on torch tensors to the Triton kernels."""
    monkeypatch.setenv(torch_backend.TRITON_ENV, "force")
    assert torch_backend._triton_ready(torch.device(DEVICE))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_linear_attention_through_the_triton_kernels_matches_the_core(triton_everywhere, causal):
    B, H, N, d = 2, 2, 35, 6
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(B, H, N, d, generator=g, dtype=torch.float64).float() for _ in range(3))
    mask = torch.rand(B, N, generator=g) > 0.3
    phi = ka.feature_map("glu", num_heads=H, head_dim=d, seed=0, xp=torch)
    state = (torch.rand(B, H, d, d, generator=g), torch.rand(B, H, d, generator=g))
    results = []
    for backend in (None, "agnostic"):
        leaves = [t.clone().to(DEVICE).requires_grad_() for t in (q, k, v, *state)]
        phi_d = phi.to(xp=torch, device=DEVICE)
        params = [p.requires_grad_() for p in phi_d.parameters()]
        out, st = ka.linear_attention(*leaves[:3], feature_map=phi_d, causal=causal, key_mask=mask.to(DEVICE),
                                      initial_state=tuple(leaves[3:]), return_state=True, backend=backend)
        loss = (out * out).sum() + st.S.sum() + st.z.sum()
        grads = torch.autograd.grad(loss, leaves + params)
        results.append([out.detach().cpu(), st.S.detach().cpu(), st.z.detach().cpu()] + [x.cpu() for x in grads])
    _compare(results[0], results[1], TOL[torch.float32])
    ref = reference_linear_attention(q, k, v, feature_map=phi, causal=causal, key_mask=mask, initial_state=state)
    assert rel_rms_error(results[0][0], ref) < 1e-5


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_triton_gradients_match_the_definition_with_left_padding(triton_everywhere, causal, eps):
    """Rows with no real key (left padding, a padded batch item) give zeros and zero gradients, any eps."""
    from kernelattn.testing import reference_linear_attention_vjp

    B, H, N, d = 3, 2, 21, 4
    g = torch.Generator().manual_seed(7)
    q, k, v, w = (torch.randn(B, H, N, d, generator=g, dtype=torch.float64) for _ in range(4))
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, :6] = False
    mask[1] = False
    phi = ka.feature_map("glu", num_heads=H, head_dim=d, depth=2, seed=0, dtype="float64")
    leaves = [t.float().to(DEVICE).requires_grad_() for t in (q, k, v)]
    phi_d = phi.to(xp=torch, device=DEVICE, dtype=torch.float32)
    params = [p.requires_grad_() for p in phi_d.parameters()]
    out = ka.linear_attention(*leaves, feature_map=phi_d, causal=causal, key_mask=mask.to(DEVICE), eps=eps)
    grads = torch.autograd.grad((out * w.float().to(DEVICE)).sum(), leaves + params)
    ref = reference_linear_attention(q, k, v, feature_map=phi, causal=causal, key_mask=mask, eps=eps)
    want = reference_linear_attention_vjp(q, k, v, w, feature_map=phi, causal=causal, key_mask=mask, eps=eps)
    assert rel_rms_error(out.detach().cpu(), ref) < 1e-5
    for got, exp in zip(grads, [want["q"], want["k"], want["v"], *want["params"]]):
        assert torch.isfinite(got).all()
        assert rel_rms_error(got.cpu(), exp) < 1e-4
