"""
Training with Flax NNX and optax under ``jit``
==============================================

Two ways to train kernelattn's feedforward kernels in JAX, both small enough to finish
in seconds on a CPU (``python docs/examples/train_flax_optax.py``):

1. **Flax NNX.** A tiny classifier built from the paper's pre-LayerNorm
   :class:`~kernelattn.backends.jax_nn.EncoderBlock` (GLU kernel, non-causal linear
   attention) learns whether a sequence holds more 1s than 2s; the answer is read
   from a CLS token, so it has to travel through attention. ``nnx.Optimizer`` with
   ``optax.adamw`` updates every ``nnx.Param``, including the kernel's weights, and the
   orthogonality penalty of the paper is added to the loss.
2. **Plain pytrees.** A :class:`kernelattn.FeatureMap` is a JAX pytree, so ``jax.grad``
   returns a FeatureMap of gradients and ``optax.apply_updates`` trains it directly:
   here a GLU kernel is fitted so that linear attention reproduces softmax attention.

Both training steps are jitted; kernelattn's JAX fast paths run inside them.
"""

from __future__ import annotations

import argparse
import time

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import kernelattn as ka
from kernelattn.backends.jax_nn import EncoderBlock

VOCAB, CLS = 5, 5  # tokens 0..4, and a CLS token


class Classifier(nnx.Module):
    """Embedding + CLS + one encoder block + a linear head on the CLS position."""

    def __init__(self, *, width=32, heads=4, length=24, rngs):
        self.embed = nnx.Embed(VOCAB + 1, width, rngs=rngs)
        self.position = nnx.Param(jnp.zeros((length + 1, width)))  # learned, initialised to zero (as the paper)
        self.block = EncoderBlock(width, heads, feature_map="glu", dropout=0.0, rngs=rngs)
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, 2, rngs=rngs)

    def __call__(self, tokens):
        B = tokens.shape[0]
        tokens = jnp.concatenate([jnp.full((B, 1), CLS, tokens.dtype), tokens], axis=1)
        x = self.embed(tokens) + self.position[...]
        x = self.block(x)
        return self.head(self.norm(x[:, 0]))


def make_batch(rng, batch, length):
    tokens = rng.integers(0, VOCAB, size=(batch, length))
    labels = (tokens == 1).sum(1) > (tokens == 2).sum(1)
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(labels, jnp.int32)


def train_classifier(steps=100, *, batch=64, length=24, lr=3e-3, ortho=0.01, seed=0, log=print):
    """Train the Flax classifier; returns the first and last losses and the held-out accuracy."""
    model = Classifier(length=length, rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adamw(lr, weight_decay=0.01), wrt=nnx.Param)

    def loss_fn(model, tokens, labels):
        logits = model(tokens)
        task = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return task + ka.orthogonality_penalty(model.block.attention.feature_map, weight=ortho), task

    @nnx.jit
    def train_step(model, optimizer, tokens, labels):
        (_, task), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, tokens, labels)
        optimizer.update(model, grads)
        return task

    @nnx.jit
    def accuracy(model, tokens, labels):
        return jnp.mean(jnp.argmax(model(tokens), axis=-1) == labels)

    rng = np.random.default_rng(seed)
    losses = []
    for step in range(steps):
        losses.append(float(train_step(model, optimizer, *make_batch(rng, batch, length))))
        if step % 25 == 0 or step == steps - 1:
            log(f"  classifier step {step:4d}  cross-entropy {losses[-1]:.3f}")
    acc = float(accuracy(model, *make_batch(np.random.default_rng(seed + 1), 1000, length)))
    log(f"  held-out accuracy {acc:.3f}")
    return {"first_loss": losses[0], "last_loss": float(np.mean(losses[-10:])), "accuracy": acc}


def fit_kernel_to_softmax(steps=60, *, heads=2, head_dim=16, length=64, lr=1e-2, seed=0, log=print):
    """Fit a GLU kernel (a plain FeatureMap pytree) to softmax attention with optax."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((8, heads, length, head_dim)), jnp.float32) for _ in range(3))
    target = ka.softmax_attention(q, k, v)
    phi = ka.feature_map("glu", num_heads=heads, head_dim=head_dim, seed=seed, xp=jnp)
    tx = optax.adam(lr)
    state = tx.init(phi)  # the FeatureMap is the parameter pytree

    def loss_fn(phi):
        return jnp.mean((ka.linear_attention(q, k, v, feature_map=phi) - target) ** 2)

    @jax.jit
    def step(phi, state):
        loss, grads = jax.value_and_grad(loss_fn)(phi)  # grads: a FeatureMap
        updates, state = tx.update(grads, state, phi)
        return optax.apply_updates(phi, updates), state, loss

    losses = []
    for i in range(steps):
        phi, state, loss = step(phi, state)
        losses.append(float(loss))
        if i % 20 == 0 or i == steps - 1:
            log(f"  kernel fit step {i:4d}  MSE to softmax attention {losses[-1]:.5f}")
    return {"first_loss": losses[0], "last_loss": losses[-1], "feature_map": phi}


def main(argv=None):
    p = argparse.ArgumentParser(description="Train kernelattn models with Flax NNX and optax (CPU, seconds).")
    p.add_argument("--steps", type=int, default=100, help="classifier training steps")
    p.add_argument("--fit-steps", type=int, default=60, help="kernel-fitting steps")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    print("1. Flax NNX encoder block, nnx.Optimizer(optax.adamw):")
    clf = train_classifier(args.steps, seed=args.seed)
    print("2. a kernelattn.FeatureMap trained directly by optax:")
    fit = fit_kernel_to_softmax(args.fit_steps, seed=args.seed)
    print(f"done in {time.perf_counter() - t0:.1f} s on {jax.devices()[0].platform}")
    return {"classifier": clf, "fit": fit}


if __name__ == "__main__":
    main()
