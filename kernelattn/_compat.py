"""The one importer of :mod:`array_api_compat`.

Everything else in kernelattn asks this module for namespaces, devices and
library predicates, so that there is one place to change if the compat layer
moves. Nothing here imports an array library: the ``is_*`` predicates only
look at types of objects that already exist.
"""

from __future__ import annotations

from array_api_compat import (
    array_namespace as _array_namespace,
    device,
    is_array_api_obj,
    is_cupy_namespace,
    is_dask_namespace,
    is_jax_namespace,
    is_numpy_namespace,
    is_torch_namespace,
    is_array_api_strict_namespace,
    to_device,
)

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


def array_namespace(*arrays):
    """Namespace of ``arrays`` (``None`` entries ignored)."""
    return _array_namespace(*[a for a in arrays if a is not None])


def library_name(xp) -> str:
    """Short, stable name of the library behind a namespace.

    One of ``"numpy"``, ``"array_api_strict"``, ``"torch"``, ``"jax"``,
    ``"cupy"``, ``"dask"``, or the namespace's module name for anything else.
    """
    if is_numpy_namespace(xp):
        return "numpy"
    if is_torch_namespace(xp):
        return "torch"
    if is_jax_namespace(xp):
        return "jax"
    if is_cupy_namespace(xp):
        return "cupy"
    if is_dask_namespace(xp):
        return "dask"
    if is_array_api_strict_namespace(xp):
        return "array_api_strict"
    return getattr(xp, "__name__", type(xp).__name__)


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
