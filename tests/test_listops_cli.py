"""``python -m kernelattn listops`` end to end on the tiny preset: a run, a resumed run, a study."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from kernelattn.cli import main
from kernelattn.listops.study import PAPER_LISTOPS, measure_step, study_markdown, study_rst, summarize
from kernelattn.listops.train import PRESETS


def _png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_single_run_writes_json_markdown_and_plot(tmp_path, capsys):
    out, data = tmp_path / "run", tmp_path / "data"
    assert main(["listops", "--preset", "tiny", "--attention", "glu", "--out", str(out), "--data-dir", str(data),
                 "--no-progress", "--ortho-weight", "0.01"]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "finished" and res["attention"] == "glu" and res["steps"] == PRESETS["tiny"].steps
    assert res["config"]["ortho_weight"] == 0.01
    assert 0.0 <= res["test_accuracy"] <= 1.0
    md = (out / "results.md").read_text()
    assert md.startswith("# ListOps: GLU (seed 0)") and "| step | epoch |" in md
    assert "# ListOps: GLU" in printed and "labels 0:" in printed  # the data's label distribution
    assert _png(out / "curves.png")
    assert list(data.glob("listops-*.npz"))


def test_stop_and_resume_from_the_command_line(tmp_path, capsys):
    args = ["listops", "--preset", "tiny", "--attention", "elu", "--out", str(tmp_path / "run"),
            "--data-dir", str(tmp_path / "data"), "--no-progress", "--no-plot"]
    assert main(args + ["--stop-after", "4"]) == 0
    assert "run the same command again to resume" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "interrupted"
    assert main(args) == 0
    assert "resumed" in capsys.readouterr().out
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["status"] == "finished" and len(res["train_curve"]) == PRESETS["tiny"].steps
    assert not (tmp_path / "run" / "curves.png").exists()


@pytest.mark.slow  # a long end-to-end run
def test_study_table(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["listops", "--preset", "tiny", "--attention", "softmax,glu", "--seeds", "0,1", "--steps", "6",
                 "--out", str(out), "--data-dir", str(tmp_path / "data"), "--no-progress",
                 "--measure-lengths", "24,64", "--jobs", "2"]) == 0
    study = json.loads((out / "study.json").read_text())
    assert [r["attention"] for r in study["rows"]] == ["softmax", "glu"]
    assert len(study["runs"]) == 4 and all((out / a / f"seed{s}" / "results.json").exists()
                                           for a in ("softmax", "glu") for s in (0, 1))
    for row in study["rows"]:
        accs = [100 * r["test_accuracy"] for r in study["runs"] if r["attention"] == row["attention"]]
        assert row["test_mean"] == pytest.approx(np.mean(accs))
        assert row["test_std"] == pytest.approx(np.std(accs, ddof=1))
        assert [m["length"] for m in row["speed"]] == [PRESETS["tiny"].data.max_length, 64]
        for m in row["speed"]:
            assert m["ms_per_step"] > 0
            assert m["saved_mib"] > 0 and m["step_memory_mib"] is None  # CPU: no allocator peak
        assert row["paper"] == PAPER_LISTOPS[row["attention"]][0]
    md = (out / "study.md").read_text()
    assert "| GLU |" in md and "18.70" in md and "36.37" in md and "MiB saved for backward (N=64)" in md
    assert (out / "study.rst").read_text().startswith(".. list-table::")
    assert _png(out / "curves.png")
    # running it again reuses the finished runs
    capsys.readouterr()
    assert main(["listops", "--preset", "tiny", "--attention", "softmax,glu", "--seeds", "0,1", "--steps", "6",
                 "--out", str(out), "--data-dir", str(tmp_path / "data"), "--no-progress", "--no-measure"]) == 0
    assert capsys.readouterr().out.count("finished earlier") == 4


def test_summary_tables_from_runs():
    runs = [{"attention": "glu", "seed": s, "test_accuracy": a, "best_val_accuracy": a + 0.01, "parameters": 10,
             "train_seconds": 1.0} for s, a in enumerate((0.2, 0.3, 0.4))]
    speed = {"glu": [{"length": 24, "batch": 4, "ms_per_step": 2.0, "saved_mib": 3.0, "step_memory_mib": None},
                     {"length": 96, "batch": 4, "ms_per_step": 5.0, "saved_mib": None, "step_memory_mib": None}]}
    rows = summarize(runs, speed)
    assert rows[0]["test_mean"] == pytest.approx(30.0) and rows[0]["test_std"] == pytest.approx(10.0)
    study = {"rows": rows, "seeds": [0, 1, 2]}
    md = study_markdown(study)
    assert "ms / step (N=24) | MiB saved for backward (N=24) | ms / step (N=96) |" in md
    assert "| GLU | 10 | 30.0 ± 10.0 | 31.0 ± 10.0 | 2.0 | 3.0 | 5.0 | – | 18.70 (authors' notebook) |" in md
    assert "     - 30.0 ± 10.0" in study_rst(study)


@pytest.mark.slow  # a long end-to-end run
def test_measure_step_in_process_and_longer():
    cfg = PRESETS["tiny"]
    m = measure_step(cfg, device="cpu", repeats=2, subprocess_=False)
    assert m["ms_per_step"] > 0 and m["length"] == cfg.data.max_length and m["batch"] == cfg.batch_size
    long = measure_step(cfg, length=3 * cfg.data.max_length, device="cpu", repeats=2)  # in a child process
    assert long["length"] == 3 * cfg.data.max_length and long["ms_per_step"] > 0
    # activations kept for backward grow with the length (the model and batch are the same)
    assert long["saved_mib"] > m["saved_mib"] > 0


def test_count_params_and_generate_only(tmp_path, capsys):
    assert main(["listops", "--preset", "lra", "--count-params"]) == 0
    out = capsys.readouterr().out
    assert "21,019,658" in out and "21,412,874" in out and "21,806,090" in out and "21,904,394" in out
    assert main(["listops", "--preset", "tiny", "--generate-only", "--data-dir", str(tmp_path)]) == 0
    assert "validation" in capsys.readouterr().out and list(tmp_path.glob("listops-*.npz"))


def test_bad_arguments(tmp_path, capsys):
    for argv, message in [(["--attention", "cosine"], "argument --attention: expected comma-separated names"),
                          (["--seeds", "a,b"], "argument --seeds: expected comma-separated non-negative"),
                          (["--steps", "0"], "argument --steps: expected a positive integer")]:
        with pytest.raises(SystemExit) as exc:
            main(["listops", "--preset", "tiny", "--out", str(tmp_path), *argv])
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_module_entry_point_help():
    proc = subprocess.run([sys.executable, "-m", "kernelattn", "listops", "--help"], capture_output=True, text=True,
                          check=True)
    assert "--preset" in proc.stdout and "--study" in proc.stdout


@pytest.mark.slow  # a long end-to-end run
def test_training_in_a_pipe_writes_no_carriage_return(tmp_path):
    """Progress bars stay on by default but only reach a terminal, never a pipe or a log."""
    res = subprocess.run([sys.executable, "-m", "kernelattn", "listops", "--preset", "tiny", "--steps", "3",
                          "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data"), "--no-plot"],
                         capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr.decode()
    assert b"results in" in res.stdout
    assert b"\r" not in res.stdout and b"\r" not in res.stderr
