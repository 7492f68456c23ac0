"""The JAX decoder step (see kernelattn/decoding.py): one jit-compiled step, the state donated.

:meth:`kernelattn.backends.jax.JAXAdapter.decoder` builds a :class:`JaxDecoder`
for :class:`kernelattn.LinearAttentionDecoder`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernelattn.decoding import decode_step
from kernelattn.feature_maps import FeatureMap

_FIELDS = ("phi", "xp", "eps", "dtype", "batch", "num_heads", "feature_dim", "value_dim")

_JAX_STEP = None


def _jax_step():
    # one compiled step for every decoder with a kernelattn map (a pytree)
    global _JAX_STEP
    if _JAX_STEP is None:
        _JAX_STEP = jax.jit(decode_step, static_argnames=("eps",), donate_argnums=(1, 2))
    return _JAX_STEP


class JaxDecoder:
    """The library half of a LinearAttentionDecoder on JAX arrays."""

    def __init__(self, dec, S, z):
        for name in _FIELDS:
            setattr(self, name, getattr(dec, name))
        self._init_jax(S, z)

    def state(self):
        return self._S, self._z

    # -- jax: one jit-compiled step, the state donated -------------------------------
    def _init_jax(self, S, z):
        self._S, self._z = jnp.array(S, copy=True), jnp.array(z, copy=True)  # donated: never the caller's
        if isinstance(self.phi, FeatureMap):  # a pytree: one compiled step for every decoder
            self._jit = _jax_step()
        else:  # a callable is no pytree, so close over it
            phi = self.phi
            fn = jax.jit(lambda _, S, z, q, k, v, mask, eps: decode_step(phi, S, z, q, k, v, mask, eps=eps),
                         static_argnames=("eps",), donate_argnums=(1, 2))
            self._jit = lambda phi, S, z, q, k, v, mask, eps: fn(None, S, z, q, k, v, mask, eps=eps)
        self._step = self._step_jax

    def _step_jax(self, q, k, v, key_mask):
        out, self._S, self._z = self._jit(self.phi, self._S, self._z, q, k, v, key_mask, eps=self.eps)
        return out
