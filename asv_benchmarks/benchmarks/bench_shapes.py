"""Short and medium shapes against the minimal code a user would write and against SDPA, and the
fixed cost of a call (issue 16). The cases are those of ``asv_benchmarks/shape_targets.py``, the
side-by-side script, imported from it so that both time the same code."""

from __future__ import annotations

import os
import sys

from .common import BACKENDS, XPBenchmark, safe_import

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # asv_benchmarks/
with safe_import():
    import shape_targets as st

LIBRARIES = ("torch", "jax")
CPU_BACKENDS = [b for b in BACKENDS if b.partition(":")[0] in LIBRARIES and b.partition(":")[2] in ("", "cpu")]
IMPLS = {"kernelattn": "ka", "minimal": "minimal", "sdpa": "sdpa"}


def _cases(lib, shape, causal, mode):
    if lib not in LIBRARIES:
        raise NotImplementedError(f"shape cases exist for {LIBRARIES}, not {lib}")
    return (st.torch_cases if lib == "torch" else st.jax_cases)(shape, causal, mode)


class Shapes(XPBenchmark):
    """One call of kernelattn, the minimal code or SDPA at SHAPES (B, H, N, d) of shape_targets.py."""

    params = [CPU_BACKENDS, list(IMPLS), [0, 1, 2], [False, True], ["fwd", "fwd+bwd"]]
    param_names = ["backend", "impl", "shape", "causal", "mode"]

    def setup(self, backend, impl, shape, causal, mode):
        self.setup_backend(backend)
        self.fn = _cases(self.lib, st.SHAPES[shape], causal, mode)[IMPLS[impl]]
        for _ in range(2):  # compile (JAX), warm caches
            self.sync(self.fn())

    def time_call(self, *params):
        self.sync(self.fn())


class CallOverhead(XPBenchmark):
    """The fixed cost of a call: B = H = N = 1, d = 64, forward."""

    params = [CPU_BACKENDS]
    param_names = ["backend"]

    def setup(self, backend):
        self.setup_backend(backend)
        self.cases = _cases(self.lib, st.TINY, False, "fwd")
        for fn in self.cases.values():
            self.sync(fn())

    def time_kernelattn(self, *params):
        self.sync(self.cases["ka"]())

    def time_minimal(self, *params):
        self.sync(self.cases["minimal"]())

    def track_overhead_us(self, *params):
        """Median kernelattn minus median minimal, interleaved rounds (target <= 30 us, torch)."""
        res = st.measure({n: self.cases[n] for n in ("ka", "minimal")}, rounds=9, sync=self.sync, budget=0.05)
        return (res["ka"][0] - res["minimal"][0]) * 1e6

    track_overhead_us.unit = "us"


class ShapeRatios(XPBenchmark):
    """kernelattn / minimal, measured side by side (targets: <= 1.1 forward, <= 1.2 forward+backward)."""

    params = [CPU_BACKENDS, [0, 1, 2], [False, True], ["fwd", "fwd+bwd"]]
    param_names = ["backend", "shape", "causal", "mode"]
    timeout = 600

    def setup(self, backend, shape, causal, mode):
        self.setup_backend(backend)
        cases = _cases(self.lib, st.SHAPES[shape], causal, mode)
        self.cases = {n: cases[n] for n in ("ka", "minimal")}

    def track_ratio(self, *params):
        res = st.measure(self.cases, rounds=7, sync=self.sync, budget=0.05)
        return res["ka"][0] / res["minimal"][0]

    track_ratio.unit = "ratio"
