"""``python -m kernelattn`` (= ``demo``) runs end to end with tiny settings and prints what it promises."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from kernelattn.cli import main
from kernelattn.commands import COMMANDS, DEFAULT

ROWS = ("ffn", "glu", "glu x2", "aoglu x3", "hedgehog", "elu+1", "relu", "favor+")
TINY = ["--steps", "3", "--heads", "0,4", "--sizes", "48,96", "--repeats", "1", "--budget", "0.2", "--no-progress"]


def _table(out):
    """label -> (params, output error, attention KL) parsed from the printed table."""
    rows = {}
    for label in ROWS:
        m = re.search(rf"^  {re.escape(label)}\s+([\d,]+)\s+(\d+\.\d+)\s+(\d+\.\d+)\s", out, re.M)
        assert m, f"no table row for {label}:\n{out}"
        rows[label] = (int(m.group(1).replace(",", "")), float(m.group(2)), float(m.group(3)))
    return rows


def test_demo_is_the_default_command():
    assert DEFAULT == "demo" and "demo" in COMMANDS and "compare" in COMMANDS


def test_demo_end_to_end_numpy(tmp_path, capsys):
    fig = tmp_path / "sub" / "demo.png"
    assert main(TINY + ["--backend", "numpy", "--out", str(fig)]) == 0  # no command: the default, demo
    out = capsys.readouterr().out
    rows = _table(out)
    assert rows["glu"][0] == 2 * 2 * 32 * 32 and rows["hedgehog"][0] == 2 * 32 * 32  # 2 heads
    assert rows["elu+1"][0] == rows["relu"][0] == rows["favor+"][0] == 0
    assert all(0 < r[1] < 3 and r[2] > 0 for r in rows.values())
    # the verdict is measured, in one of its two forms
    trained = [rows[k] for k in ROWS[:5]]
    fixed = [rows[k] for k in ROWS[5:]]
    wins = all(t[1] < min(f[1] for f in fixed) and t[2] < min(f[2] for f in fixed) for t in trained)
    assert ("Every trainable kernel beats every fixed map" in out) == wins
    assert ("Not every trainable kernel beats every fixed map" in out) == (not wins)
    assert out.count("crossover") == 4
    assert "backend numpy" in out and "held-out sched" in out
    m = re.search(r"^figure: (.+)$", out, re.M)
    assert m and m.group(1) == str(fig)
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"^done in \d+\.\d s$", out, re.M)


@pytest.mark.slow_where(backend="jax")  # a long end-to-end run
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_demo_other_backends(backend, capsys):
    assert main(["demo", "--steps", "2", "--heads", "1", "--layer", "4", "--sizes", "", "--out", "", "--no-progress",
                 "--backend", backend]) == 0
    out = capsys.readouterr().out
    _table(out)
    assert f"backend {backend}" in out and "layer 4" in out
    assert "crossover" not in out and "figure:" not in out


def test_demo_runs_with_numpy_alone(tmp_path):
    code = ("import sys; from kernelattn.cli import main; "
            f"main({TINY + ['--backend', 'numpy', '--out', str(tmp_path / 'f.png')]!r}); "
            "assert not {'torch', 'jax'} & set(sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "Held-out passage" in res.stdout


def test_demo_rejects_bad_options(capsys):
    for argv, option in [(["--heads", "x"], "--heads"), (["--backend", "tensorflow"], "--backend"),
                         (["--heads", "12"], "--heads"), (["--layer", "6"], "--layer")]:
        with pytest.raises(SystemExit) as exc:
            main(["demo", "--steps", "1", "--backend", "numpy", *argv])
        assert exc.value.code == 2
        assert f"error: argument {option}: " in capsys.readouterr().err


def test_help_lists_demo():
    res = subprocess.run([sys.executable, "-m", "kernelattn", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "demo" in res.stdout and "compare" in res.stdout
