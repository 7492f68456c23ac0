"""Softmax attention at the same shapes, so the crossover with linear attention is tracked.

``impl``: ``ours`` = :func:`kernelattn.softmax_attention` (the exact reference);
``native`` = torch ``scaled_dot_product_attention`` / ``jax.nn.dot_product_attention``.
Sizes whose softmax would take more than ~20 s or 8 GiB of scores are skipped.
"""

from __future__ import annotations

from .common import BACKENDS, HEADS, SIZES, XPBenchmark, inputs, safe_import

with safe_import():
    import kernelattn as ka


class SoftmaxAttention(XPBenchmark):
    params = [BACKENDS, ["ours", "native"], [False, True], SIZES]
    param_names = ["backend", "impl", "causal", "N"]

    def setup(self, backend, impl, causal, n):
        self.setup_backend(backend)
        if n > 16384 or (self.lib in ("numpy", "dask", "array_api_strict") and HEADS * n * n * 4 > 2**31):
            raise NotImplementedError("softmax too large at this N")
        q, k, v = (self.to_array(a) for a in inputs(n))
        if impl == "ours":
            fn = self.jit(lambda q, k, v: ka.softmax_attention(q, k, v, causal=causal))
        elif self.lib == "torch":
            sdpa = self.module.nn.functional.scaled_dot_product_attention
            fn = lambda q, k, v: sdpa(q, k, v, is_causal=causal)  # noqa: E731
        elif self.lib == "jax":
            jax = self.module
            fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
                q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), is_causal=causal))
        else:
            raise NotImplementedError(f"no native softmax attention in {self.lib}")
        self.fn, self.args = fn, (q, k, v)
        self.run(self.fn, *self.args)

    def time_softmax(self, *params):
        self.run(self.fn, *self.args)

    def peakmem_softmax(self, *params):
        self.run(self.fn, *self.args)
