"""Input checks shared by the public functions: clear errors, named arguments."""

from __future__ import annotations

from . import _compat

_FLOAT_NAMES = "float16, bfloat16, float32 or float64"


def namespace_of(**arrays):
    """The one namespace of the named arrays (``None`` ignored); a clear error otherwise."""
    libs = {}
    for name, a in arrays.items():
        if a is None:
            continue
        if not _compat.is_array_api_obj(a):
            raise TypeError(f"{name} must be an array (NumPy, PyTorch, JAX, CuPy, Dask or any "
                            f"array-API library); got {type(a).__name__}")
        libs[name] = _compat.array_namespace(a)
    names = {n: _compat.library_name(x) for n, x in libs.items()}
    if len(set(names.values())) > 1:
        detail = ", ".join(f"{n} is {lib}" for n, lib in names.items())
        raise TypeError(f"arrays from different libraries in one call ({detail}); "
                        f"convert them to one library first")
    return next(iter(libs.values()))


def same_device(**arrays):
    """Raise if the named arrays live on different devices (unknown devices are skipped)."""
    seen = None
    for name, a in arrays.items():
        if a is None:
            continue
        dev = _device_or_none(a)
        if dev is None:
            continue
        if seen is None:
            seen = (name, dev)
        elif not _same(dev, seen[1]):
            raise ValueError(f"{name} is on device {dev!r} but {seen[0]} is on {seen[1]!r}; "
                             f"move them to one device first")
    return None if seen is None else seen[1]


def _device_or_none(a):
    try:
        return _compat.device(a)
    except Exception:  # abstract tracers may not know their device
        return None


def _same(a, b):
    try:
        return bool(a == b)
    except Exception:
        return str(a) == str(b)


def real_floating(xp, name, a):
    if not xp.isdtype(a.dtype, "real floating"):
        raise TypeError(f"{name} must have a real floating dtype ({_FLOAT_NAMES}); got {a.dtype}")


def check_ndim(name, a, ndim, axes):
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {axes}; got shape {tuple(a.shape)}")


def positive_number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number; got {value!r}")


def positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")


def check_attention_inputs(q, k, v, *, key_mask=None, causal=False):
    """Validate (B, H, N, d) queries, (B, H, L, d) keys, (B, H, L, e) values and a (B, L) mask.

    Returns the namespace.
    """
    xp = namespace_of(q=q, k=k, v=v, key_mask=key_mask)
    for name, a in (("q", q), ("k", k), ("v", v)):
        check_ndim(name, a, 4, "(B, H, N, d)" if name == "q" else "(B, H, L, d)")
        real_floating(xp, name, a)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, N, d = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] != H or v.shape[1] != H:
        raise ValueError(f"head counts differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != d:
        raise ValueError(f"q and k must share the head dim d: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"k and v must have the same length L: k {tuple(k.shape)}, v {tuple(v.shape)}")
    if causal and N != k.shape[2]:
        raise ValueError(f"causal attention needs as many queries as keys (N = L); "
                         f"got N={N}, L={k.shape[2]}")
    if key_mask is not None:
        if key_mask.ndim != 2 or key_mask.shape[0] != B or key_mask.shape[1] != k.shape[2]:
            raise ValueError(f"key_mask must have shape (B, L) = ({B}, {k.shape[2]}); "
                             f"got {tuple(key_mask.shape)}")
        if not xp.isdtype(key_mask.dtype, "bool"):
            raise TypeError(f"key_mask must be boolean (True = a real key); got {key_mask.dtype}")
    same_device(q=q, k=k, v=v, key_mask=key_mask)
    return xp
