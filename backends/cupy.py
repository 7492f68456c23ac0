"""The CuPy adapter: the blocked algorithm of the NumPy path on the GPU, with fused kernels.

:mod:`kernelattn.backends._blocked` is written against the NumPy API that CuPy
mirrors, so CuPy runs the same (CPU-tested) code: batched products go to
cuBLAS, and two elementwise chains of the feature map are fused into single
CuPy ``ElementwiseKernel`` launches (Softplus in place; the GLU gate
``y / (1 + exp(-g))``). Blocks are large (GPUs want big launches); float16
inputs are computed with float32 state.

Tested only where a CUDA device is available: the test suite skips CuPy when
``cupy.cuda.is_available()`` is false, and ``asv_benchmarks/gpu_cupy_check.py``
checks every CuPy path against the NumPy float64 reference on a GPU machine.
"""

from __future__ import annotations

import functools

from kernelattn.backends import _blocked
from kernelattn.backends._base import Adapter

#: tokens per block on the GPU
BLOCK = 16384


@functools.lru_cache(maxsize=None)
def _kernels():
    import cupy

    softplus = cupy.ElementwiseKernel(
        "T x", "T y",
        "y = max(x, (T)0) + log1p(exp(-fabs(x)))",
        "kernelattn_softplus")
    gate = cupy.ElementwiseKernel(
        "T x, T g", "T y",
        "y = x / ((T)1 + exp(-g))",
        "kernelattn_glu_gate")
    # in place: the output array is also the input
    return {"softplus_": lambda y: softplus(y, y), "gate_": lambda y, g: gate(y, g, y)}


class CuPyAdapter(Adapter):
    name = library = "cupy"
    feature_forms = _blocked.FORMS
    device_types = ("cuda",)
    implementations = {"cupy:blocked-kernels": "the NumPy blocked form on cuBLAS, with fused ElementwiseKernels"}

    def block(self, x):
        import cupy

        cupy.cuda.get_current_stream().synchronize()
        return x

    def choose(self, op, *, device_type, dtype, **static):
        return "cupy:blocked-kernels", self.linear_attention, "cupy fast path: blocked, fused elementwise kernels"

    def linear_attention(self, q, k, v, *, feature_map, causal, key_mask, eps, chunk_size, method,
                         initial_state, return_state, xp):
        import cupy

        with cupy.cuda.Device(q.device):
            return _blocked.linear_attention(cupy, q, k, v, feature_map=feature_map, causal=causal,
                                             key_mask=key_mask, eps=eps, chunk_size=chunk_size,
                                             initial_state=initial_state, return_state=return_state,
                                             block=BLOCK, kernels=_kernels())


ADAPTER = CuPyAdapter()
