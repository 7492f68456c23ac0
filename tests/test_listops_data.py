"""ListOps generation: labels checked by an independent evaluator, limits, vocabulary, caching."""

from __future__ import annotations

import numpy as np
import pytest

from kernelattn.listops import data as lo


def stack_eval(expression: str) -> tuple[int, int]:
    """Evaluate a token string with an explicit stack (no trees, no recursion); also the max depth."""
    stack, depth, deepest = [], 0, 0
    for tok in expression.split():
        if tok.startswith("["):
            stack.append([tok])
            depth += 1
            deepest = max(deepest, depth)
        elif tok == "]":
            op, *args = stack.pop()
            depth -= 1
            if op == "[MAX":
                val = max(args)
            elif op == "[MIN":
                val = min(args)
            elif op == "[SM":
                val = sum(args) % 10
            elif op == "[MED":
                s = sorted(args)
                mid = len(s) // 2
                val = s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) // 2
            else:
                raise AssertionError(op)
            if not stack:
                return val, deepest
            stack[-1].append(val)
        else:
            value = int(tok)
            if not stack:
                return value, 0
            stack[-1].append(value)
    raise AssertionError("unbalanced expression")


def test_example_from_the_paper():
    assert stack_eval("[MAX 4 3 [MIN 2 3 ] 1 0 ]") == (4, 2)
    assert lo.evaluate_tree(["[MAX", 4, 3, ["[MIN", 2, 3], 1, 0]) == 4
    assert lo.to_tokens(["[MAX", 4, 3, ["[MIN", 2, 3], 1, 0]) == "[MAX 4 3 [MIN 2 3 ] 1 0 ]".split()
    assert lo.evaluate_tree(["[MED", 1, 2, 7, 9]) == 4 and lo.evaluate_tree(["[SM", 9, 8]) == 7


@pytest.mark.parametrize("cfg", [
    lo.ListOpsConfig(max_depth=4, max_args=5, min_length=5, max_length=60, train=300, validation=50, test=50, seed=1),
    pytest.param(lo.ListOpsConfig(max_depth=10, max_args=10, min_length=100, max_length=400, train=200,
                                  validation=30, test=30, seed=2), marks=pytest.mark.slow),  # long sequences
])
def test_every_label_matches_an_independent_evaluator_and_limits_hold(cfg):
    splits = lo.build(cfg, verbose=False)
    for name, split in splits.items():
        assert len(split) == getattr(cfg, name)
        for ids, length, label in zip(split.tokens, split.lengths, split.labels):
            expr = lo.decode(ids)
            assert len(expr.split()) == length
            assert cfg.min_length <= length <= cfg.max_length
            value, depth = stack_eval(expr)
            assert value == label
            assert depth <= cfg.max_depth
            assert np.all(ids[length:] == lo.PAD) and np.all(ids[:length] != lo.PAD)
    seen = {lo.decode(t) for t in splits["train"].tokens}
    assert not any(lo.decode(t) in seen for t in splits["test"].tokens)


def test_vocabulary_is_lras_17_tokens():
    assert len(lo.VOCAB) == 17 and lo.PAD == 0 and lo.OOV == 16
    ids = lo.encode("[MAX 4 [SM 9 1 ] ]", length=10)
    assert ids.tolist() == [lo.TOKEN_ID[t] for t in "[MAX 4 [SM 9 1 ] ]".split()] + [0, 0, 0]
    assert lo.decode(ids) == "[MAX 4 [SM 9 1 ] ]"
    assert lo.encode("[FOO 1 ]").tolist()[0] == lo.OOV
    with pytest.raises(ValueError, match="length=3"):
        lo.encode("[MAX 1 2 3 ]", length=3)


def test_deterministic_and_cached(tmp_path, capsys):
    cfg = lo.ListOpsConfig(max_depth=5, min_length=10, max_length=80, train=100, validation=20, test=20, seed=7)
    a = lo.build(cfg, str(tmp_path))
    assert "labels" in capsys.readouterr().out
    b = lo.build(cfg, str(tmp_path))
    assert "loaded from" in capsys.readouterr().out
    c = lo.build(cfg)
    for name in a:
        np.testing.assert_array_equal(a[name].tokens, b[name].tokens)
        np.testing.assert_array_equal(a[name].tokens, c[name].tokens)
        np.testing.assert_array_equal(a[name].labels, c[name].labels)
    other = lo.build(lo.ListOpsConfig(max_depth=5, min_length=10, max_length=80, train=100, validation=20,
                                      test=20, seed=8), verbose=False)
    assert not np.array_equal(other["train"].tokens, a["train"].tokens)
