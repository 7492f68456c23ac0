"""
Generating text: tokens per second with linear and softmax attention
====================================================================

A causal language model generates one token at a time. With softmax attention every new token
reads the keys and values of the whole context (a KV cache), so a token costs O(N); with linear
attention the context is summarised per layer by a state :math:`(S, z)` of fixed size
(Yorsh & Kovalenko 2022), so a token costs the same at any length.

Two small models of :class:`kernelattn.backends.torch_lm.CausalLM` are built with the same
weights (embeddings, projections, MLPs; only linear attention has a kernel φ). The linear model's
token-by-token decoding is checked against its parallel forward, then both decode after prompts
of 1K, 4K and 16K tokens. The prompt's prefill is not timed.
"""

import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from kernelattn.backends.torch_lm import CausalLM

torch.set_num_threads(min(2, torch.get_num_threads()))
VOCAB = 512
opts = dict(d_model=128, nhead=4, num_layers=2, seed=0)
linear = CausalLM(VOCAB, attention="linear", feature_map="ffn", **opts).eval()
softmax = CausalLM(VOCAB, attention="softmax", **opts).eval()
_, only_linear = softmax.load_state_dict(linear.state_dict(), strict=False)
print(f"{len(only_linear)} parameter tensors only in the linear model, all in its kernels: {only_linear[0]}, ...")

# %%
# Step by step equals parallel
# ----------------------------
# ``prefill`` runs a prompt in parallel and returns per layer a
# :class:`kernelattn.LinearAttentionDecoder` holding the prompt's state; each ``decode`` call
# then feeds one token. The logits equal those of ``forward`` over the whole sequence.

ids = torch.randint(0, VOCAB, (1, 256), generator=torch.Generator().manual_seed(0))
prompt = 64
with torch.inference_mode():
    parallel = linear(ids)[0]
logits, cache = linear.prefill(ids[:, :prompt])
stepped = [logits[0]]
for t in range(prompt, ids.shape[1]):
    logits, cache = linear.decode(ids[:, t], cache)
    stepped.append(logits[0])
diff = (torch.stack(stepped) - parallel[prompt - 1:]).abs().amax(dim=-1).numpy()
print(f"largest |decode - forward| over {len(diff)} positions: {diff.max():.1e} (float32 logits)")
print(f"generate(): {linear.generate(ids[:, :8], 8).tolist()[0]}")

# %%
# Decode tokens/s
# ---------------
# For each context both models are prefilled, warmed up, then timed in interleaved rounds
# (linear, softmax, linear, ...) so that a slow moment of the machine hits both; the best round
# of each is kept. Linear attention's tokens/s should not depend on the context; when it dips at
# 16K here, that is the softmax model's 16K-token KV cache, read in the round before, pushing the
# linear model's weights out of the CPU caches (timed alone, it is flat).

CONTEXTS, STEPS, ROUNDS = (1024, 4096, 16384), 32, 5
models = {"linear": linear, "softmax": softmax}
tps = {name: [] for name in models}
t_start = time.perf_counter()
for n in CONTEXTS:
    ctx = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(n))
    caches = {name: m.prefill(ctx, max_new_tokens=(ROUNDS + 1) * STEPS)[1] for name, m in models.items()}
    token = ctx[:, -1]
    best = {name: float("inf") for name in models}
    for r in range(ROUNDS + 1):  # round 0 is the warm-up
        for name, m in models.items():
            t0 = time.perf_counter()
            for _ in range(STEPS):
                m.decode(token, caches[name])
            dt = (time.perf_counter() - t0) / STEPS
            if r:
                best[name] = min(best[name], dt)
    for name in models:
        tps[name].append(1.0 / best[name])

print(f"\n{'context':>8} {'linear tok/s':>13} {'softmax tok/s':>14} {'linear / softmax':>17}")
for i, n in enumerate(CONTEXTS):
    print(f"{n:>8} {tps['linear'][i]:>13.0f} {tps['softmax'][i]:>14.0f} "
          f"{tps['linear'][i] / tps['softmax'][i]:>17.2f}")
print(f"(prefill and timing took {time.perf_counter() - t_start:.0f} s; "
      f"torch threads: {torch.get_num_threads()}, float32, batch 1)")

fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
axes[0].semilogy(np.arange(prompt, ids.shape[1] + 1), np.maximum(diff, 1e-12))
axes[0].set_xlabel("position")
axes[0].set_title("linear: max |decode − forward| of the logits", fontsize=9)
for name, marker in (("linear", "o"), ("softmax", "s")):
    axes[1].plot(CONTEXTS, tps[name], marker=marker, label=name)
axes[1].set_xscale("log", base=2)
axes[1].set_xticks(CONTEXTS, [f"{n // 1024}K" for n in CONTEXTS])
axes[1].set_ylim(bottom=0)
axes[1].set_xlabel("context (tokens)")
axes[1].set_ylabel("decode tokens/s")
axes[1].set_title("one token after the context (prefill not timed)", fontsize=9)
axes[1].legend(fontsize=8)
fig.tight_layout()
