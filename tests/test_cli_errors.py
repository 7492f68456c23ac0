"""Every bad command-line value ends in argparse's one-line error and exit status 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kernelattn.cli import main

# Safe bases: if a bad value were accepted, the run stays small (the bad option comes last and wins).
DEMO = ["--steps", "1", "--sizes", "", "--out", "", "--no-progress", "--heads", "0", "--backend", "numpy"]
COMPARE = ["compare", "--sizes", "16", "--repeats", "1", "--error-n", "16", "--heads", "1", "--head-dim", "4"]
BENCH = ["bench", "--backends", "numpy", "--sizes", "16", "--repeats", "1", "--heads", "1", "--head-dim", "4",
         "--no-plot", "--out", "{dir}/bench"]
LISTOPS = ["listops", "--preset", "tiny", "--count-params"]

INTS = ["abc", "-1", "0", "1.5", "1e999", "nan"]
FLOATS = ["abc", "-1", "nan", "inf"]
SECONDS = ["abc", "-1", "nan"]

CASES = (
    [(DEMO, "--steps", v) for v in INTS]
    + [(DEMO, "--repeats", v) for v in INTS]
    + [(DEMO, "--seed", v) for v in ["abc", "-1", "1.5"]]
    + [(DEMO, "--layer", v) for v in ["abc", "-1", "6", "99", "1.5"]]
    + [(DEMO, "--lr", v) for v in FLOATS + ["0"]]
    + [(DEMO, "--ortho-weight", v) for v in FLOATS]
    + [(DEMO, "--budget", v) for v in SECONDS]
    + [(DEMO, "--heads", v) for v in ["abc", "-1", "12", "0,0", "", ",", "1.5", "all,1"]]
    + [(DEMO, "--backend", v) for v in ["nope", "tensorflow"]]
    + [(DEMO, "--loss", "nope")]
    + [(DEMO, "--sizes", v) for v in ["abc", "-1", "0", "1,,2", ",", "1.5"]]
    + [(DEMO, "--out", v) for v in ["{dir}", "{dir}/x.nope", "{file}/x.png"]]
    + [(COMPARE, opt, v) for opt in ("--error-n", "--heads", "--head-dim", "--repeats") for v in INTS[:4]]
    + [(COMPARE, "--budget", v) for v in SECONDS]
    + [(COMPARE, "--backend", "nope")]
    + [(COMPARE, "--sizes", v) for v in ["abc", "-1", "0", "", "1,,2"]]
    + [(BENCH, opt, v) for opt in ("--heads", "--head-dim", "--repeats") for v in INTS[:3]]
    + [(BENCH, opt, v) for opt in ("--budget", "--softmax-limit") for v in SECONDS]
    + [(BENCH, "--backends", v) for v in ["nope", "", ",", "numpy,nope"]]
    + [(BENCH, "--sizes", v) for v in ["abc", "-1", "0", ""]]
    + [(BENCH, "--kernel", "nope")]
    + [(BENCH, "--out", v) for v in ["{file}", "{file}/sub", ""]]
    + [(LISTOPS, opt, v) for opt in ("--steps", "--batch-size", "--accumulate", "--warmup", "--eval-every",
                                     "--train-size", "--threads", "--jobs") for v in INTS[:3]]
    + [(LISTOPS, opt, v) for opt in ("--seed", "--stop-after") for v in ["abc", "-1"]]
    + [(LISTOPS, "--lr", v) for v in FLOATS + ["0"]]
    + [(LISTOPS, opt, v) for opt in ("--weight-decay", "--ortho-weight") for v in FLOATS]
    + [(LISTOPS, "--max-time", v) for v in SECONDS]
    + [(LISTOPS, "--preset", "nope")]
    + [(LISTOPS, "--attention", v) for v in ["nope", "", ",", "glu,nope", "glu,glu"]]
    + [(LISTOPS, "--seeds", v) for v in ["a", "-1", "", ",", "0,0"]]
    + [(LISTOPS, "--measure-lengths", v) for v in ["a", "-1", "0"]]
    + [(LISTOPS, "--train-size", "2")]  # smaller than one batch of the preset
    + [(LISTOPS, opt, v) for opt in ("--out", "--data-dir") for v in ["{file}", "{file}/sub", ""]]
    + [(["listops", "--preset", "tiny"], "--device", v) for v in ["nope", "cuda:99", "meta"]]
)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "afile").write_text("")
    return {"dir": str(d), "file": str(d / "afile")}


def _run(argv, capsys):
    """(exit status, stderr) of main(argv) in this process."""
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(("base", "option", "value"), CASES, ids=[f"{b[0] if not b[0].startswith('-') else 'demo'}"
                                                                  f" {o}={v!r}" for b, o, v in CASES])
def test_bad_value_is_a_usage_error(base, option, value, paths, capsys):
    argv = [a.format(**paths) for a in base] + [option, value.format(**paths)]
    rc, err = _run(argv, capsys)
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("usage: python -m kernelattn")
    assert f"error: argument {option}: " in lines[-1], err
    assert lines[-1].startswith("python -m kernelattn")


@pytest.mark.parametrize("argv, option", [
    (["listops", "--preset", "tiny", "--study", "--stop-after", "3"], "--stop-after"),
    (["listops", "--preset", "tiny", "--seeds", "0,1", "--max-time", "5"], "--max-time"),
    (["listops", "--preset", "tiny", "--attention", "glu,elu", "--restart"], "--restart"),
])
def test_single_run_options_refused_for_a_study(argv, option, capsys):
    rc, err = _run(argv, capsys)
    assert rc == 2 and f"error: argument {option}: applies to a single run" in err and "Traceback" not in err


def test_checkpoint_of_another_configuration(tmp_path, capsys):
    args = ["listops", "--preset", "tiny", "--attention", "elu", "--out", str(tmp_path / "run"), "--data-dir",
            str(tmp_path / "data"), "--no-progress", "--no-plot"]
    assert main(args + ["--steps", "3", "--stop-after", "1"]) == 0
    capsys.readouterr()
    rc, err = _run(args + ["--steps", "4"], capsys)
    assert rc == 2 and "error: argument --out:" in err and "--restart" in err and "Traceback" not in err


def test_good_values_still_parse():
    from kernelattn.cli import build_parser

    parser, _ = build_parser()
    a = parser.parse_args(["demo", "--sizes", "", "--heads", "all", "--layer", "5", "--budget", "inf", "--lr", "1e-3"])
    assert a.sizes == [] and a.heads is None and a.layer == 5 and a.budget == float("inf") and a.lr == 1e-3
    a = parser.parse_args(["demo", "--sizes", " 64, 128", "--heads", "3,1", "--seed", "0", "--ortho-weight", "0"])
    assert a.sizes == [64, 128] and a.heads == [3, 1] and a.seed == 0 and a.ortho_weight == 0
    a = parser.parse_args(["bench", "--backends", "torch, numpy", "--softmax-limit", "0"])
    assert a.backends == ["torch", "numpy"] and a.softmax_limit == 0
    a = parser.parse_args(["listops", "--attention", "all", "--seeds", "0,1,2", "--stop-after", "0"])
    assert len(a.attention) == 8 and a.seeds == [0, 1, 2] and a.stop_after == 0


@pytest.mark.parametrize("argv, option", [(["--sizes", "abc"], "--sizes"), (["compare", "--heads", "-1"], "--heads"),
                                          (["--layer", "99"], "--layer")])
def test_real_exit_status(argv, option):
    res = subprocess.run([sys.executable, "-m", "kernelattn", *argv], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert f"error: argument {option}: " in res.stderr and "Traceback" not in res.stderr
    assert res.stdout == ""
