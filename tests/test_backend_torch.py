"""The torch fast paths (kernelattn.backends.torch) against the array-API core on the same inputs.

Tiers: forward and gradients vs ``backend="agnostic"`` (relative RMS <= 1e-5 in
float32, <= 5e-3 in float16/bfloat16); float64 vs the NumPy reference of
kernelattn.testing; the custom op's backward vs finite differences
(``torch.autograd.gradcheck``); memory (no (N, m, e) tensor, O(N) backward).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import kernelattn as ka
from kernelattn import _dispatch
from kernelattn.backends import _torch_fmap, _torch_mem, _torch_ops
from kernelattn.backends import torch as torch_backend
from kernelattn.testing import (MASK_PATTERNS, edge_key_mask, reference_linear_attention,
                                reference_softmax_attention, rel_rms_error, watch_torch_sizes)

LIMITS = (torch_backend.CAUSAL_MAX, torch_backend.DIRECT_MAX)  # before any fixture changes them
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 5e-3, torch.float64: 1e-12}
KINDS = [("ffn", {}), ("glu", {"depth": 2}), ("aoglu", {"depth": 2, "bias": True}), ("hedgehog", {"bias": True}),
         ("glu", {"tied": False, "feature_dim": 20}), ("favor", {}), ("elu", {}), ("relu", {})]
KIND_IDS = [k + ("-" + "-".join(f"{a}={b}" for a, b in o.items()) if o else "") for k, o in KINDS]


@pytest.fixture(autouse=True)
def _autograd_on():
    """These tests need autograd on; a command run in-process earlier may have switched it off."""
    with torch.enable_grad():
        yield


@pytest.fixture(autouse=True, params=["direct", "blocked"])
def torch_path(request, monkeypatch):
    """Every test twice: as dispatch has it (short inputs on the direct formula,
    ``backends/_torch_direct.py``), then with the length limits at -1, so the same inputs take the
    blocked, fused and custom-op paths that long sequences take."""
    if request.param == "blocked":
        monkeypatch.setattr(torch_backend, "CAUSAL_MAX", -1)
        monkeypatch.setattr(torch_backend, "DIRECT_MAX", -1)
    return request.param


def _phi(kind, opts, H, d, dtype=torch.float32, grad=False):
    if kind in ("elu", "relu"):
        return ka.feature_map(kind)
    phi = ka.feature_map(kind, num_heads=H, head_dim=d, seed=3, xp=torch,
                         dtype=torch.float64 if dtype == torch.float64 else torch.float32, **opts)
    for p in phi.parameters():
        p.requires_grad_(grad)
    return phi


def _inputs(B, H, N, L, d, e, dtype, seed=0, masked=False, state_m=None):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, N, d, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    k = (torch.randn(B, H, L, d, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    v = torch.randn(B, H, L, e, generator=g, dtype=torch.float64).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(B, L, generator=g) > 0.35
        mask[0, :2] = True
        if B > 1:
            mask[-1, :] = False  # a sequence with no valid key at all
    state = None
    if state_m is not None:
        sdt = torch.float64 if dtype == torch.float64 else torch.float32
        state = (torch.rand(B, H, state_m, e, generator=g, dtype=torch.float64).to(sdt),
                 torch.rand(B, H, state_m, generator=g, dtype=torch.float64).to(sdt) + 0.5)
    return q, k, v, mask, state


def _run(backend, q, k, v, phi, *, causal, mask, state, chunk, grad, return_state=True, eps=1e-6):
    """Output, state, and the gradients of a loss touching both (to every input and parameter)."""
    leaves = []
    if grad:
        q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
        leaves = [q, k, v]
        if state is not None:
            state = tuple(s.detach().clone().requires_grad_() for s in state)
            leaves += list(state)
        if isinstance(phi, ka.FeatureMap):
            leaves += phi.parameters()
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        res = ka.linear_attention(q, k, v, feature_map=phi, causal=causal, key_mask=mask, chunk_size=chunk,
                                  initial_state=state, return_state=return_state, backend=backend, eps=eps)
        out, st = res if return_state else (res, None)
        if not grad:
            return [out] + ([st.S, st.z] if st is not None else [])
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(out.dtype)
        loss = (out * w).float().sum()
        if st is not None:
            loss = loss + 0.01 * (st.S**2).sum() + 0.1 * st.z.sum()
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [out.detach()] + ([st.S.detach(), st.z.detach()] if st is not None else []) + list(grads)


def _compare(a, b, tol, what=""):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        if x is None or y is None:
            assert x is None and y is None, f"{what}: item {i} missing on one side"
            continue
        assert x.dtype == y.dtype and x.shape == y.shape, (
            f"{what}: item {i} {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}")
        err = rel_rms_error(x, y)
        assert err <= tol, f"{what}: item {i} relative RMS error {err:.2e} > {tol:.0e}"


# ---------------------------------------------------------------------------
# dispatch


def test_torch_tensors_take_the_fast_paths_automatically():
    x = torch.zeros(1, 2, 3, 4)
    for causal in (False, True):
        for method in ("auto", "chunked"):
            res = ka.explain_dispatch("linear_attention", x, causal=causal, method=method, masked=False, kind="glu")
            assert res.backend == "torch" and res.function.__self__ is torch_backend.ADAPTER
    assert ka.explain_dispatch("softmax_attention", x, causal=True, masked=True).backend == "torch"
    for method in ("naive", "recurrent"):  # the references stay on the core, with a reason
        res = ka.explain_dispatch("linear_attention", x, causal=True, method=method, masked=False, kind="glu")
        assert res.backend == "agnostic" and "reference" in res.reason
    # naming the backend with a reference method runs that method on the core (issue 14, item 7)
    naive = ka.linear_attention(x, x, x, causal=True, method="naive", backend="torch")
    assert rel_rms_error(naive, reference_linear_attention(x, x, x, causal=True)) < 1e-5


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_each_fixture_mode_runs_its_paths(torch_path, causal):
    """The two modes of ``torch_path`` really run different code (names recorded by dispatch)."""
    for grad in (False, True):
        x = torch.ones(1, 2, 37, 4, requires_grad=grad)
        with _dispatch.recording() as names:
            ka.linear_attention(x, x, x, causal=causal)
        blocked = "torch:custom-op" if grad else "torch:fused-blocks"
        assert names == ["torch:direct" if torch_path == "direct" else blocked], (torch_path, grad)


def test_lengths_pick_the_direct_formula_only_where_it_is_faster(monkeypatch):
    monkeypatch.setattr(torch_backend, "CAUSAL_MAX", LIMITS[0])
    monkeypatch.setattr(torch_backend, "DIRECT_MAX", LIMITS[1])

    def name(n, causal, grad=False):
        x = torch.ones(1, 1, n, 4, requires_grad=grad)
        return ka.explain_dispatch("linear_attention", x, k=x, v=x, causal=causal).implementation

    short, medium, long = torch_backend.CAUSAL_MAX, torch_backend.DIRECT_MAX, torch_backend.DIRECT_MAX + 1
    assert name(short, True) == name(medium, False) == name(medium, False, grad=True) == "torch:direct"
    assert name(short + 1, True) == name(long, False) == "torch:fused-blocks"
    assert name(short + 1, True, grad=True) == name(long, False, grad=True) == "torch:custom-op"


def test_environment_switch_sends_torch_to_the_core(monkeypatch):
    monkeypatch.setenv(_dispatch.DISABLE_ENV, "1")
    _dispatch.clear_cache()
    try:
        res = ka.explain_dispatch("linear_attention", torch.zeros(1, 1, 2, 2), causal=False, method="auto",
                                  masked=False, kind="elu")
        assert res.backend == "agnostic"
    finally:
        monkeypatch.delenv(_dispatch.DISABLE_ENV)
        _dispatch.clear_cache()


def test_importing_the_adapter_stays_off_torch_nn_modules():
    import subprocess
    import sys

    code = ("import sys, kernelattn.backends.torch as t; "
            "print(any(m.startswith('kernelattn.backends.torch_nn') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------
# fast path == core, float32


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("kind,opts", KINDS, ids=KIND_IDS)
def test_forward_and_gradients_match_the_core(kind, opts, causal, masked):
    B, H, N, d = 2, 3, 37, 12
    phi = _phi(kind, opts, H, d, grad=True)
    m = phi.feature_dim or d
    q, k, v, mask, state = _inputs(B, H, N, N, d, d, torch.float32, masked=masked, state_m=m)
    for grad in (False, True):  # the fused inference path, then the differentiable one
        fast = _run(None, q, k, v, phi, causal=causal, mask=mask, state=state, chunk=8, grad=grad)
        core = _run("agnostic", q, k, v, phi, causal=causal, mask=mask, state=state, chunk=8, grad=grad)
        _compare(fast, core, TOL[torch.float32], f"grad={grad}")


@pytest.mark.parametrize(
    "B,H,N,L,d,e,chunk,causal",
    [
        (1, 1, 1, 1, 5, 3, 64, True),        # one token, one head
        (1, 1, 1, 1, 5, 3, 64, False),
        (2, 1, 70, 70, 7, 9, 16, True),      # d not a power of two, N not a multiple of the chunk
        (1, 2, 64, 64, 6, 6, 64, True),      # N exactly one chunk
        (3, 2, 65, 65, 6, 4, 64, True),      # one chunk and one token
        (2, 3, 5, 19, 12, 10, 8, False),     # cross attention, N < L
        (2, 3, 23, 4, 12, 10, 8, False),     # cross attention, N > L
        (1, 2, 33, 33, 12, 12, 1, True),     # chunks of one token
    ],
)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_awkward_shapes_match_the_core(B, H, N, L, d, e, chunk, causal, masked):
    phi = _phi("glu", {"feature_dim": d + 3}, H, d, grad=True)
    q, k, v, mask, state = _inputs(B, H, N, L, d, e, torch.float32, masked=masked, state_m=d + 3)
    for grad in (False, True):
        fast = _run(None, q, k, v, phi, causal=causal, mask=mask, state=state, chunk=chunk, grad=grad)
        core = _run("agnostic", q, k, v, phi, causal=causal, mask=mask, state=state, chunk=chunk, grad=grad)
        _compare(fast, core, TOL[torch.float32])


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_many_blocks_carry_the_state_across_blocks(monkeypatch, causal):
    """Shrink the cache budget so that a short sequence spans many blocks (and a remainder)."""
    B, H, N, d = 2, 2, 75, 6
    monkeypatch.setattr(_torch_ops, "BLOCK_FLOATS", B * H * 8 * 16)
    monkeypatch.setattr(_torch_ops, "NONCAUSAL_BLOCK_FLOATS", B * H * 8 * 16)
    assert len(_torch_ops.segments(N, 4, _torch_ops.block_tokens(B * H, 8, 4))) >= 6
    assert N // _torch_ops.block_tokens(B * H, 8, 1, _torch_ops.NONCAUSAL_BLOCK_FLOATS) >= 4
    phi = _phi("aoglu", {"depth": 2, "feature_dim": 7}, H, d, grad=True)
    q, k, v, mask, state = _inputs(B, H, N, N, d, d, torch.float32, masked=True, state_m=7)
    for grad in (False, True):
        fast = _run(None, q, k, v, phi, causal=causal, mask=mask, state=state, chunk=4, grad=grad)
        core = _run("agnostic", q, k, v, phi, causal=causal, mask=mask, state=state, chunk=4, grad=grad)
        _compare(fast, core, TOL[torch.float32])


@pytest.mark.parametrize("eps", [1e-6, 0.0], ids=["eps", "eps0"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("kind,opts", [k for k in KINDS if k[0] in ("ffn", "favor", "relu", "hedgehog")],
                         ids=[i for k, i in zip(KINDS, KIND_IDS) if k[0] in ("ffn", "favor", "relu", "hedgehog")])
def test_inference_without_state_keeps_empty_rows_zero(kind, opts, causal, eps):
    """Inference with nonnegative features and no state divides directly (eps > 0): a batch item with no
    valid key, rows whose features miss every key's (relu), and eps = 0 (which cannot) all match the core."""
    B, H, N, d = 3, 2, 29, 6
    phi = _phi(kind, opts, H, d)
    q, k, v, mask, _ = _inputs(B, H, N, N, d, d, torch.float32, masked=True)
    if kind == "relu":  # disjoint supports: every query row meets a zero denominator
        q, k = q.abs() * torch.tensor([1.0, 0, 1, 0, 1, 0]), -k.abs() * torch.tensor([1.0, 0, 1, 0, 1, 0])
    for key_mask in (mask, None):
        fast = _run(None, q, k, v, phi, causal=causal, mask=key_mask, state=None, chunk=8, grad=False, eps=eps)
        core = _run("agnostic", q, k, v, phi, causal=causal, mask=key_mask, state=None, chunk=8, grad=False, eps=eps)
        _compare(fast, core, TOL[torch.float32])
        if key_mask is not None:
            assert torch.equal(fast[0][-1], torch.zeros_like(fast[0][-1]))  # no valid key: exact zeros
        if kind == "relu":
            assert torch.equal(fast[0], torch.zeros_like(fast[0])) and torch.isfinite(fast[0]).all()


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_inference_with_a_state_whose_z_vanishes_gives_zero_rows(causal):
    """A caller's state may have S != 0 where z = 0; no valid key then leaves den = 0 and the core's zero row."""
    B, H, N, d = 1, 2, 5, 4
    q = torch.rand(B, H, N, d)
    k, v = torch.randn(B, H, N, d), torch.randn(B, H, N, d)
    state = (torch.ones(B, H, d, d), torch.zeros(B, H, d))
    mask = torch.zeros(B, N, dtype=torch.bool)
    fast = _run(None, q, k, v, ka.feature_map("relu"), causal=causal, mask=mask, state=state, chunk=8, grad=False)
    assert torch.equal(fast[0], torch.zeros_like(fast[0]))


def test_elu_plus_one_both_forms_match_the_definition():
    """Small inference tensors take exp(min(x, 0)) + relu(x); large ones and autograd take elu + 1."""
    x = torch.cat([torch.linspace(-90, 90, 2001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 88.0, 1e30, -1e30])])
    x = torch.cat([x, torch.tensor([float("inf"), float("-inf"), float("nan")])])
    xd = x.double()
    want = torch.where(xd > 0, xd + 1, torch.exp(xd))
    for n in (x.numel(), _torch_fmap.ELU_SMALL + 1):  # the small form, then the large one
        big = x.repeat(-(-n // x.numel()))[:n] if n > x.numel() else x
        with torch.no_grad():
            got = _torch_fmap.elu_plus_one(big)[: x.numel()].double()
        w = want[: got.numel()]
        fin = torch.isfinite(w)
        assert float(((got[fin] - w[fin]).abs() / w[fin].clamp_min(1.0)).max()) < 1e-6
        assert torch.equal(got[~fin].isnan(), w[~fin].isnan()) and (got[w == float("inf")] == float("inf")).all()


def test_inference_softplus_is_softplus_over_the_whole_range():
    y = torch.cat([torch.linspace(-120, 120, 4001), torch.tensor([0.0, 20.0, 88.0, 89.0])])
    want = torch.nn.functional.softplus(y.double(), threshold=40)
    got = _torch_fmap.softplus_(y.clone()).double()
    assert float(((got - want).abs() / want.clamp_min(1.0)).max()) < 1e-6  # absolute below 1, relative above
    assert _torch_fmap.softplus_(torch.tensor([float("inf")])).item() == float("inf")
    with_nan = torch.tensor([float("nan"), 100.0, -3.0])  # a NaN must not switch the overflow guard off
    out = _torch_fmap.softplus_(with_nan.clone())
    assert out[0].isnan() and out[1] == 100.0 and abs(float(out[2]) - 0.04858735) < 1e-6


@pytest.mark.parametrize("grad", [False, True])
def test_inference_softplus_fast_form_is_relatively_exact(grad):
    # every value <= 80: the exp / log1p form runs (NumPy's on the CPU, torch's where the tensor needs grad);
    # rows of only very negative values must keep their relative accuracy (the rows' sums divide)
    y = torch.cat([torch.linspace(-100, 80, 6001), torch.tensor([-87.0, -20.0, -1e-3, 0.0, 1e-30, 80.0])])
    want = torch.nn.functional.softplus(y.double(), threshold=40)
    x = y.clone().requires_grad_(True) if grad else y.clone()
    with torch.no_grad():
        got = _torch_fmap.softplus_(x).detach().double()
    normal = want > 1e-37  # float32's normal range; below it only the absolute error can be small
    assert float(((got - want).abs() / want)[normal].max()) < 1e-6
    assert float((got - want).abs()[~normal].max()) < 1e-44


@pytest.mark.parametrize("again", [False, True])
@pytest.mark.parametrize("where", [0, 16, 1000, 98303])
def test_inference_softplus_falls_back_where_exp_overflows(where, again):
    # with ``again`` NumPy's exp reports an overflow anywhere in the block (SIMD body or tail) and the block,
    # made again, takes the exact form; without it a max decides first. Values above exp's range (88.72)
    # come out as themselves either way
    y = torch.linspace(-30, 30, 98304)
    y[where] = 88.75
    want = torch.nn.functional.softplus(y.double(), threshold=40)
    made = []

    def remake():
        made.append(1)
        return y.clone()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the overflow is caught, never a RuntimeWarning
        got = _torch_fmap.softplus_(y.clone(), again=remake if again else None).double()
    assert float(((got - want).abs() / want.clamp_min(1.0)).max()) < 1e-6
    assert float(got[where]) == pytest.approx(88.75, rel=1e-7)
    assert len(made) == again
    y[where] = 88.7  # still finite: the fast form with ``again``, relatively exact up to exp's overflow
    got = _torch_fmap.softplus_(y.clone(), again=remake if again else None).double()
    want = torch.nn.functional.softplus(y.double(), threshold=40)
    assert float(((got - want).abs() / want.clamp_min(1.0)).max()) < 1e-6
    assert len(made) == again


def test_inference_softplus_checks_first_where_numpy_does_not_flag_overflows(monkeypatch):
    monkeypatch.setattr(_torch_fmap, "_FLAGGED", [False])  # as on a NumPy whose exp sets no overflow flag
    y = torch.linspace(-30, 30, 1000)
    y[7] = 95.0
    got = _torch_fmap.softplus_(y.clone(), again=lambda: pytest.fail("the maximum is taken first"))
    assert float(got[7]) == 95.0 and torch.isfinite(got).all()


def test_fused_path_with_large_activations_matches_the_core(torch_path, monkeypatch):
    B, H, N, d = 1, 2, 40, 8
    phi = _phi("ffn", {"bias": True}, H, d)
    q, k, v, _, _ = _inputs(B, H, N, N, d, d, torch.float32)
    exact = []
    real = _torch_fmap._softplus_exact_
    monkeypatch.setattr(_torch_fmap, "_softplus_exact_", lambda y: exact.append(1) or real(y))
    for causal in (False, True):  # x W far beyond exp's range: the fused path makes such blocks again, exactly
        fast = _run(None, q * 40, k * 40, v, phi, causal=causal, mask=None, state=None, chunk=8, grad=False)
        core = _run("agnostic", q * 40, k * 40, v, phi, causal=causal, mask=None, state=None, chunk=8, grad=False)
        _compare(fast, core, TOL[torch.float32])
    assert bool(exact) == (torch_path == "blocked")


def test_segments_cover_the_sequence_in_whole_chunks():
    for n, chunk, block in [(0, 4, 8), (1, 64, 256), (75, 4, 16), (256, 64, 256), (257, 64, 128)]:
        segs = _torch_ops.segments(n, chunk, block)
        assert [s[0] for s in segs] == [0, *(s[1] for s in segs[:-1])][:len(segs)]
        assert (segs[-1][1] if segs else 0) == n
        for t0, t1, c in segs:
            assert (t1 - t0) % c == 0 and t1 - t0 <= block and (c == chunk or t1 == n)


def test_user_callables_run_on_the_fast_path_with_gradients():
    B, H, N, d = 2, 2, 21, 5
    W = torch.randn(H, d, 7, generator=torch.Generator().manual_seed(0), requires_grad=True)

    def query_map(x):
        return torch.nn.functional.softplus(x @ W)

    def key_map(x):
        return torch.exp(-(x @ W) ** 2)

    q, k, v, mask, _ = _inputs(B, H, N, N, d, d, torch.float32, masked=True)
    for causal in (False, True):
        outs = []
        for backend in (None, "agnostic"):
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            out = ka.linear_attention(qq, kk, vv, feature_map=(query_map, key_map), causal=causal, key_mask=mask,
                                      chunk_size=4, backend=backend)
            grads = torch.autograd.grad((out * out).sum(), [qq, kk, vv, W])
            outs.append([out.detach(), *grads])
        _compare(outs[0], outs[1], TOL[torch.float32])


# ---------------------------------------------------------------------------
# half precision and float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_half_precision_inputs_keep_float32_state(dtype, causal):
    B, H, N, d = 2, 2, 45, 8
    phi = _phi("glu", {}, H, d, grad=True)
    q, k, v, mask, state = _inputs(B, H, N, N, d, d, dtype, masked=True, state_m=d)
    for grad in (False, True):
        fast = _run(None, q, k, v, phi, causal=causal, mask=mask, state=state, chunk=16, grad=grad)
        core = _run("agnostic", q, k, v, phi, causal=causal, mask=mask, state=state, chunk=16, grad=grad)
        assert fast[0].dtype == dtype and fast[1].dtype == fast[2].dtype == torch.float32
        _compare(fast, core, TOL[dtype])


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("kind,opts", [("aoglu", {"depth": 3}), ("ffn", {"bias": True}), ("favor", {}), ("elu", {})],
                         ids=["aoglu3", "ffn-bias", "favor", "elu"])
def test_float64_matches_the_numpy_reference(kind, opts, causal, masked):
    B, H, N, d = 2, 2, 29, 6
    phi = _phi(kind, opts, H, d, dtype=torch.float64, grad=False)
    m = phi.feature_dim or d
    q, k, v, mask, state = _inputs(B, H, N, N, d, d, torch.float64, masked=masked, state_m=m)
    ref_out, (ref_S, ref_z) = reference_linear_attention(q, k, v, feature_map=phi, causal=causal, key_mask=mask,
                                                         initial_state=state, return_state=True)
    for grad in (False, True):
        for p in phi.parameters():
            p.requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out, st = ka.linear_attention(q, k, v, feature_map=phi, causal=causal, key_mask=mask, chunk_size=8,
                                          initial_state=state, return_state=True)
        assert out.dtype == torch.float64
        for got, want in ((out, ref_out), (st.S, ref_S), (st.z, ref_z)):
            assert rel_rms_error(got.detach(), want) < 1e-12


FUSED_CASES = [(c, p) for c in (False, True) for p in MASK_PATTERNS + ("cross",) if not (c and p == "cross")]


@pytest.mark.parametrize("scale", [1.0, 100.0], ids=["plain", "beyond-exp"])  # x 100: a tenth of x W > 88.7
@pytest.mark.parametrize("causal, pattern", FUSED_CASES,
                         ids=[f"{'causal' if c else 'noncausal'}-{p}" for c, p in FUSED_CASES])
def test_float32_inference_matches_the_float64_definition(torch_path, monkeypatch, causal, pattern, scale):
    """Float32 inference against the float64 definition: output and returned state, every mask pattern, L != N,
    a caller's state, and activations beyond ``exp``'s range. Blocked: the fused path of long sequences (NumPy's
    Softplus and its overflow flag, whose blocks are then made again; many blocks of both budgets); direct:
    the whole-tensor formula of short ones."""
    B, H, N, d = 3, 2, 75, 6
    L = 53 if pattern == "cross" else N
    monkeypatch.setattr(_torch_ops, "BLOCK_FLOATS", B * H * 8 * 16)
    monkeypatch.setattr(_torch_ops, "NONCAUSAL_BLOCK_FLOATS", B * H * 8 * 16)
    fused = []
    real = _torch_ops.forward_fused
    monkeypatch.setattr(_torch_ops, "forward_fused", lambda *a, **kw: fused.append(1) or real(*a, **kw))
    phi = _phi("ffn", {"bias": True}, H, d)
    q, k, v, _, state = _inputs(B, H, N, L, d, d, torch.float64, state_m=d)
    q, k = q * scale, k * scale
    keep = edge_key_mask("none" if pattern == "cross" else pattern, B, L, np.random.default_rng(4))
    keep = None if keep is None else torch.from_numpy(keep)
    ref, (S, z) = reference_linear_attention(q, k, v, feature_map=phi.to(like=q), causal=causal, key_mask=keep,
                                             initial_state=state, return_state=True)
    with torch.no_grad():
        out, st = ka.linear_attention(*(t.float() for t in (q, k, v)), feature_map=phi, causal=causal,
                                      key_mask=keep, chunk_size=4, initial_state=tuple(t.float() for t in state),
                                      return_state=True)
    assert bool(fused) == (torch_path == "blocked"), "the fused path ran where it should not, or did not run"
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    for got, want in ((out, ref), (st.S, S), (st.z, z)):
        assert rel_rms_error(got.double(), want) < 1e-5


def test_custom_op_backward_matches_finite_differences():
    """gradcheck: the hand-written chunked backward against central differences (float64)."""
    g = torch.Generator().manual_seed(0)
    B, H, N, m, e = 1, 2, 9, 3, 2

    def make(*shape):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) + 0.1).requires_grad_()

    for causal in (False, True):
        fq, fk, v, state = make(B, H, N, m), make(B, H, N, m), make(B, H, N, e), make(B, H, m, e + 1)

        def f(fq, fk, v, state):
            out, S, _ = torch.ops.kernelattn.attend(fq, fk, v, state, causal, 1e-6, 4)
            return out, S

        assert torch.autograd.gradcheck(f, (fq, fk, v, state), eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------
# padding and memory


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_padded_keys_change_nothing_and_get_zero_gradient(causal):
    B, H, N, d = 2, 2, 30, 6
    phi = _phi("glu", {}, H, d, grad=True)
    q, k, v, _, _ = _inputs(B, H, N, N, d, d, torch.float32)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, 5:9] = False
    mask[1, 20:] = False
    k2, v2 = k.clone(), v.clone()
    k2[~mask[:, None, :].expand(B, H, N)] = 1e4
    v2[~mask[:, None, :].expand(B, H, N)] = -3e4
    for grad in (False, True):
        a = _run(None, q, k, v, phi, causal=causal, mask=mask, state=None, chunk=8, grad=grad)
        b = _run(None, q, k2, v2, phi, causal=causal, mask=mask, state=None, chunk=8, grad=grad)
        assert rel_rms_error(a[0], b[0]) < 1e-6
        if grad:
            dk, dv = b[4], b[5]
            pad = ~mask[:, None, :, None]
            assert float(dk.masked_select(pad).abs().max()) == 0.0
            assert float(dv.masked_select(pad).abs().max()) == 0.0


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "forward+backward"])
def test_causal_path_never_forms_an_N_m_e_tensor(grad):
    B, H, N, d = 1, 2, 2048, 16
    phi = _phi("ffn", {}, H, d, grad=grad)
    q, k, v, _, _ = _inputs(B, H, N, N, d, d, torch.float32)
    q, k, v = (t.requires_grad_(grad) for t in (q, k, v))
    with watch_torch_sizes() as sizes, torch.set_grad_enabled(grad):
        out = ka.linear_attention(q, k, v, feature_map=phi, causal=True)
        if grad:
            out.sum().backward()
    # the largest tensors are (B, H, N, d)-sized (inputs, features, outputs, gradients)
    # or one block's (T, C) intra-chunk products; an (N, m, e) state history would be 16x larger
    block = _torch_ops.block_tokens(B * H, d + 1, 64)
    assert sizes.largest <= max(B * H * N * (d + 1), B * H * block * 64)
    assert sizes.largest * 8 <= B * H * N * d * d


def test_large_outputs_are_plain_tensors_in_huge_pages(monkeypatch):
    for setting in ("1", "0"):
        monkeypatch.setenv(_torch_mem.ENV, setting)
        out = _torch_mem.empty((3, 2048, 1024), dtype=torch.float32, device="cpu")  # 24 MiB
        assert out.shape == (3, 2048, 1024) and out.dtype == torch.float32 and out.is_contiguous()
        assert out.storage_offset() == 0 and out.untyped_storage().nbytes() == out.numel() * 4
        out.fill_(2.0)
        assert float(out.sum()) == 2.0 * out.numel()
    small = _torch_mem.empty((4, 4), dtype=torch.float16, device="cpu")
    assert small.shape == (4, 4) and small.dtype == torch.float16


# ---------------------------------------------------------------------------
# softmax attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_softmax_attention_uses_sdpa_with_the_core_conventions(causal, masked, dtype):
    B, H, N, d = 3, 2, 9, 5
    q, k, v, _, _ = _inputs(B, H, N, N, d, d, dtype)
    mask = None
    if masked:
        mask = torch.ones(B, N, dtype=torch.bool)
        mask[0] = False          # no valid key: zeros
        mask[1, :4] = False      # causal rows 0-3 see nothing
    outs = []
    for backend in (None, "agnostic"):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = ka.softmax_attention(qq, kk, vv, causal=causal, key_mask=mask, backend=backend)
        grads = torch.autograd.grad((out.float() ** 2).sum(), [qq, kk, vv])
        assert all(torch.isfinite(gr).all() for gr in grads)
        outs.append([out.detach(), *grads])
    _compare(outs[0], outs[1], TOL[dtype] if dtype != torch.float64 else 1e-12)
    if dtype != torch.bfloat16:
        ref = reference_softmax_attention(q, k, v, causal=causal, key_mask=mask)
        assert rel_rms_error(outs[0][0], ref) < (1e-6 if dtype == torch.float32 else 1e-12)
    if masked:
        assert float(outs[0][0][0].abs().max()) == 0.0
