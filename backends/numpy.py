"""The NumPy adapter: linear attention blocked over tokens, with fused in-place feature maps.

The array-API core computes phi(Q), phi(K) and every intermediate for the whole
sequence at once; at long lengths those temporaries leave the caches and their
first touch costs page faults, which on a small machine costs more than the
matrix products themselves. Here (:mod:`kernelattn.backends._blocked`) the
sequence is processed in blocks of :data:`BLOCK` tokens, all batches and heads
at once so that each product is one batched BLAS call: the feature map is
applied to one block at a time with in-place ufuncs into reused buffers, and
the attention products follow while the block is still in cache. Causal
attention runs the chunked form inside each block from the state carried over
from earlier blocks.
"""

from __future__ import annotations

import numpy as np

from kernelattn.backends import _blocked
from kernelattn.backends._base import Adapter

#: tokens per block (a multiple of the chunk size); chosen for the caches of a small x86 CPU
BLOCK = 512


class NumPyAdapter(Adapter):
    name = library = "numpy"
    feature_forms = _blocked.FORMS
    implementations = {"numpy:blocked": "blocks of tokens, in-place ufuncs into reused buffers, batched BLAS"}

    def choose(self, op, *, device_type, dtype, **static):
        return "numpy:blocked", self.linear_attention, "numpy fast path: blocked over tokens"

    def linear_attention(self, q, k, v, *, feature_map, causal, key_mask, eps, chunk_size, method,
                         initial_state, return_state, xp):
        return _blocked.linear_attention(np, q, k, v, feature_map=feature_map, causal=causal, key_mask=key_mask,
                                         eps=eps, chunk_size=chunk_size, initial_state=initial_state,
                                         return_state=return_state, block=BLOCK)


ADAPTER = NumPyAdapter()
