"""The main job runs end to end and prints what the README promises."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

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


# -- quiet in pipes, plain-text help ---------------------------------------------------------------------------

SMALL_DEMO = ["--sizes", "128", "--repeats", "1", "--steps", "5", "--heads", "0,1", "--backend", "numpy"]


@pytest.mark.slow  # a long end-to-end run
def test_demo_in_a_pipe_writes_no_carriage_return(tmp_path):
    """Progress bars are on by default, but only for a terminal: a pipe or a log gets the table alone."""
    res = subprocess.run([sys.executable, "-m", "kernelattn", *SMALL_DEMO, "--out", str(tmp_path / "f.png")],
                         capture_output=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr.decode()
    assert b"Held-out passage" in res.stdout
    assert b"\r" not in res.stdout and b"\r" not in res.stderr


def _on_a_terminal(argv, cwd):
    """stderr (a pseudo-terminal) of ``python -m kernelattn argv``."""
    import os
    import pty
    import threading

    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty has 0 columns
    chunks = []

    def drain():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        res = subprocess.run([sys.executable, "-m", "kernelattn", *argv], stdout=subprocess.PIPE, stderr=slave,
                             cwd=cwd, timeout=300)
    finally:
        os.close(slave)
        reader.join(10)
        os.close(master)
    assert res.returncode == 0
    return b"".join(chunks)


@pytest.mark.slow  # a long end-to-end run
def test_progress_bars_on_a_terminal_and_no_progress(tmp_path):
    pytest.importorskip("tqdm")
    pytest.importorskip("termios")  # POSIX pseudo-terminals
    argv = [*SMALL_DEMO, "--sizes", "", "--out", ""]
    assert b"fitting glu" in _on_a_terminal(argv, tmp_path)
    assert b"fitting" not in _on_a_terminal(argv + ["--no-progress"], tmp_path)


def _helps():
    from kernelattn.commands import COMMANDS

    yield "python -m kernelattn --help", ["--help"]
    for name in COMMANDS:
        yield f"{name} --help", [name, "--help"]


def test_help_is_plain_text_with_an_example(capsys):
    for label, argv in _helps():
        try:
            main(argv)
        except SystemExit as exc:
            assert exc.code == 0
        text = capsys.readouterr().out
        for markup in ("``", ":func:", ":class:", ":mod:", ":data:", "::"):
            assert markup not in text, (label, markup)
        assert "example" in text and "python -m kernelattn" in text.split("example", 1)[1], label
        assert max(map(len, text.splitlines())) <= 100, label
