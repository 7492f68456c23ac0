"""A feature-map kind defined here, in the test file, works everywhere a built-in kind does.

The kind ("cosrelu_test": ``relu(x W + b) + 1 + cos(x W + b) / 2``, positive
everywhere) is registered with :func:`kernelattn.register_feature_map` and
nothing else in the package is told about it. It is checked against a float64
definition written separately below: attention (non-causal, causal, masked),
the decode step and the decoder, gradients of q, k, v and its parameters on
every backend (torch autograd, ``jax.grad``, the hand VJP it registers), the
torch and Flax modules, ``fit_feature_map``, ``python -m kernelattn --kinds``
and the docs' generated tables.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import pathlib

import numpy as np
import pytest

import kernelattn as ka
from kernelattn import _tree
from kernelattn.testing import reference_linear_attention, reference_linear_attention_vjp, to_numpy

NAME = "cosrelu_test"
B, H, N, D = 2, 2, 11, 4
CHUNK = 4
ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------
# the kind: forward (array API), hand VJP, parameters, and a float64 definition written apart


def _pre(x, blocks, xp):
    blk = blocks[0]
    y = xp.matmul(x, xp.astype(blk["W"], x.dtype))
    if "b" in blk:
        y = y + xp.astype(blk["b"], x.dtype)[:, None, :]
    return y


def forward(x, blocks, buffers, *, xp):
    y = _pre(x, blocks, xp)
    return xp.maximum(y, xp.zeros_like(y)) + 1.0 + 0.5 * xp.cos(y)


def vjp(x, blocks, buffers, *, xp):
    y = _pre(x, blocks, xp)
    blk = blocks[0]
    W = xp.astype(blk["W"], x.dtype)

    def back(g):
        gy = xp.where(y > 0, g, xp.zeros_like(g)) - 0.5 * xp.sin(y) * g
        grads = {"W": xp.astype(xp.sum(xp.matmul(xp.permute_dims(x, (0, 1, 3, 2)), gy), axis=0), blk["W"].dtype)}
        if "b" in blk:
            grads["b"] = xp.astype(xp.sum(gy, axis=(0, 2)), blk["b"].dtype)
        return xp.matmul(gy, xp.permute_dims(W, (0, 2, 1))), [grads]

    return xp.maximum(y, xp.zeros_like(y)) + 1.0 + 0.5 * xp.cos(y), back


def definition(x, blocks, buffers, *, xp):
    """The same map, written as its formula: float64, no shared code with ``forward``."""
    W = blocks[0]["W"]
    y = xp.matmul(x, W) + (blocks[0]["b"][:, None, :] if "b" in blocks[0] else 0.0)
    return xp.where(y > 0, y, 0.0 * y) + 1.0 + xp.cos(y) / 2.0


def params(spec):
    block = {"W": ka.Param((spec.num_heads, spec.head_dim, spec.feature_dim), "orthogonal")}
    if spec.bias:
        block["b"] = ka.Param((spec.num_heads, spec.feature_dim), "zeros")
    return [block]


@pytest.fixture(autouse=True, scope="module")
def registered():
    kind = ka.register_feature_map(NAME, forward, vjp=vjp, params=params, reference=definition,
                                   feature_dim=lambda d: 2 * d, description="relu + 1 + cos/2 (a test kind)")
    yield kind
    ka.unregister_feature_map(NAME)


def make_phi(dtype="float64", *, like=None, bias=True, tied=True, seed=0):
    phi = ka.feature_map(NAME, num_heads=H, head_dim=D, bias=bias, tied=tied, seed=seed, dtype=dtype)
    # non-zero biases, so their gradients are not a special case
    rng = np.random.default_rng(seed + 1)
    params_ = _tree.tree_map(lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(a.dtype), phi.params)
    phi = phi.replace(params=params_)
    return phi if like is None else phi.to(like=like)


def data(seed=0, *, n=N, L=None):
    rng = np.random.default_rng(seed)
    L = n if L is None else L
    q, k = rng.standard_normal((2, B, H, n, D)) if L == n else (rng.standard_normal((B, H, n, D)),
                                                                 rng.standard_normal((B, H, L, D)))
    v = rng.standard_normal((B, H, L, 3))
    g = rng.standard_normal((B, H, n, 3))
    mask = np.ones((B, L), dtype=bool)
    mask[0, L - 3:] = False          # right padding
    mask[1, :2] = False              # left padding
    return q, k, v, g, mask


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


# ---------------------------------------------------------------------------
# the registry itself


def test_kind_is_registered_like_a_builtin():
    assert NAME in ka.KINDS and ka.KINDS[NAME] == "relu + 1 + cos/2 (a test kind)"
    phi = ka.feature_map(NAME, num_heads=H, head_dim=D, seed=0)
    assert phi.feature_dim == 2 * D and ka.num_params(phi) == H * D * 2 * D
    assert phi.form is None and f"kind={NAME!r}" in repr(phi)
    with pytest.raises(ValueError, match="depth applies to stackable kinds"):
        ka.feature_map(NAME, num_heads=H, head_dim=D, depth=2, seed=0)
    with pytest.raises(ValueError, match="rank applies to"):
        ka.feature_map(NAME, num_heads=H, head_dim=D, rank=2, seed=0)
    with pytest.raises(ValueError, match="needs num_heads and head_dim"):
        ka.feature_map(NAME)


def test_registration_errors_name_the_argument():
    with pytest.raises(ValueError, match="already registered"):
        ka.register_feature_map(NAME, forward)
    with pytest.raises(ValueError, match="built-in kind"):
        ka.unregister_feature_map("glu")
    with pytest.raises(TypeError, match="vjp must be callable"):
        ka.register_feature_map("other_test", forward, vjp=3)
    with pytest.raises(ValueError, match="no feature-map kind .no_such_kind. is registered"):
        ka.unregister_feature_map("no_such_kind")


def test_same_seed_same_map_on_every_library():
    import torch

    a = ka.feature_map(NAME, num_heads=H, head_dim=D, bias=True, seed=7, dtype="float64")
    b = ka.feature_map(NAME, num_heads=H, head_dim=D, bias=True, seed=7, xp=torch, dtype=torch.float64)
    for x, y in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(to_numpy(x), to_numpy(y))
    W = to_numpy(a.params["shared"][0]["W"])[0]  # (d, m = 2d)
    np.testing.assert_allclose(W @ W.T, np.eye(D), atol=1e-12)  # "orthogonal" rule: orthonormal rows


# ---------------------------------------------------------------------------
# attention and decoding on every backend, against the definition


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.slow_where(xp_backend="jax", causal=True, masked=False)  # jax quick: plain and causal-masked
@pytest.mark.slow_where(xp_backend="jax", causal=False, masked=True)
def test_attention_matches_definition(xp_backend, causal, masked):
    bk = xp_backend
    q, k, v, _, mask = data()
    mask = mask if masked else None
    Q, K, V = (bk.asarray(a, "float64") for a in (q, k, v))
    phi = make_phi(like=Q)
    km = None if mask is None else bk.asarray(mask)
    out, state = ka.linear_attention(Q, K, V, feature_map=phi, causal=causal, key_mask=km, chunk_size=CHUNK,
                                     return_state=True)
    ref, (S, z) = reference_linear_attention(q, k, v, feature_map=make_phi(), causal=causal, key_mask=mask,
                                             return_state=True)
    assert rel(to_numpy(out), ref) < 1e-10
    assert rel(to_numpy(state[0]), S) < 1e-10 and rel(to_numpy(state[1]), z) < 1e-10
    assert type(out) is type(Q) or bk.name == "array_api_strict"


def test_cross_attention_untied_matches_definition(xp_backend):
    bk = xp_backend
    q, k, v, _, mask = data(3, L=7)
    Q, K, V = (bk.asarray(a, "float64") for a in (q, k, v))
    phi = make_phi(tied=False)
    out = ka.linear_attention(Q, K, V, feature_map=phi.to(like=Q), key_mask=bk.asarray(mask))
    ref = reference_linear_attention(q, k, v, feature_map=phi, key_mask=mask)
    assert rel(to_numpy(out), ref) < 1e-10


@pytest.mark.slow_where(xp_backend="jax")  # jax quick: the decoder object below
def test_decode_steps_match_causal_definition(xp_backend):
    bk = xp_backend
    q, k, v, _, mask = data(1)
    Q, K, V = (bk.asarray(a, "float64") for a in (q, k, v))
    phi = make_phi(like=Q)
    ref = reference_linear_attention(q, k, v, feature_map=make_phi(), causal=True, key_mask=mask)
    state, outs = None, []
    for t in range(N):
        o, state = ka.linear_attention_step(Q[:, :, t:t + 1, :], K[:, :, t:t + 1, :], V[:, :, t:t + 1, :], feature_map=phi,
                                            state=state, key_mask=bk.asarray(mask[:, t:t + 1]))
        outs.append(to_numpy(o))
    assert rel(np.concatenate(outs, axis=2), ref) < 1e-10


@pytest.mark.backends("numpy", "torch", "jax")
def test_decoder_object_matches_causal_definition(xp_backend):
    bk = xp_backend
    q, k, v, _, _ = data(2)
    Q, K, V = (bk.asarray(a, "float64") for a in (q, k, v))
    dec = ka.LinearAttentionDecoder(make_phi(like=Q), like=Q[:, :, 0], value_dim=3)
    outs = [to_numpy(dec.step(Q[:, :, t, :], K[:, :, t, :], V[:, :, t, :])) for t in range(N)]
    ref = reference_linear_attention(q, k, v, feature_map=make_phi(), causal=True)
    assert rel(np.stack(outs, axis=2), ref) < 1e-10


# ---------------------------------------------------------------------------
# gradients on every backend, against the definition differentiated in float64


def _grads(bk, q, k, v, g, phi, mask, causal):
    """(gq, gk, gv, [g of each phi parameter]) as float64 NumPy, by the backend's own means."""
    kw = dict(causal=causal, chunk_size=CHUNK)
    if bk.name == "torch":
        import torch

        ts = [torch.tensor(a, requires_grad=True) for a in (q, k, v)]
        leaves = [torch.tensor(to_numpy(p), requires_grad=True) for p in phi.parameters()]
        phi_t = ka.FeatureMap(phi.spec, _tree.with_leaves(phi.params, leaves), {})
        out = ka.linear_attention(*ts, feature_map=phi_t, key_mask=torch.tensor(mask), **kw)
        (out * torch.tensor(g)).sum().backward()
        return [t.grad.numpy() for t in ts], [p.grad.numpy() for p in leaves]
    if bk.name == "jax":
        import jax
        import jax.numpy as jnp

        phi_j = phi.to(xp=jnp)

        def loss(q_, k_, v_, params_):
            out = ka.linear_attention(q_, k_, v_, feature_map=phi_j.replace(params=params_),
                                      key_mask=jnp.asarray(mask), **kw)
            return jnp.sum(out * g)

        gq, gk, gv, gp = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*map(jnp.asarray, (q, k, v)), phi_j.params)
        return [np.asarray(a) for a in (gq, gk, gv)], [np.asarray(a) for a in _tree.leaves(gp)]
    Q, K, V, G = (bk.asarray(a, "float64") for a in (q, k, v, g))
    out, back = ka.linear_attention_vjp(Q, K, V, feature_map=phi.to(like=Q), key_mask=bk.asarray(mask), **kw)
    grads = back(G)
    return [to_numpy(a) for a in (grads.q, grads.k, grads.v)], [to_numpy(a) for a in grads.feature_map.parameters()]


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_definition(xp_backend, causal):
    q, k, v, g, mask = data(4)
    phi = make_phi()
    (gq, gk, gv), gp = _grads(xp_backend, q, k, v, g, phi, mask, causal)
    ref = reference_linear_attention_vjp(q, k, v, g, feature_map=phi, causal=causal, key_mask=mask)
    for name, got, want in (("q", gq, ref["q"]), ("k", gk, ref["k"]), ("v", gv, ref["v"])):
        assert rel(got, want) < 1e-9, name
    assert len(gp) == len(ref["params"]) == 2
    for got, want in zip(gp, ref["params"]):
        assert np.abs(want).max() > 0 and rel(got, want) < 1e-9


def test_feature_map_vjp_matches_definition():
    import torch

    x = np.random.default_rng(5).standard_normal((B, H, N, D))
    phi = make_phi()
    y, back = ka.feature_map_vjp(phi, x)
    gy = np.random.default_rng(6).standard_normal(y.shape)
    gx, gphi = back(gy)
    xt = torch.tensor(x, requires_grad=True)
    leaves = [torch.tensor(to_numpy(p), requires_grad=True) for p in phi.parameters()]
    blocks = [dict(zip(sorted(phi.params["shared"][0]), leaves))]
    import array_api_compat.torch as txp

    (definition(xt, blocks, {}, xp=txp) * torch.tensor(gy)).sum().backward()
    assert rel(y, definition(x, [phi.params["shared"][0]], {}, xp=np)) < 1e-12
    assert rel(gx, xt.grad.numpy()) < 1e-12
    for got, want in zip(gphi.parameters(), leaves):
        assert rel(got, want.grad.numpy()) < 1e-12


@pytest.mark.backends("numpy", "torch")
def test_fit_feature_map_trains_the_kind(xp_backend):
    bk = xp_backend
    rng = np.random.default_rng(8)
    q, k, v = (bk.asarray(rng.standard_normal((4, H, 16, D)), "float32") for _ in range(3))
    phi0 = ka.feature_map(NAME, num_heads=H, head_dim=D, seed=0, like=q)
    phi, hist = ka.fit_feature_map(phi0, q, k, v, steps=30, lr=5e-2)
    assert hist.loss[-1] < 0.9 * hist.loss[0]
    assert ka.approximation_error(phi, q, k, v).attention_kl < ka.approximation_error(phi0, q, k, v).attention_kl


# ---------------------------------------------------------------------------
# the torch and Flax modules


def test_torch_modules_take_the_kind():
    import torch

    from kernelattn.backends import torch_nn

    fm = torch_nn.FeatureMap(NAME, num_heads=H, head_dim=D, bias=True, seed=0, dtype=torch.float64)
    assert len(list(fm.parameters())) == 2 and NAME in repr(fm)
    x = torch.randn(B, H, N, D, dtype=torch.float64)
    np.testing.assert_allclose(fm(x).detach().numpy(), ka.testing.reference_feature_map(fm.as_feature_map(), x),
                               rtol=1e-12, atol=1e-12)
    attn = torch_nn.MultiheadLinearAttention(8, H, feature_map=NAME, causal=True, seed=0, dtype=torch.float64)
    y = attn(torch.randn(B, N, 8, dtype=torch.float64))
    (y[0] if isinstance(y, tuple) else y).sum().backward()
    grads = [p.grad for p in attn.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)


def test_flax_modules_take_the_kind():
    import jax.numpy as jnp
    from flax import nnx

    from kernelattn.backends import jax_nn

    fm = jax_nn.FeatureMap(NAME, num_heads=H, head_dim=D, bias=True, rngs=nnx.Rngs(0), dtype=jnp.float64)
    W = np.asarray(fm.params["shared"][0]["W"][...])  # (H, d, 2d): orthonormal rows per head
    np.testing.assert_allclose(W @ np.swapaxes(W, -1, -2), np.broadcast_to(np.eye(D), (H, D, D)), atol=1e-6)
    x = np.random.default_rng(9).standard_normal((B, H, N, D))
    np.testing.assert_allclose(np.asarray(fm(jnp.asarray(x))),
                               ka.testing.reference_feature_map(fm.as_feature_map(), x), rtol=1e-10, atol=1e-10)
    attn = jax_nn.MultiheadLinearAttention(8, H, feature_map=NAME, causal=True, rngs=nnx.Rngs(1))
    y = attn(jnp.ones((B, N, 8), jnp.float32))
    assert y.shape == (B, N, 8) and bool(jnp.isfinite(y).all())


# ---------------------------------------------------------------------------
# the command line and the docs


def test_demo_command_fits_the_kind():
    from kernelattn import cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["demo", "--kinds", f"{NAME},elu+1", "--steps", "3", "--sizes", "", "--out", "",
                       "--backend", "numpy", "--no-progress"])
    text = buf.getvalue()
    assert rc == 0
    rows = [line.split() for line in text.splitlines() if line.strip().startswith((NAME, "elu+1"))]
    assert [r[0] for r in rows] == [NAME, "elu+1"], text
    sample = ka.data.minilm(0)
    expected = ka.num_params(ka.feature_map(NAME, num_heads=sample.q.shape[1], head_dim=sample.q.shape[3], seed=0))
    assert int(rows[0][1].replace(",", "")) == expected and int(rows[1][1].replace(",", "")) == 0
    assert "glu" not in [r[0] for r in rows]


def test_demo_rejects_an_unknown_kind_with_exit_2(capsys):
    from kernelattn import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--kinds", "no_such_kernel"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--kinds" in err and "no_such_kernel" in err and NAME in err


def _docs_ext():
    spec = importlib.util.spec_from_file_location("_support_matrix", ROOT / "docs" / "_ext" / "support_matrix.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_docs_feature_map_table_lists_the_kind():
    pytest.importorskip("sphinx")
    rows = {row[0]: row for row in _docs_ext().kind_rows()}
    assert rows[NAME][1:3] == ("yes", "yes")
    assert "numpy: array-API forward" in rows[NAME][3] and "torch: array-API forward" in rows[NAME][3]
    assert "torch: own form (feedforward)" in rows["glu"][3]
