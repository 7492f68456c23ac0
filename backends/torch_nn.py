"""PyTorch modules: the paper's kernels, multi-head linear attention, and its encoder block.

* :class:`FeatureMap`: a head-wise trainable kernel (``"ffn"``, ``"glu"``,
  ``"aoglu"``, ``"hedgehog"``) or a fixed one (``"elu"``, ``"relu"``,
  ``"favor"``) holding its weights as ``nn.Parameter``\\ s, with the
  orthogonality penalty of the paper.
* :class:`MultiheadLinearAttention`: a drop-in for
  ``torch.nn.MultiheadAttention`` where that makes sense (same call, same
  ``key_padding_mask`` convention: True marks padding), linear in the sequence
  length, with :meth:`~MultiheadLinearAttention.step` for token-by-token decoding.
* :class:`LinearTransformerEncoderLayer`: the paper's pre-LayerNorm block,
  ``x + Attn(LN x)`` then ``x + FFN(LN x)``.

The modules only hold parameters and call :func:`kernelattn.linear_attention`,
so the fast paths of :mod:`kernelattn.backends.torch` run underneath, and
``torch.compile(module, fullgraph=True)`` works.

Examples
--------
>>> import torch
>>> from kernelattn.backends.torch_nn import MultiheadLinearAttention
>>> attn = MultiheadLinearAttention(64, 4, feature_map="glu", causal=True, seed=0)
>>> x = torch.randn(2, 10, 64)
>>> out, _ = attn(x, x, x)
>>> out.shape
torch.Size([2, 10, 64])
>>> y, state = attn.step(x[:, :6])          # a prompt ...
>>> z, state = attn.step(x[:, 6], state=state)   # ... then one token at a time
>>> bool(torch.allclose(z, out[:, 6], atol=1e-5))
True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernelattn as ka
from kernelattn import _validation as _check
from kernelattn.backends import _torch_fmap
from kernelattn.backends._renames import renamed as _renamed
from kernelattn.feature_maps import CallableFeatureMap as _CallableFeatureMap
from kernelattn.feature_maps import FeatureMap as _FeatureMap
from kernelattn.feature_maps import describe as _describe

__all__ = ["FeatureMap", "LinearTransformerEncoderLayer", "MultiheadLinearAttention"]


def _wrap(spec, params, buffers) -> _FeatureMap:
    # kernelattn.FeatureMap around the module's tensors, without its __init__
    # (which looks for JAX); the same construction as its pytree unflatten
    phi = object.__new__(_FeatureMap)
    phi.spec, phi.params, phi.buffers = spec, params, buffers
    return phi


class FeatureMap(nn.Module):
    """A head-wise feature map phi: (B, H, N, d) -> (B, H, N, m) with trainable weights.

    Parameters
    ----------
    kind : {"ffn", "glu", "aoglu", "hedgehog", "elu", "relu", "favor"}, default "glu"
        See :data:`kernelattn.KINDS`.
    num_heads, head_dim : int
        H and d.
    feature_dim, depth, rank, bias, tied
        As in :func:`kernelattn.feature_map` (m, stacked blocks, AOGLU gate
        rank, biases, one map for queries and keys).
    seed : int or numpy.random.Generator, optional
        Initial weights, drawn as :func:`kernelattn.feature_map` draws them
        (orthogonal main weights, He-normal gates), so a seed gives the same map
        as on any other backend.
    device, dtype : optional
        Where the parameters live (default CPU, float32).

    Notes
    -----
    Parameters are registered as ``params.<role>.<block>.<name>`` (role
    ``shared``, or ``query`` and ``key`` when untied; names ``W``, ``G``,
    ``A``, ``B``, ``b``, ``c``); FAVOR+'s projection is the buffer ``omega``.

    Examples
    --------
    >>> import torch
    >>> from kernelattn.backends.torch_nn import FeatureMap
    >>> phi = FeatureMap("glu", num_heads=4, head_dim=16, seed=0)
    >>> phi(torch.randn(2, 4, 10, 16)).shape
    torch.Size([2, 4, 10, 16])
    >>> float(phi.orthogonality_penalty()) < 1e-10   # orthogonal at init
    True
    """

    def __init__(self, kind: str = "glu", num_heads: int | None = None, head_dim: int | None = None, *,
                 feature_dim: int | None = None, depth: int = 1, rank: int | None = None, bias: bool = False,
                 tied: bool = True, seed=None, device=None, dtype=None):
        super().__init__()
        dtype = torch.float32 if dtype is None else dtype
        phi = ka.feature_map(kind, num_heads=num_heads, head_dim=head_dim, feature_dim=feature_dim, depth=depth,
                             rank=rank, bias=bias, tied=tied, seed=seed, xp=torch, device=device, dtype=dtype)
        self.spec = phi.spec
        self.params = nn.ModuleDict({
            role: nn.ModuleList(nn.ParameterDict({name: nn.Parameter(a) for name, a in block.items()})
                                for block in blocks)
            for role, blocks in phi.params.items()
        })
        for name, a in phi.buffers.items():
            self.register_buffer(name, a)
        self._buffer_names = tuple(phi.buffers)

    kind = property(lambda self: self.spec.kind)
    num_heads = property(lambda self: self.spec.num_heads)
    head_dim = property(lambda self: self.spec.head_dim)
    feature_dim = property(lambda self: self.spec.feature_dim)

    def as_feature_map(self) -> _FeatureMap:
        """The :class:`kernelattn.FeatureMap` over this module's parameters (autograd flows through it).

        :func:`kernelattn.linear_attention` calls this when given the module as
        ``feature_map``.
        """
        params = {role: [dict(block.items()) for block in blocks] for role, blocks in self.params.items()}
        buffers = {name: getattr(self, name) for name in self._buffer_names}
        return _wrap(self.spec, params, buffers)

    def forward(self, x, role: str = "query"):
        """phi(x) for ``x`` of shape (B, H, N, d); ``role="key"`` applies the key map when untied.

        Returns (B, H, N, m) in the dtype of ``x`` (float16/bfloat16 are
        computed in float32).
        """
        if role not in ("query", "key"):
            raise ValueError(f"role must be 'query' or 'key'; got {role!r}")
        _tensor("x", x)
        if x.ndim != 4:
            raise ValueError(f"x must have 4 dimensions (B, H, N, d); got shape {tuple(x.shape)}")
        phi = self.as_feature_map()
        phi.check_compatible(x, name="x")
        cdt = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        return _torch_fmap.apply(phi, x.to(cdt), role=role).to(x.dtype)

    def key(self, x):
        """The key map (the same as the query map when tied)."""
        return self(x, role="key")

    def orthogonality_penalty(self, weight: float = 1.0):
        """``weight * sum_blocks mean_{h,i,j} ((W_h W_h^T - I)_{ij})^2`` (0-d tensor; 0.0 without weights)."""
        return ka.orthogonality_penalty(self.as_feature_map(), weight=weight)

    def extra_repr(self) -> str:
        return ", ".join([repr(self.spec.kind), *_describe(self.spec)])


class _DropoutFeatureMap(_CallableFeatureMap):
    """phi with dropout on its blocks' inputs (training), as one map object for both roles.

    A (query, key) pair of closures would do, but telling them apart needs an
    ``is`` test on functions, which torch.compile(fullgraph=True) cannot trace.
    """

    __slots__ = ("phi", "p")

    def __init__(self, phi, p):
        self.phi, self.p = phi, p
        self.query_fn = self.key_fn = None
        self._widths = {}

    def apply(self, x, *, role, xp):
        return _torch_fmap.apply(self.phi, x, role=role, dropout=self.p, training=True)


def _tensor(name, x, width=None, width_name="embed_dim"):
    """``x`` if it is a floating tensor whose last axis has ``width`` features; a one-line error otherwise."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {_check.described(x)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64); got {x.dtype}")
    if width is not None and x.ndim >= 1 and x.shape[-1] != width:
        raise ValueError(f"{name} must have {width_name}={width} features in its last dimension; "
                         f"got shape {tuple(x.shape)}")
    return x


def _as_key_mask(key_padding_mask, batch, length, name="key_padding_mask"):
    """PyTorch's padding mask (True = padding) -> kernelattn's key mask (True = real key)."""
    if key_padding_mask is None:
        return None
    if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a boolean tensor (True marks padding, as in "
                        f"torch.nn.MultiheadAttention); got "
                        f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
    if tuple(key_padding_mask.shape) != (batch, length):
        raise ValueError(f"{name} must have shape (batch, source length) = ({batch}, {length}); "
                         f"got {tuple(key_padding_mask.shape)}")
    return ~key_padding_mask


class MultiheadLinearAttention(nn.Module):
    """Multi-head linear attention with a trainable feedforward kernel.

    ``out = W_o concat_h( phi(q_h) S_h / (phi(q_h) . z_h + eps) )`` with
    ``q = W_q x``, ``k = W_k x``, ``v = W_v x``; O(N) in the sequence length.

    Parameters
    ----------
    embed_dim : int
        Model width E; split into ``num_heads`` heads of width E / num_heads.
    num_heads : int
    feature_map : str or FeatureMap, default "glu"
        The feature map: a kind (see :data:`kernelattn.KINDS`) built here, or
        a :class:`FeatureMap` module (for instance to share one between layers).
    depth, feature_dim, rank, tied
        Passed to :class:`FeatureMap` when ``feature_map`` is a kind.
    feature_map_bias : bool, default False
        Biases in the kernel's blocks (:class:`FeatureMap`'s ``bias``).
    causal : bool, default False
        Attend only to earlier positions (decoder self-attention).
    batch_first : bool, default True
        Inputs are (batch, seq, feature); False for (seq, batch, feature).
    feature_map_dropout : float, default 0.0
        Dropout on the input of every kernel block while training (the
        paper's regularisation; linear attention has no weight matrix to drop).
    dropout : float, optional
        ``torch.nn.MultiheadAttention``'s spelling of ``feature_map_dropout``,
        kept for ported code (there it drops attention weights, which linear
        attention never forms). Give one of the two.
    bias : bool, default True
        Biases of the four projections.
    kdim, vdim : int, optional
        Widths of keys and values (default ``embed_dim``).
    eps : float, default 1e-6
        Added to the denominator.
    chunk_size : int, optional
        Chunk length of the causal form.
    seed : int, optional
        Seed of the kernel's initial weights (projections use torch's RNG).
    device, dtype : optional

    Notes
    -----
    Differences from ``torch.nn.MultiheadAttention``: ``need_weights`` defaults
    to False and True is an error (the (N, L) weights are never formed; use
    :func:`kernelattn.linear_attention_weights` to inspect them);
    ``attn_mask`` is accepted only as the causal mask (``is_causal=True``).
    Projections are four ``nn.Linear`` (``q_proj``, ``k_proj``, ``v_proj``,
    ``out_proj``).

    The names ``kernel=`` and ``kernel_bias=`` still work for
    ``feature_map=`` and ``feature_map_bias=`` (deprecated; they warn). The
    arguments are those of :class:`kernelattn.backends.jax_nn.MultiheadLinearAttention`
    (see :doc:`/guide/modules`).
    """

    @_renamed(synonyms=(("dropout", "feature_map_dropout"),), kernel="feature_map",
              kernel_bias="feature_map_bias")
    def __init__(self, embed_dim: int, num_heads: int, *, feature_map="glu", depth: int = 1,
                 feature_dim: int | None = None, rank: int | None = None, feature_map_bias: bool = False,
                 tied: bool = True, causal: bool = False, batch_first: bool = True,
                 feature_map_dropout: float = 0.0, dropout: float | None = None, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, eps: float = 1e-6,
                 chunk_size: int | None = None, seed=None, device=None, dtype=None):
        super().__init__()
        embed_dim, num_heads = _check.integer("embed_dim", embed_dim), _check.integer("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim must be divisible by num_heads; got embed_dim={embed_dim}, "
                             f"num_heads={num_heads}")
        kdim, vdim = _check.optional_integer("kdim", kdim), _check.optional_integer("vdim", vdim)
        if dropout is None:
            dropout = _check.probability("feature_map_dropout", feature_map_dropout)
        else:
            dropout = _check.probability("dropout", dropout)
        eps = _check.nonnegative("eps", eps)
        chunk_size = _check.optional_integer("chunk_size", chunk_size)
        causal, batch_first, bias, feature_map_bias, tied = (_check.flag(name, value) for name, value in (
            ("causal", causal), ("batch_first", batch_first), ("bias", bias), ("feature_map_bias", feature_map_bias),
            ("tied", tied)))
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.causal, self.batch_first = bool(causal), bool(batch_first)
        self.dropout, self.eps, self.chunk_size = float(dropout), float(eps), chunk_size
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        for proj in (self.q_proj, self.k_proj, self.v_proj):  # as nn.MultiheadAttention initialises
            nn.init.xavier_uniform_(proj.weight)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        if isinstance(feature_map, FeatureMap):
            if (feature_map.num_heads, feature_map.head_dim) not in ((num_heads, self.head_dim), (None, None)):
                raise ValueError(f"feature_map was built for num_heads={feature_map.num_heads}, "
                                 f"head_dim={feature_map.head_dim}; this layer has num_heads={num_heads}, "
                                 f"head_dim={self.head_dim}")
            self.feature_map = feature_map
        elif isinstance(feature_map, str):
            self.feature_map = FeatureMap(feature_map, num_heads, self.head_dim, feature_dim=feature_dim,
                                          depth=depth, rank=rank, bias=feature_map_bias, tied=tied, seed=seed,
                                          **factory)
        else:
            raise TypeError(f"feature_map must be a kind name or a kernelattn FeatureMap module; "
                            f"got {_check.short(feature_map)}")

    # -- helpers ---------------------------------------------------------------
    def _heads(self, x, proj):
        # (B, T, *) -> (B, H, T, d)
        B, T = x.shape[0], x.shape[1]
        return proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def _phi(self):
        phi = self.feature_map.as_feature_map()
        if not (self.training and self.dropout > 0.0):
            return phi
        return _DropoutFeatureMap(phi, self.dropout)

    def _width(self, name):
        return {"query": (self.embed_dim, "embed_dim"), "key": (self.kdim, "kdim"),
                "value": (self.vdim, "vdim")}[name]

    def _batch(self, x, name):
        _tensor(name, x, *self._width(name))
        if x.ndim == 2:  # unbatched (T, E)
            return x.unsqueeze(0), True
        if x.ndim != 3:
            raise ValueError(f"{name} must be (batch, seq, feature) (or (seq, batch, feature) with "
                             f"batch_first=False, or unbatched (seq, feature)); got shape {tuple(x.shape)}")
        return (x if self.batch_first else x.transpose(0, 1)), False

    # -- calls ------------------------------------------------------------------
    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights: bool = False,
                attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        """Attend ``query`` over ``key``/``value`` (both default to ``query``).

        Parameters
        ----------
        query : torch.Tensor, shape (B, N, E)
            (N, B, E) with ``batch_first=False``; (N, E) unbatched.
        key : torch.Tensor, shape (B, L, kdim), optional
        value : torch.Tensor, shape (B, L, vdim), optional
        key_padding_mask : bool torch.Tensor, shape (B, L), optional
            True marks padding (``torch.nn.MultiheadAttention``'s convention).
            Padded keys never enter the sums, so they change nothing.
        need_weights : bool, default False
            Must be False: linear attention never forms the weights.
        attn_mask : optional
            Only the causal mask, flagged with ``is_causal=True`` (it is then
            not read); any other mask is an error.
        average_attn_weights : bool
            Ignored (no weights).
        is_causal : bool, default False
            Causal for this call (as if built with ``causal=True``).

        Returns
        -------
        out : torch.Tensor, shape like ``query``
        weights : None
        """
        need_weights = _check.flag("need_weights", need_weights)
        average_attn_weights = _check.flag("average_attn_weights", average_attn_weights)
        is_causal = _check.flag("is_causal", is_causal)
        if need_weights:
            raise ValueError("need_weights=True is not supported: linear attention never forms the (N, L) "
                             "attention weights. Call with need_weights=False, or inspect the weights with "
                             "kernelattn.linear_attention_weights(q, k, feature_map=module.feature_map)")
        if attn_mask is not None and not is_causal:
            raise ValueError("attn_mask is not supported: an arbitrary (N, L) mask needs the O(N L) form. "
                             "Use causal=True (or is_causal=True) for the causal mask and key_padding_mask "
                             "for padding")
        key = query if key is None else key
        value = key if value is None else value
        q_in, unbatched = self._batch(query, "query")
        k_in, k_unbatched = self._batch(key, "key")
        v_in, v_unbatched = self._batch(value, "value")
        if not unbatched == k_unbatched == v_unbatched:
            raise ValueError(f"query, key and value must all be batched (3-D) or all unbatched (2-D); got shapes "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        if not q_in.shape[0] == k_in.shape[0] == v_in.shape[0]:
            raise ValueError(f"query, key and value must have one batch size; got shapes {tuple(query.shape)}, "
                             f"{tuple(key.shape)}, {tuple(value.shape)}")
        if k_in.shape[1] != v_in.shape[1]:
            raise ValueError(f"key and value must have the same sequence length; got shapes {tuple(key.shape)}, "
                             f"{tuple(value.shape)}")
        kpm = key_padding_mask.unsqueeze(0) if (unbatched and key_padding_mask is not None) else key_padding_mask
        key_mask = _as_key_mask(kpm, k_in.shape[0], k_in.shape[1])
        out = ka.linear_attention(self._heads(q_in, self.q_proj), self._heads(k_in, self.k_proj),
                                  self._heads(v_in, self.v_proj), feature_map=self._phi(),
                                  causal=self.causal or is_causal, key_mask=key_mask, eps=self.eps,
                                  chunk_size=self.chunk_size)
        out = self.out_proj(out.transpose(1, 2).reshape(q_in.shape[0], q_in.shape[1], self.embed_dim))
        if unbatched:
            return out[0], None
        return (out if self.batch_first else out.transpose(0, 1)), None

    def step(self, query, key=None, value=None, *, state=None, key_padding_mask=None):
        """Decode: continue causal attention over new tokens from ``state``.

        Parameters
        ----------
        query : torch.Tensor, shape (B, E) or (B, T, E)
            One new token, or T of them (a prompt); (T, B, E) with
            ``batch_first=False``.
        key, value : torch.Tensor, optional
            Default ``query`` (self-attention).
        state : kernelattn.LinearAttentionState, optional
            From the previous call; None starts an empty sequence.
        key_padding_mask : bool torch.Tensor, shape (B,) or (B, T), optional
            True marks new tokens that are padding (they do not enter the state).

        Returns
        -------
        out : torch.Tensor, shape like ``query``
        state : kernelattn.LinearAttentionState
            Pass it to the next call. ``step`` over a sequence in any split
            equals ``forward`` with ``causal=True``.
        """
        if not self.causal:
            raise ValueError("step() continues causal attention, and this module was built with causal=False; "
                             "build it with causal=True to decode token by token")
        key = query if key is None else key
        value = key if value is None else value
        for name, x in (("query", query), ("key", key), ("value", value)):
            _tensor(name, x, *self._width(name))
        if key_padding_mask is not None and not isinstance(key_padding_mask, torch.Tensor):
            _as_key_mask(key_padding_mask, 0, 0)  # raises, naming it
        single = query.ndim == 2
        if single:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None and key_padding_mask.ndim == 1:
                key_padding_mask = key_padding_mask.unsqueeze(1)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        for name, x in (("query", query), ("key", key), ("value", value)):
            if x.ndim != 3:
                raise ValueError(f"{name} must be (B, E) or (B, T, E); got shape {tuple(x.shape)}")
        key_mask = _as_key_mask(key_padding_mask, key.shape[0], key.shape[1])
        out, state = ka.linear_attention_step(self._heads(query, self.q_proj), self._heads(key, self.k_proj),
                                              self._heads(value, self.v_proj), feature_map=self._phi(),
                                              state=state, key_mask=key_mask, eps=self.eps)
        out = self.out_proj(out.transpose(1, 2).reshape(query.shape[0], query.shape[1], self.embed_dim))
        if single:
            return out[:, 0], state
        return (out if self.batch_first else out.transpose(0, 1)), state

    def orthogonality_penalty(self, weight: float = 1.0):
        """The kernel's orthogonality penalty (see :meth:`FeatureMap.orthogonality_penalty`)."""
        return self.feature_map.orthogonality_penalty(weight)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, causal={self.causal}, "
                f"batch_first={self.batch_first}, dropout={self.dropout}")


_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


class LinearTransformerEncoderLayer(nn.Module):
    """The paper's pre-LayerNorm encoder block: ``x + Attn(LN x)``, then ``x + FFN(LN x)``.

    ``FFN = Linear -> GELU -> Dropout -> Linear -> Dropout`` (Yorsh & Kovalenko 2022, their experiments); the
    attention is :class:`MultiheadLinearAttention`. Called like
    ``torch.nn.TransformerEncoderLayer`` (with ``norm_first=True``).

    Parameters
    ----------
    d_model : int
    nhead : int
    dim_feedforward : int, default 2048
    dropout : float, default 0.1
        Dropout of the feedforward sublayer (and of the kernel blocks' inputs
        unless ``feature_map_dropout`` is given), as in
        ``torch.nn.TransformerEncoderLayer``'s position.
    feature_map, depth, feature_dim, rank, feature_map_bias, tied, seed
        The attention's kernel (see :class:`MultiheadLinearAttention`).
    feature_map_dropout : float, optional
        Dropout on the kernel blocks' inputs (default ``dropout``, as in the paper).
    causal : bool, default False
    activation : {"gelu", "relu"} or callable, default "gelu"
    layer_norm_eps : float, default 1e-5
    batch_first : bool, default True
    bias : bool, default True
    eps, chunk_size, device, dtype
        As in :class:`MultiheadLinearAttention`.

    Examples
    --------
    >>> import torch
    >>> from kernelattn.backends.torch_nn import LinearTransformerEncoderLayer
    >>> layer = LinearTransformerEncoderLayer(64, 4, 128, feature_map="glu", seed=0)
    >>> layer(torch.randn(2, 50, 64)).shape
    torch.Size([2, 50, 64])

    The names ``kernel=``, ``kernel_bias=`` and ``kernel_dropout=`` still work
    for ``feature_map=``, ``feature_map_bias=`` and ``feature_map_dropout=``
    (deprecated; they warn). See :doc:`/guide/modules` for the arguments
    side by side with :class:`kernelattn.backends.jax_nn.EncoderBlock`.
    """

    @_renamed(kernel="feature_map", kernel_bias="feature_map_bias", kernel_dropout="feature_map_dropout")
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1, *,
                 feature_map="glu", depth: int = 1, feature_dim: int | None = None, rank: int | None = None,
                 feature_map_bias: bool = False, tied: bool = True, feature_map_dropout: float | None = None,
                 causal: bool = False, activation="gelu", layer_norm_eps: float = 1e-5, batch_first: bool = True,
                 bias: bool = True, eps: float = 1e-6, chunk_size: int | None = None, seed=None, device=None,
                 dtype=None):
        super().__init__()
        dim_feedforward = _check.integer("dim_feedforward", dim_feedforward)
        dropout = _check.probability("dropout", dropout)
        if feature_map_dropout is not None:
            feature_map_dropout = _check.probability("feature_map_dropout", feature_map_dropout)
        layer_norm_eps = _check.positive("layer_norm_eps", layer_norm_eps)
        factory = {"device": device, "dtype": dtype}
        self.self_attn = MultiheadLinearAttention(
            d_model, nhead, feature_map=feature_map, depth=depth, feature_dim=feature_dim, rank=rank,
            feature_map_bias=feature_map_bias, tied=tied, causal=causal, batch_first=batch_first,
            feature_map_dropout=dropout if feature_map_dropout is None else feature_map_dropout, bias=bias, eps=eps,
            chunk_size=chunk_size, seed=seed, **factory)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        if isinstance(activation, str):
            if activation not in _ACTIVATIONS:
                raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)} or a callable; got {activation!r}")
            activation = _ACTIVATIONS[activation]
        elif not callable(activation):
            raise TypeError(f"activation must be one of {sorted(_ACTIVATIONS)} or a callable; "
                            f"got {_check.short(activation)}")
        self.activation = activation

    def _ff(self, x):
        return self.dropout2(self.linear2(self.dropout1(self.activation(self.linear1(x)))))

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal: bool = False):
        """``src`` (B, N, d_model) (or (N, B, d_model) with ``batch_first=False``) -> same shape.

        ``src_key_padding_mask`` (B, N): True marks padding. ``src_mask`` is
        accepted only as the causal mask with ``is_causal=True``.
        """
        x = _tensor("src", src, self.self_attn.embed_dim, "d_model")
        x = x + self.self_attn(self.norm1(x), key_padding_mask=src_key_padding_mask, attn_mask=src_mask,
                               is_causal=_check.flag("is_causal", is_causal))[0]
        return x + self._ff(self.norm2(x))

    def step(self, x, *, state=None, key_padding_mask=None):
        """Decode through the block: ``x`` (B, d_model) or (B, T, d_model); returns (out, state).

        Needs ``causal=True``; see :meth:`MultiheadLinearAttention.step`.
        """
        _tensor("x", x, self.self_attn.embed_dim, "d_model")
        h, state = self.self_attn.step(self.norm1(x), state=state, key_padding_mask=key_padding_mask)
        x = x + h
        return x + self._ff(self.norm2(x)), state

    def orthogonality_penalty(self, weight: float = 1.0):
        """The attention kernel's orthogonality penalty."""
        return self.self_attn.orthogonality_penalty(weight)

