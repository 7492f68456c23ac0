"""The jax adapter.

No hand-tuned path yet: every operation runs the array-API core on jax
arrays, which is correct and tested; fast paths are added here as methods
with the core functions' signatures.
"""

from __future__ import annotations

from kernelattn.backends._base import Adapter


class JAXAdapter(Adapter):
    name = "jax"
    library = "jax"


ADAPTER = JAXAdapter()

# Importing this module means JAX is in use: make FeatureMap a pytree.
from kernelattn.feature_maps import _register_pytrees  # noqa: E402

_register_pytrees()
