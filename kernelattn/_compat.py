"""The one importer of :mod:`array_api_compat`.

Everything else in kernelattn asks this module for namespaces, devices and
library predicates, so that there is one place to change if the compat layer
moves. Nothing here imports an array library: the ``is_*`` predicates only
look at types of objects that already exist.
"""

from __future__ import annotations

import sys

import array_api_compat as _aac
from array_api_compat import array_namespace as _array_namespace, to_device

# array_api_compat (>= 1.12) wraps its predicates in functools.lru_cache, and
# torch.compile warns once for every lru_cache-wrapped function it traces. The
# functions below answer the questions kernelattn asks while tracing (torch
# tensors, plain Python scalars, namespaces by name) without calling them, with
# the same answers; anything else is still asked of array_api_compat.

_C = _aac.__name__
#: namespace module name -> library: the names array_api_compat's is_*_namespace test
_LIBRARIES = {
    "numpy": "numpy", f"{_C}.numpy": "numpy",
    "torch": "torch", f"{_C}.torch": "torch",
    "jax.numpy": "jax", "jax.experimental.array_api": "jax",
    "cupy": "cupy", f"{_C}.cupy": "cupy",
    "dask.array": "dask", f"{_C}.dask.array": "dask",
    "array_api_strict": "array_api_strict",
}
# exact types only: NumPy scalars subclass float and are arrays
_PLAIN = (bool, int, float, complex, str, bytes, type(None))

__all__ = [
    "array_namespace",
    "device",
    "is_array_api_obj",
    "is_cupy_namespace",
    "is_dask_namespace",
    "is_jax_namespace",
    "is_numpy_namespace",
    "is_torch_namespace",
    "is_array_api_strict_namespace",
    "library_name",
    "numpy_namespace",
    "to_device",
    "values_visible",
]


def _torch_tensor_type():
    torch = sys.modules.get("torch")  # never imports torch
    return None if torch is None else torch.Tensor


def array_namespace(*arrays):
    """Namespace of ``arrays`` (``None`` entries ignored)."""
    present = [a for a in arrays if a is not None]
    tensor = _torch_tensor_type()
    if present and tensor is not None and all(isinstance(a, tensor) for a in present):
        import array_api_compat.torch as torch_xp  # what array_api_compat gives any Tensor (subclass)

        return torch_xp
    return _array_namespace(*present)


def device(x):
    """The device of array ``x`` (array_api_compat's ``device``)."""
    tensor = _torch_tensor_type()
    if tensor is not None and isinstance(x, tensor):
        return x.device
    return _aac.device(x)


def is_array_api_obj(x) -> bool:
    """Whether ``x`` is an array of some array-API library (array_api_compat's answer)."""
    if type(x) in _PLAIN:
        return False
    tensor = _torch_tensor_type()
    if tensor is not None and isinstance(x, tensor):
        return True
    return _aac.is_array_api_obj(x)


_CACHES_MARKED = False


def mark_compat_caches_traceable() -> None:
    """Tell torch.compile that array_api_compat's own lru_cache helpers may be traced.

    Some of its namespace functions (``cumulative_sum``, ``clip``, ...) look up
    their namespace through those helpers, pure functions of types and module
    names, so tracing through the cache changes nothing; registered the way
    torch registers einops', Dynamo traces them without a warning. Runs
    outside the graph (see :func:`kernelattn._dispatch._decide`), once Dynamo
    is loaded; torch versions without the registry are left as they are.
    """
    global _CACHES_MARKED
    utils = sys.modules.get("torch._dynamo.utils")  # never imports Dynamo for eager users
    if _CACHES_MARKED or utils is None:
        return
    allow = getattr(utils, "allow_lru_cache_wrapper_trace_without_warning", None)
    if allow is not None:
        import array_api_compat.common._helpers as helpers

        for obj in vars(helpers).values():
            if callable(obj) and hasattr(obj, "cache_info") and hasattr(obj, "__wrapped__"):
                allow(obj)
    _CACHES_MARKED = True


def library_name(xp) -> str:
    """Short, stable name of the library behind a namespace.

    One of ``"numpy"``, ``"array_api_strict"``, ``"torch"``, ``"jax"``,
    ``"cupy"``, ``"dask"``, or the namespace's module name for anything else.
    """
    name = getattr(xp, "__name__", None)
    if not isinstance(name, str):
        return type(xp).__name__
    return _LIBRARIES.get(name, name)


def is_numpy_namespace(xp) -> bool:
    return library_name(xp) == "numpy"


def is_torch_namespace(xp) -> bool:
    return library_name(xp) == "torch"


def is_jax_namespace(xp) -> bool:
    return library_name(xp) == "jax"


def is_cupy_namespace(xp) -> bool:
    return library_name(xp) == "cupy"


def is_dask_namespace(xp) -> bool:
    return library_name(xp) == "dask"


def is_array_api_strict_namespace(xp) -> bool:
    return library_name(xp) == "array_api_strict"


def numpy_namespace():
    """The NumPy namespace (imports NumPy, which is a core dependency)."""
    import array_api_compat.numpy as np_xp

    return np_xp


def values_visible(x) -> bool:
    """Whether Python may look at the values of ``x`` now (branch on them).

    False for lazy arrays (Dask: looking would compute the graph), JAX
    tracers (under ``jit``/``grad``/``vmap``), and torch while ``torch.compile``
    traces or inside ``torch.func`` transforms. Imports nothing: the library
    of ``x`` is already loaded.
    """
    import sys

    if is_dask_namespace(array_namespace(x)):
        return False
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.core.Tracer):
        return False
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        if torch.compiler.is_compiling():
            return False
        if torch._C._functorch.is_functorch_wrapped_tensor(x):
            return False
    return True
