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


def test_crossover_interpolates_log_log():
    from kernelattn._timing import crossover, crossover_text

    sizes = [100, 400, 1600]
    # linear attention ~ N, softmax ~ N^2: equal at N = 200 (fast/slow = 2 at 100, 0.5 at 400)
    slow, fast = [1.0, 16.0, 256.0], [2.0, 8.0, 32.0]
    assert crossover(sizes, slow, fast) == (200, True)
    assert crossover_text(sizes, slow, fast) == "N ~ 200"
    assert crossover_text(sizes, slow, [0.5, 1.0, 2.0], unicode=True) == "N ≤ 100 (faster at every size measured)"
    assert crossover_text(sizes, slow, [9.0, 99.0, 999.0]) == "not reached up to N=1600"
    assert crossover(sizes, [None, 16.0, 256.0], [None, 8.0, 32.0]) == (400, False)


def test_bench_writes_the_report(tmp_path, capsys):
    import json

    assert main(["bench", "--backends", "numpy", "--sizes", "64,128", "--repeats", "1", "--heads", "2",
                 "--head-dim", "8", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("crossover with softmax") == 4  # non-causal, causal; fast and agnostic
    report = json.loads((tmp_path / "bench.json").read_text())
    times = report["results"]["numpy"]["times"]
    assert report["sizes"] == [64, 128]
    assert set(times) >= {"softmax", "floor", "non-causal", "causal", "non-causal agnostic", "causal agnostic"}
    assert all(t > 0 for t in times["floor"]) and all(len(p) == 2 for p in times["softmax"])
    assert (tmp_path / "bench.rst").read_text().lstrip().startswith("Measured on")
    assert "| N |" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
