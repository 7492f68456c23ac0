"""The "Adding a backend" recipe, run: one new file plus one registry line.

The toy adapter is the code block of docs/guide/adding_backend.rst (after the
``.. toy-adapter:`` marker), written as one module into ``tmp_path`` and
registered for ``array_api_strict`` (which has no built-in adapter) with
``ka.register_backend``; nothing in the package changes. Docs and test cannot
drift: the module under test is the page's code.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import sys

import numpy as np
import pytest

import kernelattn as ka
from kernelattn import _compat, _dispatch
from kernelattn._convert import to_numpy
from kernelattn.testing import assert_close, reference_linear_attention

xp = pytest.importorskip("array_api_strict")

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "guide" / "adding_backend.rst"
MARKER = ".. toy-adapter:"
MODULE = "toy_strict_adapter"
LIBRARY = "array_api_strict"
TOY = "array_api_strict:toy-noncausal"
CAUSAL_REASON = "array_api_strict adapter declines: causal attention: the core runs it"


def toy_source() -> str:
    """The first ``.. code-block:: python`` after the marker comment of the docs page, dedented."""
    lines = PAGE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(MARKER))
    block = next(i for i in range(start, len(lines)) if lines[i].strip() == ".. code-block:: python")
    body = []
    for line in lines[block + 1:]:
        if line.strip() and not line.startswith("   "):
            break  # the first unindented line ends the block
        body.append(line[3:])
    return "\n".join(body).strip("\n") + "\n"


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The docs' toy adapter as one file on sys.path, registered with one line; undone afterwards."""
    (tmp_path / f"{MODULE}.py").write_text(toy_source())
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(MODULE, None)
    ka.register_backend(LIBRARY, MODULE)
    try:
        yield _dispatch.load_adapter(LIBRARY)
    finally:
        ka.unregister_backend(LIBRARY)
        sys.modules.pop(MODULE, None)


def inputs(*, N=7, L=None, d=4, e=3, dtype=None, seed=0):
    rng = np.random.default_rng(seed)
    L = N if L is None else L
    dtype = xp.float64 if dtype is None else dtype
    q, k = (xp.asarray(rng.standard_normal((2, 2, n, d)), dtype=dtype) for n in (N, L))
    v = xp.asarray(rng.standard_normal((2, 2, L, e)), dtype=dtype)
    phi = ka.feature_map("glu", num_heads=2, head_dim=d, seed=0, like=q)
    return q, k, v, phi


def test_page_holds_the_module():
    src = toy_source()
    assert "class ToyStrictAdapter(Adapter)" in src and src.rstrip().endswith("ADAPTER = ToyStrictAdapter()")
    compile(src, str(PAGE), "exec")


def test_strict_arrays_have_no_builtin_adapter():
    assert _compat.library_name(xp) == LIBRARY
    assert LIBRARY not in _dispatch.REGISTRY
    q, k, v, phi = inputs()
    assert ka.explain_dispatch("linear_attention", q, k=k, v=v, feature_map=phi).implementation == "agnostic:noncausal"


def test_the_adapter_declares_what_it_chooses(toy):
    assert (toy.name, toy.library, toy.device_types) == (LIBRARY, LIBRARY, ("cpu",))
    assert set(toy.implementations) == {TOY}
    assert all(re.fullmatch(r"array_api_strict:[a-z-]+", n) for n in toy.implementations)
    assert toy.supports("linear_attention", device_type="cpu", dtype="float16", causal=False, method="auto") \
        == "no fast path for dtype float16"
    assert toy.supports("linear_attention", device_type="cuda", dtype="float32", causal=False, method="auto") \
        == "no fast path for device type 'cuda'"
    res = _dispatch.decide("linear_attention", LIBRARY, "cpu", "float16", None, causal=False, method="auto",
                           masked=False, kind="glu")
    assert res.implementation == "agnostic:noncausal"
    assert res.reason == "array_api_strict adapter declines: no fast path for dtype float16"


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_noncausal_runs_the_toy_and_matches_the_definition(toy, masked, dtype):
    q, k, v, phi = inputs(N=6, L=9, dtype=getattr(xp, dtype))
    key_mask, k_padded = None, k
    if masked:  # the second batch entry has no valid key at all: its rows must be zeros
        key_mask = xp.asarray(np.array([[True] * 5 + [False] * 4, [False] * 9]))
        # NaN at padded keys must not leak (the reference gets the finite keys: its 0 * x would keep a NaN)
        k_padded = xp.where(key_mask[:, None, :, None], k, xp.full_like(k, float("nan")))
    with _dispatch.recording() as names:
        out, state = ka.linear_attention(q, k_padded, v, feature_map=phi, key_mask=key_mask, return_state=True)
    assert names == [TOY]
    assert names.functions == ["ToyStrictAdapter.linear_attention"]
    ref, (S, z) = reference_linear_attention(q, k, v, feature_map=phi, key_mask=key_mask, return_state=True)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == "float64" else dict(rtol=2e-4, atol=1e-6)
    assert_close(out, ref, like=q, **tol)
    assert_close(state.S, S, **tol)
    assert_close(state.z, z, **tol)
    if masked:
        assert not np.any(to_numpy(out)[1])


def test_initial_state_is_added_like_the_definition(toy):
    q, k, v, phi = inputs(N=4, L=5)
    _, first = ka.linear_attention(q, k, v, feature_map=phi, return_state=True)
    with _dispatch.recording() as names:
        out, state = ka.linear_attention(q, k, v, feature_map=phi, initial_state=first, return_state=True)
    assert names == [TOY]
    ref, (S, z) = reference_linear_attention(q, k, v, feature_map=phi, initial_state=tuple(first),
                                             return_state=True)
    assert_close(out, ref, like=q, rtol=1e-10, atol=1e-12)
    assert_close(state.S, S, rtol=1e-10, atol=1e-12)
    assert_close(state.z, z, rtol=1e-10, atol=1e-12)


def test_explain_dispatch_names_the_toy(toy):
    q, k, v, phi = inputs()
    res = ka.explain_dispatch("linear_attention", q, k=k, v=v, feature_map=phi)
    assert (res.backend, res.implementation, res.reason) == (LIBRARY, TOY, "toy fast path: non-causal")
    assert ka.explain_dispatch("linear_attention", q, k=k, v=v, feature_map=phi,
                               key_mask=xp.ones((2, 7), dtype=xp.bool)).implementation == TOY


def test_causal_calls_go_to_the_core_with_the_toys_reason(toy):
    q, k, v, phi = inputs()
    res = ka.explain_dispatch("linear_attention", q, k=k, v=v, feature_map=phi, causal=True)
    assert (res.backend, res.implementation, res.reason) == ("agnostic", "agnostic:chunked", CAUSAL_REASON)
    with _dispatch.recording() as names:
        out = ka.linear_attention(q, k, v, feature_map=phi, causal=True)
    assert names == ["agnostic:chunked"]
    assert_close(out, reference_linear_attention(q, k, v, feature_map=phi, causal=True), like=q,
                 rtol=1e-10, atol=1e-12)


def test_other_devices_go_to_the_core(toy):
    q, k, v, phi = inputs()
    dev = xp.Device("device1")
    q, k, v = (xp.asarray(a, device=dev) for a in (q, k, v))
    phi = ka.feature_map("glu", num_heads=2, head_dim=4, seed=0, like=q)
    res = ka.explain_dispatch("linear_attention", q, k=k, v=v, feature_map=phi)
    assert res.implementation == "agnostic:noncausal"
    assert res.reason.startswith("array_api_strict adapter declines: no fast path for device type")
    with _dispatch.recording() as names:
        ka.linear_attention(q, k, v, feature_map=phi)
    assert names == ["agnostic:noncausal"]


def test_naming_the_backend_explicitly(toy):
    q, k, v, phi = inputs()
    with _dispatch.recording() as names:
        out = ka.linear_attention(q, k, v, feature_map=phi, backend=LIBRARY)
        causal = ka.linear_attention(q, k, v, feature_map=phi, causal=True, backend=LIBRARY)
        ka.linear_attention(q, k, v, feature_map=phi, backend="agnostic")
    assert names == [TOY, "agnostic:chunked", "agnostic:noncausal"]
    assert_close(out, reference_linear_attention(q, k, v, feature_map=phi), like=q, rtol=1e-10, atol=1e-12)
    assert_close(causal, reference_linear_attention(q, k, v, feature_map=phi, causal=True), like=q,
                 rtol=1e-10, atol=1e-12)
    res = ka.explain_dispatch("linear_attention", q, k=k, v=v, feature_map=phi, causal=True, backend=LIBRARY)
    assert res.reason == "backend='array_api_strict': causal attention: the core runs it"
    # a real limitation of the named backend is an error, not a silent fallback
    q1 = xp.asarray(q, device=xp.Device("device1"))
    with pytest.raises(ValueError, match="cannot run this call: no fast path for device type"):
        ka.explain_dispatch("linear_attention", q1, backend=LIBRARY)
    with pytest.raises(ValueError, match="backend='array_api_strict' cannot run numpy arrays"):
        ka.explain_dispatch("linear_attention", np.ones((1, 2, 3, 4)), backend=LIBRARY)


def _support_matrix():
    pytest.importorskip("sphinx", reason="the support matrix is a docs extension: pip install -e '.[docs]'")
    spec = importlib.util.spec_from_file_location("support_matrix", ROOT / "docs" / "_ext" / "support_matrix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_support_matrix_has_rows_for_the_toy(toy):
    matrix = _support_matrix()
    rows = [r for r in matrix.rows() if r[0] == LIBRARY]
    assert [(r[1], r[2], r[3], r[4]) for r in rows] == [
        ("linear_attention (non-causal)", "cpu", "–", TOY),
        ("linear_attention (causal)", "cpu", "–", "agnostic:chunked"),
        ("linear_attention (causal, key_mask)", "cpu", "–", "agnostic:chunked"),
        ("softmax_attention", "cpu", "–", "agnostic:softmax"),
    ]
    assert rows[1][5] == rows[2][5] == CAUSAL_REASON
    # each row is what explain_dispatch says on real strict arrays (as tests/test_dispatch.py checks for the others)
    q, k, v, phi = inputs(N=5)
    for _, op, _, _, implementation, reason in rows:
        if op.startswith("softmax"):
            res = ka.explain_dispatch("softmax_attention", q, k=k, v=v)
        else:
            key_mask = xp.ones((2, 5), dtype=xp.bool) if "key_mask" in op else None
            res = ka.explain_dispatch("linear_attention", q, k=k, v=v, feature_map=phi, causal="(causal" in op,
                                      key_mask=key_mask)
        assert (res.implementation, res.reason) == (implementation, reason), op
    kinds = {name: what for name, _, _, what in matrix.kind_rows()}
    assert "array_api_strict: array-API forward" in kinds["glu"]


def test_unregistering_sends_strict_arrays_back_to_the_core(tmp_path, monkeypatch):
    (tmp_path / f"{MODULE}.py").write_text(toy_source())
    monkeypatch.syspath_prepend(str(tmp_path))
    q, k, v, phi = inputs()
    ka.register_backend(LIBRARY, MODULE)
    try:
        with _dispatch.recording() as names:
            ka.linear_attention(q, k, v, feature_map=phi)
        assert names == [TOY]
    finally:
        ka.unregister_backend(LIBRARY)
        sys.modules.pop(MODULE, None)
    assert LIBRARY not in _dispatch.REGISTRY and LIBRARY not in _dispatch.KNOWN_BACKENDS
    with _dispatch.recording() as names:
        out = ka.linear_attention(q, k, v, feature_map=phi)
    assert names == ["agnostic:noncausal"]
    assert_close(out, reference_linear_attention(q, k, v, feature_map=phi), like=q, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="unknown backend 'array_api_strict'"):
        ka.linear_attention(q, k, v, feature_map=phi, backend=LIBRARY)
