"""Dispatch: resolution order, overrides, the environment switch, caching, and
import hygiene (``import kernelattn`` imports no framework)."""

from __future__ import annotations

import importlib.util
import logging
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import kernelattn as ka
from kernelattn import _dispatch
from kernelattn.backends._base import Adapter

ROOT = pathlib.Path(__file__).resolve().parents[1]
X = np.ones((1, 2, 3, 4), np.float32)


def test_import_kernelattn_imports_no_framework():
    code = ("import sys, kernelattn, kernelattn.backends, kernelattn.testing; "
            "bad = [m for m in ('torch', 'jax', 'cupy', 'dask', 'array_api_strict') if m in sys.modules]; "
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT / "tests")
    assert res.returncode == 0, f"frameworks imported: {res.stdout} {res.stderr}"


def test_core_has_no_framework_imports():
    pattern = re.compile(r"^\s*(import|from)\s+(numpy|torch|jax|cupy|dask)\b", re.M)
    for path in (ROOT / "kernelattn" / "_agnostic").glob("*.py"):
        assert not pattern.search(path.read_text()), f"framework import in {path}"


#: modules outside backends/ that are about one library: the ListOps model and its command (torch), the
#: data builder (runs the real model), and the test helpers (the float64 definition is differentiated by
#: torch autograd, an independent differentiator; watch_torch_sizes is a torch tool)
_LIBRARY_MODULES = ("listops/", "commands/listops.py", "data/make_minilm.py", "testing.py")
_FRAMEWORKS = ("torch", "jax", "cupy", "dask", "flax", "triton")


def _framework_imports(path):
    import ast

    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                 else [node.args[0].value] if isinstance(node, ast.Call) and getattr(node.func, "attr", "") ==
                 "import_module" and node.args and isinstance(node.args[0], ast.Constant) else [])
        for name in names:
            if str(name).split(".")[0] in _FRAMEWORKS:
                yield node.lineno, name


def test_frameworks_are_imported_only_in_backends():
    """Library facts live in the adapters: torch, jax, cupy and dask are imported only under backends/."""
    package = ROOT / "kernelattn"
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if rel.startswith(_LIBRARY_MODULES):
            continue
        found += [f"kernelattn/{rel}:{line}: {name}" for line, name in _framework_imports(path)]
    assert not found, "framework imports outside backends/:\n" + "\n".join(found)
    # and the scan sees them where they are
    assert any(True for _ in _framework_imports(ROOT / "backends" / "torch.py"))


def test_numpy_calls_go_to_the_numpy_fast_path_except_references():
    res = ka.explain_dispatch("linear_attention", X, causal=True, method="auto", masked=False, kind="glu")
    assert res.backend == "numpy"
    res = ka.explain_dispatch("linear_attention", X, causal=True, method="naive", masked=False, kind="glu")
    assert res.backend == "agnostic" and "reference strategy" in res.reason
    res = ka.explain_dispatch("softmax_attention", X, causal=False, masked=False)
    assert res.backend == "agnostic" and "no fast path" in res.reason


def test_agnostic_forces_core_and_unknown_names_list_known():
    assert ka.explain_dispatch("linear_attention", X, backend="agnostic").backend == "agnostic"
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'.*'agnostic'.*'torch'"):
        ka.explain_dispatch("linear_attention", X, backend="cuda")
    with pytest.raises(ValueError, match="unknown operation"):
        ka.explain_dispatch("conv", X)


class _Loopback(Adapter):
    """A test adapter that forwards to the core and counts calls."""

    name = library = "numpy"

    def __init__(self, answer=True):
        self.calls = 0
        self.answer = answer

    def supports(self, op, **static):
        return self.answer if not static.get("causal") else "causal is not supported here"

    def linear_attention(self, q, k, v, **kw):
        self.calls += 1
        return _dispatch.CORE["linear_attention"](q, k, v, **kw)


@pytest.fixture
def loopback(monkeypatch):
    adapter = _Loopback()
    monkeypatch.setattr(_dispatch, "load_adapter", lambda name: adapter)
    _dispatch.clear_cache()
    yield adapter
    _dispatch.clear_cache()


def test_adapter_is_used_when_it_supports_the_call(loopback):
    out = ka.linear_attention(X, X, X)
    assert loopback.calls == 1
    np.testing.assert_allclose(out, ka.linear_attention(X, X, X, backend="agnostic"))
    assert loopback.calls == 1  # agnostic did not go through the adapter


def test_declined_call_falls_back_with_a_logged_reason(loopback, caplog):
    with caplog.at_level(logging.DEBUG, logger="kernelattn.dispatch"):
        ka.linear_attention(X, X, X, causal=True)
    assert loopback.calls == 0
    assert "causal is not supported here" in caplog.text
    with pytest.raises(ValueError, match="causal is not supported here"):
        ka.linear_attention(X, X, X, causal=True, backend="numpy")


def test_environment_switch_disables_fast_paths(loopback, monkeypatch):
    monkeypatch.setenv(_dispatch.DISABLE_ENV, "1")
    ka.linear_attention(X, X, X)
    assert loopback.calls == 0
    monkeypatch.setenv(_dispatch.DISABLE_ENV, "0")
    ka.linear_attention(X, X, X)
    assert loopback.calls == 1


def test_decisions_are_cached_on_static_facts(loopback, monkeypatch):
    seen = []
    real = loopback.supports
    monkeypatch.setattr(loopback, "supports", lambda op, **st: seen.append(st) or real(op, **st))
    for scale in (1.0, 2.0, 3.0):  # values change, static facts do not
        ka.linear_attention(X * scale, X, X)
    assert len(seen) == 1
    ka.linear_attention(X.astype(np.float64), X.astype(np.float64), X.astype(np.float64))
    assert len(seen) == 2


def test_adapters_load_lazily_and_route_to_core():
    for name in ("numpy", "torch", "jax", "dask", "cupy"):
        adapter = _dispatch.load_adapter(name)
        assert adapter.name == name
        assert "adapter" in repr(adapter)


def test_broken_adapter_module_falls_back(monkeypatch, caplog):
    def boom(name):
        raise ImportError("simulated")

    monkeypatch.setattr(_dispatch, "load_adapter", boom)
    _dispatch.clear_cache()
    try:
        with caplog.at_level(logging.DEBUG, logger="kernelattn.dispatch"):
            out = ka.linear_attention(X, X, X)
        assert out.shape == X.shape and "simulated" in caplog.text
        with pytest.raises(ValueError, match="failed to import"):
            ka.linear_attention(X, X, X, backend="numpy")
    finally:
        _dispatch.clear_cache()


def test_public_api_is_stable():
    assert ka.__all__ == sorted(ka.__all__)
    for name in ka.__all__:
        assert hasattr(ka, name)
    assert {"feature_map", "linear_attention", "softmax_attention", "num_params",
            "orthogonality_penalty", "linear_attention_step"} <= set(ka.__all__)


def test_named_backend_runs_reference_methods_on_the_core():
    # a reference method or a missing fast path is not a limitation of the backend: the core runs it
    for method in ("naive", "recurrent"):
        res = ka.explain_dispatch("linear_attention", X, backend="numpy", causal=True, method=method,
                                  masked=False, kind="glu")
        assert res.backend == "agnostic" and "reference strategy" in res.reason and "backend='numpy'" in res.reason
    res = ka.explain_dispatch("softmax_attention", X, backend="numpy", causal=False, masked=False)
    assert res.backend == "agnostic" and "no fast path" in res.reason
    assert Adapter().runs_on_core("linear_attention", method="auto") == "no fast path for linear_attention"


def _support_matrix_rows():
    # the docs extension that renders the support matrix (docs/_ext/support_matrix.py)
    spec = importlib.util.spec_from_file_location(
        "support_matrix", pathlib.Path(__file__).resolve().parents[1] / "docs" / "_ext" / "support_matrix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.rows()


def _cpu_inputs(library, *, grad, n=5):
    """(q, k, v) float32 (1, 2, n, 4) arrays of ``library`` on its CPU; ``grad``: torch tensors that require gradients."""
    a = np.ones((1, 2, n, 4), np.float32)
    if library == "numpy":
        return a, a, a
    if library == "torch":
        import torch

        return tuple(torch.ones(1, 2, n, 4, requires_grad=grad) for _ in range(3))
    if library == "jax":
        import jax.numpy as jnp

        return (jnp.asarray(a),) * 3
    if library == "dask":
        import dask.array as da

        return (da.from_array(a, chunks=(1, 2, 2, 4)),) * 3
    return None


def test_support_matrix_is_explain_dispatch_on_every_cpu_row():
    pytest.importorskip("sphinx", reason="the support matrix is a docs extension: pip install -e '.[docs]'")
    rows = [r for r in _support_matrix_rows() if r[2] == "cpu"]
    libraries = {r[0] for r in rows}
    assert {"numpy", "torch", "jax", "dask"} <= libraries, libraries
    # the torch fast paths are in the table (it once compared "float32" with "torch.float32" and showed none)
    assert {r[4] for r in rows if r[0] == "torch"} == {"torch:direct", "torch:fused-blocks", "torch:custom-op",
                                                       "torch:sdpa"}
    from kernelattn.backends import jax as jax_adapter
    from kernelattn.backends import torch as torch_adapter

    # a length inside each bucket the rows name (e.g. torch's "max(N, L) ≤ 256")
    sizes = {"torch": {"short": 5, "medium": torch_adapter.CAUSAL_MAX + 1, "long": torch_adapter.DIRECT_MAX + 1},
             "jax": {"short": 5, "long": jax_adapter.CAUSAL_MAX + 1}}
    lengths = {lib: {_dispatch.load_adapter(lib).lengths[b]: n for b, n in by.items()} for lib, by in sizes.items()}
    checked = 0
    for library, op, dev, grad, implementation, reason in rows:
        n = next((n for label, n in lengths.get(library, {}).items() if label in op), 5)
        q, k, v = _cpu_inputs(library, grad=grad == "yes", n=n)
        phi = ka.feature_map("glu", num_heads=2, head_dim=4, seed=0, like=q)
        causal, masked = "(causal" in op, "key_mask" in op
        key_mask = np.ones((1, n), bool) if masked else None
        if op.startswith("softmax"):
            res = ka.explain_dispatch("softmax_attention", q, k=k, v=v)
        else:
            res = ka.explain_dispatch("linear_attention", q, k=k, v=v, feature_map=phi, causal=causal,
                                      key_mask=key_mask)
        assert (res.implementation, res.reason) == (implementation, reason), (library, op, grad)
        checked += 1
    assert checked == len(rows) >= 19
