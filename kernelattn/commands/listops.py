"""``listops``: the paper's experiment on ListOps (Long Range Arena), generated offline.

Train the paper's encoder classifier with one attention::

    python -m kernelattn listops --attention glu --preset cpu

or the kernel-vs-softmax study (every attention, three seeds, one table)::

    python -m kernelattn listops --study --preset cpu

Presets: ``cpu`` (a few minutes per run on a 2-core CPU), ``lra`` (the paper's
LRA ListOps setting; a GPU), ``tiny`` (seconds, smoke tests). A run resumes
from its checkpoint when started again with the same options (``--restart``
starts afresh). Outputs: ``results.json``, ``results.md`` and ``curves.png``
per run; ``study.json``, ``study.md``, ``study.rst`` and ``curves.png`` for a
study. The data are generated once and cached (``--data-dir``).
"""

from __future__ import annotations

import os
from dataclasses import replace

HELP = "train the paper's LRA classifier on generated ListOps; the kernel-vs-softmax study"

STUDY_ATTENTIONS = ("softmax", "elu", "favor", "ffn", "glu", "glu2", "aoglu3", "hedgehog")
DEFAULT_OUT = os.path.join("kernelattn_out", "listops")


def _int_list(text: str, option: str = "--seeds") -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"{option} expects comma-separated integers, e.g. 0,1,2; got {text!r}") from None


def add_arguments(p):
    p.add_argument("--preset", default="cpu", choices=("cpu", "lra", "tiny"),
                   help="cpu: minutes per run on a CPU; lra: the paper's setting (GPU); tiny: seconds (default cpu)")
    p.add_argument("--attention", default=None,
                   help="softmax, elu, favor, ffn, glu, glu2 (GLU x2), aoglu3 (AOGLU x3), hedgehog; "
                        "comma-separated or 'all' for several (default glu; with --study all)")
    p.add_argument("--seed", type=int, default=None, help="seed of a single run (default 0)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (several make a study; --study: 0,1,2)")
    p.add_argument("--study", action="store_true",
                   help="the study: every attention (or --attention) x seeds 0,1,2 (or --seeds), mean ± std table, "
                        "speed and memory per attention")
    p.add_argument("--out", default=None, help=f"output folder (default {DEFAULT_OUT}/<preset>)")
    p.add_argument("--data-dir", default=os.path.join(DEFAULT_OUT, "data"),
                   help="cache of the generated data (default %(default)s)")
    g = p.add_argument_group("overrides of the preset")
    g.add_argument("--steps", type=int, help="optimiser steps")
    g.add_argument("--batch-size", type=int, help="examples per micro-batch")
    g.add_argument("--accumulate", type=int, help="micro-batches per optimiser step (gradient accumulation)")
    g.add_argument("--lr", type=float, help="base learning rate")
    g.add_argument("--warmup", type=int, help="warm-up steps of the inverse-square-root schedule")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    g.add_argument("--ortho-weight", type=float, help="lambda of the orthogonality penalty (per phi call)")
    g.add_argument("--eval-every", type=int, help="steps between validations (default: the preset's)")
    g.add_argument("--train-size", type=int, help="training examples to generate")
    r = p.add_argument_group("running")
    r.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads (per job with --jobs)")
    r.add_argument("--jobs", type=int, default=1,
                   help="study: runs trained at once, each in its own process (default 1)")
    r.add_argument("--restart", action="store_true", help="ignore an existing checkpoint and start afresh")
    r.add_argument("--stop-after", type=int, default=None,
                   help="stop after this step with a checkpoint (resume by running the command again)")
    r.add_argument("--max-time", type=float, default=None,
                   help="time budget in seconds for training (then validate and test)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--no-plot", action="store_true", help="no learning-curve plot")
    r.add_argument("--no-measure", action="store_true", help="study: skip the speed / memory measurement")
    r.add_argument("--measure-lengths", default=None,
                   help="study: comma-separated lengths to measure speed / memory at (default: the preset's length)")
    r.add_argument("--generate-only", action="store_true", help="generate (or load) the data, describe it, stop")
    r.add_argument("--count-params", action="store_true",
                   help="print the parameter count of the preset's model per attention and stop")


def _config(args):
    from kernelattn.listops.train import preset

    cfg = preset(args.preset)
    fields = {"steps": args.steps, "batch_size": args.batch_size, "accumulate": args.accumulate,
              "base_lr": args.lr, "warmup": args.warmup, "weight_decay": args.weight_decay,
              "ortho_weight": args.ortho_weight, "eval_every": args.eval_every}
    cfg = replace(cfg, **{k: v for k, v in fields.items() if v is not None})
    if args.train_size is not None:
        cfg = replace(cfg, data=replace(cfg.data, train=args.train_size))
    return cfg


def _attentions(args) -> list[str]:
    from kernelattn.listops.model import ATTENTIONS

    if args.attention is None:
        return list(STUDY_ATTENTIONS) if args.study else ["glu"]
    names = list(ATTENTIONS) if args.attention == "all" else [a.strip() for a in args.attention.split(",")]
    for a in names:
        if a not in ATTENTIONS:
            raise SystemExit(f"unknown --attention {a!r}; choose from {', '.join(ATTENTIONS)} or 'all'")
    return names


def run(args) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        cfg = _config(args)
    except ValueError as e:
        raise SystemExit(f"listops: {e}") from None
    attentions = _attentions(args)
    if args.seeds is not None:
        seeds = _int_list(args.seeds)
    elif args.study:
        seeds = [0, 1, 2]
    else:
        seeds = [0 if args.seed is None else args.seed]
    out = args.out or os.path.join(DEFAULT_OUT, args.preset)

    if args.count_params:
        from kernelattn.listops.model import describe, parameter_table

        print(f"{args.preset} model: {describe(cfg.model)}")
        for name, n in parameter_table(cfg.model, attentions if args.attention else STUDY_ATTENTIONS).items():
            print(f"  {name:<9} {n:>12,}")
        return 0
    if args.generate_only:
        from kernelattn.listops.data import build

        build(cfg.data, args.data_dir)
        return 0

    from kernelattn.listops.train import describe_config

    print(describe_config(cfg))
    device = None if args.device == "auto" else args.device
    if args.study or len(attentions) * len(seeds) > 1:
        if args.stop_after is not None or args.max_time is not None:
            raise SystemExit("--stop-after and --max-time apply to a single run, not a study "
                             "(a study resumes where it stopped when run again)")
        from kernelattn.listops.study import run_study

        if args.restart:
            raise SystemExit("--restart applies to a single run; delete the study folder to start a study afresh")
        run_study(replace(cfg, attention=attentions[0], seed=seeds[0]), attentions, seeds, out,
                  data_dir=args.data_dir, device=device, progress=not args.no_progress,
                  measure=not args.no_measure, threads=args.threads, jobs=args.jobs,
                  measure_lengths=None if args.measure_lengths is None else _int_list(args.measure_lengths,
                                                                                      "--measure-lengths"))
        print(f"study written to {out}/study.md, study.rst, study.json and curves.png")
        return 0

    from kernelattn.listops.train import train

    run_dir = args.out or os.path.join(out, attentions[0], f"seed{seeds[0]}")
    res = train(replace(cfg, attention=attentions[0], seed=seeds[0]), run_dir, data_dir=args.data_dir,
                resume=not args.restart, stop_after=args.stop_after, max_time=args.max_time, device=device,
                progress=not args.no_progress, plot=not args.no_plot)
    with open(os.path.join(run_dir, "results.md")) as f:
        print(f.read())
    if res["status"] == "interrupted":
        print(f"stopped at step {res['steps']}; run the same command again to resume")
    print(f"results in {run_dir}/results.json, results.md" + ("" if args.no_plot else ", curves.png"))
    return 0
