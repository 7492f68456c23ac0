"""Linear attention: forward, forward+backward, peak memory and numeric drift.

Parameters: backend x impl (``agnostic`` = the array-API core forced with
``backend="agnostic"``; ``fast`` = whatever dispatch picks) x causal x N x
feature map (elu, glu, aoglu x3), B=1, H=8, d=m=64, float32.
"""

from __future__ import annotations

import numpy as np

from .common import BACKENDS, HEAD_DIM, HEADS, KERNELS, SIZES, XPBenchmark, inputs, safe_import

with safe_import():
    import kernelattn as ka
    from kernelattn.testing import rel_rms_error, to_numpy


def _phi(kernel, like):
    kind, opts = KERNELS[kernel]
    if kind == "elu":
        return ka.feature_map("elu")
    return ka.feature_map(kind, num_heads=HEADS, head_dim=HEAD_DIM, seed=0, like=like, **opts)


class LinearAttention(XPBenchmark):
    params = [BACKENDS, ["agnostic", "fast"], [False, True], SIZES, list(KERNELS)]
    param_names = ["backend", "impl", "causal", "N", "kernel"]

    def setup(self, backend, impl, causal, n, kernel):
        self.setup_backend(backend)
        self.q_np, self.k_np, self.v_np = inputs(n)
        self.q, self.k, self.v = (self.to_array(a) for a in (self.q_np, self.k_np, self.v_np))
        self.phi = _phi(kernel, self.q if self.lib != "dask" else self.q_np)
        if self.lib == "dask":
            self.phi = self.phi.to(like=self.q) if hasattr(self.phi, "to") else self.phi
        choice = "agnostic" if impl == "agnostic" else None

        def forward(q, k, v, phi):
            return ka.linear_attention(q, k, v, feature_map=phi, causal=causal, backend=choice)

        self.forward = self.jit(forward)
        self.run(self.forward, self.q, self.k, self.v, self.phi)  # warm-up / compile

    def time_forward(self, *params):
        self.run(self.forward, self.q, self.k, self.v, self.phi)

    def peakmem_forward(self, *params):
        self.run(self.forward, self.q, self.k, self.v, self.phi)

    def track_rel_error(self, backend, impl, causal, n, kernel):
        """Relative RMS error of the float32 output against a float64 NumPy run of the core."""
        out = to_numpy(self.run(self.forward, self.q, self.k, self.v, self.phi))
        phi64 = self.phi.to(xp=np, dtype="float64") if isinstance(self.phi, ka.FeatureMap) else self.phi
        ref = ka.linear_attention(*(a.astype(np.float64) for a in (self.q_np, self.k_np, self.v_np)),
                                  feature_map=phi64, causal=causal, backend="agnostic")
        return rel_rms_error(out, ref)

    track_rel_error.unit = "relative RMS"


class LinearAttentionBackward(XPBenchmark):
    """Forward + backward (gradients for q, k, v and the feature map's parameters)."""

    params = [[b for b in BACKENDS if b.split(":")[0] in ("torch", "jax")], ["agnostic", "fast"],
              [False, True], SIZES, ["elu", "glu"]]
    param_names = ["backend", "impl", "causal", "N", "kernel"]

    def setup(self, backend, impl, causal, n, kernel):
        self.setup_backend(backend)
        q, k, v = inputs(n)
        w = np.random.default_rng(0).standard_normal(v.shape).astype(np.float32)
        choice = "agnostic" if impl == "agnostic" else None
        if self.lib == "torch":
            torch = self.module
            self.args = [self.to_array(a).requires_grad_(True) for a in (q, k, v)]
            self.phi = _phi(kernel, self.args[0])
            params = self.phi.parameters() if isinstance(self.phi, ka.FeatureMap) else []
            for p in params:
                p.requires_grad_(True)
            tw = self.to_array(w)

            def step():
                out = ka.linear_attention(*self.args, feature_map=self.phi, causal=causal, backend=choice)
                grads = torch.autograd.grad((out * tw).sum(), self.args + params)
                return grads[0]

            self.step = step
        else:
            jax = self.module
            self.args = [self.to_array(a) for a in (q, k, v)]
            self.phi = _phi(kernel, self.args[0])
            jw = self.to_array(w)

            def loss(q, k, v, phi):
                out = ka.linear_attention(q, k, v, feature_map=phi, causal=causal, backend=choice)
                return (out * jw).sum()

            grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
            self.step = lambda: grad(*self.args, self.phi)[0]
        self.run(self.step)

    def time_forward_backward(self, *params):
        self.run(self.step)

    def peakmem_forward_backward(self, *params):
        self.run(self.step)
