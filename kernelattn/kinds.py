"""The feature-map kinds: one record per kind, and the one place that knows a kind by its name.

A :class:`Kind` holds everything the rest of the package needs about a map:
its array-API forward, its hand-derived VJP (for training without autodiff),
its parameters (shapes and initialisation rules), its default width m, the
options it takes, a float64 reference written apart from the forward (what
the tests compare every path with), and the name of its *form*: the adapters
keep hand-written versions of some forms (``backends/_torch_fmap.py``,
``backends/_blocked.py``) and look them up by that name. A kind without a
form runs its array-API forward on every backend.

:func:`register_feature_map` (``ka.register_feature_map``) adds a kind; after
that, ``ka.feature_map(name, ...)``, ``linear_attention``, the decoders, the
hand gradients, ``fit_feature_map``, the torch and Flax modules and the
command line take it like a built-in one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from ._agnostic import feature_maps as _fm
from ._agnostic import grad as _vjp
from ._agnostic._utils import elu_plus_one

__all__ = ["INIT_RULES", "Kind", "Param", "get", "names", "register_feature_map", "unregister_feature_map"]

#: initialisation rules a parameter can name (NumPy draws them in kernelattn/feature_maps.py, JAX in
#: backends/jax_nn.py): per-head (semi-)orthogonal, He-normal (fan-in = shape[-2]), zeros, identity
#: (eye(d_in, d_out) per head), and FAVOR+'s orthogonal random features (H, d, m)
INIT_RULES = ("orthogonal", "he_normal", "zeros", "eye", "favor")


class Param(NamedTuple):
    """Shape and initialisation rule (one of :data:`INIT_RULES`) of one parameter array."""

    shape: tuple
    init: str


@dataclass(frozen=True)
class Kind:
    """Everything about one feature-map kind. Build with :func:`register_feature_map`.

    Attributes
    ----------
    name, description : str
    forward : callable
        ``forward(x, blocks, buffers, *, xp)``: x (B, H, N, d) in the compute
        dtype, ``blocks`` the list of parameter dicts of the role being mapped
        (queries or keys), ``buffers`` the fixed arrays; returns (B, H, N, m).
        Array-API code only, so that every library runs it and torch autograd
        and ``jax.grad`` see through it.
    vjp : callable or None
        ``vjp(x, blocks, buffers, *, xp) -> (y, back)`` with ``back(gy) ->
        (gx, gblocks)``, ``gblocks`` shaped like ``blocks``. None: the hand
        gradients (NumPy, CuPy, array-api-strict, Dask) refuse the kind;
        autodiff libraries still train it.
    params : callable or None
        ``params(spec) -> [ {name: Param}, ... ]``, one dict per block (None:
        no trainable parameters).
    buffers : callable or None
        ``buffers(spec) -> {name: Param}``: fixed arrays drawn at construction.
    feature_dim : callable
        ``feature_dim(d) -> m``, the default width (for a map without
        parameters or buffers, the only width).
    stackable : bool
        Whether ``depth`` > 1 is allowed (``params`` gives the blocks).
    options : tuple of str
        Extra :class:`~kernelattn.FeatureMapSpec` fields the kind uses (``"rank"``).
    check : callable or None
        ``check(spec) -> spec``: fills kind-specific defaults, raises ValueError
        on a bad combination.
    reference : callable or None
        The float64 definition, same signature as ``forward``; default ``forward``.
    form : str or None
        The hand-written form adapters may run instead of ``forward``.
    """

    name: str
    forward: Callable
    description: str = ""
    vjp: Callable | None = None
    params: Callable | None = None
    buffers: Callable | None = None
    feature_dim: Callable = field(default=lambda d: d)
    stackable: bool = False
    options: tuple = ()
    check: Callable | None = None
    reference: Callable | None = None
    form: str | None = None

    @property
    def trainable(self) -> bool:
        return self.params is not None

    @property
    def needs_shape(self) -> bool:
        """Whether num_heads and head_dim are needed (the map holds arrays shaped by them)."""
        return self.params is not None or self.buffers is not None

    def define(self, x, blocks, buffers, *, xp):
        """The float64 reference (``reference``, else ``forward``)."""
        return (self.reference or self.forward)(x, blocks, buffers, xp=xp)


_REGISTRY: dict[str, Kind] = {}


def names() -> list[str]:
    """The registered kind names, in registration order."""
    return list(_REGISTRY)


def get(name) -> Kind | None:
    """The :class:`Kind` called ``name``, or None."""
    return _REGISTRY.get(name) if isinstance(name, str) else None


def register_feature_map(name: str, forward: Callable, *, description: str = "", vjp: Callable | None = None,
                         params: Callable | None = None, buffers: Callable | None = None,
                         feature_dim: Callable | None = None, stackable: bool = False, options=(),
                         check: Callable | None = None, reference: Callable | None = None,
                         form: str | None = None, replace: bool = False) -> Kind:
    """Add a feature-map kind that every part of kernelattn then accepts by ``name``.

    Parameters are those of :class:`Kind`. ``params(spec)`` lists, per block,
    ``{name: Param(shape, init)}`` (or ``(shape, init)`` tuples), with shapes
    from ``spec.num_heads``, ``spec.head_dim``, ``spec.feature_dim`` and
    ``spec.depth``; ``ka.feature_map`` then draws them from its seed, and the
    Flax module from its ``rngs``. ``replace=True`` overwrites an existing
    kind of that name.

    Returns
    -------
    Kind

    Examples
    --------
    >>> import numpy as np, kernelattn as ka
    >>> def fwd(x, blocks, buffers, *, xp):           # [relu(x W), relu(-x W)] + 1e-3
    ...     y = xp.matmul(x, blocks[0]["W"])
    ...     zero = xp.zeros_like(y)
    ...     return xp.concat([xp.maximum(y, zero), xp.maximum(-y, zero)], axis=-1) + 1e-3
    >>> kind = ka.register_feature_map(
    ...     "relu_pair", fwd, feature_dim=lambda d: 2 * d,
    ...     params=lambda s: [{"W": ka.Param((s.num_heads, s.head_dim, s.feature_dim // 2), "orthogonal")}])
    >>> phi = ka.feature_map("relu_pair", num_heads=2, head_dim=4, seed=0)
    >>> phi(np.ones((1, 2, 3, 4), np.float32)).shape
    (1, 2, 3, 8)
    >>> ka.unregister_feature_map("relu_pair")
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be an identifier-like string; got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"feature-map kind {name!r} is already registered; pass replace=True to redefine it")
    for arg, value in (("forward", forward), ("vjp", vjp), ("params", params), ("buffers", buffers),
                       ("feature_dim", feature_dim), ("check", check), ("reference", reference)):
        if value is not None and not callable(value):
            raise TypeError(f"{arg} must be callable; got {type(value).__name__}")
    options = tuple(options)
    unknown = [o for o in options if o not in ("rank",)]
    if unknown:
        raise ValueError(f"options may name only 'rank'; got {unknown}")
    kind = Kind(name, forward, description, vjp, params, buffers, feature_dim or (lambda d: d), bool(stackable),
                options, check, reference, form)
    _REGISTRY[name] = kind
    return kind


def unregister_feature_map(name: str) -> None:
    """Remove a kind added by :func:`register_feature_map` (built-in kinds stay)."""
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is a built-in kind and cannot be removed")
    if name not in _REGISTRY:
        raise ValueError(f"no feature-map kind {name!r} is registered")
    del _REGISTRY[name]


# ---------------------------------------------------------------------------
# the built-in kinds. References are written apart from the forwards (float64, masks by selection),
# so comparing a path with them is a real check.


def _ns_softplus(x, xp):
    return xp.logaddexp(x * 0.0, x)


def _ns_sigmoid(x, xp):
    return 0.5 * (1.0 + xp.tanh(0.5 * x))


def _ref_feedforward(x, blocks, buffers, *, xp):
    last = len(blocks) - 1
    for i, blk in enumerate(blocks):
        y = xp.matmul(x, blk["W"])
        if "b" in blk:
            y = y + blk["b"][:, None, :]
        if i == last:
            y = _ns_softplus(y, xp)
        if "G" in blk:
            g = xp.matmul(x, blk["G"])
        elif "A" in blk:
            g = xp.matmul(xp.matmul(x, blk["A"]), blk["B"])
        else:
            g = None
        if g is not None:
            if "c" in blk:
                g = g + blk["c"][:, None, :]
            y = y * _ns_sigmoid(g, xp)
        x = y
    return x


def _ref_hedgehog(x, blocks, buffers, *, xp):
    blk = blocks[0]
    y = xp.matmul(x, blk["W"])
    if "b" in blk:
        y = y + blk["b"][:, None, :]

    def sm(t):
        t = xp.exp(t - xp.max(t, axis=-1, keepdims=True))
        return t / xp.sum(t, axis=-1, keepdims=True)

    return xp.concat([sm(y), sm(-y)], axis=-1)


def _ref_favor(x, blocks, buffers, *, xp):
    omega = buffers["omega"]
    d, m = x.shape[-1], omega.shape[-1]
    xs = x / d**0.25
    logits = xp.matmul(xs, omega) - 0.5 * xp.sum(xs**2, axis=-1, keepdims=True)
    return xp.exp(logits) / math.sqrt(m)


def _feedforward_params(gate):
    """Blocks of ffn (gate None), glu ("G") or aoglu ("A"): d -> m, then m -> m."""

    def layout(spec):
        H, d, m = spec.num_heads, spec.head_dim, spec.feature_dim
        blocks = []
        for i in range(spec.depth):
            d_in = d if i == 0 else m
            block = {"W": Param((H, d_in, m), "orthogonal")}
            if gate == "G":
                block["G"] = Param((H, d_in, m), "he_normal")
            elif gate == "A":
                block["A"] = Param((H, d_in, spec.rank), "he_normal")
                block["B"] = Param((H, spec.rank, m), "he_normal")
            if spec.bias:
                block["b"] = Param((H, m), "zeros")
                if gate is not None:
                    block["c"] = Param((H, m), "zeros")
            blocks.append(block)
        return blocks

    return layout


def _hedgehog_params(spec):
    H, d, half = spec.num_heads, spec.head_dim, spec.feature_dim // 2
    block = {"W": Param((H, d, half), "eye")}  # identity start: the map begins as softmax of the input
    if spec.bias:
        block["b"] = Param((H, half), "zeros")
    return [block]


def _hedgehog_check(spec):
    if spec.feature_dim % 2:
        raise ValueError(f"hedgehog's feature_dim must be even ([softmax(y), softmax(-y)]); got {spec.feature_dim}")
    return spec


def _aoglu_check(spec):
    from dataclasses import replace

    return spec if spec.rank is not None else replace(spec, rank=max(1, spec.head_dim // 4))


def _feedforward(x, blocks, buffers, *, xp):
    return _fm.feedforward(x, blocks, xp=xp)


def _feedforward_vjp(x, blocks, buffers, *, xp):
    return _vjp.feedforward_vjp(x, blocks, xp=xp)


def _relu(x, *, xp):
    return xp.maximum(x, xp.zeros_like(x))


_FFN = dict(forward=_feedforward, vjp=_feedforward_vjp, stackable=True, reference=_ref_feedforward,
            form="feedforward")
register_feature_map("ffn", description="Softplus(x W): the paper's feedforward kernel",
                     params=_feedforward_params(None), **_FFN)
register_feature_map("glu", description="f(x W) * sigmoid(x G): the paper's gated linear unit (OGLU)",
                     params=_feedforward_params("G"), **_FFN)
register_feature_map("aoglu", description="f(x W) * sigmoid((x A) B): GLU with a rank-r gate",
                     params=_feedforward_params("A"), options=("rank",), check=_aoglu_check, **_FFN)
register_feature_map(
    "hedgehog", lambda x, blocks, buffers, *, xp: _fm.hedgehog(x, blocks[0]["W"], blocks[0].get("b"), xp=xp),
    description="[softmax(x W), softmax(-x W)]: Hedgehog (Zhang et al. 2024)",
    vjp=lambda x, blocks, buffers, *, xp: _vjp.hedgehog_vjp(x, blocks[0], xp=xp),
    params=_hedgehog_params, feature_dim=lambda d: 2 * d, check=_hedgehog_check, reference=_ref_hedgehog,
    form="hedgehog")
register_feature_map(
    "elu", lambda x, blocks, buffers, *, xp: elu_plus_one(x, xp=xp),
    description="elu(x) + 1: the Linear Transformer's map (Katharopoulos et al. 2020)",
    vjp=lambda x, blocks, buffers, *, xp: _vjp.elu_vjp(x, xp=xp),
    reference=lambda x, blocks, buffers, *, xp: xp.where(x > 0, x + 1.0, xp.exp(xp.where(x > 0, xp.zeros_like(x), x))),
    form="elu")
register_feature_map(
    "relu", lambda x, blocks, buffers, *, xp: _relu(x, xp=xp), description="max(x, 0)",
    vjp=lambda x, blocks, buffers, *, xp: _vjp.relu_vjp(x, xp=xp),
    reference=lambda x, blocks, buffers, *, xp: xp.where(x > 0, x, xp.zeros_like(x)), form="relu")
register_feature_map(
    "favor", lambda x, blocks, buffers, *, xp: _fm.favor(x, buffers["omega"], xp=xp),
    description="Performer's positive orthogonal random features (FAVOR+)",
    vjp=lambda x, blocks, buffers, *, xp: _vjp.favor_vjp(x, buffers["omega"], xp=xp),
    buffers=lambda s: {"omega": Param((s.num_heads, s.head_dim, s.feature_dim), "favor")},
    reference=_ref_favor, form="favor")

_BUILTIN = frozenset(_REGISTRY)
