"""
Approximation error against training steps
==========================================

Each of the paper's kernels (and Hedgehog) starts from its seeded initialisation and is fitted to
the softmax attention of layer 0 of all-MiniLM-L6-v2 on three passages; the error is measured on
a held-out passage every few steps. The fixed maps (dashed) cannot learn and stay where they are.
"""

import matplotlib.pyplot as plt

import kernelattn as ka

sample = ka.data.minilm(layer=0, heads=[0, 3, 6, 9])
train, test = sample.split(held_out=1)
H, d = test.q.shape[1], test.q.shape[3]
held_out = (test.q, test.k, test.v)

kernels = {"ffn": ("ffn", {}), "glu": ("glu", {}), "glu x2": ("glu", {"depth": 2}),
           "aoglu x3": ("aoglu", {"depth": 3}), "hedgehog": ("hedgehog", {})}
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
for label, (kind, opts) in kernels.items():
    phi0 = ka.feature_map(kind, num_heads=H, head_dim=d, seed=0, **opts)
    _, hist = ka.fit_feature_map(phi0, train.q, train.k, train.v, steps=100, lr=0.03, eval_data=held_out,
                                 eval_every=10)
    axes[0].plot(hist.eval_steps, hist.eval_attention_kl, "-o", ms=3, label=f"{label} ({ka.num_params(phi0):,})")
    axes[1].plot(hist.eval_steps, hist.eval_output_error, "-o", ms=3, label=label)
    print(f"{label:<9} attention KL {hist.eval_attention_kl[0]:.3f} -> {hist.eval_attention_kl[-1]:.3f}, "
          f"output error {hist.eval_output_error[0]:.3f} -> {hist.eval_output_error[-1]:.3f}")
for name in ("elu", "relu", "favor"):
    phi = name if name != "favor" else ka.feature_map("favor", num_heads=H, head_dim=d, seed=0)
    err = ka.approximation_error(phi, *held_out)
    axes[0].axhline(err.attention_kl, ls="--", lw=1, color="grey")
    axes[1].axhline(err.output_error, ls="--", lw=1, color="grey")
    axes[1].text(100, err.output_error, f" {name}", fontsize=7, va="center")
axes[0].set_yscale("log")
axes[0].set_title("held-out attention KL (log scale)", fontsize=9)
axes[1].set_title("held-out output relative error", fontsize=9)
for ax in axes:
    ax.set_xlabel("training step")
axes[0].legend(fontsize=7)
fig.tight_layout()
