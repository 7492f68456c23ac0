"""Feature maps: the paper's trainable feedforward kernels and fixed maps to compare with.

A :class:`FeatureMap` is a callable ``phi(x)`` mapping (B, H, N, d) to
(B, H, N, m), head by head. It holds a static description (:class:`FeatureMapSpec`)
and a tree of parameters in the caller's array library; torch autograd and JAX
transformations see through it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace as _dc_replace

import numpy as np

from . import _compat, _convert, _tree, _validation, kinds as _kinds
from ._agnostic import feature_maps as _core
from ._agnostic._utils import cast, compute_dtype

__all__ = [
    "FeatureMap",
    "FeatureMapSpec",
    "KINDS",
    "feature_map",
    "num_params",
    "orthogonality_penalty",
]

class _KindNames(Mapping):
    """Kind name -> description, read live from the registry (kernelattn/kinds.py)."""

    def __getitem__(self, name):
        kind = _kinds.get(name)
        if kind is None:
            raise KeyError(name)
        return kind.description

    def __iter__(self):
        return iter(_kinds.names())

    def __len__(self):
        return len(_kinds.names())

    def __repr__(self):
        return repr(dict(self))


#: Feature-map kinds and what they are (built-in ones and those added by
#: :func:`kernelattn.register_feature_map`).
KINDS = _KindNames()
_ROLES = ("query", "key")


def _kind(name) -> "_kinds.Kind":
    kind = _kinds.get(name)
    if kind is None:
        raise ValueError(f"feature-map kind {name!r} is not registered; known: {sorted(KINDS)}")
    return kind


def describe(spec) -> list[str]:
    """The ``key=value`` parts that show a spec (FeatureMap reprs, the torch module's extra_repr)."""
    kind = _kinds.get(spec.kind)
    parts = []
    if spec.num_heads is not None:
        parts += [f"num_heads={spec.num_heads}", f"head_dim={spec.head_dim}", f"feature_dim={spec.feature_dim}"]
    if kind is not None and kind.stackable:
        parts.append(f"depth={spec.depth}")
    if kind is not None and "rank" in kind.options:
        parts.append(f"rank={spec.rank}")
    if spec.bias:
        parts.append("bias=True")
    if not spec.tied:
        parts.append("tied=False")
    return parts


@dataclass(frozen=True)
class FeatureMapSpec:
    """Static description of a feature map (hashable; JAX keeps it as aux data).

    Attributes
    ----------
    kind : str
        One of :data:`KINDS`.
    num_heads, head_dim : int or None
        H and d the map was built for (None for shape-free maps such as ``"elu"``).
    feature_dim : int or None
        m, the output width.
    depth : int
        Number of stacked blocks (ffn, glu, aoglu).
    rank : int or None
        Gate rank r of ``"aoglu"``.
    bias : bool
        Whether blocks carry biases.
    tied : bool
        Whether queries and keys share one map (the paper's default).
    """

    kind: str
    num_heads: int | None = None
    head_dim: int | None = None
    feature_dim: int | None = None
    depth: int = 1
    rank: int | None = None
    bias: bool = False
    tied: bool = True


class FeatureMap:
    """A head-wise feature map with its parameters; build one with :func:`feature_map`.

    Calling ``phi(x)`` applies the query map (the only map when tied);
    ``phi.key(x)`` applies the key map. ``phi.params`` is a dict of lists of
    block dicts: ``{"shared": [...]}`` when tied, ``{"query": [...], "key":
    [...]}`` otherwise; each block holds arrays named ``W`` (H, d_in, d_out),
    ``G``, ``A`` (H, d_in, r), ``B`` (H, r, d_out), ``b`` and ``c`` (H, d_out).
    ``phi.buffers`` holds fixed arrays (FAVOR+'s projection ``omega`` (H, d, m)).
    """

    __slots__ = ("spec", "params", "buffers")

    def __init__(self, spec: FeatureMapSpec, params=None, buffers=None):
        self.spec = spec
        self.params = {} if params is None else params
        self.buffers = {} if buffers is None else buffers
        _register_pytrees()

    # -- static facts -------------------------------------------------------
    kind = property(lambda self: self.spec.kind)
    num_heads = property(lambda self: self.spec.num_heads)
    head_dim = property(lambda self: self.spec.head_dim)
    feature_dim = property(lambda self: self.spec.feature_dim)
    depth = property(lambda self: self.spec.depth)
    tied = property(lambda self: self.spec.tied)

    def blocks(self, role: str = "query") -> list:
        """The parameter blocks applied to ``role`` (``"query"`` or ``"key"``)."""
        if role not in _ROLES:
            raise ValueError(f"role must be 'query' or 'key'; got {role!r}")
        if "shared" in self.params:
            return self.params["shared"]
        return self.params.get(role, [])

    def parameters(self) -> list:
        """The trainable arrays, in a fixed order."""
        return _tree.leaves(self.params)

    def main_weights(self) -> list:
        """The main weights ``W`` of every block (those the orthogonality penalty sees)."""
        return [block["W"] for role in sorted(self.params) for block in self.params[role]]

    @property
    def definition(self) -> "_kinds.Kind":
        """The :class:`kernelattn.kinds.Kind` record of this map's kind."""
        return _kind(self.spec.kind)

    @property
    def form(self) -> str | None:
        """The hand-written form adapters may run for this kind (None: its array-API forward)."""
        return self.definition.form

    def width(self, d: int) -> int:
        """m, the number of features for inputs of width ``d``."""
        return self.spec.feature_dim if self.spec.feature_dim is not None else self.definition.feature_dim(d)

    # -- applying -------------------------------------------------------------
    def apply(self, x, *, role: str, xp):
        """Core entry: ``x`` (B, H, N, d) already in the compute dtype; no checks."""
        return self.definition.forward(x, self.blocks(role), self.buffers, xp=xp)

    def vjp(self, x, *, role: str, xp):
        """Core entry of the hand gradient: ``(phi(x), back)``, ``back(gy) -> (gx, gblocks)``; no checks."""
        kind = self.definition
        if kind.vjp is None:
            raise ValueError(f"feature-map kind {kind.name!r} has no hand-derived gradient (register it with "
                             f"vjp=...); use torch autograd or jax.grad for it")
        return kind.vjp(x, self.blocks(role), self.buffers, xp=xp)

    def __call__(self, x, /):
        """Apply the (query) map to ``x`` of shape (B, H, N, d); returns (B, H, N, m) in x's dtype."""
        return self._call(x, "query")

    def query(self, x, /):
        """Apply the query map to ``x`` (B, H, N, d)."""
        return self._call(x, "query")

    def key(self, x, /):
        """Apply the key map to ``x`` (B, H, N, d)."""
        return self._call(x, "key")

    def _call(self, x, role):
        xp = _validation.namespace_of(x=x)
        _validation.check_ndim("x", x, 4, "(B, H, N, d)")
        _validation.real_floating(xp, "x", x)
        self.check_compatible(x, name="x")
        cdt = compute_dtype(x.dtype, xp=xp)
        return cast(self.apply(cast(x, cdt, xp=xp), role=role, xp=xp), x.dtype, xp=xp)

    def check_compatible(self, x, *, name: str = "q") -> None:
        """Raise a clear error if ``x`` (B, H, N, d) does not fit this map."""
        H, d = x.shape[1], x.shape[3]
        if self.num_heads is not None and H != self.num_heads:
            raise ValueError(f"feature map {self.kind!r} was built for num_heads={self.num_heads}, "
                             f"but {name} has {H} heads (shape {tuple(x.shape)})")
        if self.head_dim is not None and d != self.head_dim:
            raise ValueError(f"feature map {self.kind!r} was built for head_dim={self.head_dim}, "
                             f"but {name} has d={d} (shape {tuple(x.shape)})")
        arrays = _check_leaves(self)
        if not arrays:
            return
        lib_x = _compat.library_name(_compat.array_namespace(x))
        lib_p = _compat.library_name(_compat.array_namespace(arrays[0]))
        if lib_x != lib_p:
            raise TypeError(f"feature map parameters are {lib_p} arrays but {name} is a {lib_x} "
                            f"array; build the map with like={name} or convert it with "
                            f"phi.to(like={name})")
        _validation.same_device(**{name: x, "feature map parameters": arrays[0]})

    # -- functional updates ---------------------------------------------------
    def replace(self, *, params=None, buffers=None) -> "FeatureMap":
        """A copy with new ``params`` and/or ``buffers`` (same structure)."""
        return FeatureMap(self.spec, self.params if params is None else params,
                          self.buffers if buffers is None else buffers)

    def to(self, *, like=None, xp=None, device=None, dtype=None) -> "FeatureMap":
        """A copy with every array moved to another library, device or dtype.

        Parameters
        ----------
        like : array, optional
            Take this array's library, device and dtype.
        xp, device, dtype : optional
            Override them. Whatever is not given stays as it is (the map's own
            library, device and dtype), so ``phi.to(dtype=torch.float64)``
            changes only the dtype of a torch map.
        """
        arrays = _tree.leaves(self.params) + _tree.leaves(self.buffers)
        if not arrays:
            return self
        here = _compat.array_namespace(arrays[0])
        if like is None and xp is None:
            xp = here
            device = _compat.device(arrays[0]) if device is None else device
        if like is None and dtype is None:
            name = str(arrays[0].dtype).rsplit(".", 1)[-1]
            target = xp if xp is not None else here
            dtype = name if hasattr(target, name) else None
        xp, device, dtype = _placement(like, xp, device, dtype)
        same_library = _compat.library_name(xp) == _compat.library_name(here)

        def move(a):
            if same_library:  # stay in the library: keeps autograd history, no host round trip
                if device is not None and str(_compat.device(a)) != str(device):
                    a = _compat.to_device(a, device)
                return a if a.dtype == dtype else xp.astype(a, dtype)
            return _convert.from_numpy(_convert.to_numpy(a), xp=xp, device=device, dtype=dtype)

        return FeatureMap(self.spec, _tree.tree_map(move, self.params), _tree.tree_map(move, self.buffers))

    def __repr__(self):
        parts = [f"kind={self.spec.kind!r}", *describe(self.spec)]
        arrays = _tree.leaves(self.params) + _tree.leaves(self.buffers)
        if arrays:
            a = arrays[0]
            lib = _compat.library_name(_compat.array_namespace(a))
            parts.append(f"params={num_params(self):,} ({lib}, {a.dtype})")
        return f"FeatureMap({', '.join(parts)})"


def _check_leaves(phi) -> list:
    """The arrays of ``phi`` (params, then buffers); a TypeError naming the first leaf that is not one."""
    arrays = []
    for part in ("params", "buffers"):
        for path, leaf in _tree_paths(getattr(phi, part), part):
            if not _compat.is_array_api_obj(leaf):
                raise TypeError(f"feature map {path} must be an array; got {_validation.short(leaf)}")
            arrays.append(leaf)
    return arrays


def _tree_paths(tree, prefix):
    # (path, leaf) in the order of _tree.leaves
    if isinstance(tree, dict):
        for key in sorted(tree):
            yield from _tree_paths(tree[key], f"{prefix}[{key!r}]")
    elif isinstance(tree, (list, tuple)):
        for i, item in enumerate(tree):
            yield from _tree_paths(item, f"{prefix}[{i}]")
    elif tree is not None:
        yield prefix, tree


class CallableFeatureMap:
    """Wraps user callables (one, or a (query, key) pair) to the core's interface.

    Their outputs are checked (an array (B, H, N, m) with the input's leading
    dims, one m for queries and keys) so that a wrong map fails here, named,
    not inside the attention products.
    """

    __slots__ = ("query_fn", "key_fn", "_widths")
    kind = "callable"
    form = None
    num_heads = head_dim = feature_dim = None

    def width(self, d):
        return None  # only a call can tell

    def vjp(self, x, *, role, xp):
        raise ValueError("no hand-derived gradient for a callable feature map; use torch autograd or jax.grad")

    def __init__(self, query_fn, key_fn=None):
        self.query_fn = query_fn
        self.key_fn = query_fn if key_fn is None else key_fn
        self._widths = {}

    def apply(self, x, *, role, xp):
        pair = self.key_fn is not self.query_fn
        y = _validation.check_features((self.query_fn if role == "query" else self.key_fn)(x), x,
                                       role=role if pair else "query")
        if pair:
            m, other = y.shape[-1], self._widths.get("key" if role == "query" else "query")
            if other is not None and other != m:
                got = {role: m, ("key" if role == "query" else "query"): other}
                raise ValueError(f"feature_map's query and key maps must give the same feature size m; "
                                 f"got m={got['query']} for queries and m={got['key']} for keys")
            self._widths[role] = m
        return y

    def check_compatible(self, x, *, name="q"):
        return None


def as_feature_map(feature_map):
    """Normalise what ``linear_attention(feature_map=...)`` accepts to a map object."""
    if isinstance(feature_map, (FeatureMap, CallableFeatureMap)):
        return feature_map
    if isinstance(feature_map, str):
        kind = _kinds.get(feature_map)
        if kind is not None and not kind.needs_shape:
            return FeatureMap(FeatureMapSpec(feature_map))
        if kind is not None:
            raise ValueError(f"feature_map={feature_map!r} has parameters; build it first with "
                             f"ka.feature_map({feature_map!r}, num_heads=H, head_dim=d, seed=...)")
        raise ValueError(f"unknown feature map {feature_map!r}; expected one of {sorted(KINDS)}, "
                         f"a FeatureMap, or a callable")
    if isinstance(feature_map, tuple) and len(feature_map) == 2 and all(map(callable, feature_map)):
        return CallableFeatureMap(*feature_map)
    if isinstance(feature_map, tuple):
        raise TypeError(f"feature_map as a tuple must be a (query map, key map) pair of callables; "
                        f"got {_validation.short(feature_map)}")
    if hasattr(feature_map, "as_feature_map"):  # framework modules (torch, flax)
        return feature_map.as_feature_map()
    if callable(feature_map):
        return CallableFeatureMap(feature_map)
    raise TypeError(f"feature_map must be a FeatureMap, a kind name, a callable or a "
                    f"(query, key) pair of callables; got {_validation.short(feature_map)}")


# ---------------------------------------------------------------------------
# construction


def _placement(like, xp, device, dtype):
    """Resolve (namespace, device, dtype) from ``like`` and explicit overrides."""
    if like is not None:
        lxp = _validation.namespace_of(like=like)
        xp = lxp if xp is None else xp
        if device is None:
            device = _compat.device(like)
        if dtype is None and lxp.isdtype(like.dtype, "real floating"):
            dtype = like.dtype
    if xp is None:
        xp = _compat.numpy_namespace()
    elif not hasattr(xp, "asarray"):
        raise TypeError(f"xp must be an array namespace; got {xp!r}")
    else:
        xp = _compat.array_namespace(xp.asarray(0.0))  # e.g. plain numpy -> its array-API wrapper
    if isinstance(dtype, str):
        if not hasattr(xp, dtype):
            raise ValueError(f"dtype {dtype!r} is not a dtype of {_compat.library_name(xp)}")
        dtype = getattr(xp, dtype)
    if dtype is None:
        dtype = xp.float32
    if not xp.isdtype(dtype, "real floating"):
        raise TypeError(f"dtype must be a real floating dtype; got {dtype}")
    return xp, device, dtype


def _rng(seed) -> np.random.Generator:
    return _validation.rng("seed", seed)


def _orthogonal(rng, heads, d_in, d_out):
    """Per-head (semi-)orthogonal (heads, d_in, d_out): Q of a Gaussian's QR, signs fixed."""
    out = np.empty((heads, d_in, d_out))
    for h in range(heads):
        a = rng.standard_normal((max(d_in, d_out), min(d_in, d_out)))
        q, r = np.linalg.qr(a)
        q = q * np.sign(np.diag(r))
        out[h] = q if d_in >= d_out else q.T
    return out


def _he_normal(rng, shape, fan_in):
    return rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)


def _favor_projection(rng, heads, d, m):
    """Orthogonal random features: blocks of d orthogonal rows, rows scaled to chi(d) norms."""
    out = np.empty((heads, d, m))
    for h in range(heads):
        blocks = []
        for _ in range(-(-m // d)):
            q, _r = np.linalg.qr(rng.standard_normal((d, d)))
            blocks.append(q.T)
        w = np.concatenate(blocks, axis=0)[:m]  # (m, d) orthonormal rows
        norms = np.linalg.norm(rng.standard_normal((m, d)), axis=1)
        out[h] = (w * norms[:, None]).T
    return out


def draw(rng, param: "_kinds.Param") -> np.ndarray:
    """A NumPy value for ``param`` by its rule (kernelattn/kinds.py lists them); float64."""
    shape, rule = tuple(param.shape), param.init
    if rule == "orthogonal":
        return _orthogonal(rng, *shape)
    if rule == "he_normal":
        return _he_normal(rng, shape, shape[-2])
    if rule == "zeros":
        return np.zeros(shape)
    if rule == "eye":
        return np.broadcast_to(np.eye(shape[-2], shape[-1]), shape).copy()
    if rule == "favor":
        return _favor_projection(rng, *shape)
    raise ValueError(f"unknown initialisation rule {rule!r}; expected one of {list(_kinds.INIT_RULES)}")


def layout(spec: FeatureMapSpec):
    """``(params, buffers)`` of a spec as :class:`kernelattn.kinds.Param` trees (shapes and rules).

    ``params`` is ``{"shared": [...]}`` or ``{"query": [...], "key": [...]}`` (empty for fixed maps).
    """
    kind = _kind(spec.kind)
    params = {}
    if kind.params is not None:
        def blocks():
            return [{name: _kinds.Param(*p) for name, p in block.items()} for block in kind.params(spec)]

        params = {"shared": blocks()} if spec.tied else {"query": blocks(), "key": blocks()}
    buffers = {} if kind.buffers is None else {name: _kinds.Param(*p) for name, p in kind.buffers(spec).items()}
    return params, buffers


def feature_map(
    kind: str,
    *,
    num_heads: int | None = None,
    head_dim: int | None = None,
    feature_dim: int | None = None,
    depth: int = 1,
    rank: int | None = None,
    bias: bool = False,
    tied: bool = True,
    seed=None,
    like=None,
    xp=None,
    device=None,
    dtype=None,
) -> FeatureMap:
    """Build a head-wise feature map phi: (B, H, N, d) -> (B, H, N, m).

    Parameters
    ----------
    kind : {"ffn", "glu", "aoglu", "hedgehog", "elu", "relu", "favor"} or a registered name
        The map (see :data:`KINDS`). ``ffn``, ``glu`` and ``aoglu`` are the
        paper's trainable kernels; ``hedgehog`` is trainable too; ``elu``,
        ``relu`` and ``favor`` are fixed. :func:`kernelattn.register_feature_map`
        adds kinds.
    num_heads, head_dim : int
        H and d. Required except for ``"elu"`` and ``"relu"``.
    feature_dim : int, optional
        m. Default d (2d for ``"hedgehog"``, which must be even).
    depth : int, default 1
        Blocks stacked for ffn / glu / aoglu (the first d -> m, then m -> m);
        only the last carries Softplus.
    rank : int, optional
        Gate rank of ``"aoglu"``; default max(1, d // 4).
    bias : bool, default False
        Add a bias to every block (and to GLU gates).
    tied : bool, default True
        One map for queries and keys (the paper's choice) or two independent ones.
    seed : int, numpy.random.Generator or None
        Source of the initial weights, drawn in NumPy so that a seed gives the
        same map on every backend. Main weights are orthogonal per head, gates
        He-normal, biases zero; FAVOR+ draws orthogonal random features.
    like : array, optional
        Place parameters in this array's library, on its device, in its dtype.
    xp, device, dtype : optional
        Override the namespace, device or dtype (default NumPy, float32).

    Returns
    -------
    FeatureMap

    Examples
    --------
    >>> import numpy as np, kernelattn as ka
    >>> x = np.ones((2, 8, 5, 64), dtype=np.float32)
    >>> phi = ka.feature_map("glu", num_heads=8, head_dim=64, seed=0, like=x)
    >>> phi(x).shape, ka.num_params(phi)
    ((2, 8, 5, 64), 65536)
    """
    kind = _validation.choice("kind", kind, sorted(KINDS), unknown=f"unknown feature-map kind {kind!r}; "
                              f"expected one of {sorted(KINDS)}" if isinstance(kind, str) else None)
    depth = _validation.integer("depth", depth)
    bias, tied = _validation.flag("bias", bias), _validation.flag("tied", tied)
    num_heads, head_dim, feature_dim, rank = (_validation.optional_integer(name, value) for name, value in (
        ("num_heads", num_heads), ("head_dim", head_dim), ("feature_dim", feature_dim), ("rank", rank)))
    rng = _rng(seed)  # before any work: a bad seed is an argument error like the others
    info = _kind(kind)
    if depth != 1 and not info.stackable:
        stackable = ", ".join(repr(k) for k in KINDS if _kinds.get(k).stackable)
        raise ValueError(f"depth applies to stackable kinds ({stackable}); {kind!r} has one block, got depth={depth}")
    if info.needs_shape:
        if num_heads is None or head_dim is None:
            raise ValueError(f"feature map {kind!r} needs num_heads and head_dim")
    elif feature_dim is not None and head_dim is not None and feature_dim != info.feature_dim(head_dim):
        raise ValueError(f"{kind!r} has no weights, so its width is fixed (m = {info.feature_dim(head_dim)} for "
                         f"d = {head_dim}); got feature_dim={feature_dim}")
    elif feature_dim is not None and head_dim is None:
        raise ValueError(f"{kind!r} has no weights, so its width is fixed by d; got feature_dim={feature_dim}")
    if feature_dim is None and head_dim is not None:
        feature_dim = info.feature_dim(head_dim)
    if rank is not None and "rank" not in info.options:
        takers = ", ".join(repr(k) for k in KINDS if "rank" in _kinds.get(k).options)
        raise ValueError(f"rank applies to {takers} only; got rank={rank} for {kind!r}")
    if not info.trainable:
        if bias:
            raise ValueError(f"{kind!r} has no weights, so no bias")
        if not tied:
            raise ValueError(f"{kind!r} is a fixed map; tied=False applies to trainable kernels")
    spec = FeatureMapSpec(kind, num_heads, head_dim, feature_dim, depth, rank, bool(bias), bool(tied))
    if info.check is not None:
        spec = info.check(spec)

    xp, device, dtype = _placement(like, xp, device, dtype)
    param_layout, buffer_layout = layout(spec) if info.needs_shape else ({}, {})
    # drawn in order (query blocks, then key blocks, then buffers), so a seed gives one map everywhere
    params = {role: [{name: draw(rng, p) for name, p in block.items()} for block in blocks]
              for role, blocks in param_layout.items()}
    buffers = {name: draw(rng, p) for name, p in buffer_layout.items()}

    def put(a):
        return _convert.from_numpy(a, xp=xp, device=device, dtype=dtype)

    return FeatureMap(spec, _tree.tree_map(put, params), _tree.tree_map(put, buffers))


def num_params(phi) -> int:
    """Number of trainable scalars of a feature map (0 for fixed maps).

    Examples
    --------
    >>> import kernelattn as ka
    >>> ka.num_params(ka.feature_map("aoglu", num_heads=8, head_dim=64, depth=3, seed=0))
    147456
    """
    if hasattr(phi, "as_feature_map"):
        phi = phi.as_feature_map()
    if not isinstance(phi, FeatureMap):
        raise TypeError(f"num_params expects a FeatureMap; got {_validation.short(phi)}")
    _check_leaves(phi)
    return sum(math.prod(a.shape) for a in phi.parameters())


def orthogonality_penalty(phi, *, weight: float = 1.0):
    """The paper's regulariser: ``weight * sum_blocks mean_{h,i,j} ((W_h W_h^T - I)_{ij})^2``.

    Only main weights ``W`` enter (gates do not). A 0-d array in the
    parameters' library, differentiable by torch and JAX; ``0.0`` for maps
    without weights. The authors add it once per phi call (twice per layer,
    for the query and the key pass); that choice is the caller's.

    Examples
    --------
    >>> import kernelattn as ka
    >>> phi = ka.feature_map("glu", num_heads=2, head_dim=8, seed=0)
    >>> float(ka.orthogonality_penalty(phi)) < 1e-10   # orthogonal at init
    True
    """
    if hasattr(phi, "as_feature_map"):
        phi = phi.as_feature_map()
    if not isinstance(phi, FeatureMap):
        raise TypeError(f"orthogonality_penalty expects a FeatureMap; got {_validation.short(phi)}")
    if not _compat.is_array_api_obj(weight) or isinstance(weight, np.ndarray):  # arrays may be traced
        weight = _validation.nonnegative("weight", weight)
    _check_leaves(phi)
    weights = phi.main_weights()
    if not weights:
        return 0.0
    xp = _compat.array_namespace(*weights)
    return weight * _core.orthogonality_penalty(weights, xp=xp)


# ---------------------------------------------------------------------------
# JAX pytrees: the JAX adapter (backends/jax.py) registers FeatureMap when it is imported

_PYTREES_REGISTERED = False  # set by backends/jax.py


def _register_pytrees() -> None:
    """Make FeatureMap a JAX pytree once JAX has been imported by someone (importing nothing otherwise)."""
    if _PYTREES_REGISTERED or "jax" not in sys.modules:
        return
    from . import _dispatch

    _dispatch.adapter_for("jax")

