"""The adapter contract shared by every backend module."""

from __future__ import annotations


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

    def supports(self, op: str, *, device_type: str, dtype: str, **static) -> bool | str:
        return self.runs_on_core(op, **static) or True

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

    def __repr__(self) -> str:
        ops = [op for op in ("linear_attention", "softmax_attention") if getattr(self, op, None)]
        return f"<kernelattn adapter {self.name!r}: fast paths {ops or 'none yet'}>"
