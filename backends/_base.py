"""The adapter contract shared by every backend module."""

from __future__ import annotations

import contextlib


class Adapter:
    """Base class of backend adapters.

    Subclasses set ``name`` and ``library`` and define, for each operation they
    accelerate, a method with the same signature as the core function in
    :mod:`kernelattn._agnostic` (``linear_attention``, ``softmax_attention``).
    An operation without a method falls back to the core.

    ``supports(op, *, device_type, dtype, **static)`` returns True, or a string
    saying why this call goes to the core instead.
    """

    name = "base"
    library = ""

    #: strategies the core always runs: the references the fast paths are tested against
    REFERENCE_METHODS = ("naive", "recurrent")

    #: True when the adapter's linear_attention keeps padded and non-finite inputs away from the
    #: outputs that must not see them by itself (kernelattn/_agnostic/isolate.py says how); the
    #: public function then skips its own isolation step
    isolates_inputs = False

    #: feature-map forms (kernelattn/kinds.py, ``Kind.form``) this adapter computes with code of its own;
    #: a kind with another form, or none, runs its array-API forward here
    feature_forms: tuple = ()

    #: device types this library's arrays live on (the docs' support matrix has a row for each)
    device_types: tuple = ("cpu",)

    #: implementation name ("<library>:<what>") -> one line on what it is; names are stable (docs, tests)
    implementations: dict = {}

    def supports(self, op: str, *, device_type: str, dtype: str, **static) -> bool | str:
        return self.runs_on_core(op, **static) or True

    def facts(self, op: str, *, arrays, feature_map) -> dict:
        """Static facts this library reads from a call's inputs (e.g. ``grad``), for :meth:`choose`.

        Must be cheap and hashable-valued: dispatch caches its decision on them.
        """
        return {}

    #: optional: ``call_key(q, k, v, key_mask, state, feature_map) -> hashable or None``, everything the
    #: checks of ``linear_attention`` and :meth:`facts` read from these arrays. A later call with the same key
    #: (and the same options and feature-map object) skips them (kernelattn/attention.py's call cache).
    #: None opts the call out (tracing, lazy arrays, subclasses).
    call_key = None

    def facts_for(self, op: str, *, device_type: str, grad: bool) -> dict:
        """The facts :meth:`facts` would read from inputs on ``device_type`` that do (not) need gradients.

        For tables made without arrays (the docs' support matrix).
        """
        return {}

    def choose(self, op: str, *, device_type: str, dtype: str, **static):
        """``(implementation name, function, reason)`` for a call :meth:`supports` accepted.

        The function has the core's signature for ``op``. The default: one
        implementation per operation, the method named ``op``.
        """
        return f"{self.name}:{op}", getattr(self, op), f"{self.name} fast path"

    def runs_on_core(self, op: str, **static) -> str | None:
        """Why this call goes to the core on any device and dtype, or None.

        Such a call is not refused when this backend is named explicitly: the
        core is what this backend runs for it (a reference method, or an
        operation without a fast path).
        """
        if getattr(self, op, None) is None:
            return f"no fast path for {op}"
        method = static.get("method")
        if op == "linear_attention" and method in self.REFERENCE_METHODS:
            return f"method={method!r} is a reference strategy; the core runs it"
        return None

    # -- library services: what kernelattn's generic code asks of a library instead of importing it --------
    def block(self, x):
        """``x`` once the library's asynchronous work on it is done (for timing); Dask computes it."""
        return x

    def jit(self, fn):
        """``fn`` compiled by the library where it compiles whole functions (JAX), else ``fn``."""
        return fn

    def value_and_grad(self, loss_fn):
        """Autodiff: ``f(phi, *args) -> (loss_fn(phi, *args), gradients as a FeatureMap)``; None if the library has none."""
        return None

    def decoder(self, dec, S, z):
        """The library's own step for a :class:`kernelattn.LinearAttentionDecoder`, or None (the array-API step).

        The object returned has ``_step(q, k, v, key_mask) -> out`` and ``state() -> (S, z)``.
        """
        return None

    def from_numpy(self, a):
        """A NumPy array as this library's array (for the command line's ``--backend``)."""
        return self.namespace().asarray(a)

    def namespace(self):
        """The library's array-API namespace."""
        import importlib

        import array_api_compat

        return array_api_compat.array_namespace(importlib.import_module(self.library).asarray(0.0))

    def native_softmax(self):
        """``(label, f(q, k, v, causal))``: the library's own softmax attention, the baseline benchmarks use."""
        from kernelattn.attention import softmax_attention

        return "kernelattn.softmax_attention", lambda q, k, v, causal: softmax_attention(q, k, v, causal=causal)

    def inference(self) -> None:
        """Switch the library to inference for the rest of the process (the command line): no autograd."""

    @contextlib.contextmanager
    def threads(self, n: int):
        """Run the block with ``n`` intra-op threads where the library has such a setting."""
        yield

    def __repr__(self) -> str:
        ops = [op for op in ("linear_attention", "softmax_attention") if getattr(self, op, None)]
        return f"<kernelattn adapter {self.name!r}: fast paths {ops or 'none yet'}>"
