"""
Padding never changes the answer
================================

Sequences in a batch are padded to one length, and the padded keys must not change what the real
queries see. kernelattn applies the key mask *after* the feature map: padded rows of
:math:`\\phi(K)` are zeroed, so they enter neither :math:`S` nor the normaliser :math:`z`.

Masking the raw keys instead (setting padded keys to zero before :math:`\\phi`) is a common bug:
:math:`\\phi(0) \\neq 0` for a positive map, so every padded key still adds to the normaliser.
Below, the same 60 real tokens are padded with 0 … 300 garbage tokens.
"""

import matplotlib.pyplot as plt
import numpy as np

import kernelattn as ka
from kernelattn.data import default_inputs
from kernelattn.testing import rel_rms_error

n_real = 60
q, k, v = default_inputs(n_real, num_heads=2, head_dim=16, seed=2)
phi = ka.feature_map("glu", num_heads=2, head_dim=16, seed=0)
clean = ka.linear_attention(q, k, v, feature_map=phi)

rng = np.random.default_rng(0)
pads = [0, 10, 30, 100, 300]
ours, wrong = [], []
for pad in pads:
    garbage = rng.standard_normal((2, 1, 2, pad, 16)).astype(np.float32) * 3
    kp = np.concatenate([k, garbage[0]], axis=2)
    vp = np.concatenate([v, garbage[1]], axis=2)
    mask = np.zeros((1, n_real + pad), dtype=bool)
    mask[:, :n_real] = True
    ours.append(rel_rms_error(ka.linear_attention(q, kp, vp, feature_map=phi, key_mask=mask), clean))
    # the bug: zero the raw padded keys and values, then apply phi without a mask
    k_bug = np.where(mask[:, None, :, None], kp, 0)
    v_bug = np.where(mask[:, None, :, None], vp, 0)
    wrong.append(rel_rms_error(ka.linear_attention(q, k_bug, v_bug, feature_map=phi), clean))

for pad, a, b in zip(pads, ours, wrong):
    print(f"{pad:4d} padded keys: key_mask error {a:.1e}   masking raw keys error {b:.3f}")

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(pads, np.maximum(ours, 1e-9), "-o", label="key_mask (after phi): kernelattn")
ax.plot(pads, wrong, "-s", label="zeroing raw keys (before phi): wrong")
ax.set_yscale("log")
ax.set_xlabel("number of padded keys")
ax.set_ylabel("relative error of the real outputs")
ax.legend(fontsize=8)
fig.tight_layout()
