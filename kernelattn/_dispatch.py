"""Choosing who computes an operation: a backend's fast path or the array-API core.

Resolution order for an operation on arrays of namespace ``xp``:

1. an explicit ``backend=`` argument: ``"agnostic"`` forces the core; an
   adapter name must match the arrays' library (its fast path is used where it
   has one); an unknown name is a ValueError listing the known ones;
2. the environment switch ``KERNELATTN_DISABLE_FAST_PATHS=1`` forces the core;
3. the built-in adapter for the namespace, when its module imports and its
   ``supports(op, **static)`` says True (a string is its reason to decline,
   logged at DEBUG on logger ``kernelattn.dispatch``) and it has a method
   named ``op``; its ``choose(op, **static)`` then names the implementation;
4. the core in :mod:`kernelattn._agnostic`, whose implementation is named by
   the strategy it runs (:func:`core_implementation`).

Every implementation has a stable name (``torch:fused-blocks``,
``numpy:blocked``, ``agnostic:chunked``...): :class:`Resolution` carries it,
``ka.explain_dispatch`` reports it, and :func:`recording` lists the ones that
ran. The static facts are the operation, library, device type, dtype, the
call's options (``causal``, ``method``, ``masked``, ``kind``) and what the
adapter reads from the inputs (its ``facts(op, arrays=..., feature_map=...)``:
for torch, whether gradients are needed and whether ``torch.compile`` is
tracing). Decisions are cached on these, never on values, so dispatch happens
once at trace time under ``jax.jit`` and ``torch.compile``.

An adapter is a module ``kernelattn.backends.<name>`` exposing ``ADAPTER``
(see ``backends/_base.py``), listed in :data:`REGISTRY`; :func:`register_backend`
adds one. Modules are imported on first use only, so ``import kernelattn``
imports no framework.
"""

from __future__ import annotations

import importlib
import logging
import os
import contextlib
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
_BUILTIN = frozenset(REGISTRY)
DISABLE_ENV = "KERNELATTN_DISABLE_FAST_PATHS"


@dataclass(frozen=True)
class Resolution:
    """What runs an operation, and why.

    ``backend`` is ``"agnostic"`` or an adapter name; ``implementation`` the
    stable name of the code that runs (``"torch:custom-op"``, ``"agnostic:chunked"``).
    """

    op: str
    backend: str
    function: Callable
    reason: str
    implementation: str = ""

    def __call__(self, *args, **kwargs):
        if _RECORDERS:
            for names in _RECORDERS:
                names.append(self.implementation)
                names.functions.append(getattr(self.function, "__qualname__", repr(self.function)))
        return self.function(*args, **kwargs)


#: lists receiving the implementation names that run (see :func:`recording`)
_RECORDERS: list[list] = []


class _Names(list):
    """Implementation names, and in ``.functions`` the qualified names of the functions that ran them."""

    def __init__(self):
        super().__init__()
        self.functions: list[str] = []


@contextlib.contextmanager
def recording():
    """``with recording() as names:``: the implementation names of the operations run inside, in order."""
    names = _Names()
    _RECORDERS.append(names)
    try:
        yield names
    finally:
        _RECORDERS.remove(names)


def core_implementation(op: str, static: dict) -> str:
    """The name of what the array-API core runs for ``op`` with these options."""
    if op != "linear_attention":
        return f"agnostic:{op.replace('_attention', '')}"
    method = static.get("method", "auto")
    if method == "naive":
        return "agnostic:naive"
    if not static.get("causal", False):
        return "agnostic:noncausal"
    return "agnostic:recurrent" if method == "recurrent" else "agnostic:chunked"


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


def register_backend(library: str, module: str) -> None:
    """Route arrays of ``library`` (its name as ``_compat.library_name`` gives it) to the adapter in ``module``.

    ``module`` is imported on first use and must expose ``ADAPTER`` (see
    ``backends/_base.py``). The built-in adapters are listed the same way in
    :data:`REGISTRY`.
    """
    global KNOWN_BACKENDS
    if not isinstance(library, str) or not library:
        raise ValueError(f"library must be a non-empty string; got {library!r}")
    if not isinstance(module, str) or not module:
        raise ValueError(f"module must be a module path such as 'mypkg.adapter'; got {module!r}")
    if library in _BUILTIN:
        raise ValueError(f"{library!r} already has a built-in adapter ({REGISTRY[library]})")
    REGISTRY[library] = module
    _ADAPTERS.pop(library, None)
    KNOWN_BACKENDS = ("agnostic", *REGISTRY)
    clear_cache()


def unregister_backend(library: str) -> None:
    """Undo :func:`register_backend` (the built-in adapters cannot be removed)."""
    global KNOWN_BACKENDS
    if library in _BUILTIN:
        raise ValueError(f"{library!r} is a built-in backend and cannot be removed")
    if library not in REGISTRY:
        raise ValueError(f"no backend {library!r} is registered")
    del REGISTRY[library]
    _ADAPTERS.pop(library, None)
    KNOWN_BACKENDS = ("agnostic", *REGISTRY)
    clear_cache()


def adapter_for(library: str):
    """The adapter of ``library``, or None when it has none or it cannot load (eager code only)."""
    if library not in REGISTRY:
        return None
    try:
        return load_adapter(library)
    except ImportError:
        return None


def _ensure_loaded(library: str) -> str:
    """Import the adapter of ``library`` (under torch.compile, once, outside the graph); '' or the error."""
    if library in _ADAPTERS:
        return ""
    try:
        load_adapter(library)
    except ImportError as exc:
        return str(exc) or type(exc).__name__
    return ""


_ensure_loaded._dynamo_marked_constant = True


def facts(op: str, library: str, *, arrays=(), feature_map=None) -> dict:
    """What the adapter of ``library`` reads from a call's inputs to choose (e.g. ``grad``); {} if none."""
    if library not in REGISTRY or _ensure_loaded(library):
        return {}
    try:
        read = getattr(load_adapter(library), "facts", None)
    except ImportError:  # _choose reports it
        return {}
    return {} if read is None else dict(read(op, arrays=arrays, feature_map=feature_map))


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


def resolve(op: str, xp, *, device=None, dtype=None, backend: str | None = None, arrays=(), feature_map=None,
            **static: Any) -> Resolution:
    """Choose the implementation of ``op`` for arrays of namespace ``xp``.

    ``static`` holds hashable options that may change the choice (``causal``,
    ``method``, ``masked`` ...); ``arrays`` and ``feature_map`` are the call's
    inputs, from which the adapter reads its own facts (:func:`facts`; given
    ``static`` entries win). The result is cached on these facts.
    """
    if not isinstance(op, str) or op not in CORE:
        kind = TypeError if not isinstance(op, str) else ValueError
        raise kind(f"unknown operation {_short(op)}; known: {sorted(CORE)}")
    if backend is not None and backend != "agnostic" and backend not in REGISTRY:
        raise ValueError(f"unknown backend {backend!r}; expected one of {['agnostic', *REGISTRY]}")
    library = _compat.library_name(xp)
    if backend != "agnostic" and (arrays or feature_map is not None) and not _fast_paths_disabled():
        static = {**facts(op, library, arrays=arrays, feature_map=feature_map), **static}
    # adapters see the bare dtype name ("float32"), whatever the library prints ("torch.float32")
    return decide(op, library, device_type(device), str(dtype).rsplit(".", 1)[-1], backend, **static)


def decide(op: str, library: str, device_type: str, dtype: str, backend: str | None = None, **static) -> Resolution:
    """The decision for static facts alone (what :func:`resolve` ends in; the docs' support matrix asks it too)."""
    key = (op, library, device_type, dtype, tuple(sorted(static.items())), backend, _fast_paths_disabled())
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
    core_name = core_implementation(op, dict(static_items))

    def core(reason):
        return Resolution(op, "agnostic", CORE[op], reason, core_name)

    if backend == "agnostic":
        return core("backend='agnostic' was requested")
    if backend is not None and backend != library:
        raise ValueError(f"backend={backend!r} cannot run {library} arrays; use backend={library!r} "
                         f"(if available), backend='agnostic', or None")
    if disabled and backend is None:
        return core(f"{DISABLE_ENV} is set")
    if library not in REGISTRY:
        return core(f"no adapter for {library}")
    try:
        adapter = load_adapter(library)
    except ImportError as exc:
        reason = f"adapter {library!r} failed to import: {exc}"
        if backend is not None:
            raise ValueError(reason) from exc
        logger.debug("%s: %s", op, reason)
        return core(reason)
    answer = adapter.supports(op, device_type=dev_type, dtype=dtype, **dict(static_items))
    if answer is not True:
        reason = f"{library} adapter declines: {answer}"
        if backend is not None:
            # a named backend runs reference methods (and operations it has no fast path for) on the
            # core, as it would unnamed; only a real limitation of the backend is an error
            core_reason = getattr(adapter, "runs_on_core", lambda op, **st: None)(op, **dict(static_items))
            if core_reason is None:
                raise ValueError(f"backend={backend!r} cannot run this call: {answer}")
            return core(f"backend={backend!r}: {core_reason}")
        logger.debug("%s: %s", op, reason)
        return core(reason)
    if getattr(adapter, op, None) is None:
        reason = f"{library} adapter has no fast path for {op}; the core runs"
        logger.debug("%s: %s", op, reason)
        return core(reason)
    choose = getattr(adapter, "choose", None)
    if choose is None:  # an adapter without names for its implementations: one per operation
        return Resolution(op, library, getattr(adapter, op), f"{library} fast path", f"{library}:{op}")
    name, fn, reason = choose(op, device_type=dev_type, dtype=dtype, **dict(static_items))
    return Resolution(op, library, fn, reason, name)


#: functions :func:`clear_cache` calls (caches elsewhere that hold decisions, e.g. kernelattn/attention.py's)
_ON_CLEAR: list[Callable[[], None]] = []


def on_clear(fn: Callable[[], None]) -> None:
    """Have :func:`clear_cache` call ``fn`` too."""
    _ON_CLEAR.append(fn)


def clear_cache() -> None:
    """Forget cached decisions (after changing the environment switch, for instance)."""
    _DECIDED.clear()
    for fn in _ON_CLEAR:
        fn()
