"""The quick tier (``pytest -m "not slow"``) keeps a test in every module and every backend.

Slow marks (``@pytest.mark.slow``, ``pytest.param(..., marks=...)`` and ``slow_where`` in
conftest.py) only drop repeats: a mark set too wide that empties a test module, or takes a whole
backend out of the float64 comparisons in test_edges.py, fails here. These checks collect the whole
suite in a second interpreter, so they are themselves slow: the full run (CI) holds the quick tier.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

TESTS = pathlib.Path(__file__).resolve().parent
BACKENDS = ("numpy", "array_api_strict", "torch", "jax", "dask")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_ids():
    env = {k: v for k, v in os.environ.items() if k not in ("KERNELATTN_TEST_BACKENDS", "PYTEST_ADDOPTS")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "not slow",
                           "-p", "no:cacheprovider", "-p", "no:xdist", str(TESTS)],
                          cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [line.strip() for line in proc.stdout.splitlines() if "::" in line]


def test_every_module_keeps_a_quick_test(quick_ids):
    modules = {line.split("::")[0].rsplit("/", 1)[-1] for line in quick_ids}
    missing = sorted(p.name for p in TESTS.glob("test_*.py") if p.name not in modules | {pathlib.Path(__file__).name})
    assert not missing, f"no quick test left in {missing}: mark only repeats slow"


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_keeps_its_float64_comparisons(quick_ids, backend):
    edges = [i for i in quick_ids if "test_edges.py::" in i]
    for test in ("test_paths_match_definition", "test_reference_strategies_match_definition"):
        assert any(f"::{test}[{backend}-" in i for i in edges), f"{test} lost {backend} in the quick tier"
