"""ListOps at the paper's scale on a GPU: the ``lra`` preset on a shortened schedule.

For a session with a GPU (none was available when this was written, so its
numbers are pending). Run from the repository root on a machine with CUDA and
torch::

    python asv_benchmarks/gpu_listops_lra.py                  # ~8 minutes on one H100-class card
    python asv_benchmarks/gpu_listops_lra.py --per-run 30 --attentions softmax,glu   # a quicker look

The model is the paper's LRA ListOps classifier (vocabulary 17, length 2000,
hidden 512, 8 heads, 6 layers, MLP 2048; 21,019,658 parameters with softmax),
on LRA-style data (depth <= 10, <= 10 arguments, 500-2000 tokens). The
schedule is shortened: the paper's recipe (AdamW, wd 0.1, batch 32, base lr
0.005, inverse-square-root schedule) with ``--warmup`` steps of warm-up and a
time budget of ``--per-run`` seconds of training per attention, after which
the run validates and tests at its best validation checkpoint. For each
attention it prints and writes (``--out``/gpu_listops.json and .md):

* accuracy after that budget (steps reached, best validation, test);
* the time of one training step and its peak memory above the resting
  weights / gradients / optimiser state, at the full length 2000 and batch 32
  (:func:`kernelattn.listops.study.measure_step`);
* the card's name, torch version.

The training split is smaller than LRA's 96,000 (``--train-size``, default
12,000: generating costs ~0.8 ms per example on one CPU core); the data can be
generated beforehand on any machine and carried along::

    python -m kernelattn listops --preset lra --train-size 12000 --generate-only

(the cache is ``kernelattn_out/listops/data``). Accuracies after a few hundred
steps are far from the paper's 7.5k-20k steps: they say how fast each
attention starts to learn, not where it ends. Exit status 1 without CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

import torch

from kernelattn.listops.data import build
from kernelattn.listops.model import LABELS
from kernelattn.listops.study import PAPER_LISTOPS, measure_step
from kernelattn.listops.train import preset, train


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attentions", default="softmax,elu,favor,glu,glu2,aoglu3")
    p.add_argument("--per-run", type=float, default=60.0, help="seconds of training per attention")
    p.add_argument("--steps", type=int, default=3000, help="schedule length (the time budget usually ends first)")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--train-size", type=int, default=12_000)
    p.add_argument("--data-dir", default=os.path.join("kernelattn_out", "listops", "data"))
    p.add_argument("--out", default=os.path.join("kernelattn_out", "listops", "gpu"))
    p.add_argument("--no-measure", action="store_true")
    p.add_argument("--preset", default="lra", help="lra (default); tiny with --device cpu is a smoke test of this script")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: this script is for a GPU session", file=sys.stderr)
        return 1
    if args.device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 matmuls (measure_step's child does the same)
        card = torch.cuda.get_device_name(torch.device(args.device))
    else:
        card = "cpu"
    print(f"{card}, torch {torch.__version__}")
    base = preset(args.preset, steps=args.steps, warmup=args.warmup, eval_every=args.eval_every)
    base = replace(base, data=replace(base.data, train=args.train_size))
    t0 = time.perf_counter()
    build(base.data, args.data_dir)
    print(f"data ready in {time.perf_counter() - t0:.0f} s")
    rows = []
    for attention in args.attentions.split(","):
        cfg = replace(base, attention=attention)
        res = train(cfg, os.path.join(args.out, attention), data_dir=args.data_dir, resume=False,
                    max_time=args.per_run, device=args.device, progress=False, verbose=False)
        row = {"attention": attention, "label": LABELS[attention], "parameters": res["parameters"],
               "steps": res["steps"], "best_val_accuracy": res["best_val_accuracy"],
               "test_accuracy": res["test_accuracy"], "train_ms_per_step": 1e3 * res["seconds_per_step"],
               "paper": PAPER_LISTOPS.get(attention, (None,))[0]}
        if not args.no_measure:
            m = measure_step(cfg, device=args.device, repeats=10)
            row.update(ms_per_step=m["ms_per_step"], step_memory_mib=m["step_memory_mib"], saved_mib=m["saved_mib"], length=m["length"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    summary = {"card": card, "torch": torch.__version__, "per_run_seconds": args.per_run, "warmup": args.warmup,
               "train_size": args.train_size, "rows": rows}
    with open(os.path.join(args.out, "gpu_listops.json"), "w") as f:
        json.dump(summary, f, indent=1)
    at = f"N={base.data.max_length}, B={base.batch_size}"
    head = (f"| attention | parameters | steps in budget | best val. % | test % | ms/step ({at}) | "
            f"peak step memory MiB ({at}) | MiB saved for backward | paper's % |")
    lines = [f"ListOps, {args.preset} preset, {args.per_run:.0f} s of training per attention on {card}", "", head,
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = (lambda x, f: "–" if x is None else format(x, f))
        lines.append(f"| {r['label']} | {r['parameters']:,} | {r['steps']} | {100 * r['best_val_accuracy']:.1f} | "
                     f"{100 * r['test_accuracy']:.1f} | {fmt(r.get('ms_per_step'), '.1f')} | "
                     f"{fmt(r.get('step_memory_mib'), '.0f')} | {fmt(r.get('saved_mib'), '.1f')} | "
                     f"{fmt(r['paper'], '.2f')} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "gpu_listops.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
