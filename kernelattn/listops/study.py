"""The kernel-vs-softmax study: every attention, several seeds, one table.

:func:`run_study` trains one run per (attention, seed) with a preset (each in
its own folder, skipped when already finished, resumed when interrupted), then
measures the speed and memory of one training step per attention at the
preset's full length (:func:`measure_step`, each in a fresh process), and
writes ``study.json``, ``study.md``, ``study.rst`` and ``curves.png``.

The table puts the mean ± standard deviation (over seeds) of the test
accuracy at the best validation checkpoint beside the ListOps accuracies the
paper's authors recorded (:data:`PAPER_LISTOPS`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np

from .model import ATTENTIONS, LABELS
from .data import build
from .train import TrainConfig, load_results, plot_curves, train

__all__ = ["PAPER_LISTOPS", "measure_step", "run_study", "study_markdown", "study_rst", "summarize"]

#: ListOps test accuracy (%) for comparison, and where it comes from (Yorsh & Kovalenko, ICANN 2022; Tay et al. 2021).
PAPER_LISTOPS = {
    "softmax": (36.37, "Transformer, LRA (Tay et al. 2021)"),
    "elu": (16.13, "Linear Transformer, LRA (Tay et al. 2021)"),
    "favor": (18.01, "Performer, LRA (Tay et al. 2021)"),
    "glu": (18.70, "authors' notebook"),
    "glu2": (18.45, "authors' notebook"),
    "aoglu3": (18.70, "authors' notebook"),
}


def _saved_for_backward_mib(model, step) -> float:
    """MiB of the tensors autograd keeps for the backward pass of ``step()`` (activations; weights excluded).

    Counted with ``torch.autograd.graph.saved_tensors_hooks``, one storage
    once: deterministic and the same on every device, unlike a process's
    resident memory, which the allocator's caching blurs on a CPU.
    """
    import torch

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[(storage.data_ptr(), str(t.device))] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values()) / 2**20


def _measure_here(cfg: TrainConfig, device: str, repeats: int, threads: int | None,
                  matmul_precision: str | None = None) -> dict:
    """Time and memory of training steps at full length, in this process (see :func:`measure_step`)."""
    import torch
    import torch.nn.functional as F

    from .model import ListOpsClassifier

    if threads:
        torch.set_num_threads(threads)
    if matmul_precision:
        torch.set_float32_matmul_precision(matmul_precision)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    torch.manual_seed(0)
    model = ListOpsClassifier(cfg.model, cfg.attention, seed=0).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=cfg.betas, weight_decay=cfg.weight_decay)
    B, N = cfg.batch_size, cfg.data.max_length
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, cfg.model.vocab_size - 1, (B, N), generator=gen).to(dev)  # no padding
    labels = torch.randint(0, cfg.model.num_classes, (B,), generator=gen).to(dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def step():
        opt.zero_grad(set_to_none=False)  # gradients stay allocated: part of the resting state
        loss = F.cross_entropy(model(tokens).float(), labels)
        if cfg.ortho_weight:
            loss = loss + model.orthogonality_penalty(cfg.ortho_weight)
        loss.backward()
        opt.step()

    step()
    saved = _saved_for_backward_mib(model, step)  # also the second warm-up step
    sync()
    memory = None
    if dev.type == "cuda":  # the caching allocator's peak above the resting state
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        step()
        sync()
        memory = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"attention": cfg.attention, "length": N, "batch": B, "ms_per_step": 1e3 * float(np.median(times)),
            "saved_mib": saved, "step_memory_mib": memory, "device": name, "threads": torch.get_num_threads()}


def measure_step(cfg: TrainConfig, *, length: int | None = None, device: str = "auto", repeats: int = 5,
                 threads: int | None = None, subprocess_: bool = True) -> dict:
    """Speed and peak memory of one training step at the preset's full length (or ``length``).

    A batch of ``cfg.batch_size`` sequences of ``length`` (default
    ``cfg.data.max_length``) real tokens, no padding, goes through forward,
    backward and the AdamW update of ``cfg``'s model (its positional table
    lengthened if ``length`` needs it).

    Returns
    -------
    dict
        ``ms_per_step``: median over ``repeats`` steps after two warm-up
        steps. ``saved_mib``: the activations autograd keeps for the
        backward pass (every device; what grows as N² for softmax attention
        that stores its probabilities and as N for linear attention).
        ``step_memory_mib``: on CUDA, the caching allocator's peak during a
        step above the resting state (weights, gradients, optimiser moments);
        None on a CPU, where the allocator's caching makes a process's peak
        memory meaningless at this scale. Run in a fresh process unless
        ``subprocess_=False``.
    """
    if length is not None and length != cfg.data.max_length:
        cfg = replace(cfg, data=replace(cfg.data, max_length=length, min_length=min(cfg.data.min_length, length)),
                      model=replace(cfg.model, max_length=max(length, cfg.model.max_length)))
    if not subprocess_:
        return _measure_here(cfg, device, repeats, threads)
    import torch

    args = json.dumps({"config": cfg.to_dict(), "device": device, "repeats": repeats, "threads": threads,
                       "matmul_precision": torch.get_float32_matmul_precision()})
    proc = subprocess.run([sys.executable, "-m", "kernelattn.listops.study", args], capture_output=True,
                          text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"measuring {cfg.attention} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_study(base: TrainConfig, attentions, seeds, out_dir: str, *, data_dir: str | None = None,
              device=None, progress: bool = True, measure: bool = True, measure_lengths=None,
              repeats: int = 5, threads: int | None = None, jobs: int = 1, verbose: bool = True) -> dict:
    """Train every (attention, seed), measure each attention, write the study table.

    Parameters
    ----------
    base : TrainConfig
        The preset; ``attention`` and ``seed`` are replaced per run.
    attentions : sequence of str
    seeds : sequence of int
    out_dir : str
        Runs go to ``out_dir/<attention>/seed<seed>``; the study files to ``out_dir``.
    data_dir, device, progress
        As in :func:`kernelattn.listops.train.train`.
    measure : bool, default True
        Also measure speed and memory per attention (:func:`measure_step`).
    measure_lengths : sequence of int, optional
        Lengths to measure at (default: the preset's ``data.max_length``).
    repeats : int, default 5
        Timed steps per measurement (the median is reported).
    threads : int, optional
        torch CPU threads of the measurements (and of each worker when ``jobs > 1``).
    jobs : int, default 1
        Runs trained at the same time, each in its own process (with
        ``threads`` threads, default 1). The measurements always run alone,
        one after the other.

    Returns
    -------
    dict
        ``rows`` (one per attention, see :func:`summarize`), ``runs`` and
        ``speed``; also written to ``out_dir/study.json``.
    """
    for a in attentions:
        if a not in ATTENTIONS:
            raise ValueError(f"attention must be one of {list(ATTENTIONS)}; got {a!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer; got {jobs!r}")
    os.makedirs(out_dir, exist_ok=True)
    start = time.perf_counter()
    if data_dir is not None:
        build(base.data, data_dir, verbose=verbose)  # once, before any worker needs it
    todo, runs = [], {}
    for attention in attentions:
        for seed in seeds:
            cfg = replace(base, attention=attention, seed=int(seed))
            run_dir = os.path.join(out_dir, attention, f"seed{seed}")
            done = load_results(run_dir)
            if done is not None and done["status"] == "finished" and done["config"] == _plain(cfg):
                if verbose:
                    print(f"{attention} seed {seed}: finished earlier, test accuracy "
                          f"{100 * done['test_accuracy']:.2f}%")
                runs[attention, seed] = done
            else:
                todo.append((cfg, run_dir))

    def report(res):
        runs[res["attention"], res["seed"]] = res
        if verbose:
            print(f"{res['attention']} seed {res['seed']}: test accuracy {100 * res['test_accuracy']:.2f}% "
                  f"(best validation {100 * res['best_val_accuracy']:.2f}% at step {res['best_step']}; "
                  f"{res['train_seconds']:.0f} s)", flush=True)

    if jobs == 1:
        for cfg, run_dir in todo:
            report(train(cfg, run_dir, data_dir=data_dir, device=device, progress=progress, verbose=False))
    elif todo:
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_train_worker, cfg.to_dict(), run_dir, data_dir, device, threads or 1)
                       for cfg, run_dir in todo]
            for future in concurrent.futures.as_completed(futures):
                report(future.result())
    runs = [runs[a, int(s)] for a in attentions for s in seeds]
    speed = {}
    if measure:
        lengths = [base.data.max_length] if measure_lengths is None else [int(n) for n in measure_lengths]
        for attention in attentions:
            speed[attention] = []
            for n in lengths:
                m = measure_step(replace(base, attention=attention), length=n,
                                 device="auto" if device is None else str(device), repeats=repeats, threads=threads)
                speed[attention].append(m)
                if verbose:
                    peak = "" if m["step_memory_mib"] is None else f", peak {m['step_memory_mib']:.0f} MiB"
                    print(f"{attention}: {m['ms_per_step']:.1f} ms/step, {m['saved_mib']:.1f} MiB saved for backward"
                          f"{peak} at length {n}, batch {m['batch']}")
    import platform

    import torch

    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
               "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None}
    study = {"preset": base.to_dict(), "attentions": list(attentions), "seeds": [int(s) for s in seeds],
             "machine": machine,
             "rows": summarize(runs, speed), "speed": speed,
             "runs": [{k: r[k] for k in ("attention", "seed", "best_step", "best_val_accuracy", "test_accuracy",
                                         "test_loss", "train_seconds", "parameters")} for r in runs],
             "wall_seconds": time.perf_counter() - start}
    with open(os.path.join(out_dir, "study.json"), "w") as f:
        json.dump(study, f, indent=1)
    with open(os.path.join(out_dir, "study.md"), "w") as f:
        f.write(study_markdown(study))
    with open(os.path.join(out_dir, "study.rst"), "w") as f:
        f.write(study_rst(study))
    plot_curves(runs, os.path.join(out_dir, "curves.png"))
    if verbose:
        print(study_markdown(study))
    return study


def _plain(cfg: TrainConfig) -> dict:
    """The config as results.json stores it (tuples become lists)."""
    return json.loads(json.dumps(cfg.to_dict()))


def _train_worker(cfg_dict, run_dir, data_dir, device, threads):
    import torch

    torch.set_num_threads(threads)
    return train(TrainConfig.from_dict(cfg_dict), run_dir, data_dir=data_dir, device=device, progress=False,
                 verbose=False)


def summarize(runs: list[dict], speed: dict | None = None) -> list[dict]:
    """One row per attention: parameters, test / validation accuracy mean and std (%), speed, memory.

    ``speed`` maps an attention to its :func:`measure_step` results (a list,
    one per length); a row's ``speed`` is that list.
    """
    speed = speed or {}
    rows = []
    for attention in dict.fromkeys(r["attention"] for r in runs):
        mine = [r for r in runs if r["attention"] == attention]
        test = np.array([100 * r["test_accuracy"] for r in mine])
        val = np.array([100 * r["best_val_accuracy"] for r in mine])
        paper = PAPER_LISTOPS.get(attention)
        rows.append({
            "attention": attention, "label": LABELS[attention], "parameters": mine[0]["parameters"],
            "seeds": len(mine), "test_mean": float(test.mean()),
            "test_std": float(test.std(ddof=1)) if len(test) > 1 else 0.0,
            "val_mean": float(val.mean()), "val_std": float(val.std(ddof=1)) if len(val) > 1 else 0.0,
            "train_seconds": float(np.mean([r["train_seconds"] for r in mine])),
            "speed": [{k: m[k] for k in ("length", "batch", "ms_per_step", "saved_mib", "step_memory_mib")}
                      for m in speed.get(attention, [])],
            "paper": None if paper is None else paper[0], "paper_source": None if paper is None else paper[1],
        })
    return rows


def _lengths(study) -> list[int]:
    return [m["length"] for m in next((r["speed"] for r in study["rows"] if r["speed"]), [])]


def _cells(row, lengths) -> list[str]:
    paper = "–" if row["paper"] is None else f"{row['paper']:.2f} ({row['paper_source']})"
    cells = [row["label"], f"{row['parameters']:,}", f"{row['test_mean']:.1f} ± {row['test_std']:.1f}",
             f"{row['val_mean']:.1f} ± {row['val_std']:.1f}"]
    by_length = {m["length"]: m for m in row["speed"]}
    for n in lengths:
        m = by_length.get(n, {})
        cells.append("–" if m.get("ms_per_step") is None else f"{m['ms_per_step']:.1f}")
        cells.append("–" if m.get("saved_mib") is None else f"{m['saved_mib']:.1f}")
    return cells + [paper]


def _header(study) -> list[str]:
    n = len(study["seeds"])
    head = ["attention", "parameters", f"test acc. % (mean ± std, {n} seeds)", "best val. acc. %"]
    for length in _lengths(study):
        head += [f"ms / step (N={length})", f"MiB saved for backward (N={length})"]
    return head + ["paper's ListOps % (LRA, N ≤ 2000)"]


def study_markdown(study: dict) -> str:
    """The study table in Markdown."""
    head = _header(study)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cells(r, _lengths(study))) + " |" for r in study["rows"]]
    return "\n".join(lines) + "\n"


def study_rst(study: dict) -> str:
    """The study table as a reStructuredText list-table (for the docs)."""
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for cells in [_header(study)] + [_cells(r, _lengths(study)) for r in study["rows"]]:
        lines.append("   * - " + cells[0])
        lines += [f"     - {c}" for c in cells[1:]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # the child of measure_step
    _args = json.loads(sys.argv[1])
    print(json.dumps(_measure_here(TrainConfig.from_dict(_args["config"]), _args["device"], _args["repeats"],
                                   _args["threads"], _args.get("matmul_precision"))))
