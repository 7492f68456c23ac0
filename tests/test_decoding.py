"""LinearAttentionDecoder and decode_step against the float64 definition.

Decoding token by token from a prompt state must give what
:func:`kernelattn.testing.reference_linear_attention` gives causally over the
prompt and the new tokens (outputs and state), with padding, on every backend;
torch gradients through several steps match the reference VJP, and the torch
state is updated in place when autograd is not recording.
"""

from __future__ import annotations

import numpy as np
import pytest

import kernelattn as ka
from kernelattn.testing import reference_linear_attention, reference_linear_attention_vjp, to_numpy

B, H, D, E = 3, 2, 8, 6     # e != d, so a mixed-up axis fails
P, T = 5, 9                 # prompt tokens, decoded tokens
KINDS = ("ffn", "glu", "elu")


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.linalg.norm(b)
    return np.linalg.norm(a - b) / den if den > 0 else np.linalg.norm(a)


def make_phi(kind):
    if kind == "elu":
        return ka.feature_map("elu")
    return ka.feature_map(kind, num_heads=H, head_dim=D, seed=0)


def data(rng, padded):
    q = rng.standard_normal((B, H, P + T, D))
    k = rng.standard_normal((B, H, P + T, D))
    v = rng.standard_normal((B, H, P + T, E))
    mask = None
    if padded:
        mask = rng.random((B, P + T)) > 0.3
        mask[1, :] = False          # a whole batch row is padding: zeros throughout
        mask[0, P + 2] = mask[2, P] = False
    return q, k, v, mask


def decode(bk, phi_np, q, k, v, mask, *, prompt, eps=1e-6, dtype="float32"):
    """Decode tokens prompt..P+T-1 one at a time on backend ``bk``; (outs (B, H, T', e), state)."""
    arr = lambda a: bk.asarray(a, dtype)  # noqa: E731
    qx, kx, vx = arr(q), arr(k), arr(v)
    phi = phi_np.to(like=qx) if phi_np.kind != "elu" else phi_np
    state = None
    if prompt:
        km = None if mask is None else bk.asarray(mask[:, :prompt])
        _, state = ka.linear_attention(qx[:, :, :prompt, :], kx[:, :, :prompt, :], vx[:, :, :prompt, :],
                                       feature_map=phi, causal=True, key_mask=km, return_state=True)
    dec = ka.LinearAttentionDecoder(phi, batch=B, like=qx[:, :, 0, :], value_dim=E, state=state, eps=eps)
    outs = []
    for t in range(prompt, q.shape[2]):
        km = None if mask is None else bk.asarray(mask[:, t])
        outs.append(to_numpy(dec.step(qx[:, :, t, :], kx[:, :, t, :], vx[:, :, t, :], key_mask=km)))
    o = outs[-1]
    return np.stack(outs, axis=2), dec, o


# quick tier (-m "not slow"): every case on numpy, array_api_strict and torch; on jax and dask (a
# compile or a graph per step) glu and elu, dense from empty and padded after a prompt
@pytest.mark.slow_where(xp_backend=("jax", "dask"), kind="ffn")
@pytest.mark.slow_where(xp_backend=("jax", "dask"), padded=True, prompt=0)
@pytest.mark.slow_where(xp_backend=("jax", "dask"), padded=False, prompt=P)
@pytest.mark.slow_where(xp_backend=("jax", "dask"), prompt=0)  # jax, dask: glu, padded after a prompt
@pytest.mark.slow_where(xp_backend="jax", kind="elu")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("prompt", [0, P], ids=["empty", "prompt"])
def test_decoder_matches_definition(xp_backend, rng, kind, padded, prompt):
    # dask runs too: every step is a lazy graph, computed when compared
    q, k, v, mask = data(rng, padded)
    phi = make_phi(kind)
    outs, dec, _ = decode(xp_backend, phi, q, k, v, mask, prompt=prompt)
    ref, (S, z) = reference_linear_attention(q, k, v, feature_map=phi, causal=True, key_mask=mask,
                                             return_state=True)
    assert outs.dtype == np.float32
    assert rel(outs, ref[:, :, prompt:]) < 1e-5
    st = dec.state
    assert isinstance(st, ka.LinearAttentionState)
    assert rel(to_numpy(st.S), S) < 1e-5 and rel(to_numpy(st.z), z) < 1e-5
    if padded:
        assert np.all(outs[1] == 0) and np.all(to_numpy(st.S)[1] == 0)


@pytest.mark.parametrize("eps", [0.0, 1e-6])
@pytest.mark.slow_where(xp_backend=("dask", "jax"), eps=1e-6)  # quick: eps = 0, the edge
def test_fully_padded_row_gives_zeros_for_any_eps(xp_backend, rng, eps):
    q, k, v, mask = data(rng, True)
    outs, _, _ = decode(xp_backend, make_phi("ffn"), q, k, v, mask, prompt=0, eps=eps)
    assert np.all(np.isfinite(outs)) and np.all(outs[1] == 0)


def test_half_precision_in_float32(xp_backend, rng):
    bk = xp_backend
    if not bk.has("float16"):
        pytest.skip(f"{bk.name} has no float16")
    q, k, v, _ = data(rng, False)
    phi = make_phi("glu")
    qh = bk.asarray(q, "float16")
    dec = ka.LinearAttentionDecoder(phi.to(like=qh), like=qh[:, :, 0, :], value_dim=E)
    outs = [dec.step(qh[:, :, t], bk.asarray(k[:, :, t], "float16"), bk.asarray(v[:, :, t], "float16"))
            for t in range(P + T)]
    assert outs[0].dtype == qh.dtype
    assert dec.state.S.dtype == bk.dtype("float32") and dec.state.z.dtype == bk.dtype("float32")
    # phi's parameters are float16 too, so compare with the definition on those rounded weights
    ref = reference_linear_attention(to_numpy(qh), k, v, feature_map=phi.to(like=qh), causal=True)
    assert rel(np.stack([to_numpy(o) for o in outs], axis=2), ref) < 2e-2


def test_construction_checks(xp_backend):
    bk = xp_backend
    q = bk.asarray(np.zeros((B, H + 1, D)))
    phi = make_phi("ffn").to(like=q)
    with pytest.raises(ValueError, match="num_heads"):
        ka.LinearAttentionDecoder(phi, like=q, value_dim=E)
    with pytest.raises(TypeError, match="value_dim"):
        ka.LinearAttentionDecoder("elu", like=q)
    with pytest.raises(ValueError, match="batch"):
        ka.LinearAttentionDecoder("elu", like=q, value_dim=E, batch=B + 1)
    bad = (bk.asarray(np.zeros((B, H + 1, D, E))), bk.asarray(np.zeros((B, H + 1, D + 1))))
    with pytest.raises(ValueError, match="state.z"):
        ka.LinearAttentionDecoder("elu", like=q, state=bad)
    with pytest.raises(ValueError, match="value_dim"):
        ka.LinearAttentionDecoder("elu", like=q, state=bad, value_dim=E + 1)


@pytest.mark.backends("torch")
@pytest.mark.parametrize("kind", KINDS)
def test_torch_gradients_through_three_steps(xp_backend, rng, kind):
    import torch

    steps = 3
    q, k, v = (rng.standard_normal((B, H, steps, n)) for n in (D, D, E))
    g = rng.standard_normal((B, H, steps, E))
    S0 = np.abs(rng.standard_normal((B, H, D, E)))
    z0 = np.abs(rng.standard_normal((B, H, D))) + 1.0
    mask = np.ones((B, steps), dtype=bool)
    mask[2, 1] = False
    phi = make_phi(kind)
    leaf = lambda a: torch.tensor(a, dtype=torch.float32, requires_grad=True)  # noqa: E731
    tq, tk, tv, tS, tz = map(leaf, (q, k, v, S0, z0))
    phi_t = phi.to(like=tq)
    params = phi_t.parameters()
    for p in params:
        p.requires_grad_(True)
    dec = ka.LinearAttentionDecoder(phi_t, like=tq[:, :, 0], state=ka.LinearAttentionState(tS, tz))
    loss = 0
    for t in range(steps):
        out = dec.step(tq[:, :, t], tk[:, :, t], tv[:, :, t], key_mask=torch.tensor(mask[:, t]))
        loss = loss + (out * torch.tensor(g[:, :, t], dtype=torch.float32)).sum()
    got = torch.autograd.grad(loss, [tq, tk, tv, *params, tS, tz])
    ref = reference_linear_attention_vjp(q, k, v, g, feature_map=phi, causal=True, key_mask=mask,
                                         initial_state=(S0, z0))
    want = [ref["q"], ref["k"], ref["v"], *ref["params"], *ref["state"]]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert rel(a.numpy(), b) < 1e-4


@pytest.mark.backends("torch")
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "no_requires_grad"])
def test_torch_state_updated_in_place(xp_backend, rng, mode):
    import torch

    q, k, v, mask = data(rng, True)
    tq, tk, tv = (torch.tensor(a, dtype=torch.float32) for a in (q, k, v))
    phi = make_phi("glu").to(like=tq)
    if mode != "no_requires_grad":
        for p in phi.parameters():
            p.requires_grad_(True)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
           "no_requires_grad": torch.enable_grad}[mode]
    with ctx():
        dec = ka.LinearAttentionDecoder(phi, like=tq[:, :, 0], value_dim=E)
        ptrs = {dec.state.S.data_ptr()}
        for t in range(P + T):
            out = dec.step(tq[:, :, t], tk[:, :, t], tv[:, :, t], key_mask=torch.tensor(mask[:, t]))
            ptrs.add(dec.state.S.data_ptr())
        assert not out.requires_grad
    assert len(ptrs) == 1
    ref = reference_linear_attention(q, k, v, feature_map=phi, causal=True, key_mask=mask)
    assert rel(out.numpy(), ref[:, :, -1]) < 1e-5


@pytest.mark.backends("jax")
def test_jax_grad_of_pure_step(xp_backend, rng):
    import jax
    import jax.numpy as jnp

    steps = 3
    q, k, v = (rng.standard_normal((B, H, steps, n)) for n in (D, D, E))
    g = rng.standard_normal((B, H, steps, E))
    phi = make_phi("glu").to(like=jnp.zeros(1, dtype=jnp.float32))

    def loss(phi, q):
        S, z = jnp.zeros((B, H, D, E), jnp.float32), jnp.zeros((B, H, D), jnp.float32)
        total = 0.0
        for t in range(steps):
            out, S, z = ka.LinearAttentionDecoder.step_fn(phi, S, z, q[:, :, t], jnp.asarray(k[:, :, t], jnp.float32),
                                                          jnp.asarray(v[:, :, t], jnp.float32))
            total = total + jnp.sum(out * g[:, :, t])
        return total

    gphi, gq = jax.jit(jax.grad(loss, argnums=(0, 1)))(phi, jnp.asarray(q, jnp.float32))
    ref = reference_linear_attention_vjp(q, k, v, g, feature_map=phi, causal=True)
    assert rel(np.asarray(gq), ref["q"]) < 1e-4
    for a, b in zip(gphi.parameters(), ref["params"]):
        assert rel(np.asarray(a), b) < 1e-4
