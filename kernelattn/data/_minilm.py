"""Real attention inputs: queries, keys and values of all-MiniLM-L6-v2, shipped as ``minilm.npz``."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

import numpy as np

LAYERS = 6
HEADS = 12
HEAD_DIM = 32
FILE = "minilm.npz"


@functools.lru_cache(maxsize=1)
def _load():
    with resources.files(__package__).joinpath(FILE).open("rb") as f:
        with np.load(f, allow_pickle=False) as z:
            return {name: z[name] for name in z.files}


@dataclass(frozen=True)
class MiniLMSample:
    """Queries, keys and values of one layer of all-MiniLM-L6-v2 on B passages of text.

    Attributes
    ----------
    q, k, v : numpy.ndarray, shape (B, H, N, d)
        What the layer's attention heads see; ``softmax_attention(q, k, v)``
        is the model's own attention output (d = 32).
    layer : int
        Layer index, 0-5.
    heads : tuple of int
        Which of the 12 heads are included, in order.
    tokens : numpy.ndarray of str, shape (B, N)
        The WordPiece tokens, [CLS] first and [SEP] last.
    texts : tuple of str
        The passages (module docstrings of the Python standard library).
    sources : tuple of str
        The module each passage comes from.
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    layer: int
    heads: tuple
    tokens: np.ndarray
    texts: tuple
    sources: tuple

    def split(self, held_out: int = 1):
        """``(held_in, held_out)`` samples: the last ``held_out`` passages are held out.

        Passages, not tokens, are split, so held-out attention rows come from
        text the fit never saw.
        """
        B = self.q.shape[0]
        if isinstance(held_out, bool) or not isinstance(held_out, int) or not 0 < held_out < B:
            raise ValueError(f"held_out must be an integer in [1, {B - 1}]; got {held_out!r}")
        cut = B - held_out
        return self._select(slice(0, cut)), self._select(slice(cut, B))

    def _select(self, sl):
        return MiniLMSample(self.q[sl], self.k[sl], self.v[sl], self.layer, self.heads, self.tokens[sl],
                            self.texts[sl], self.sources[sl])


def minilm(layer: int = 0, *, heads=None, dtype=np.float32) -> MiniLMSample:
    """Real queries, keys and values of a pretrained transformer, from the file shipped with kernelattn.

    all-MiniLM-L6-v2 (sentence-transformers; Apache-2.0), 6 layers of 12
    heads of width 32, run on 4 passages of English text of 96 tokens each
    (the docstrings of the standard-library modules heapq, shelve, turtle and
    sched). Stored as float16 (softmax attention over them reproduces the
    model's attention output to 5e-4); no torch or model is needed to read
    them. :mod:`kernelattn.data.make_minilm` regenerates the file.

    Parameters
    ----------
    layer : int, default 0
        0-5.
    heads : sequence of int, optional
        Heads to keep (default all 12).
    dtype : numpy dtype, default float32

    Returns
    -------
    MiniLMSample
        ``.q``, ``.k``, ``.v`` of shape (4, H, 96, 32), plus the tokens and
        texts; ``.split(held_out=1)`` separates held-out passages.

    Examples
    --------
    >>> import kernelattn as ka
    >>> s = ka.data.minilm(layer=2, heads=[0, 5])
    >>> s.q.shape, s.tokens[0, 0]
    ((4, 2, 96, 32), np.str_('[CLS]'))
    """
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < LAYERS:
        raise ValueError(f"layer must be an integer in [0, {LAYERS - 1}]; got {layer!r}")
    if heads is None:
        heads = tuple(range(HEADS))
    else:
        heads = tuple(int(h) for h in heads)
        if not heads or any(not 0 <= h < HEADS for h in heads) or len(set(heads)) != len(heads):
            raise ValueError(f"heads must be distinct integers in [0, {HEADS - 1}]; got {heads!r}")
    z = _load()
    idx = list(heads)
    q, k, v = (np.ascontiguousarray(z[name][layer][:, idx], dtype=dtype) for name in ("q", "k", "v"))
    return MiniLMSample(q, k, v, int(layer), heads, z["tokens"], tuple(str(t) for t in z["texts"]),
                        tuple(str(m) for m in z["modules"]))
