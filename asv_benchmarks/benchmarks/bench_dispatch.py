"""Dispatch overhead: the public call against the core function it resolves to, on tiny inputs."""

from __future__ import annotations

import numpy as np

from .common import safe_import

with safe_import():
    import kernelattn as ka
    from kernelattn._agnostic import attention as core
    from kernelattn._compat import numpy_namespace


class Dispatch:
    def setup(self):
        self.q = np.ones((1, 1, 4, 4), np.float32)
        self.phi = ka.feature_map("elu")
        self.xp = numpy_namespace()

    def time_public_call(self):
        ka.linear_attention(self.q, self.q, self.q, feature_map=self.phi)

    def time_core_call(self):
        core.linear_attention(self.q, self.q, self.q, feature_map=self.phi, causal=False, key_mask=None,
                              eps=1e-6, chunk_size=64, method="auto", initial_state=None,
                              return_state=False, xp=self.xp)

    def time_explain_dispatch(self):
        ka.explain_dispatch("linear_attention", self.q, causal=False)
