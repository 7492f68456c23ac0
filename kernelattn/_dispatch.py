"""Choosing who computes an operation: a backend's fast path or the array-API core.

Resolution order for an operation on arrays of namespace ``xp``:

1. an explicit ``backend=`` argument: ``"agnostic"`` forces the core; an
   adapter name must match the arrays' library (its fast path is used where it
   has one); an unknown name is a ValueError listing the known ones;
2. the environment switch ``KERNELATTN_DISABLE_FAST_PATHS=1`` forces the core;
3. the built-in adapter for the namespace, when its module imports and its
   ``supports(op, **static)`` says True (a string is its reason to decline,
   logged at DEBUG on logger ``kernelattn.dispatch``) and it has a method
   named ``op``;
4. the core in :mod:`kernelattn._agnostic`.

Decisions are cached on static facts only (operation, library, device type,
dtype, and static options such as ``causal``), never on values, so dispatch
happens once at trace time under ``jax.jit`` and ``torch.compile``.

An adapter is a module ``kernelattn.backends.<name>`` exposing ``ADAPTER``,
an object with ``name``, ``supports(op, **static)`` and, for each operation it
accelerates, a method with the core function's signature. Modules are
imported on first use only, so ``import kernelattn`` imports no framework.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

from . import _compat
from ._agnostic import attention as _attention
from ._validation import short as _short

logger = logging.getLogger("kernelattn.dispatch")

#: library name -> adapter module (imported on first use)
REGISTRY: dict[str, str] = {
    "numpy": "kernelattn.backends.numpy",
    "torch": "kernelattn.backends.torch",
    "jax": "kernelattn.backends.jax",
    "dask": "kernelattn.backends.dask",
    "cupy": "kernelattn.backends.cupy",
}

#: operation -> the core implementation every adapter method must match
CORE: dict[str, Callable] = {
    "linear_attention": _attention.linear_attention,
    "softmax_attention": _attention.softmax_attention,
}

KNOWN_BACKENDS = ("agnostic", *REGISTRY)
DISABLE_ENV = "KERNELATTN_DISABLE_FAST_PATHS"


@dataclass(frozen=True)
class Resolution:
    """What runs an operation, and why."""

    op: str
    backend: str  # "agnostic" or an adapter name
    function: Callable
    reason: str

    def __call__(self, *args, **kwargs):
        return self.function(*args, **kwargs)


def _fast_paths_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


#: backend name -> loaded adapter (a plain dict, not lru_cache: torch.compile warns on
#: every lru_cache-wrapped function it meets)
_ADAPTERS: dict[str, Any] = {}


def load_adapter(name: str):
    """The adapter object of backend ``name``; raises ImportError if it cannot load."""
    adapter = _ADAPTERS.get(name)
    if adapter is None:
        adapter = _ADAPTERS[name] = importlib.import_module(REGISTRY[name]).ADAPTER
    return adapter


def device_type(dev) -> str:
    """'cpu', 'cuda', ... from any library's device object (None -> 'unknown')."""
    if dev is None:
        return "unknown"
    kind = getattr(dev, "type", None) or getattr(dev, "platform", None)
    if isinstance(kind, str):
        return kind
    text = str(dev).lower()
    for word in ("cuda", "gpu", "tpu", "rocm", "mps", "cpu"):
        if word in text:
            return word
    return text


def resolve(op: str, xp, *, device=None, dtype=None, backend: str | None = None, **static: Any) -> Resolution:
    """Choose the implementation of ``op`` for arrays of namespace ``xp``.

    ``static`` holds hashable options that may change the choice (``causal``,
    ``method``, ``masked`` ...). The result is cached on these facts.
    """
    if not isinstance(op, str) or op not in CORE:
        kind = TypeError if not isinstance(op, str) else ValueError
        raise kind(f"unknown operation {_short(op)}; known: {sorted(CORE)}")
    if backend is not None and backend not in KNOWN_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {list(KNOWN_BACKENDS)}")
    library = _compat.library_name(xp)
    # adapters see the bare dtype name ("float32"), whatever the library prints ("torch.float32")
    key = (op, library, device_type(device), str(dtype).rsplit(".", 1)[-1], tuple(sorted(static.items())), backend,
           _fast_paths_disabled())
    _decide(*key)
    return _DECIDED[key]


#: decisions already taken, by static facts (read under torch.compile, see _decide)
_DECIDED: dict[tuple, Resolution] = {}


def _decide(*key) -> str:
    """Take the decision for ``key`` once and store it in ``_DECIDED``; return the backend name.

    ``torch.compile`` calls a function carrying ``_dynamo_marked_constant``
    (what ``torch.compiler.assume_constant_result`` sets) once while tracing
    and keeps its (string) result as a constant, so importing an adapter and
    asking it never enter the graph; the graph then reads the stored
    Resolution like any global. Eager calls behave as before.
    """
    if key[1] == "torch":
        _compat.mark_compat_caches_traceable()
    found = _DECIDED.get(key)
    if found is None:
        found = _DECIDED[key] = _choose(*key)
    return found.backend


_decide._dynamo_marked_constant = True


def _choose(op, library, dev_type, dtype, static_items, backend, disabled) -> Resolution:
    core = CORE[op]
    if backend == "agnostic":
        return Resolution(op, "agnostic", core, "backend='agnostic' was requested")
    if backend is not None and backend != library:
        raise ValueError(f"backend={backend!r} cannot run {library} arrays; use backend={library!r} "
                         f"(if available), backend='agnostic', or None")
    if disabled and backend is None:
        return Resolution(op, "agnostic", core, f"{DISABLE_ENV} is set")
    if library not in REGISTRY:
        return Resolution(op, "agnostic", core, f"no adapter for {library}")
    try:
        adapter = load_adapter(library)
    except ImportError as exc:
        reason = f"adapter {library!r} failed to import: {exc}"
        if backend is not None:
            raise ValueError(reason) from exc
        logger.debug("%s: %s", op, reason)
        return Resolution(op, "agnostic", core, reason)
    answer = adapter.supports(op, device_type=dev_type, dtype=dtype, **dict(static_items))
    if answer is not True:
        reason = f"{library} adapter declines: {answer}"
        if backend is not None:
            # a named backend runs reference methods (and operations it has no fast path for) on the
            # core, as it would unnamed; only a real limitation of the backend is an error
            core_reason = getattr(adapter, "runs_on_core", lambda op, **st: None)(op, **dict(static_items))
            if core_reason is None:
                raise ValueError(f"backend={backend!r} cannot run this call: {answer}")
            return Resolution(op, "agnostic", core, f"backend={backend!r}: {core_reason}")
        logger.debug("%s: %s", op, reason)
        return Resolution(op, "agnostic", core, reason)
    fn = getattr(adapter, op, None)
    if fn is None:
        reason = f"{library} adapter has no fast path for {op}; the core runs"
        logger.debug("%s: %s", op, reason)
        return Resolution(op, "agnostic", core, reason)
    return Resolution(op, library, fn, f"{library} fast path")


def clear_cache() -> None:
    """Forget cached decisions (after changing the environment switch, for instance)."""
    _DECIDED.clear()
