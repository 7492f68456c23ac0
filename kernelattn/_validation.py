"""Input checks shared by the public functions: clear errors, named arguments.

Every refusal is a ValueError (a wrong value) or a TypeError (a wrong kind of
object) in one line that names the argument, shows what was received and
says what is allowed. The scalar checks also convert: NumPy scalars and 0-d
arrays are accepted wherever a Python number is, and come back as ``int``,
``float`` or ``bool``.
"""

from __future__ import annotations

import math
import operator

import numpy as np

from . import _compat

_FLOAT_NAMES = "float16, bfloat16, float32 or float64"
_ARRAY_LIBS = "NumPy, PyTorch, JAX, CuPy, Dask or any array-API library"


def short(value, limit: int = 60) -> str:
    """``repr(value)`` on one line, shortened; arrays of any rank > 0 by type, shape and dtype."""
    if _compat.is_array_api_obj(value) and getattr(value, "ndim", 0) != 0:
        return f"{type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, (tuple, list)) and any(_compat.is_array_api_obj(a) for a in value):
        inner = ", ".join(short(a, limit) for a in value)
        text = f"({inner}{',' if len(value) == 1 else ''})" if isinstance(value, tuple) else f"[{inner}]"
        return text if len(text) <= 3 * limit else text[: 3 * limit - 3] + "..."
    try:
        text = " ".join(repr(value).split())
    except Exception:  # a broken __repr__ must not hide the real error
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------
# scalars


def flag(name: str, value) -> bool:
    """A real boolean (``bool`` or ``numpy.bool_``): a string such as "False" is refused."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be a bool (True or False); got {short(value)}")


def _scalar(value):
    """A NumPy scalar or 0-d array unwrapped to a Python number; anything else as it is."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    return value


def number(name: str, value, *, low: float | None = None, strict: bool = False, high: float | None = None,
           high_strict: bool = True, finite: bool = True, allowed: str | None = None) -> float:
    """A real number as ``float``, checked against ``low`` (``> low`` if ``strict``) and ``high``.

    Accepts Python and NumPy ints and floats and 0-d arrays of them; refuses
    bools, strings, complex numbers and arrays of rank > 0 (TypeError), and
    NaN, infinities (unless ``finite=False``) and values out of range (ValueError).
    """
    if allowed is None:
        allowed = "a finite number" if finite else "a number"
        if low is not None:
            allowed += f" {'>' if strict else '>='} {low:g}"
        if high is not None:
            allowed += f"{' and' if low is not None else ''} {'<' if high_strict else '<='} {high:g}"
    raw = _scalar(value)
    if _compat.is_array_api_obj(raw) and getattr(raw, "ndim", None) == 0:
        try:  # 0-d arrays of other libraries (concrete values only, not traced ones)
            raw = float(raw)
        except Exception:
            raise TypeError(f"{name} must be {allowed} (a concrete value); got {short(value)}") from None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise TypeError(f"{name} must be {allowed}; got {short(value)}")
    x = float(raw)
    bad = math.isnan(x) or (finite and math.isinf(x))
    if low is not None:
        bad = bad or (x <= low if strict else x < low)
    if high is not None:
        bad = bad or (x >= high if high_strict else x > high)
    if bad:
        raise ValueError(f"{name} must be {allowed}; got {short(value)}")
    return x


def nonnegative(name: str, value) -> float:
    """A finite number >= 0 (eps, floor, lr, weight decay, penalty weights)."""
    return number(name, value, low=0.0)


def positive(name: str, value) -> float:
    """A finite number > 0 (scale, layer-norm eps)."""
    return number(name, value, low=0.0, strict=True)


def probability(name: str, value) -> float:
    """A dropout rate: a finite number in [0, 1)."""
    return number(name, value, low=0.0, high=1.0, allowed="a number in [0, 1)")


def integer(name: str, value, *, low: int | None = 1, allowed: str | None = None) -> int:
    """An integer as ``int`` (``operator.index``: NumPy ints and 0-d int arrays pass), ``>= low``."""
    if allowed is None:
        allowed = {1: "a positive integer", 0: "a non-negative integer", None: "an integer"}.get(
            low, f"an integer >= {low}")
    raw = _scalar(value)
    if isinstance(raw, bool):
        raise TypeError(f"{name} must be {allowed}; got {short(value)}")
    try:
        n = operator.index(raw)
    except TypeError:
        raise TypeError(f"{name} must be {allowed}; got {short(value)}") from None
    if low is not None and n < low:
        raise ValueError(f"{name} must be {allowed}; got {short(value)}")
    return n


def optional_integer(name: str, value, *, low: int | None = 1) -> int | None:
    return None if value is None else integer(name, value, low=low)


def choice(name: str, value, options, *, unknown: str | None = None) -> str:
    """One of the strings ``options``; ``unknown`` replaces the message for an unknown string."""
    listed = list(options)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {listed} (a string); got {short(value)}")
    if value not in listed:
        raise ValueError(unknown or f"{name} must be one of {listed}; got {short(value)}")
    return value


def rng(name: str, seed) -> np.random.Generator:
    """A NumPy Generator from ``seed``: None, a non-negative integer, or a Generator."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        return np.random.default_rng()
    return np.random.default_rng(integer(name, seed, low=0,
                                         allowed="None, a non-negative integer or a numpy.random.Generator"))


def positive_number(name, value):
    """Kept for callers of the old name: a finite number >= 0, as ``float``."""
    return nonnegative(name, value)


def positive_int(name, value):
    """A positive integer, as ``int``."""
    return integer(name, value, low=1)


# ---------------------------------------------------------------------------
# arrays


def array(name: str, a):
    """Raise a TypeError unless ``a`` is an array of some array-API library."""
    if not _compat.is_array_api_obj(a):
        raise TypeError(f"{name} must be an array ({_ARRAY_LIBS}); got {described(a)}")
    return a


def described(value) -> str:
    """``value`` for a message about its type: ``None``, or its type and a shortened repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return short(value)
    return f"a {type(value).__name__} {short(value, 40)}"


def namespace_of(**arrays):
    """The one namespace of the named arrays (``None`` ignored unless all are); a clear error otherwise."""
    libs = {}
    for name, a in arrays.items():
        if a is None:
            continue
        array(name, a)
        libs[name] = _compat.array_namespace(a)
    if not libs:
        name = next(iter(arrays), "the input")
        raise TypeError(f"{name} must be an array ({_ARRAY_LIBS}); got None")
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


#: the axis orders the attention functions take: (batch, heads, tokens, features) or (batch, tokens, heads, features)
LAYOUTS = ("BHND", "BNHD")


def layout_hint(layout: str, name: str = "q") -> str:
    """The axes of ``name`` (q, k or v) in ``layout``, and how to pass the other layout (for shape errors)."""
    n, f = {"q": ("N", "d"), "k": ("L", "d"), "v": ("L", "e")}[name]
    axes = {"BHND": f"(B, H, {n}, {f})", "BNHD": f"(B, {n}, H, {f})"}
    other = "BNHD" if layout == "BHND" else "BHND"
    return f"{axes[layout]} [layout={layout!r}; pass layout={other!r} for {axes[other]}]"


def check_attention_inputs(q, k, v, *, key_mask=None, causal=False, layout="BHND"):
    """Validate queries, keys and values in ``layout``, a (B, L) mask and ``causal``.

    With ``layout="BHND"`` (the default) q is (B, H, N, d), k (B, H, L, d) and
    v (B, H, L, e); with ``"BNHD"`` the head and token axes are swapped:
    (B, N, H, d), (B, L, H, d), (B, L, H, e). Messages show the shapes as given.
    Returns the namespace.
    """
    layout = choice("layout", layout, LAYOUTS)
    for name, a in (("q", q), ("k", k), ("v", v)):
        array(name, a)
    flag("causal", causal)
    xp = namespace_of(q=q, k=k, v=v, key_mask=key_mask)
    h_ax, n_ax = (1, 2) if layout == "BHND" else (2, 1)
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.ndim != 4:
            raise ValueError(f"{name} must have 4 dimensions {layout_hint(layout, name)}; got shape {tuple(a.shape)}")
        real_floating(xp, name, a)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, N, d = q.shape[0], q.shape[h_ax], q.shape[n_ax], q.shape[3]
    L = k.shape[n_ax]
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[h_ax] != H or v.shape[h_ax] != H:
        raise ValueError(f"head counts differ (axis {h_ax}, layout={layout!r}): q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != d:
        raise ValueError(f"q and k must share the head dim d: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if v.shape[n_ax] != L:
        raise ValueError(f"k and v must have the same length L (axis {n_ax}, layout={layout!r}): "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if causal and N != L:
        raise ValueError(f"causal attention needs as many queries as keys (N = L); "
                         f"got N={N}, L={L}")
    if key_mask is not None:
        if key_mask.ndim != 2 or key_mask.shape[0] != B or key_mask.shape[1] != L:
            raise ValueError(f"key_mask must have shape (B, L) = ({B}, {L}); "
                             f"got {tuple(key_mask.shape)}")
        if not xp.isdtype(key_mask.dtype, "bool"):
            raise TypeError(f"key_mask must be boolean (True = a real key); got {key_mask.dtype}")
    same_device(q=q, k=k, v=v, key_mask=key_mask)
    return xp


def to_bhnd(xp, layout, *arrays):
    """``arrays`` in (B, H, N, d) order: swapped axes 1 and 2 for ``layout="BNHD"``, as they are otherwise."""
    if layout == "BHND":
        return arrays
    return tuple(None if a is None else xp.permute_dims(a, (0, 2, 1, 3)) for a in arrays)


def feature_size(phi, q):
    """m, the width phi gives, when it is known without running phi (None for callables)."""
    if phi is None:
        return None
    return phi.width(q.shape[-1]) if hasattr(phi, "width") else getattr(phi, "feature_dim", None)


def check_state(state, q, *, B, H, e, m=None, name="state"):
    """A decoding state (S, z): S (B, H, m, e), z (B, H, m), real floating, with q's library and device."""
    if state is None:
        return None
    if not (isinstance(state, tuple) and len(state) == 2):
        raise TypeError(f"{name} must be a LinearAttentionState (S, z) of two arrays; got {short(state)}")
    S, z = state
    array(f"{name}.S", S)
    array(f"{name}.z", z)
    xp = namespace_of(**{"q": q, f"{name}.S": S, f"{name}.z": z})
    same_device(**{"q": q, f"{name}.S": S, f"{name}.z": z})
    for part, a in (("S", S), ("z", z)):
        if not xp.isdtype(a.dtype, "real floating"):
            raise TypeError(f"{name}.{part} must have a real floating dtype ({_FLOAT_NAMES}); got {a.dtype}")
    want_m = "m" if m is None else str(m)
    if (S.ndim != 4 or S.shape[0] != B or S.shape[1] != H or S.shape[3] != e
            or (m is not None and S.shape[2] != m)):
        why = "" if m is None else f" (m is the feature map's feature size, {m})"
        raise ValueError(f"{name}.S must have shape (B, H, m, e) = ({B}, {H}, {want_m}, {e}){why}; "
                         f"got {tuple(S.shape)}")
    if z.ndim != 3 or tuple(z.shape) != tuple(S.shape[:3]):
        raise ValueError(f"{name}.z must have shape (B, H, m) = {tuple(S.shape[:3])}; got {tuple(z.shape)}")
    return state


def check_features(y, x, *, role: str):
    """The output of a user's feature map: an array (B, H, N, m) with the leading dims of ``x``."""
    which = "feature_map" if role == "query" else "feature_map's key map"
    lead = tuple(x.shape[:3])
    want = "(" + ", ".join(str(n) for n in lead) + ", m)"
    if not _compat.is_array_api_obj(y):
        raise TypeError(f"{which} must return an array of shape (B, H, N, m) = {want}; got {short(y)}")
    if y.ndim != 4 or tuple(y.shape[:3]) != lead:
        raise ValueError(f"{which} must map (B, H, N, d) = {tuple(x.shape)} to (B, H, N, m) = {want}; "
                         f"got shape {tuple(y.shape)}")
    xp = _compat.array_namespace(y)
    if not xp.isdtype(y.dtype, "real floating"):
        raise TypeError(f"{which} must return a real floating array ({_FLOAT_NAMES}); got dtype {y.dtype}")
    return y
