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

from ._args import (UsageError, choice_list, int_list, nonnegative_float, nonnegative_int, output_folder,
                    positive_float, positive_int, seconds)

HELP = "train the paper's LRA classifier on generated ListOps; the kernel-vs-softmax study"
DESCRIPTION = """\
The paper's experiment on ListOps (Long Range Arena), generated offline.

Trains the paper's encoder classifier with one attention, or runs the
kernel-vs-softmax study (every attention, three seeds, one table).
Presets: cpu (a few minutes per run on a 2-core CPU), lra (the paper's LRA
ListOps setting; a GPU), tiny (seconds, smoke tests). A run resumes from its
checkpoint when started again with the same options (--restart starts afresh).
Outputs: results.json, results.md and curves.png per run; study.json,
study.md, study.rst and curves.png for a study. The data are generated once
and cached (--data-dir)."""
EXAMPLES = ("python -m kernelattn listops --attention glu --preset cpu",
            "python -m kernelattn listops --study --preset cpu")

STUDY_ATTENTIONS = ("softmax", "elu", "favor", "ffn", "glu", "glu2", "aoglu3", "hedgehog")
DEFAULT_OUT = os.path.join("kernelattn_out", "listops")
#: option -> TrainConfig field of the preset overrides
_FIELDS = {"--steps": "steps", "--batch-size": "batch_size", "--accumulate": "accumulate", "--lr": "base_lr",
           "--warmup": "warmup", "--weight-decay": "weight_decay", "--ortho-weight": "ortho_weight",
           "--eval-every": "eval_every"}


def add_arguments(p):
    p.add_argument("--preset", default="cpu", choices=("cpu", "lra", "tiny"),
                   help="cpu: minutes per run on a CPU; lra: the paper's setting (GPU); tiny: seconds (default cpu)")
    p.add_argument("--attention", type=choice_list(STUDY_ATTENTIONS, all_word="all"), default=None, metavar="NAME,...",
                   help="softmax, elu, favor, ffn, glu, glu2 (GLU x2), aoglu3 (AOGLU x3), hedgehog; "
                        "comma-separated or 'all' for several (default glu; with --study all)")
    p.add_argument("--seed", type=nonnegative_int, default=None, help="seed of a single run (default 0)")
    p.add_argument("--seeds", type=int_list(0, example="0,1,2"), default=None, metavar="SEED,...",
                   help="comma-separated seeds (several make a study; --study: 0,1,2)")
    p.add_argument("--study", action="store_true",
                   help="the study: every attention (or --attention) x seeds 0,1,2 (or --seeds), mean ± std table, "
                        "speed and memory per attention")
    p.add_argument("--out", default=None, help=f"output folder (default {DEFAULT_OUT}/<preset>)")
    p.add_argument("--data-dir", default=os.path.join(DEFAULT_OUT, "data"),
                   help="cache of the generated data (default %(default)s)")
    g = p.add_argument_group("overrides of the preset")
    g.add_argument("--steps", type=positive_int, help="optimiser steps")
    g.add_argument("--batch-size", type=positive_int, help="examples per micro-batch")
    g.add_argument("--accumulate", type=positive_int, help="micro-batches per optimiser step (gradient accumulation)")
    g.add_argument("--lr", type=positive_float, help="base learning rate")
    g.add_argument("--warmup", type=positive_int, help="warm-up steps of the inverse-square-root schedule")
    g.add_argument("--weight-decay", type=nonnegative_float, help="AdamW weight decay")
    g.add_argument("--ortho-weight", type=nonnegative_float, help="lambda of the orthogonality penalty (per phi call)")
    g.add_argument("--eval-every", type=positive_int, help="steps between validations (default: the preset's)")
    g.add_argument("--train-size", type=positive_int, help="training examples to generate (at least one batch)")
    r = p.add_argument_group("running")
    r.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    r.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (per job with --jobs)")
    r.add_argument("--jobs", type=positive_int, default=1,
                   help="study: runs trained at once, each in its own process (default 1)")
    r.add_argument("--restart", action="store_true", help="ignore an existing checkpoint and start afresh")
    r.add_argument("--stop-after", type=nonnegative_int, default=None,
                   help="stop after this step with a checkpoint (resume by running the command again)")
    r.add_argument("--max-time", type=seconds, default=None,
                   help="time budget in seconds for training (then validate and test)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--no-plot", action="store_true", help="no learning-curve plot")
    r.add_argument("--no-measure", action="store_true", help="study: skip the speed / memory measurement")
    r.add_argument("--measure-lengths", type=int_list(example="512,1024"), default=None, metavar="N,N,...",
                   help="study: comma-separated lengths to measure speed / memory at (default: the preset's length)")
    r.add_argument("--generate-only", action="store_true", help="generate (or load) the data, describe it, stop")
    r.add_argument("--count-params", action="store_true",
                   help="print the parameter count of the preset's model per attention and stop")


def _config(args):
    from kernelattn.listops.train import preset

    cfg = preset(args.preset)
    fields = {field: getattr(args, opt[2:].replace("-", "_")) for opt, field in _FIELDS.items()}
    try:
        cfg = replace(cfg, **{k: v for k, v in fields.items() if v is not None})
    except ValueError as e:  # the preset's own checks: name the option
        opt = next((o for o, f in _FIELDS.items() if str(e).startswith(f) and fields[f] is not None), "--preset")
        raise UsageError(opt, str(e)) from None
    if args.train_size is not None:
        if args.train_size < cfg.batch_size:
            raise UsageError("--train-size", f"expected at least one batch ({cfg.batch_size} examples, "
                                             f"--batch-size), got {args.train_size}")
        cfg = replace(cfg, data=replace(cfg.data, train=args.train_size))
    return cfg


def _attentions(args) -> list[str]:
    if args.attention is None:
        return list(STUDY_ATTENTIONS) if args.study else ["glu"]
    return args.attention


def _device(text):
    """None for auto; else the device, refused unless torch can run on it here."""
    if text == "auto":
        return None
    import torch

    allowed = "auto, cpu, cuda, cuda:N or mps"
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError("--device", f"unknown device {text!r}; expected {allowed}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise UsageError("--device", f"{text!r} is not available here ({count} CUDA device(s))")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError("--device", f"{text!r} is not available here")
    elif dev.type != "cpu":
        raise UsageError("--device", f"unsupported device {text!r}; expected {allowed}")
    return text


def _distinct(option, values):
    if len(set(values)) != len(values):
        raise UsageError(option, f"expected distinct values, got {','.join(map(str, values))!r}")
    return values


def run(args) -> int:
    cfg = _config(args)
    attentions = _distinct("--attention", _attentions(args))
    if args.out is not None:
        output_folder("--out", args.out)
    output_folder("--data-dir", args.data_dir)
    if args.seeds is not None:
        seeds = _distinct("--seeds", args.seeds)
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

    study = args.study or len(attentions) * len(seeds) > 1
    if study:
        for opt in ("--stop-after", "--max-time"):
            if getattr(args, opt[2:].replace("-", "_")) is not None:
                raise UsageError(opt, "applies to a single run, not a study "
                                      "(a study resumes where it stopped when run again)")
        if args.restart:
            raise UsageError("--restart", "applies to a single run; delete the study folder to start a study afresh")
    device = _device(args.device)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from kernelattn.listops.train import CheckpointMismatch, describe_config

    print(describe_config(cfg))
    if study:
        from kernelattn.listops.study import run_study

        try:
            run_study(replace(cfg, attention=attentions[0], seed=seeds[0]), attentions, seeds, out,
                      data_dir=args.data_dir, device=device, progress=not args.no_progress,
                      measure=not args.no_measure, threads=args.threads, jobs=args.jobs,
                      measure_lengths=args.measure_lengths)
        except CheckpointMismatch as e:
            raise UsageError("--out", f"{e.args[1]} holds a checkpoint of another configuration; delete that run "
                                      f"folder or choose another --out") from None
        print(f"study written to {out}/study.md, study.rst, study.json and curves.png")
        return 0

    from kernelattn.listops.train import train

    run_dir = args.out or os.path.join(out, attentions[0], f"seed{seeds[0]}")
    try:
        res = train(replace(cfg, attention=attentions[0], seed=seeds[0]), run_dir, data_dir=args.data_dir,
                    resume=not args.restart, stop_after=args.stop_after, max_time=args.max_time, device=device,
                    progress=not args.no_progress, plot=not args.no_plot)
    except CheckpointMismatch as e:
        raise UsageError("--out", f"{e.args[1]} holds a checkpoint of another configuration; add --restart to "
                                  f"start afresh or choose another --out") from None
    with open(os.path.join(run_dir, "results.md")) as f:
        print(f.read())
    if res["status"] == "interrupted":
        print(f"stopped at step {res['steps']}; run the same command again to resume")
    print(f"results in {run_dir}/results.json, results.md" + ("" if args.no_plot else ", curves.png"))
    return 0
