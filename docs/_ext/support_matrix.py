"""``.. support-matrix::``: the backend support table, generated from the dispatch registry.

For every library in :data:`kernelattn._dispatch.REGISTRY`, every operation
and the device types, it asks the adapter (as dispatch would) whether it runs
the call itself, and renders what runs: the library's fast path, or the
array-API core with the adapter's reason. Nothing is written by hand.
"""

from __future__ import annotations

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective

from kernelattn import _dispatch

CASES = [
    ("linear_attention", {"causal": False, "method": "auto", "masked": False, "kind": "glu"}, "non-causal"),
    ("linear_attention", {"causal": True, "method": "auto", "masked": False, "kind": "glu"}, "causal"),
    ("linear_attention", {"causal": True, "method": "auto", "masked": True, "kind": "glu"}, "causal, key_mask"),
    ("softmax_attention", {"causal": False, "masked": False}, ""),
]
DEVICES = ("cpu", "cuda")


def rows():
    out = []
    for library in _dispatch.REGISTRY:
        try:
            adapter = _dispatch.load_adapter(library)
        except ImportError as exc:
            out.append((library, "–", "–", f"adapter not importable here: {exc}"))
            continue
        for op, static, label in CASES:
            for dev in DEVICES:
                if library in ("numpy", "dask") and dev == "cuda":
                    continue
                answer = adapter.supports(op, device_type=dev, dtype="float32", **static)
                has = getattr(adapter, op, None) is not None
                if answer is True and has:
                    what = f"fast path ({library})"
                else:
                    reason = answer if isinstance(answer, str) else "no fast path"
                    what = f"array-API core ({reason})"
                name = op + (f" ({label})" if label else "")
                out.append((library, name, dev, what))
    return out


def kind_rows():
    """(kind, trainable, hand gradient, what computes phi per library) for every registered kind."""
    from kernelattn import kinds

    adapters = {}
    for library in _dispatch.REGISTRY:
        try:
            adapters[library] = _dispatch.load_adapter(library)
        except ImportError:
            adapters[library] = None
    out = []
    for name in kinds.names():
        kind = kinds.get(name)
        cells = []
        for library, adapter in adapters.items():
            if adapter is None:
                cells.append(f"{library}: –")
            elif kind.form is not None and kind.form in adapter.feature_forms:
                cells.append(f"{library}: own form ({kind.form})")
            else:
                cells.append(f"{library}: array-API forward")
        out.append((name, "yes" if kind.trainable else "no", "yes" if kind.vjp is not None else "no (autodiff only)",
                    "; ".join(cells)))
    return out


class FeatureMapMatrix(SphinxDirective):
    has_content = False

    def run(self):
        lines = [".. list-table::", "   :header-rows: 1", "   :widths: 12 10 16 62", "",
                 "   * - kind", "     - trainable", "     - hand gradient", "     - what computes phi"]
        for name, trainable, vjp, what in kind_rows():
            lines += [f"   * - ``{name}``", f"     - {trainable}", f"     - {vjp}", f"     - {what}"]
        node = nodes.section()
        self.state.nested_parse(StringList(lines), self.content_offset, node)
        return node.children


class SupportMatrix(SphinxDirective):
    has_content = False

    def run(self):
        lines = [".. list-table::", "   :header-rows: 1", "   :widths: 12 30 8 50", "",
                 "   * - library", "     - operation", "     - device", "     - what runs"]
        for library, op, dev, what in rows():
            lines += [f"   * - {library}", f"     - ``{op}``" if op != "–" else "     - –",
                      f"     - {dev}", f"     - {what}"]
        node = nodes.section()
        self.state.nested_parse(StringList(lines), self.content_offset, node)
        return node.children


def setup(app):
    app.add_directive("support-matrix", SupportMatrix)
    app.add_directive("feature-map-matrix", FeatureMapMatrix)
    return {"parallel_read_safe": True}
