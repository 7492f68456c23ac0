"""Shared plumbing for the kernelattn asv suites.

Every benchmark class derives from :class:`XPBenchmark`. Its first parameter is
a ``backend`` string ``"<library>[:<device>]"`` (``numpy``, ``array_api_strict``,
``dask``, ``torch:cpu``, ``torch:cuda``, ``jax:cpu``, ``jax:gpu``, ``cupy``);
``setup`` raises ``NotImplementedError`` (asv's "skip") when the library or the
device is missing. Timed functions complete their device work
(:func:`kernelattn._timing.block`) and JAX functions are jitted and warmed up
in ``setup``, outside the timing.

Environment variables:

``KERNELATTN_BENCH_PROFILE``
    ``quick`` (default: N in 1K, 4K) or ``full`` (N in 1K, 4K, 16K, 64K).
``KERNELATTN_BENCH_BACKENDS``
    comma-separated backends to run (default ``numpy,torch:cpu,jax:cpu``; add
    ``torch:cuda,jax:gpu,cupy`` on a GPU machine).
"""

from __future__ import annotations

import contextlib
import importlib
import os

import numpy as np

PROFILE = os.environ.get("KERNELATTN_BENCH_PROFILE", "quick")
SIZES = {"quick": [1024, 4096], "full": [1024, 4096, 16384, 65536]}[PROFILE]
BACKENDS = os.environ.get("KERNELATTN_BENCH_BACKENDS", "numpy,torch:cpu,jax:cpu").split(",")
HEADS, HEAD_DIM = 8, 64
KERNELS = {"elu": ("elu", {}), "glu": ("glu", {}), "aoglu3": ("aoglu", {"depth": 3})}


@contextlib.contextmanager
def safe_import():
    """Let benchmarks import names that older commits lack; the benchmark then skips."""
    try:
        yield
    except ImportError:
        pass


def load_backend(spec: str):
    """``(to_array, sync, jit, module)`` for ``"<library>[:<device>]"``; NotImplementedError if unusable."""
    lib, _, dev = spec.partition(":")
    try:
        if lib == "numpy":
            return (lambda a: a), (lambda x: x), (lambda f: f), np
        if lib == "array_api_strict":
            xps = importlib.import_module("array_api_strict")
            return xps.asarray, (lambda x: x), (lambda f: f), xps
        if lib == "dask":
            da = importlib.import_module("dask.array")
            return (lambda a: da.from_array(a, chunks=(1, HEADS, 4096, a.shape[-1]))), \
                (lambda x: x.compute() if hasattr(x, "compute") else x), (lambda f: f), da
        if lib == "torch":
            torch = importlib.import_module("torch")
            device = dev or "cpu"
            if device == "cuda" and not torch.cuda.is_available():
                raise NotImplementedError("no CUDA device")

            def sync(x):
                if device == "cuda":
                    torch.cuda.synchronize()
                return x

            return (lambda a: torch.as_tensor(a, device=device)), sync, (lambda f: f), torch
        if lib == "jax":
            jax = importlib.import_module("jax")
            device = dev or "cpu"
            try:
                target = jax.devices(device)[0]
            except RuntimeError as exc:
                raise NotImplementedError(f"no JAX {device} device") from exc

            def sync(x):
                return jax.block_until_ready(x)

            return (lambda a: jax.device_put(a, target)), sync, jax.jit, jax
        if lib == "cupy":
            cupy = importlib.import_module("cupy")
            if not cupy.cuda.is_available():
                raise NotImplementedError("no CUDA device for CuPy")

            def sync(x):
                cupy.cuda.get_current_stream().synchronize()
                return x

            return cupy.asarray, sync, (lambda f: f), cupy
    except ImportError as exc:
        raise NotImplementedError(f"{lib} is not installed") from exc
    raise NotImplementedError(f"unknown backend {spec!r}")


def inputs(n: int, *, e: int = HEAD_DIM, seed: int = 0, dtype=np.float32):
    """(1, H, n, d) queries, keys and values with peaked softmax attention."""
    from kernelattn.data import default_inputs

    return default_inputs(n, num_heads=HEADS, head_dim=HEAD_DIM, seed=seed, dtype=dtype)


class XPBenchmark:
    """Base class: parses the backend, builds inputs, provides sync and jit."""

    params = [BACKENDS]
    param_names = ["backend"]
    timeout = 300

    def setup_backend(self, backend):
        self.backend = backend
        self.lib = backend.partition(":")[0]
        self.to_array, self.sync, self.jit, self.module = load_backend(backend)

    def run(self, fn, *args):
        return self.sync(fn(*args))
