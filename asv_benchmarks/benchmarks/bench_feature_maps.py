"""Feature maps alone: phi(x) for x of shape (1, 8, N, 64)."""

from __future__ import annotations

from .common import BACKENDS, HEAD_DIM, HEADS, SIZES, XPBenchmark, inputs, safe_import

with safe_import():
    import kernelattn as ka

MAPS = {"elu": ("elu", {}), "favor": ("favor", {}), "ffn": ("ffn", {}), "glu": ("glu", {}),
        "glu2": ("glu", {"depth": 2}), "aoglu3": ("aoglu", {"depth": 3}), "hedgehog": ("hedgehog", {})}


class FeatureMaps(XPBenchmark):
    params = [BACKENDS, SIZES, list(MAPS)]
    param_names = ["backend", "N", "kernel"]

    def setup(self, backend, n, kernel):
        self.setup_backend(backend)
        self.x = self.to_array(inputs(n)[0])
        kind, opts = MAPS[kernel]
        shape = {} if kind == "elu" else {"num_heads": HEADS, "head_dim": HEAD_DIM, "seed": 0}
        phi = ka.feature_map(kind, like=self.x, **shape, **opts)
        self.fn = self.jit(lambda x, phi: phi(x))
        self.phi = phi
        self.run(self.fn, self.x, self.phi)

    def time_feature_map(self, *params):
        self.run(self.fn, self.x, self.phi)
