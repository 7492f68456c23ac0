"""The numpy adapter.

No hand-tuned path yet: every operation runs the array-API core on numpy
arrays, which is correct and tested; fast paths are added here as methods
with the core functions' signatures.
"""

from __future__ import annotations

from kernelattn.backends._base import Adapter


class NumPyAdapter(Adapter):
    name = "numpy"
    library = "numpy"


ADAPTER = NumPyAdapter()
