"""Dispatch names what runs: over a grid of calls, ``ka.explain_dispatch`` reports the implementation
that the call then runs (recorded by :func:`kernelattn._dispatch.recording`), on every library.

The grid: causal or not, with or without a key mask, each method, a kind with hand-written forms, a
kind without (a user callable), and for torch inputs that need gradients or not, eager.
"""

from __future__ import annotations

import numpy as np
import pytest

import kernelattn as ka
from kernelattn import _dispatch

B, H, N, D = 2, 2, 7, 4
METHODS = ("auto", "chunked", "naive", "recurrent")


def _callable_map(x):
    return x * x + 1.0


def _maps(bk, q):
    return {"glu": ka.feature_map("glu", num_heads=H, head_dim=D, seed=0, like=q), "elu": "elu",
            "callable": _callable_map}


#: implementation name -> the function that ran it, over the whole run: names must mean distinct code
_FUNCTIONS: dict[str, set] = {}


def _ran(fn):
    with _dispatch.recording() as names:
        fn()
    for name, function in zip(names, names.functions):
        _FUNCTIONS.setdefault(name, set()).add(function)
        assert len(_FUNCTIONS[name]) == 1, (name, _FUNCTIONS[name])  # one name, one function
        # one function, one name (the core is one function whose method argument picks the strategy)
        others = [n for n, fs in _FUNCTIONS.items() if function in fs and n != name and not n.startswith("agnostic:")]
        assert name.startswith("agnostic:") or not others, (function, name, others)
    return list(names)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.slow_where(xp_backend="jax", causal=True)  # a compile per call: jax's quick case is the plain one
@pytest.mark.slow_where(xp_backend="jax", masked=True)
def test_explain_dispatch_names_what_runs(xp_backend, causal, masked, monkeypatch):
    bk = xp_backend
    rng = np.random.default_rng(0)
    grads = (False, True) if bk.name == "torch" else (False,)
    # torch: as dispatch has it (short inputs: the direct formula), then with the length limits at -1
    # (the paths of long sequences)
    limits = (None, -1) if bk.name in ("torch", "jax") else (None,)
    seen = set()
    for grad, limit in ((g, lim) for lim in limits for g in grads):
        if limit is not None:
            import importlib

            adapter_module = importlib.import_module(f"kernelattn.backends.{bk.name}")
            for name in ("CAUSAL_MAX", "DIRECT_MAX"):
                if hasattr(adapter_module, name):
                    monkeypatch.setattr(adapter_module, name, limit)
        q, k, v = (bk.asarray(rng.standard_normal((B, H, N, D))) for _ in range(3))
        if grad:
            q.requires_grad_(True)
        km = bk.asarray(np.arange(N)[None, :].repeat(B, 0) < N - 2) if masked else None
        for label, phi in _maps(bk, q).items():
            for method in METHODS:
                res = ka.explain_dispatch("linear_attention", q, k=k, v=v, feature_map=phi, key_mask=km,
                                          causal=causal, method=method)
                ran = _ran(lambda: ka.linear_attention(q, k, v, feature_map=phi, key_mask=km, causal=causal,
                                                       method=method))
                assert ran == [res.implementation], (label, method, grad, res.reason)
                seen.add(res.implementation)
                if res.backend != "agnostic":
                    assert res.implementation in _dispatch.load_adapter(res.backend).implementations
    # the references stay on the core, and the library's fast path is named where it has one
    assert {"agnostic:naive"} <= seen
    expected = {"numpy": {"numpy:blocked"}, "torch": {"torch:direct", "torch:fused-blocks", "torch:custom-op"},
                "jax": {"jax:chunked-vjp", "jax:causal-direct"} if causal else {"jax:state-readout"}, "dask": {"dask:blockwise"},
                "array_api_strict": set()}.get(bk.name, set())
    assert expected <= seen, seen


def test_explain_dispatch_names_what_runs_for_softmax(xp_backend):
    bk = xp_backend
    rng = np.random.default_rng(1)
    q, k = (bk.asarray(rng.standard_normal((B, H, N, D))) for _ in range(2))
    for e in (D, D + 2):  # jax.nn.dot_product_attention needs e = d: the other width runs on the core
        v = bk.asarray(rng.standard_normal((B, H, N, e)))
        for causal in (False, True):
            res = ka.explain_dispatch("softmax_attention", q, k=k, v=v, causal=causal)
            assert _ran(lambda: ka.softmax_attention(q, k, v, causal=causal)) == [res.implementation]
            if bk.name == "jax":
                assert res.implementation == ("jax:dot-product-attention" if e == D else "agnostic:softmax")


@pytest.mark.backends("jax")
def test_names_hold_under_jit(xp_backend):
    import jax
    import jax.numpy as jnp

    q = jnp.ones((B, H, N, D))
    phi = ka.feature_map("glu", num_heads=H, head_dim=D, seed=0, like=q)
    for causal in (False, True):
        res = ka.explain_dispatch("linear_attention", q, k=q, v=q, feature_map=phi, causal=causal)
        f = jax.jit(lambda q_: ka.linear_attention(q_, q_, q_, feature_map=phi, causal=causal))
        assert _ran(lambda: f(q).block_until_ready()) == [res.implementation]  # recorded while tracing


@pytest.mark.backends("torch")
def test_triton_is_named_when_it_runs(xp_backend, monkeypatch):
    pytest.importorskip("triton")
    import torch

    monkeypatch.setenv("KERNELATTN_TORCH_TRITON", "force")  # every device to the Triton kernels (interpreted here)
    q = torch.randn(1, 2, 8, 4)
    res = ka.explain_dispatch("linear_attention", q, k=q, v=q, causal=True)
    assert res.implementation == "torch:triton"
    assert _ran(lambda: ka.linear_attention(q, q, q, causal=True, chunk_size=4)) == ["torch:triton"]
    monkeypatch.setenv("KERNELATTN_TORCH_TRITON", "0")  # the CPU's own choice again (8 tokens: the direct formula)
    assert ka.explain_dispatch("linear_attention", q, k=q, v=q, causal=True).implementation == "torch:direct"


def test_explain_dispatch_takes_a_fact_directly():
    import torch

    q = torch.zeros(1, 1, 2, 2)
    assert ka.explain_dispatch("linear_attention", q, feature_map="elu").implementation == "torch:direct"
    assert ka.explain_dispatch("linear_attention", q, feature_map="elu", length="long").implementation == \
        "torch:fused-blocks"
    res = ka.explain_dispatch("linear_attention", q, feature_map="elu", grad=True, length="long")
    assert res.implementation == "torch:custom-op" and "gradients are needed" in res.reason
