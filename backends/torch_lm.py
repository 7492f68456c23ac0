"""A small causal language model with linear or softmax attention, and token-by-token generation.

* :class:`CausalLM`: token embedding + sinusoidal positions, ``num_layers``
  pre-LayerNorm causal blocks, a final LayerNorm and an LM head tied to the
  embedding. ``attention="linear"`` uses
  :class:`~kernelattn.backends.torch_nn.LinearTransformerEncoderLayer`
  (``causal=True``); ``attention="softmax"`` the same block with
  ``scaled_dot_product_attention`` in place of linear attention (the
  parameters have the same names, so ``load_state_dict(..., strict=False)``
  moves everything but the kernel between the two).
* :meth:`CausalLM.prefill` runs a prompt in parallel and returns a
  :class:`GenerationCache`; :meth:`CausalLM.decode` feeds one token per call.
  Linear attention carries a fixed-size state per layer (a
  :class:`kernelattn.LinearAttentionDecoder`, updated in place), so a token
  costs the same at any context length; softmax attention keeps a key/value
  cache per layer and reads all of it for every token.
* :meth:`CausalLM.generate`: greedy or sampled continuation.

Examples
--------
>>> import torch
>>> from kernelattn.backends.torch_lm import CausalLM
>>> model = CausalLM(100, d_model=32, nhead=2, num_layers=2, seed=0).eval()
>>> ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
>>> model.generate(ids, 5).shape
torch.Size([2, 13])
>>> logits, cache = model.prefill(ids[:, :6])      # a prompt in parallel ...
>>> for t in (6, 7):                               # ... then one token at a time
...     logits, cache = model.decode(ids[:, t], cache)
>>> full = model(ids)
>>> bool(torch.allclose(logits, full[:, -1], atol=1e-4))
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import kernelattn as ka
from kernelattn import _validation as _check
from kernelattn.backends.torch_nn import LinearTransformerEncoderLayer

__all__ = ["CausalLM", "GenerationCache"]

_ATTENTIONS = ("linear", "softmax")


def sinusoidal_positions(start: int, length: int, d_model: int, *, dtype=torch.float32, device=None):
    """Positions ``start .. start + length - 1`` as (length, d_model) sines and cosines.

    Computed on the fly (in float64, then cast), so any context length works
    without a table.
    """
    pos = torch.arange(start, start + length, dtype=torch.float64, device=device)
    inv = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64, device=device) / d_model)
    angle = pos[:, None] * inv
    # interleaved: sin at even features, cos at odd ones
    return torch.stack((angle.sin(), angle.cos()), dim=-1).reshape(length, d_model).to(dtype)


class _SoftmaxAttention(nn.Module):
    """Causal multi-head softmax attention: q/k/v/out projections around ``scaled_dot_product_attention``."""

    def __init__(self, embed_dim, num_heads, *, dropout=0.0, bias=True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        for proj in (self.q_proj, self.k_proj, self.v_proj):  # as MultiheadLinearAttention initialises
            nn.init.xavier_uniform_(proj.weight)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def _heads(self, x, proj):
        B, T = x.shape[0], x.shape[1]
        return proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def _merge(self, out):
        B, _, T, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, T, self.embed_dim))

    def prefill(self, x, capacity):
        """Causal attention over ``x`` (B, T, E); returns (out, cache) with room for ``capacity`` tokens."""
        q, k, v = (self._heads(x, p) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self._merge(out), _KVCache(k, v, capacity)

    def forward(self, x):
        return self.prefill(x, 0)[0]

    def step(self, x, cache):
        """One token ``x`` (B, E) attending to the cache and itself; the cache grows by one."""
        q, k, v = (self._heads(x[:, None], p) for p in (self.q_proj, self.k_proj, self.v_proj))
        keys, values = cache.append(k, v)
        return self._merge(F.scaled_dot_product_attention(q, keys, values))[:, 0]


class _KVCache:
    """Keys and values (B, H, capacity, d), filled up to ``length``; capacity doubles when full."""

    def __init__(self, k, v, capacity):
        B, H, T, d = k.shape
        cap = max(capacity, T, 1)
        self.k = k.new_empty((B, H, cap, d))
        self.v = v.new_empty((B, H, cap, v.shape[-1]))
        self.k[:, :, :T], self.v[:, :, :T] = k, v
        self.length = T

    @property
    def capacity(self):
        return self.k.shape[2]

    def append(self, k, v):
        n = self.length
        if n == self.capacity:  # doubling keeps the copies O(1) per token on average
            for name in ("k", "v"):
                old = getattr(self, name)
                new = old.new_empty((*old.shape[:2], 2 * n, old.shape[3]))
                new[:, :, :n] = old
                setattr(self, name, new)
        self.k[:, :, n:n + 1], self.v[:, :, n:n + 1] = k, v
        self.length = n + 1
        return self.k[:, :, :n + 1], self.v[:, :, :n + 1]


class _SoftmaxBlock(nn.Module):
    """LinearTransformerEncoderLayer's pre-LN block with softmax attention; same parameter names."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout, *, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.self_attn = _SoftmaxAttention(d_model, nhead, dropout=dropout, **factory)
        self.norm1 = nn.LayerNorm(d_model, **factory)
        self.norm2 = nn.LayerNorm(d_model, **factory)
        self.linear1 = nn.Linear(d_model, dim_feedforward, **factory)
        self.linear2 = nn.Linear(dim_feedforward, d_model, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = F.gelu

    _ff = LinearTransformerEncoderLayer._ff

    def forward(self, x):
        x = x + self.self_attn(self.norm1(x))
        return x + self._ff(self.norm2(x))


@dataclass
class GenerationCache:
    """What :meth:`CausalLM.decode` continues from: the tokens seen and one entry per layer.

    ``layers`` holds a :class:`kernelattn.LinearAttentionDecoder` per layer
    (linear attention: state (S, z) of fixed size) or a key/value cache
    (softmax attention). Updated in place by :meth:`CausalLM.decode`.
    """

    attention: str
    batch: int
    length: int
    layers: list = field(default_factory=list)


def _ids(name, ids, vocab_size, ndim):
    """``ids`` if it is an integer tensor with ``ndim`` dimensions and values in [0, vocab_size)."""
    axes = "(B, T)" if ndim == 2 else "(B,)"
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor of shape {axes}; got {_check.described(ids)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of shape {axes}; got dtype {ids.dtype}")
    if ids.ndim != ndim or ids.shape[0] == 0 or (ndim == 2 and ids.shape[1] == 0):
        raise ValueError(f"{name} must have shape {axes} with B >= 1{' and T >= 1' if ndim == 2 else ''}; "
                         f"got shape {tuple(ids.shape)}")
    lo, hi = (int(a) for a in torch.aminmax(ids))
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{name} must hold token ids in [0, vocab_size={vocab_size}); "
                         f"got values in [{lo}, {hi}]")
    return ids


class CausalLM(nn.Module):
    """A causal language model of ``num_layers`` pre-LN blocks with linear or softmax attention.

    Parameters
    ----------
    vocab_size : int
    d_model : int, default 256
    nhead : int, default 4
    num_layers : int, default 4
    dim_feedforward : int, optional
        Width of the blocks' MLP (default ``4 * d_model``).
    attention : {"linear", "softmax"}, default "linear"
        Linear attention with a trainable kernel (Yorsh & Kovalenko 2022), or
        exact softmax attention with a key/value cache for decoding.
    feature_map : str, default "ffn"
        The kernel of linear attention (see :data:`kernelattn.KINDS`); ignored
        for softmax attention.
    max_len : int, optional
        Longest sequence accepted (prompt plus generated tokens); default no
        limit: the positions are sinusoids computed on the fly, so there is no
        table to outgrow.
    dropout : float, default 0.0
        Dropout of the blocks while training (:meth:`prefill`, :meth:`decode`
        and :meth:`generate` run the modules as they are: call ``eval()``).
    seed : int, optional
        Initial weights (torch's global RNG is left as it was).
    device, dtype : optional

    Notes
    -----
    The input is ``sqrt(d_model) * embedding + positions``; the LM head is the
    embedding matrix (tied). Linear attention's causal form would work
    without positions too; they are kept so both models see the same input.
    """

    def __init__(self, vocab_size: int, d_model: int = 256, nhead: int = 4, num_layers: int = 4,
                 dim_feedforward: int | None = None, *, attention: str = "linear", feature_map: str = "ffn",
                 max_len: int | None = None, dropout: float = 0.0, seed=None, device=None, dtype=None):
        super().__init__()
        vocab_size = _check.integer("vocab_size", vocab_size)
        d_model, nhead = _check.integer("d_model", d_model), _check.integer("nhead", nhead)
        num_layers = _check.integer("num_layers", num_layers)
        if d_model % nhead:
            raise ValueError(f"d_model must be divisible by nhead; got d_model={d_model}, nhead={nhead}")
        if d_model % 2:
            raise ValueError(f"d_model must be even (sine and cosine positions); got {d_model}")
        dim_feedforward = 4 * d_model if dim_feedforward is None else _check.integer("dim_feedforward",
                                                                                       dim_feedforward)
        attention = _check.choice("attention", attention, _ATTENTIONS)
        self.max_len = _check.optional_integer("max_len", max_len)
        dropout = _check.probability("dropout", dropout)
        if seed is not None:
            seed = _check.integer("seed", seed, low=0)
        self.vocab_size, self.d_model, self.nhead, self.attention = vocab_size, d_model, nhead, attention
        factory = {"device": device, "dtype": dtype}
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.embed = nn.Embedding(vocab_size, d_model, **factory)
            nn.init.normal_(self.embed.weight, std=d_model ** -0.5)
            if attention == "linear":
                self.layers = nn.ModuleList(
                    LinearTransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, feature_map=feature_map,
                                                  causal=True, seed=None if seed is None else seed + i, **factory)
                    for i in range(num_layers))
            else:
                self.layers = nn.ModuleList(_SoftmaxBlock(d_model, nhead, dim_feedforward, dropout, **factory)
                                            for _ in range(num_layers))
            self.norm = nn.LayerNorm(d_model, **factory)

    # -- the parallel form ------------------------------------------------------------
    def _inputs(self, ids, start):
        w = self.embed.weight
        pe = sinusoidal_positions(start, ids.shape[1], self.d_model, dtype=w.dtype, device=w.device)
        return self.embed(ids) * math.sqrt(self.d_model) + pe

    def _logits(self, x):
        return F.linear(self.norm(x), self.embed.weight)

    def _check_length(self, n, name="ids"):
        if self.max_len is not None and n > self.max_len:
            raise ValueError(f"{name} would make the sequence {n} tokens long; this model has max_len={self.max_len}")

    def forward(self, ids):
        """Logits (B, T, vocab_size) of every position of ``ids`` (B, T), each seeing only itself and earlier tokens."""
        ids = _ids("ids", ids, self.vocab_size, 2)
        self._check_length(ids.shape[1])
        x = self._inputs(ids, 0)
        for layer in self.layers:
            x = layer(x)
        return self._logits(x)

    # -- token by token ---------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids, *, max_new_tokens: int = 0):
        """Run the prompt ``ids`` (B, T) in parallel: (logits of its last position (B, vocab_size), cache).

        ``max_new_tokens`` sizes the softmax key/value cache (it doubles when
        a :meth:`decode` finds it full); linear attention needs no room.
        """
        ids = _ids("ids", ids, self.vocab_size, 2)
        max_new_tokens = _check.integer("max_new_tokens", max_new_tokens, low=0)
        B, T = ids.shape
        self._check_length(T)
        x = self._inputs(ids, 0)
        cache = GenerationCache(self.attention, B, T)
        for layer in self.layers:
            if self.attention == "linear":
                x, state = layer.step(x)  # the prompt's causal attention and its final state (S, z)
                attn = layer.self_attn
                like = x.new_empty((B, attn.num_heads, attn.head_dim))
                cache.layers.append(ka.LinearAttentionDecoder(attn._phi(), like=like, state=state, eps=attn.eps))
            else:
                h, kv = layer.self_attn.prefill(layer.norm1(x), T + max_new_tokens)
                x = x + h
                x = x + layer._ff(layer.norm2(x))
                cache.layers.append(kv)
        return self._logits(x[:, -1]), cache

    @torch.inference_mode()
    def decode(self, token_ids, cache: GenerationCache):
        """Feed one token per sequence, ``token_ids`` (B,): (its logits (B, vocab_size), the cache).

        The cache is updated in place (and returned). A linear-attention
        token costs the same at any context length; a softmax one reads the
        whole key/value cache of every layer.
        """
        if not isinstance(cache, GenerationCache) or cache.attention != self.attention:
            raise TypeError(f"cache must be the GenerationCache of this {self.attention}-attention model's "
                            f"prefill(); got {_check.short(cache)}")
        token_ids = _ids("token_ids", token_ids, self.vocab_size, 1)
        if token_ids.shape[0] != cache.batch:
            raise ValueError(f"token_ids must have shape (B,) = ({cache.batch},), the cache's batch; "
                             f"got {tuple(token_ids.shape)}")
        self._check_length(cache.length + 1, "token_ids")
        x = self._inputs(token_ids[:, None], cache.length)[:, 0]
        for layer, entry in zip(self.layers, cache.layers):
            attn = layer.self_attn
            h = layer.norm1(x)
            if self.attention == "linear":
                B, H, d = x.shape[0], attn.num_heads, attn.head_dim
                q, k, v = (p(h).view(B, H, d) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
                h = attn.out_proj(entry.step(q, k, v).reshape(B, H * d))
            else:
                h = attn.step(h, entry)
            x = x + h
            x = x + layer._ff(layer.norm2(x))
        cache.length += 1
        return self._logits(x), cache

    @torch.inference_mode()
    def generate(self, ids, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
                 generator: torch.Generator | None = None):
        """Continue ``ids`` (B, T) by ``max_new_tokens`` tokens: (B, T + max_new_tokens).

        ``temperature=0`` is greedy (argmax); otherwise tokens are drawn from
        ``softmax(logits / temperature)``, over the ``top_k`` likeliest if
        given, with ``generator``.
        """
        ids = _ids("ids", ids, self.vocab_size, 2)
        max_new_tokens = _check.integer("max_new_tokens", max_new_tokens, low=0)
        temperature = _check.nonnegative("temperature", temperature)
        if top_k is not None:
            top_k = _check.integer("top_k", top_k)
            if top_k > self.vocab_size:
                raise ValueError(f"top_k must be in [1, vocab_size={self.vocab_size}]; got {top_k}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None; got {_check.short(generator)}")
        self._check_length(ids.shape[1] + max_new_tokens, "max_new_tokens")
        if max_new_tokens == 0:
            return ids.clone()
        logits, cache = self.prefill(ids, max_new_tokens=max_new_tokens)
        out = [ids]
        for i in range(max_new_tokens):
            nxt = self._sample(logits, temperature, top_k, generator)
            out.append(nxt[:, None])
            if i + 1 < max_new_tokens:
                logits, cache = self.decode(nxt, cache)
        return torch.cat(out, dim=1)

    @staticmethod
    def _sample(logits, temperature, top_k, generator):
        if temperature == 0.0:
            return logits.argmax(dim=-1)
        logits = logits.float() / temperature
        if top_k is not None:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size}, d_model={self.d_model}, nhead={self.nhead}, "
                f"num_layers={len(self.layers)}, attention={self.attention!r}")
