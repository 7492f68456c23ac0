"""``torch.compile(..., fullgraph=True)`` of the modules and of linear_attention is silent.

Every warning is an error here, and whatever torch's loggers say at WARNING
or above fails the test. Dynamo warns once per process for each message, so
each compile starts from a reset Dynamo and an empty warn-once cache: an
earlier test that compiled cannot hide a warning.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import pytest
import torch

import kernelattn as ka
from kernelattn.backends.torch_nn import LinearTransformerEncoderLayer, MultiheadLinearAttention
from kernelattn.testing import rel_rms_error

# Importing inductor (on the first compile) makes torch.utils.mkldnn raise
# DeprecationWarnings inside torch, which Python's default filters hide from
# users; importing it here, outside the checked region, keeps them out.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import torch._inductor.compile_fx  # noqa: F401

LOGGERS = ("torch", "torch._dynamo", "torch._inductor")


@pytest.fixture(autouse=True)
def _autograd_on():
    with torch.enable_grad():
        yield


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records = []

    def emit(self, record):
        if record not in self.records:  # the same record reaches several of LOGGERS
            self.records.append(record)


@contextlib.contextmanager
def silent():
    """Turn warnings into errors and collect torch's WARNING log records; fail if any."""
    torch._dynamo.reset()
    cache = getattr(torch._dynamo.utils, "warn_once_cache", None)
    if cache is not None:
        cache.clear()
    handler = _Records()
    loggers = [logging.getLogger(name) for name in LOGGERS]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
        torch._dynamo.reset()
    said = [f"{r.name}: {r.getMessage()[:300]}" for r in handler.records]
    assert not said, "torch logged while compiling:\n" + "\n".join(said)


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _pad(B, N):
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[0, N - 3:] = True
    return pad


@pytest.mark.slow  # torch.compile; quick: test_linear_attention_function_compiles_silently_and_matches_eager
def test_encoder_layer_training_step_with_padding_compiles_silently():
    """Training mode (kernel dropout on) and its backward; aot_eager: Dynamo and AOTAutograd
    without inductor's C++ build, which the other two tests run (a cold one costs ~40 s here)."""
    torch.manual_seed(0)
    layer = LinearTransformerEncoderLayer(16, 2, 32, feature_map="glu", seed=0, dropout=0.1)
    x, pad = _x(2, 12, 16), _pad(2, 12)
    with silent():
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        out = compiled(x, src_key_padding_mask=pad)
        out.sum().backward()
    assert out.shape == x.shape
    assert all(p.grad is not None for p in layer.self_attn.feature_map.parameters())


@pytest.mark.slow  # torch.compile; quick: test_linear_attention_function_compiles_silently_and_matches_eager
def test_causal_attention_module_compiles_silently_and_matches_eager():
    attn = MultiheadLinearAttention(16, 2, feature_map="glu", depth=2, causal=True, seed=0, chunk_size=4).eval()
    x, pad = _x(2, 10, 16, seed=1), _pad(2, 10)
    with torch.no_grad():
        want = attn(x, key_padding_mask=pad)[0]
        with silent():
            got = torch.compile(attn, fullgraph=True)(x, key_padding_mask=pad)[0]
    assert rel_rms_error(got, want) < 1e-5


def test_linear_attention_function_compiles_silently_and_matches_eager():
    q, k, v = _x(3, 1, 2, 9, 8, seed=2)
    mask = torch.ones(1, 9, dtype=torch.bool)
    mask[0, 6:] = False
    phi = ka.feature_map("glu", num_heads=2, head_dim=8, seed=0, like=q)

    def f(q, k, v, key_mask):
        causal = ka.linear_attention(q, k, v, feature_map=phi, causal=True, key_mask=key_mask, chunk_size=4)
        cross = ka.linear_attention(q, k, v, feature_map=phi, key_mask=key_mask)
        return causal, cross

    want = f(q, k, v, mask)
    with silent():
        got = torch.compile(f, fullgraph=True)(q, k, v, mask)
    for g, w in zip(got, want):
        assert rel_rms_error(g, w) < 1e-5
