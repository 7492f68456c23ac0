"""Synthetic attention problems drawn on the spot (no file): :func:`default_inputs`.

No download and no file: :func:`default_inputs` draws queries, keys and values
from a fixed seed, with structure that makes softmax attention peaked rather
than uniform (tokens belong to a few latent topics; queries and keys of the
same topic align), so approximation errors mean something.
"""

from __future__ import annotations

import numpy as np

__all__ = ["default_inputs"]


def default_inputs(n: int = 512, *, batch: int = 1, num_heads: int = 8, head_dim: int = 64,
                   topics: int = 16, seed: int = 0, dtype=np.float32):
    """Queries, keys and values of shape (batch, num_heads, n, head_dim).

    Parameters
    ----------
    n : int
        Sequence length N.
    batch, num_heads, head_dim : int
        B, H and d.
    topics : int
        Number of latent topics; queries attend mostly to keys of their topic.
    seed : int
        Everything is drawn from ``numpy.random.default_rng(seed)``.
    dtype : numpy dtype

    Returns
    -------
    q, k, v : numpy.ndarray, each (batch, num_heads, n, head_dim)
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_heads, topics, head_dim))
    centres /= np.linalg.norm(centres, axis=-1, keepdims=True)
    topic = rng.integers(0, topics, size=(batch, num_heads, n))
    base = _gather(centres, topic)  # (B, H, N, d), unit vectors
    scale = 2.2 * head_dim**0.25       # logits q.k/sqrt(d) of about 4.8 within a topic
    q = scale * (base + 0.3 * rng.standard_normal(base.shape) / np.sqrt(head_dim))
    k = scale * (base + 0.3 * rng.standard_normal(base.shape) / np.sqrt(head_dim))
    v = rng.standard_normal((batch, num_heads, n, head_dim))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _gather(centres, topic):
    # centres (H, T, d), topic (B, H, N) -> (B, H, N, d)
    H = centres.shape[0]
    return centres[np.arange(H)[None, :, None], topic]
