"""Flax NNX modules for kernelized attention (the ``flax`` extra).

* :class:`FeatureMap`: the paper's trainable kernels (and the fixed maps) as a
  module whose arrays are :class:`flax.nnx.Param` (FAVOR+'s projection is a
  :class:`Buffer`, not trained);
* :class:`MultiheadLinearAttention`: projections, the feature map and
  :func:`kernelattn.linear_attention` (self- or cross-attention, causal or
  not, key masks);
* :class:`EncoderBlock`: the paper's pre-LayerNorm block,
  ``x + Attn(LN x)`` then ``x + MLP(LN x)`` with MLP = Linear, GELU, Dropout,
  Linear, Dropout.

The modules only hold parameters and call the public functions, so the JAX fast
paths of :mod:`kernelattn.backends.jax` run underneath, under ``nnx.jit`` too.
Train them with ``nnx.Optimizer(model, optax.adamw(...), wrt=nnx.Param)``.

Without Flax, a :class:`kernelattn.FeatureMap` is itself a JAX pytree:
``jax.grad`` returns a FeatureMap of gradients and ``optax.apply_updates``
trains it directly (see ``docs/examples/train_flax_optax.py``).

Examples
--------
>>> import jax.numpy as jnp, flax.nnx as nnx
>>> from kernelattn.backends.jax_nn import EncoderBlock
>>> block = EncoderBlock(64, 4, feature_map="glu", rngs=nnx.Rngs(0))
>>> block(jnp.ones((2, 100, 64))).shape
(2, 100, 64)
"""

from __future__ import annotations

import math

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

import kernelattn as ka
from kernelattn import _tree
from kernelattn import _validation as _check
from kernelattn import feature_maps as _fm
from kernelattn._convert import to_numpy
from kernelattn.backends._renames import renamed as _renamed

__all__ = ["Buffer", "EncoderBlock", "FeatureMap", "MultiheadLinearAttention"]


class Buffer(nnx.Variable):
    """A fixed array of a feature map (FAVOR+'s projection ``omega``); optimisers skip it."""


def _semi_orthogonal(key, heads, d_in, d_out, dtype):
    """(heads, d_in, d_out) with orthonormal columns (d_in >= d_out) or rows, per head."""
    n = max(d_in, d_out)
    Q = jax.random.orthogonal(key, n, shape=(heads,), dtype=dtype)
    return Q[:, :d_in, :d_out]


def _favor_projection(key, heads, d, m, dtype):
    """FAVOR+'s orthogonal random features, drawn as the core draws them (see kernelattn.feature_maps)."""
    k_rot, k_norm = jax.random.split(key)
    n_blocks = -(-m // d)
    rows = jax.random.orthogonal(k_rot, d, shape=(heads, n_blocks), dtype=dtype)  # (heads, blocks, d, d)
    w = jnp.reshape(jnp.swapaxes(rows, -1, -2), (heads, n_blocks * d, d))[:, :m]  # (heads, m, d) orthonormal rows
    norms = jnp.linalg.norm(jax.random.normal(k_norm, (heads, m, d), dtype), axis=-1)
    return jnp.swapaxes(w * norms[..., None], -1, -2)


def _as_jax(a, dtype):
    """Any library's array as a JAX array (in ``dtype`` if given)."""
    a = a if isinstance(a, jax.Array) else jnp.asarray(to_numpy(a))
    return a if dtype is None else a.astype(dtype)


def _draw(param, key, dtype):
    """A fresh value for ``param`` (shape and rule, kernelattn/kinds.py), drawn as the core draws it."""
    shape, rule = tuple(param.shape), param.init
    if rule == "zeros":
        return jnp.zeros(shape, dtype)
    if rule == "orthogonal":
        return _semi_orthogonal(key, *shape, dtype)
    if rule == "eye":
        return jnp.broadcast_to(jnp.eye(shape[-2], shape[-1], dtype=dtype), shape)
    if rule == "favor":
        return _favor_projection(key, *shape, dtype)
    if rule == "he_normal":  # fan_in = the input width of the head's matrix
        return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / shape[-2])
    raise ValueError(f"unknown initialisation rule {rule!r}; expected one of {list(ka.kinds.INIT_RULES)}")


class FeatureMap(nnx.Module):
    """A head-wise feature map phi: (B, H, N, d) -> (B, H, N, m), as a Flax NNX module.

    Parameters
    ----------
    kind : {"ffn", "glu", "aoglu", "hedgehog", "elu", "relu", "favor"} or kernelattn.FeatureMap
        As in :func:`kernelattn.feature_map`; or an existing map to wrap
        (its arrays become Params; the other arguments except ``dtype`` are
        then ignored).
    num_heads, head_dim, feature_dim, depth, rank, bias, tied
        As in :func:`kernelattn.feature_map`.
    rngs : flax.nnx.Rngs, optional
        Draws the weights with JAX (``rngs.params()``): main weights orthogonal
        per head, gates He-normal, biases zero, as the core does. Works under
        ``nnx.eval_shape`` and ``nnx.jit``.
    seed : int or numpy.random.Generator, optional
        Draws the weights in NumPy instead, exactly as
        ``kernelattn.feature_map(..., seed=seed)`` does on every backend.
    dtype : jax dtype, default float32
        Dtype of the parameters (when wrapping a map, None keeps its dtype).

    Attributes
    ----------
    spec : kernelattn.FeatureMapSpec
    params : nnx.Dict
        ``{"shared": [block, ...]}`` (tied) or ``{"query": [...], "key": [...]}``;
        each block an ``nnx.Dict`` of :class:`flax.nnx.Param` named ``W``,
        ``G``, ``A``, ``B``, ``b``, ``c``.
    buffers : nnx.Dict
        ``{"omega": Buffer}`` for FAVOR+, else empty.
    """

    def __init__(self, kind, *, num_heads: int | None = None, head_dim: int | None = None,
                 feature_dim: int | None = None, depth: int = 1, rank: int | None = None, bias: bool = False,
                 tied: bool = True, rngs: nnx.Rngs | None = None, seed=None, dtype=jnp.float32):
        if isinstance(kind, _fm.FeatureMap):  # wrap an existing map
            phi = kind
            params = _tree.tree_map(lambda a: _as_jax(a, dtype), phi.params)
            buffers = _tree.tree_map(lambda a: _as_jax(a, dtype), phi.buffers)
            self._set(phi.spec, params, buffers)
            return
        if rngs is not None and seed is not None:
            raise ValueError("give rngs (JAX initialisation) or seed (NumPy initialisation), not both")
        _check_rngs(rngs, optional=True)
        # kernelattn.feature_map checks the arguments and gives the structure;
        # with rngs, every array is then drawn again with JAX.
        phi = ka.feature_map(kind, num_heads=num_heads, head_dim=head_dim, feature_dim=feature_dim, depth=depth,
                             rank=rank, bias=bias, tied=tied, seed=0 if seed is None else seed, xp=np)
        needs_random = bool(phi.parameters()) or bool(phi.buffers)
        if needs_random and rngs is None and seed is None:
            raise ValueError(f"feature map {kind!r} has weights: pass rngs=nnx.Rngs(...) or seed=...")
        if rngs is not None and needs_random:
            param_layout, buffer_layout = _fm.layout(phi.spec)

            def fresh(p):  # deterministic rules draw no key
                return _draw(p, None if p.init == "eye" else rngs.params(), dtype)

            params = {role: [{name: fresh(p) for name, p in sorted(block.items())} for block in blocks]
                      for role, blocks in param_layout.items()}
            buffers = {name: fresh(p) for name, p in buffer_layout.items()}
        else:
            params = _tree.tree_map(lambda a: jnp.asarray(a, dtype), phi.params)
            buffers = _tree.tree_map(lambda a: jnp.asarray(a, dtype), phi.buffers)
        self._set(phi.spec, params, buffers)

    def _set(self, spec, params, buffers):
        self.spec = spec
        self.params = nnx.Dict({role: nnx.List([nnx.Dict({name: nnx.Param(a) for name, a in block.items()})
                                                for block in blocks]) for role, blocks in params.items()})
        self.buffers = nnx.Dict({name: Buffer(a) for name, a in buffers.items()})

    @classmethod
    def from_feature_map(cls, phi: ka.FeatureMap, *, dtype=None) -> "FeatureMap":
        """Wrap a :class:`kernelattn.FeatureMap` (its arrays become Params, as JAX arrays).

        Same as ``FeatureMap(phi)``; ``dtype`` converts the arrays (default: keep theirs).
        """
        if not isinstance(phi, _fm.FeatureMap):
            raise TypeError(f"from_feature_map expects a kernelattn.FeatureMap; got {type(phi).__name__}")
        return cls(phi, dtype=dtype)

    def as_feature_map(self) -> ka.FeatureMap:
        """The current values as a :class:`kernelattn.FeatureMap` (what kernelattn's functions take)."""
        params = {role: [{name: p[...] for name, p in block.items()} for block in blocks]
                  for role, blocks in self.params.items()}
        buffers = {name: b[...] for name, b in self.buffers.items()}
        return ka.FeatureMap(self.spec, params, buffers)

    @property
    def kind(self) -> str:
        return self.spec.kind

    def __call__(self, x):
        """phi(x) for queries: (B, H, N, d) -> (B, H, N, m)."""
        return self.as_feature_map()(x)

    def key(self, x):
        """phi(x) for keys (the same map unless ``tied=False``)."""
        return self.as_feature_map().key(x)


def _check_input(name, x, width, width_name="in_features"):
    """``x`` if it is a floating JAX (or NumPy) array (B, N, width); a one-line error naming it otherwise."""
    if not isinstance(x, (jax.Array, np.ndarray)):  # tracers are jax.Array too
        raise TypeError(f"{name} must be a JAX array of shape (B, N, D), D = {width_name} = {width}; "
                        f"got {_check.described(x)}")
    if x.ndim != 3 or x.shape[-1] != width:
        raise ValueError(f"{name} must have shape (B, N, D), D = {width_name} = {width}; got {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype; got {x.dtype}")
    return x


def _check_rngs(rngs, *, optional=False):
    if rngs is None and optional:
        return
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(f"rngs must be a flax.nnx.Rngs (for instance nnx.Rngs(0)); got {_check.short(rngs)}")


def _make_feature_map(feature_map, *, num_heads, head_dim, rngs, **options):
    if isinstance(feature_map, FeatureMap):
        return feature_map
    if isinstance(feature_map, _fm.FeatureMap):
        return FeatureMap.from_feature_map(feature_map)
    if isinstance(feature_map, str):
        kind = ka.kinds.get(feature_map)
        if kind is not None and not kind.needs_shape:
            return FeatureMap(feature_map)
        return FeatureMap(feature_map, num_heads=num_heads, head_dim=head_dim, rngs=rngs, **options)
    raise TypeError(f"feature_map must be a kind name, a kernelattn.FeatureMap or a jax_nn.FeatureMap; "
                    f"got {_check.short(feature_map)}")


class MultiheadLinearAttention(nnx.Module):
    """Multi-head kernelized attention: projections, phi, linear attention, output projection.

    Parameters
    ----------
    in_features : int
        D, the model width of the inputs (B, N, D).
    num_heads : int
        H.
    head_dim : int, optional
        d; default ``in_features // num_heads`` (which must divide evenly).
    out_features : int, optional
        Width of the output; default ``in_features``.
    feature_map : str, FeatureMap or kernelattn.FeatureMap, default "glu"
        The kernel: a kind name (built here with ``rngs``), or a map to use.
    feature_dim, depth, rank, tied
        Options of a feature map built here (see :func:`kernelattn.feature_map`).
    feature_map_bias : bool, default False
        Biases in the kernel's blocks (the feature map's ``bias``).
    causal : bool, default False
        Causal self-attention.
    eps : float, default 1e-6
    chunk_size : int, optional
        Chunk length of the causal form.
    use_bias : bool, default True
        Biases on the q/k/v/output projections.
    rngs : flax.nnx.Rngs

    Notes
    -----
    The kernelattn-specific arguments are named and defaulted as in
    :class:`kernelattn.backends.torch_nn.MultiheadLinearAttention` (see
    :doc:`/guide/modules`); ``kernel_bias=`` still works for
    ``feature_map_bias=`` (deprecated; it warns). There is no
    ``feature_map_dropout`` here: the JAX feature maps are applied by the
    core, which has no dropout inside the kernel's blocks.
    """

    @_renamed(kernel_bias="feature_map_bias")
    def __init__(self, in_features: int, num_heads: int, *, head_dim: int | None = None,
                 out_features: int | None = None, feature_map="glu", feature_dim: int | None = None,
                 depth: int = 1, rank: int | None = None, tied: bool = True, feature_map_bias: bool = False,
                 causal: bool = False, eps: float = 1e-6, chunk_size: int | None = None,
                 use_bias: bool = True, rngs: nnx.Rngs):
        in_features, num_heads = _check.integer("in_features", in_features), _check.integer("num_heads", num_heads)
        head_dim = _check.optional_integer("head_dim", head_dim)
        out_features = _check.optional_integer("out_features", out_features)
        eps, chunk_size = _check.nonnegative("eps", eps), _check.optional_integer("chunk_size", chunk_size)
        causal, use_bias, tied, feature_map_bias = (_check.flag(name, value) for name, value in (
            ("causal", causal), ("use_bias", use_bias), ("tied", tied), ("feature_map_bias", feature_map_bias)))
        _check_rngs(rngs)
        if head_dim is None:
            if in_features % num_heads:
                raise ValueError(f"in_features={in_features} is not a multiple of num_heads={num_heads}; "
                                 f"pass head_dim")
            head_dim = in_features // num_heads
        self.num_heads, self.head_dim, self.in_features = num_heads, head_dim, in_features
        self.causal, self.eps, self.chunk_size = causal, eps, chunk_size
        width = num_heads * head_dim
        self.query = nnx.Linear(in_features, width, use_bias=use_bias, rngs=rngs)
        self.key = nnx.Linear(in_features, width, use_bias=use_bias, rngs=rngs)
        self.value = nnx.Linear(in_features, width, use_bias=use_bias, rngs=rngs)
        self.out = nnx.Linear(width, in_features if out_features is None else out_features,
                              use_bias=use_bias, rngs=rngs)
        options = {"feature_dim": feature_dim, "depth": depth, "rank": rank, "tied": tied, "bias": feature_map_bias}
        self.feature_map = _make_feature_map(feature_map, num_heads=num_heads, head_dim=head_dim, rngs=rngs,
                                             **options)

    def _heads(self, x):
        B, N, _ = x.shape
        return jnp.swapaxes(jnp.reshape(x, (B, N, self.num_heads, self.head_dim)), 1, 2)

    def __call__(self, x, context=None, *, key_mask=None):
        """Attend from ``x`` to ``context`` (default ``x``).

        Parameters
        ----------
        x : array, shape (B, N, D)
            Queries' inputs.
        context : array, shape (B, L, D), optional
            Keys' and values' inputs (cross-attention); default ``x``.
        key_mask : bool array, shape (B, L), optional
            True for a real token of ``context``.

        Returns
        -------
        array, shape (B, N, out_features)
        """
        _check_input("x", x, self.in_features)
        if context is not None:
            _check_input("context", context, self.in_features)
            if context.shape[0] != x.shape[0]:
                raise ValueError(f"x and context must have one batch size; got shapes {tuple(x.shape)} and "
                                 f"{tuple(context.shape)}")
        context = x if context is None else context
        q = self._heads(self.query(x))
        k, v = self._heads(self.key(context)), self._heads(self.value(context))
        out = ka.linear_attention(q, k, v, feature_map=self.feature_map, causal=self.causal, key_mask=key_mask,
                                  eps=self.eps, chunk_size=self.chunk_size)
        B, H, N, d = out.shape
        return self.out(jnp.reshape(jnp.swapaxes(out, 1, 2), (B, N, H * d)))


class EncoderBlock(nnx.Module):
    """The paper's pre-LayerNorm encoder block with kernelized attention.

    ``x = x + Attn(LN(x))``, then ``x = x + Dropout(Linear(Dropout(GELU(Linear(LN(x))))))``.

    Parameters
    ----------
    features : int
        D, the model width.
    num_heads : int
    mlp_features : int, optional
        Hidden width of the MLP; default ``4 * features``.
    dropout : float, default 0.1
        Rate of both MLP dropouts (``model.eval()`` turns them off).
    feature_map, feature_dim, depth, rank, tied, feature_map_bias, causal, eps, chunk_size
        The attention's options (see :class:`MultiheadLinearAttention`).
    rngs : flax.nnx.Rngs
    **attention_options
        Further options of :class:`MultiheadLinearAttention` (``head_dim``,
        ``use_bias``, ...).

    Notes
    -----
    The kernelattn-specific arguments are named and defaulted as in
    :class:`kernelattn.backends.torch_nn.LinearTransformerEncoderLayer` (see
    :doc:`/guide/modules`); ``kernel_bias=`` still works for
    ``feature_map_bias=`` (deprecated; it warns).
    """

    @_renamed(kernel_bias="feature_map_bias")
    def __init__(self, features: int, num_heads: int, *, mlp_features: int | None = None, dropout: float = 0.1,
                 feature_map="glu", feature_dim: int | None = None, depth: int = 1, rank: int | None = None,
                 tied: bool = True, feature_map_bias: bool = False, causal: bool = False, eps: float = 1e-6,
                 chunk_size: int | None = None, rngs: nnx.Rngs, **attention_options):
        features, num_heads = _check.integer("features", features), _check.integer("num_heads", num_heads)
        mlp_features = _check.optional_integer("mlp_features", mlp_features)
        dropout, causal = _check.probability("dropout", dropout), _check.flag("causal", causal)
        _check_rngs(rngs)
        hidden = 4 * features if mlp_features is None else mlp_features
        self.norm1 = nnx.LayerNorm(features, rngs=rngs)
        self.attention = MultiheadLinearAttention(
            features, num_heads, feature_map=feature_map, feature_dim=feature_dim, depth=depth, rank=rank,
            tied=tied, feature_map_bias=feature_map_bias, causal=causal, eps=eps, chunk_size=chunk_size, rngs=rngs,
            **attention_options)
        self.norm2 = nnx.LayerNorm(features, rngs=rngs)
        self.mlp_in = nnx.Linear(features, hidden, rngs=rngs)
        self.mlp_out = nnx.Linear(hidden, features, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x, *, key_mask=None):
        """x (B, N, D) -> (B, N, D); ``key_mask`` (B, N) marks real tokens."""
        _check_input("x", x, self.attention.in_features, "features")
        x = x + self.attention(self.norm1(x), key_mask=key_mask)
        h = self.dropout(nnx.gelu(self.mlp_in(self.norm2(x))))
        return x + self.dropout(self.mlp_out(h))
