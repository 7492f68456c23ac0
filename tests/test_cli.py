"""The main job runs end to end and prints what the README promises."""

from __future__ import annotations

import re
import subprocess
import sys

from kernelattn.cli import main


def test_compare_prints_errors_times_and_crossover(capsys):
    assert main(["compare", "--sizes", "64,128", "--repeats", "1", "--error-n", "48", "--heads", "2", "--head-dim", "8"]) == 0
    out = capsys.readouterr().out
    for label in ("elu+1", "favor", "glu x2", "aoglu x3", "hedgehog"):
        assert re.search(rf"{re.escape(label)}\s+[\d,]+\s+\d+\.\d+\s+\d+\.\d+", out), label
    assert out.count("crossover") == 6
    assert "non-causal" in out and "causal" in out


def test_python_dash_m_and_help():
    res = subprocess.run([sys.executable, "-m", "kernelattn", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "compare" in res.stdout
    res = subprocess.run([sys.executable, "-m", "kernelattn", "compare", "--bogus"], capture_output=True, text=True)
    assert res.returncode == 2 and "--bogus" in res.stderr


def test_commands_leave_torch_autograd_as_they_found_it():
    import torch

    assert torch.is_grad_enabled()
    main(["compare", "--backend", "torch", "--sizes", "32", "--repeats", "1", "--error-n", "16", "--heads", "1",
          "--head-dim", "4"])
    assert torch.is_grad_enabled()
