"""``.. support-matrix::``: the backend support table, generated from the dispatch registry.

For every library in :data:`kernelattn._dispatch.REGISTRY`, every operation,
device type and whether gradients are needed, it takes dispatch's own decision
(:func:`kernelattn._dispatch.decide`, what every call ends in) and renders the
implementation's name and the reason. Nothing is written by hand;
tests/test_dispatch.py checks the table against ``ka.explain_dispatch`` on
real arrays.
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
    ("softmax_attention", {"causal": False, "masked": False, "same_width": True}, ""),
]
GRADS = (False, True)


def rows():
    """(library, operation, device, gradients, implementation, reason): dispatch's own decision for each."""
    out = []
    for library in _dispatch.REGISTRY:
        try:
            adapter = _dispatch.load_adapter(library)
        except ImportError as exc:
            out.append((library, "–", "–", "–", "–", f"adapter not importable here: {exc}"))
            continue
        for op, static, label in CASES:
            for dev in adapter.device_types:
                # a gradients column only where the adapter's choice reads it
                grads = GRADS if "grad" in adapter.facts_for(op, device_type=dev, grad=True) else (None,)
                for grad in grads:
                    # one row per sequence-length bucket the adapter reads (torch: short, medium, long),
                    # collapsed to one row where the decision does not depend on it
                    lengths = getattr(adapter, "lengths", {None: ""})
                    decided = []
                    for length in lengths:
                        extra = {} if length is None else {"length": length}
                        facts = adapter.facts_for(op, device_type=dev, grad=bool(grad), **extra)
                        res = _dispatch.decide(op, library, dev, "float32", None, **{**facts, **static})
                        decided.append((lengths[length], res))
                    if len({(r.implementation, r.reason) for _, r in decided}) == 1:
                        decided = [("", decided[0][1])]
                    for what, res in decided:
                        parts = [p for p in (label, what) if p]
                        name = op + (f" ({', '.join(parts)})" if parts else "")
                        out.append((library, name, dev, {None: "–", False: "no", True: "yes"}[grad],
                                    res.implementation, res.reason))
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
        lines = [".. list-table::", "   :header-rows: 1", "   :widths: 10 26 8 8 18 30", "",
                 "   * - library", "     - operation", "     - device", "     - gradients", "     - implementation",
                 "     - why"]
        for library, op, dev, grad, impl, why in rows():
            lines += [f"   * - {library}", f"     - ``{op}``" if op != "–" else "     - –", f"     - {dev}",
                      f"     - {grad}", f"     - ``{impl}``" if impl != "–" else "     - –", f"     - {why}"]
        node = nodes.section()
        self.state.nested_parse(StringList(lines), self.content_offset, node)
        return node.children


def setup(app):
    app.add_directive("support-matrix", SupportMatrix)
    app.add_directive("feature-map-matrix", FeatureMapMatrix)
    return {"parallel_read_safe": True}
