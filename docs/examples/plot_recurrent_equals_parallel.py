"""
Recurrent decoding equals the parallel form
===========================================

A language model decodes one token at a time. With linear attention the whole past is summarised
by a state :math:`(S, z)` of fixed size, so each new token costs O(1) in the length. Here a prompt
is processed in parallel (``return_state=True``), the rest of the sequence is decoded token by
token with :func:`kernelattn.linear_attention_step`, and the result is compared with the causal
parallel output over the whole sequence.
"""

import matplotlib.pyplot as plt
import numpy as np

import kernelattn as ka
from kernelattn.data import default_inputs

q, k, v = default_inputs(200, num_heads=2, head_dim=16, seed=5)
phi = ka.feature_map("aoglu", num_heads=2, head_dim=16, depth=3, seed=0)
parallel = ka.linear_attention(q, k, v, feature_map=phi, causal=True)

prompt = 50
out, state = ka.linear_attention(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt],
                                 feature_map=phi, causal=True, return_state=True)
decoded = [out]
for t in range(prompt, 200):
    o, state = ka.linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], feature_map=phi, state=state)
    decoded.append(o[:, :, None])
decoded = np.concatenate(decoded, axis=2)

err = np.abs(decoded - parallel).max(axis=(0, 1, 3))
print(f"largest difference over all positions: {err.max():.2e} (float32)")
print(f"state shapes: S {state.S.shape}, z {state.z.shape} — independent of the length")

fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
axes[0].plot(parallel[0, 0, :, 0], label="parallel (causal)")
axes[0].plot(decoded[0, 0, :, 0], "--", label="prefill + step by step")
axes[0].axvline(prompt, color="grey", lw=0.8)
axes[0].set_xlabel("position")
axes[0].set_title("output, head 0, channel 0", fontsize=9)
axes[0].legend(fontsize=8)
axes[1].semilogy(np.maximum(err, 1e-12))
axes[1].set_xlabel("position")
axes[1].set_title("max |difference| per position", fontsize=9)
fig.tight_layout()
