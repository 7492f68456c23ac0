"""Feature maps on every backend against the float64 NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest

import kernelattn as ka
from kernelattn.testing import assert_close, reference_feature_map, to_numpy

# (kind, options) covering every map, stacks, biases, m != d, untied maps
MAPS = [
    ("ffn", {}),
    ("ffn", {"depth": 2, "bias": True}),
    ("glu", {}),
    ("glu", {"depth": 2}),
    ("glu", {"feature_dim": 24, "bias": True}),
    ("aoglu", {"depth": 3}),
    ("aoglu", {"rank": 3, "bias": True, "tied": False}),
    ("hedgehog", {}),
    ("hedgehog", {"feature_dim": 10, "bias": True}),
    ("favor", {}),
    ("favor", {"feature_dim": 40}),
    ("elu", {}),
    ("relu", {}),
]
MAP_IDS = [k + "".join(f"-{a}={b}" for a, b in o.items()) for k, o in MAPS]


@pytest.mark.slow_where(xp_backend="jax", kind=("ffn", "aoglu", "hedgehog", "relu"))  # jax quick: glu, favor, elu
@pytest.mark.parametrize("kind,opts", MAPS, ids=MAP_IDS)
def test_feature_map_matches_float64_reference(xp_backend, kind, opts, rng):
    H, d = 3, 12  # d not a power of two
    x_np = rng.standard_normal((2, H, 7, d))
    x = xp_backend.asarray(x_np, "float32")
    phi = ka.feature_map(kind, num_heads=H, head_dim=d, seed=0, like=x, **opts)
    for role in ("query", "key"):
        out = phi(x) if role == "query" else phi.key(x)
        m = opts.get("feature_dim", 2 * d if kind == "hedgehog" else d)
        assert out.shape == (2, H, 7, m)
        ref = reference_feature_map(phi, x_np, role=role)
        assert_close(out, ref, rtol=2e-5, atol=2e-6, like=x)
        assert np.all(to_numpy(out) >= 0), "feature maps must be non-negative"
        if kind not in ("relu",):
            assert np.all(to_numpy(out) > 0)


@pytest.mark.parametrize("kind", ["glu", "aoglu", "favor"])
def test_float64_inputs_stay_float64(xp_backend, kind, rng):
    if not xp_backend.has("float64"):
        pytest.skip("no float64 on this backend")
    x_np = rng.standard_normal((1, 2, 5, 8))
    x = xp_backend.asarray(x_np, "float64")
    phi = ka.feature_map(kind, num_heads=2, head_dim=8, depth=1, seed=3, like=x)
    out = phi(x)
    assert out.dtype == x.dtype
    assert_close(out, reference_feature_map(phi, x_np), rtol=1e-11, atol=1e-13, like=x)


def test_same_seed_same_parameters_on_every_backend(xp_backend):
    ref = ka.feature_map("aoglu", num_heads=2, head_dim=8, depth=2, seed=7)
    x = xp_backend.asarray(np.zeros((1, 2, 1, 8)))
    phi = ka.feature_map("aoglu", num_heads=2, head_dim=8, depth=2, seed=7, like=x)
    for a, b in zip(ref.parameters(), phi.parameters()):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    fav_ref = ka.feature_map("favor", num_heads=2, head_dim=8, seed=11)
    fav = ka.feature_map("favor", num_heads=2, head_dim=8, seed=11, like=x)
    np.testing.assert_array_equal(to_numpy(fav.buffers["omega"]), to_numpy(fav_ref.buffers["omega"]))


def test_seed_generator_and_determinism():
    a = ka.feature_map("glu", num_heads=2, head_dim=4, seed=np.random.default_rng(5))
    b = ka.feature_map("glu", num_heads=2, head_dim=4, seed=np.random.default_rng(5))
    c = ka.feature_map("glu", num_heads=2, head_dim=4, seed=6)
    for x, y in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.parameters()[0], c.parameters()[0])


@pytest.mark.parametrize("kind,depth", [("ffn", 2), ("glu", 1), ("aoglu", 3)])
def test_main_weights_orthogonal_per_head_and_gates_he_normal(kind, depth):
    H, d = 8, 64
    phi = ka.feature_map(kind, num_heads=H, head_dim=d, depth=depth, seed=0, dtype="float64")
    for W in phi.main_weights():
        gram = np.matmul(W, np.transpose(W, (0, 2, 1)))
        np.testing.assert_allclose(gram, np.broadcast_to(np.eye(d), gram.shape), atol=1e-12)
        assert not np.allclose(W[0], W[1])  # independent per head
    for block in phi.params["shared"]:
        if "G" in block:
            assert abs(block["G"].std() - np.sqrt(2 / d)) < 0.01
        if "A" in block:
            assert abs(block["A"].std() - np.sqrt(2 / d)) < 0.02
            assert abs(block["B"].std() - np.sqrt(2 / phi.spec.rank)) < 0.05
    assert float(ka.orthogonality_penalty(phi)) < 1e-25


def test_semi_orthogonal_when_width_changes():
    phi = ka.feature_map("glu", num_heads=2, head_dim=8, feature_dim=20, depth=2, seed=0, dtype="float64")
    W0, W1 = phi.main_weights()
    assert W0.shape == (2, 8, 20) and W1.shape == (2, 20, 20)
    np.testing.assert_allclose(W0 @ np.transpose(W0, (0, 2, 1)), np.broadcast_to(np.eye(8), (2, 8, 8)), atol=1e-12)


# the paper's parameter counts (Yorsh & Kovalenko 2022): per layer, H = 8
@pytest.mark.parametrize("kind,depth,d,expected", [
    ("ffn", 1, 64, 32_768),
    ("glu", 1, 64, 65_536),
    ("glu", 2, 64, 131_072),
    ("aoglu", 3, 64, 147_456),
    ("glu", 1, 16, 4_096),
    ("glu", 2, 16, 8_192),
    ("aoglu", 3, 16, 9_216),
])
def test_parameter_counts_match_the_paper(kind, depth, d, expected):
    assert ka.num_params(ka.feature_map(kind, num_heads=8, head_dim=d, depth=depth, seed=0)) == expected


def test_listops_model_overhead_matches_the_paper():
    # 6 layers of the ListOps model: softmax 21,019,658 -> GLU 21,412,874, GLU x2 21,806,090, AOGLU x3 21,904,394
    base = 21_019_658
    for kind, depth, total in [("glu", 1, 21_412_874), ("glu", 2, 21_806_090), ("aoglu", 3, 21_904_394)]:
        phi = ka.feature_map(kind, num_heads=8, head_dim=64, depth=depth, seed=0)
        assert base + 6 * ka.num_params(phi) == total
    # Retrieval model (hidden 128, 8 heads of d = 16, 4 layers)
    for kind, depth, total in [("glu", 1, 1_617_922), ("glu", 2, 1_634_306), ("aoglu", 3, 1_638_402)]:
        phi = ka.feature_map(kind, num_heads=8, head_dim=16, depth=depth, seed=0)
        assert 1_601_538 + 4 * ka.num_params(phi) == total


def test_other_counts():
    assert ka.num_params(ka.feature_map("glu", num_heads=2, head_dim=4, tied=False, seed=0)) == 2 * 2 * 2 * 16
    assert ka.num_params(ka.feature_map("glu", num_heads=2, head_dim=4, bias=True, seed=0)) == 2 * 16 * 2 + 2 * 4 * 2
    assert ka.num_params(ka.feature_map("hedgehog", num_heads=2, head_dim=4, seed=0)) == 2 * 4 * 4
    assert ka.num_params(ka.feature_map("favor", num_heads=2, head_dim=4, seed=0)) == 0
    assert ka.num_params(ka.feature_map("elu")) == 0


def test_orthogonality_penalty_value(xp_backend, rng):
    H, d = 3, 5
    phi = ka.feature_map("glu", num_heads=H, head_dim=d, depth=2, seed=0)
    Ws = [rng.standard_normal((H, d, d)) for _ in range(2)]
    x = xp_backend.asarray(np.zeros(1), "float32")
    blocks = [dict(b, W=W) for b, W in zip(phi.params["shared"], Ws)]
    phi = phi.replace(params={"shared": blocks}).to(like=x)
    expected = sum(np.mean((np.float32(W) @ np.float32(W).transpose(0, 2, 1) - np.eye(d)) ** 2) for W in Ws)
    got = ka.orthogonality_penalty(phi, weight=0.01)
    assert_close(got, 0.01 * expected, rtol=1e-5)
    assert ka.orthogonality_penalty(ka.feature_map("elu")) == 0.0


def test_untied_maps_differ_and_tied_do_not(rng):
    x = rng.standard_normal((1, 2, 3, 4)).astype(np.float32)
    untied = ka.feature_map("glu", num_heads=2, head_dim=4, tied=False, seed=0)
    tied = ka.feature_map("glu", num_heads=2, head_dim=4, seed=0)
    assert not np.allclose(untied(x), untied.key(x))
    np.testing.assert_array_equal(tied(x), tied.key(x))
    assert set(untied.params) == {"query", "key"} and set(tied.params) == {"shared"}


def test_placement_like_and_explicit(xp_backend):
    x = xp_backend.asarray(np.zeros((1, 2, 3, 4)), "float32")
    phi = ka.feature_map("glu", num_heads=2, head_dim=4, seed=0, like=x)
    for a in phi.parameters():
        assert type(a) is type(x) and a.dtype == x.dtype
    if xp_backend.has("float64"):
        phi64 = ka.feature_map("glu", num_heads=2, head_dim=4, seed=0, xp=xp_backend.xp, dtype="float64")
        assert phi64.parameters()[0].dtype == xp_backend.dtype("float64")
    assert isinstance(ka.feature_map("glu", num_heads=2, head_dim=4, seed=0).parameters()[0], np.ndarray)


def test_to_moves_between_libraries(xp_backend, rng):
    phi = ka.feature_map("aoglu", num_heads=2, head_dim=8, seed=0)
    x_np = rng.standard_normal((1, 2, 3, 8)).astype(np.float32)
    x = xp_backend.asarray(x_np)
    moved = phi.to(like=x)
    assert_close(moved(x), phi(x_np), rtol=2e-5, atol=1e-6, like=x)
    back = moved.to(xp=np)
    assert isinstance(back.parameters()[0], np.ndarray)


def test_repr_is_informative():
    r = repr(ka.feature_map("aoglu", num_heads=8, head_dim=64, depth=3, seed=0))
    assert "aoglu" in r and "depth=3" in r and "rank=16" in r and "147,456" in r


def test_to_keeps_what_is_not_given(xp_backend):
    x = xp_backend.asarray(np.zeros((1, 2, 3, 4)), "float32")
    phi = ka.feature_map("glu", num_heads=2, head_dim=4, seed=0, like=x)
    if xp_backend.has("float64"):
        wide = phi.to(dtype=xp_backend.dtype("float64"))
        assert type(wide.parameters()[0]) is type(x)
        assert wide.parameters()[0].dtype == xp_backend.dtype("float64")
    same = phi.to()
    assert type(same.parameters()[0]) is type(x) and same.parameters()[0].dtype == x.dtype
