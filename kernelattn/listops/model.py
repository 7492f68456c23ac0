"""The paper's Long Range Arena classifier, with the attention chosen by name.

The backbone of Yorsh & Kovalenko's experiments (ICANN 2022, and their
``lra/layers.py``):

* token embedding + learned positional embedding (initialised to zero), then
  a CLS vector prepended (it gets no position);
* ``layers`` pre-LayerNorm blocks: ``x + Attn(LN x)``, then ``x + FFN(LN x)``
  with ``FFN = Linear -> GELU -> Dropout -> Linear -> Dropout``;
* the classifier ``LN -> CLS -> Dropout -> Linear + GELU -> Linear``.

Every Linear and LayerNorm is affine (weights and biases); LayerNorm eps is
1e-6 as in the authors' code. With the LRA ListOps configuration
(:data:`LRA`) the parameter counts are the authors' to the parameter:
21,019,658 with softmax attention, 21,412,874 with GLU, 21,806,090 with GLU x2
and 21,904,394 with AOGLU x3 (see :func:`count_parameters`).

Attention (:data:`ATTENTIONS`): ``softmax`` is exact attention through
:func:`torch.nn.functional.scaled_dot_product_attention` (dropout 0.1 on the
attention probabilities, as the authors' ``TAttention``); every other name is
:class:`kernelattn.backends.torch_nn.MultiheadLinearAttention` with that
feature map (dropout on the input of every trainable kernel block, the
paper's regularisation). Padded keys never enter either: softmax gets a
boolean mask, linear attention a ``key_padding_mask`` applied after phi.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import NUM_CLASSES, PAD, VOCAB

__all__ = ["ATTENTIONS", "LABELS", "LRA", "ListOpsClassifier", "ModelConfig", "SoftmaxAttention", "count_parameters",
           "parameter_table"]

#: name -> (feature-map kind, options) of the linear attentions; ``softmax`` maps to None.
ATTENTIONS = {
    "softmax": None,
    "elu": ("elu", {}),
    "favor": ("favor", {}),
    "ffn": ("ffn", {}),
    "glu": ("glu", {}),
    "glu2": ("glu", {"depth": 2}),
    "aoglu3": ("aoglu", {"depth": 3}),
    "hedgehog": ("hedgehog", {}),
}
#: names shown in tables
LABELS = {"softmax": "softmax", "elu": "elu+1", "favor": "FAVOR+", "ffn": "FFN", "glu": "GLU",
          "glu2": "GLU×2", "aoglu3": "AOGLU×3", "hedgehog": "Hedgehog"}
TRAINABLE = ("ffn", "glu", "glu2", "aoglu3", "hedgehog")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the classifier (defaults: LRA ListOps, :data:`LRA`).

    Attributes
    ----------
    vocab_size : int
        Token ids 0 .. vocab_size - 1; 0 is padding.
    max_length : int
        Longest input (the positional table's length; CLS comes on top).
    hidden, heads, layers, mlp : int
        Width, attention heads (head width hidden / heads), blocks, FFN width
        (also the classifier's hidden width).
    num_classes : int
    dropout : float
        Dropout in the FFN sublayers.
    attention_dropout : float
        Softmax: dropout on the attention probabilities. Trainable kernels:
        dropout on every kernel block's input. Fixed maps (elu, favor): none.
    classifier_dropout : float
        Dropout on the CLS vector before the classifier (0 in the authors' runs).
    """

    vocab_size: int = len(VOCAB)
    max_length: int = 2000
    hidden: int = 512
    heads: int = 8
    layers: int = 6
    mlp: int = 2048
    num_classes: int = NUM_CLASSES
    dropout: float = 0.1
    attention_dropout: float = 0.1
    classifier_dropout: float = 0.0

    def __post_init__(self):
        for name in ("vocab_size", "max_length", "hidden", "heads", "layers", "mlp", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer; got {value!r}")
        if self.hidden % self.heads:
            raise ValueError(f"ModelConfig.hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        for name in ("dropout", "attention_dropout", "classifier_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ModelConfig.{name} must be in [0, 1); got {getattr(self, name)!r}")


#: The LRA ListOps model of the paper: vocabulary 17, length 2000, hidden 512, 8 heads, 6 layers, MLP 2048.
LRA = ModelConfig()


def _check_attention(attention: str) -> str:
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {list(ATTENTIONS)}; got {attention!r}")
    return attention


class SoftmaxAttention(nn.Module):
    """Exact multi-head attention: q/k/v/out ``nn.Linear`` with bias, SDPA underneath.

    Parameters
    ----------
    embed_dim, num_heads : int
    dropout : float
        On the attention probabilities while training.
    device, dtype : optional
    """

    def __init__(self, embed_dim: int, num_heads: int, *, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_heads, self.head_dim, self.dropout = num_heads, embed_dim // num_heads, float(dropout)
        self.q_proj = nn.Linear(embed_dim, embed_dim, **factory)
        self.k_proj = nn.Linear(embed_dim, embed_dim, **factory)
        self.v_proj = nn.Linear(embed_dim, embed_dim, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, **factory)
        # the same initialisation as MultiheadLinearAttention (and nn.MultiheadAttention)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.zeros_(proj.bias)

    def _heads(self, x, proj):
        B, T = x.shape[:2]
        return proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x, key_padding_mask=None):
        """``x`` (B, T, E) -> (B, T, E); ``key_padding_mask`` (B, T) bool, True marks padding."""
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(self._heads(x, self.q_proj), self._heads(x, self.k_proj),
                                             self._heads(x, self.v_proj), attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        B, T = x.shape[:2]
        return self.out_proj(out.transpose(1, 2).reshape(B, T, -1))

    def orthogonality_penalty(self, weight: float = 1.0):
        return None


class _LinearAttention(nn.Module):
    """MultiheadLinearAttention with the call of :class:`SoftmaxAttention`."""

    def __init__(self, cfg: ModelConfig, attention: str, *, seed, device=None, dtype=None):
        super().__init__()
        from kernelattn.backends.torch_nn import MultiheadLinearAttention

        kind, options = ATTENTIONS[attention]
        self.attn = MultiheadLinearAttention(
            cfg.hidden, cfg.heads, feature_map=kind,
            feature_map_dropout=cfg.attention_dropout if attention in TRAINABLE else 0.0,
            seed=seed, device=device, dtype=dtype, **options)
        self.tied = self.attn.feature_map.spec.tied

    def forward(self, x, key_padding_mask=None):
        return self.attn(x, key_padding_mask=key_padding_mask)[0]

    def orthogonality_penalty(self, weight: float = 1.0):
        if not any(True for _ in self.attn.feature_map.parameters()):
            return None
        # The authors add the penalty once per phi call: a tied map is called twice (queries, keys); an
        # untied pair once each, which the sum over both roles already is.
        return (2.0 if self.tied else 1.0) * self.attn.orthogonality_penalty(weight)


class EncoderBlock(nn.Module):
    """Pre-LayerNorm block: ``x + Attn(LN x)``, then ``x + FFN(LN x)``."""

    def __init__(self, cfg: ModelConfig, attention: str, *, seed, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(cfg.hidden, eps=1e-6, **factory)
        if attention == "softmax":
            self.attn = SoftmaxAttention(cfg.hidden, cfg.heads, dropout=cfg.attention_dropout, **factory)
        else:
            self.attn = _LinearAttention(cfg, attention, seed=seed, **factory)
        self.norm2 = nn.LayerNorm(cfg.hidden, eps=1e-6, **factory)
        self.ffn = nn.Sequential(nn.Linear(cfg.hidden, cfg.mlp, **factory), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.mlp, cfg.hidden, **factory), nn.Dropout(cfg.dropout))

    def forward(self, x, key_padding_mask=None):
        x = x + self.attn(self.norm1(x), key_padding_mask=key_padding_mask)
        return x + self.ffn(self.norm2(x))


class ListOpsClassifier(nn.Module):
    """The paper's LRA encoder classifier.

    Parameters
    ----------
    cfg : ModelConfig
        Sizes (default :data:`LRA`).
    attention : str, default "softmax"
        One of :data:`ATTENTIONS`: ``softmax``, ``elu`` (elu+1), ``favor``
        (FAVOR+), or the trainable kernels ``ffn``, ``glu``, ``glu2`` (GLU x2),
        ``aoglu3`` (AOGLU x3, gate rank d/4), ``hedgehog``.
    seed : int, default 0
        Seed of the kernels' initial weights (layer ``i`` draws from
        ``numpy.random.default_rng([seed, i])``); everything else is drawn
        from torch's global generator (seed it with :func:`torch.manual_seed`).
    device, dtype : optional
        ``device="meta"`` builds the shapes without memory (for counting).

    Examples
    --------
    >>> import torch
    >>> from kernelattn.listops.model import ListOpsClassifier, ModelConfig
    >>> cfg = ModelConfig(max_length=32, hidden=16, heads=2, layers=1, mlp=32)
    >>> model = ListOpsClassifier(cfg, "glu")
    >>> model(torch.tensor([[1, 7, 8, 5, 0, 0]])).shape
    torch.Size([1, 10])
    """

    def __init__(self, cfg: ModelConfig = LRA, attention: str = "softmax", *, seed: int = 0, device=None,
                 dtype=None):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"cfg must be a ModelConfig; got {type(cfg).__name__}")
        self.cfg, self.attention = cfg, _check_attention(attention)
        factory = {"device": device, "dtype": dtype}
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.hidden, padding_idx=PAD, **factory)
        self.pos_embedding = nn.Parameter(torch.zeros(1, cfg.max_length, cfg.hidden, **factory))
        self.cls = nn.Parameter(torch.empty(1, 1, cfg.hidden, **factory))
        nn.init.xavier_uniform_(self.cls)
        self.blocks = nn.ModuleList(
            EncoderBlock(cfg, attention, seed=np.random.default_rng([seed, i]), **factory)
            for i in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.hidden, eps=1e-6, **factory)
        self.classifier = nn.Sequential(nn.Dropout(cfg.classifier_dropout),
                                        nn.Linear(cfg.hidden, cfg.mlp, **factory), nn.GELU(),
                                        nn.Linear(cfg.mlp, cfg.num_classes, **factory))

    def forward(self, tokens):
        """Logits of the classes.

        Parameters
        ----------
        tokens : torch.Tensor of int, shape (B, N)
            Token ids, right-padded with 0 (:data:`~kernelattn.listops.data.PAD`);
            N <= ``cfg.max_length``. Padding never changes the logits.

        Returns
        -------
        torch.Tensor, shape (B, num_classes)
        """
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.dtype.is_floating_point:
            raise ValueError(f"tokens must be an integer tensor of shape (B, N); got "
                             f"{getattr(tokens, 'dtype', type(tokens).__name__)} "
                             f"{tuple(getattr(tokens, 'shape', ()))}")
        B, N = tokens.shape
        if N > self.cfg.max_length:
            raise ValueError(f"tokens has length {N}, more than the model's max_length={self.cfg.max_length}")
        tokens = tokens.long()
        x = self.embedding(tokens) + self.pos_embedding[:, :N]
        x = torch.cat([self.cls.expand(B, 1, -1), x], dim=1)
        padding = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=tokens.device), tokens == PAD], dim=1)
        for block in self.blocks:
            x = block(x, key_padding_mask=padding)
        return self.classifier(self.norm(x)[:, 0])

    def orthogonality_penalty(self, weight: float = 1.0):
        """The regulariser of one forward pass: ``weight * sum over phi calls of the kernel's penalty``.

        As the authors add it: once per phi call, i.e. twice per layer (the
        query pass and the key pass of the shared map). A 0-d tensor (0 for
        attentions without trainable main weights).
        """
        terms = [t for t in (b.attn.orthogonality_penalty(weight) for b in self.blocks) if t is not None]
        return torch.stack(terms).sum() if terms else self.cls.new_zeros(())

    def extra_repr(self) -> str:
        return f"attention={self.attention!r}"


def count_parameters(module: nn.Module) -> int:
    """Number of trainable scalars of a module (``requires_grad`` parameters)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def parameter_table(cfg: ModelConfig = LRA, attentions=tuple(ATTENTIONS)) -> dict[str, int]:
    """Parameter count of the classifier per attention, each built on the meta device (no memory)."""
    return {name: count_parameters(ListOpsClassifier(cfg, name, device="meta")) for name in attentions}


def describe(cfg: ModelConfig) -> str:
    """One line with the sizes of ``cfg``."""
    return ", ".join(f"{f.name} {getattr(cfg, f.name)}" for f in dataclasses.fields(cfg))

