"""Moving arrays between libraries (only where the user asks for it)."""

from __future__ import annotations

import numpy as np

from . import _compat


def to_numpy(x) -> np.ndarray:
    """A NumPy copy (or view) of any supported array; gradients are detached."""
    if isinstance(x, np.ndarray):
        return x
    if not _compat.is_array_api_obj(x):
        return np.asarray(x)
    xp = _compat.array_namespace(x)
    lib = _compat.library_name(xp)
    if lib == "torch":
        x = x.detach()
        if x.dtype.is_floating_point and x.element_size() == 2:
            x = x.float()
        return x.cpu().numpy()
    if lib == "cupy":
        return x.get()
    if lib == "dask":
        return np.asarray(x.compute())
    if lib == "jax":
        return np.asarray(x)
    try:
        return np.from_dlpack(x)
    except Exception:
        return np.asarray(x)


def from_numpy(a: np.ndarray, *, xp, device=None, dtype=None):
    """``a`` as an array of namespace ``xp`` on ``device`` with ``dtype``."""
    wide = dtype is not None and dtype == getattr(xp, "float64", None)
    a = np.ascontiguousarray(a, dtype=np.float64 if wide else np.float32)
    out = xp.asarray(a, device=device) if device is not None else xp.asarray(a)
    if dtype is not None and out.dtype != dtype:
        out = xp.astype(out, dtype)
    return out
