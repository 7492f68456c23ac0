"""Every docstring example of the public modules runs, and prints what it shows."""

from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest

MODULES = [
    "kernelattn",
    "kernelattn.feature_maps",
    "kernelattn.attention",
    "kernelattn.decoding",
    "kernelattn.grad",
    "kernelattn.fit",
    "kernelattn.losses",
    "kernelattn.optim",
    "kernelattn.data._minilm",
    "kernelattn.backends.torch_nn",
    "kernelattn.backends.torch_lm",
    "kernelattn.backends.jax",
    "kernelattn.backends.jax_nn",
]


@pytest.mark.slow_where(name="kernelattn.backends.jax_nn")  # Flax modules: held by test_jax_nn.py
@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    import warnings

    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
    tests = [t for t in finder.find(module, name, globs={"np": np}) if t.examples]
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0, f"no docstring examples found in {name}"
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_the_public_api_has_examples():
    import kernelattn as ka

    for name in ("feature_map", "linear_attention", "linear_attention_step", "softmax_attention", "num_params",
                 "orthogonality_penalty", "fit_feature_map", "explain_dispatch"):
        assert ">>>" in (getattr(ka, name).__doc__ or ""), f"ka.{name} has no example"
