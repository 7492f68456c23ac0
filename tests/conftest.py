"""Shared fixtures: one ``xp`` fixture parametrised over array libraries.

``KERNELATTN_TEST_BACKENDS=numpy,torch`` narrows a run. A backend named there,
or one of the default five (numpy, array_api_strict, torch, jax, dask), that
cannot be imported FAILS the run instead of being skipped. CuPy runs only
where ``cupy.cuda.is_available()``; elsewhere it is left out and the
reason in the report header (importing CuPy succeeds on a machine without a
GPU, so an import check is not enough).
"""

from __future__ import annotations

import os

# Before anything imports JAX: 8 simulated CPU devices for mesh tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# JAX's persistent compilation cache, in pytest's cache folder: most of a JAX test's time is compiling,
# so a second run (the quick tier in an edit loop) reuses the first run's programs
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), os.pardir,
                                                                ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Before anything imports Triton (torch's inductor does, in test_compile_warnings.py): without a
# GPU the kernels run in Triton's interpreter, which must be chosen before the first @triton.jit.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (README: ``pytest -n 2``) each worker gets one thread per library, so two
# workers share the 2 cores instead of oversubscribing them; before numpy, torch or jax load.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import importlib
from dataclasses import dataclass, field

import numpy as np
import pytest

DEFAULT_BACKENDS = ("numpy", "array_api_strict", "torch", "jax", "dask")
ALL_BACKENDS = DEFAULT_BACKENDS + ("cupy",)
ENV = "KERNELATTN_TEST_BACKENDS"


def requested_backends() -> tuple[str, ...]:
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return DEFAULT_BACKENDS + (("cupy",) if _cupy_usable() else ())
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    unknown = [n for n in names if n not in ALL_BACKENDS]
    if unknown:
        raise pytest.UsageError(f"{ENV}: unknown backend(s) {unknown}; known: {list(ALL_BACKENDS)}")
    return names


def _cupy_usable() -> bool:
    try:
        import cupy

        return bool(cupy.cuda.is_available())
    except Exception:
        return False


@dataclass
class Backend:
    """A library under test: its namespace and how to make its arrays."""

    name: str
    xp: object
    module: object
    device: object = None
    dtypes: dict = field(default_factory=dict)

    def asarray(self, a, dtype="float32"):
        """NumPy data -> this library's array of ``dtype`` (a name)."""
        a = np.asarray(a)
        if a.dtype == bool:
            out = self.xp.asarray(a)
        else:
            out = self.xp.asarray(np.asarray(a, dtype=np.float64 if dtype == "float64" else np.float32))
            want = self.dtype(dtype)
            if out.dtype != want:
                out = self.xp.astype(out, want)
        if self.device is not None and self.name == "torch":
            out = out.to(self.device)
        return out

    def dtype(self, name):
        if hasattr(self.xp, name):
            return getattr(self.xp, name)
        if self.name == "dask" and name == "float16":  # dask holds NumPy dtypes
            return np.dtype(name)
        raise AttributeError(f"{self.name} has no {name}")

    def has(self, dtype_name):
        try:
            self.dtype(dtype_name)
            return True
        except AttributeError:
            return False

    def __repr__(self):
        return self.name


def _make_backend(name: str) -> Backend:
    import array_api_compat

    if name == "numpy":
        mod = np
    elif name == "array_api_strict":
        mod = importlib.import_module("array_api_strict")
    elif name == "torch":
        mod = importlib.import_module("torch")
    elif name == "jax":
        jax = importlib.import_module("jax")
        jax.config.update("jax_enable_x64", True)
        jax.config.update("jax_default_matmul_precision", "float32")
        mod = importlib.import_module("jax.numpy")
    elif name == "dask":
        mod = importlib.import_module("dask.array")
    elif name == "cupy":
        mod = importlib.import_module("cupy")
    else:  # pragma: no cover
        raise ValueError(name)
    xp = array_api_compat.array_namespace(mod.asarray(np.zeros(1)) if name != "dask" else mod.zeros(1))
    return Backend(name, xp, mod)


_CACHE: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    if name not in _CACHE:
        try:
            _CACHE[name] = _make_backend(name)
        except ImportError as exc:  # asked for but missing: fail, never skip
            pytest.fail(f"backend {name!r} was requested (default set or {ENV}) but cannot be "
                        f"imported: {exc}", pytrace=False)
    return _CACHE[name]


def pytest_generate_tests(metafunc):
    if "xp_backend" in metafunc.fixturenames:
        names = requested_backends()
        marks = getattr(metafunc.function, "pytestmark", [])
        only = [m.args for m in marks if m.name == "backends"]
        if only:
            names = tuple(n for n in names if n in only[0])
        metafunc.parametrize("xp_backend", names, indirect=True)


@pytest.fixture
def xp_backend(request) -> Backend:
    name = request.param
    if name == "cupy" and not _cupy_usable():
        pytest.fail(f"cupy was requested in {ENV} but no CUDA device is usable", pytrace=False)
    return get_backend(name)


@pytest.fixture
def xp(xp_backend):
    return xp_backend.xp


def pytest_report_header(config):
    names = ", ".join(requested_backends())
    extra = "" if _cupy_usable() else " (cupy left out: no usable CUDA device)"
    return f"kernelattn backends under test: {names}{extra}"


def pytest_configure(config):
    config.addinivalue_line("markers", "backends(*names): run only on these backends")
    config.addinivalue_line("markers", "slow_where(**params): mark slow the parametrisations whose parameters "
                                       "all match (a list or tuple: any of these values; xp_backend: the name)")


def _matches(value, want) -> bool:
    wants = want if isinstance(want, (list, tuple, set, frozenset)) else (want,)
    for w in wants:
        try:
            if bool(value == w):
                return True
        except Exception:  # e.g. arrays compared with a scalar
            continue
    return False


@pytest.hookimpl(tryfirst=True)  # before -m "not slow" deselects
def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.slow_where(xp_backend="jax", kind=["ffn", "favor"])`` marks slow the items whose
    parameters all match: repeats of a path the quick tier (``-m "not slow"``) already covers."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        for mark in item.iter_markers("slow_where"):
            unknown = sorted(set(mark.kwargs) - set(params))
            if unknown or not mark.kwargs:
                raise pytest.UsageError(f"{item.nodeid}: slow_where names no parameter of the test: {unknown}")
            if all(_matches(params[k], v) for k, v in mark.kwargs.items()):
                item.add_marker(pytest.mark.slow)
                break


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
