"""``pathoseg mil-train``: train an M4 slide classifier (NegGuide MIL) from a cohort CSV.

    pathoseg mil-train COHORT.csv --out RUN [--preset lite|m4] [--variant negguide|selfdistill|meanpool]
        [--epochs N] [--steps-per-epoch N] [--seed S] [--k K] [--resume|--force] [--threads N]
        [--register NAME] [--val VAL.csv] [--mpp M]

The cohort CSV has the columns ``slide,label[,mpp]`` (see ``docs/model_card_slidecls.md`` and
``methods/mil/cohort_csv.py``); it is checked in full before training (missing files, unknown
labels, a single class, slides without µm/px and no ``--mpp``). Progress goes to stderr (one
line per epoch), the result is one JSON document on stdout; Ctrl-C or SIGTERM saves a
resumable checkpoint (exit 130); ``--resume`` continues a run, ``--force`` starts over.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from napari_pathoseg.cli._driver import (
    device,
    drive,
    existing_file,
    float_range,
    positive_float,
    positive_int,
    print_json,
)
from napari_pathoseg.cli.train import _err, stopped_line, with_sigterm

__all__ = ["add_commands", "cmd_mil_train", "PRESETS", "VARIANTS"]

#: Choices of ``--preset`` and ``--variant``, spelled here so that building the parser imports no
#: torch; tests/test_mil_train.py checks them against methods.mil.network.
PRESETS = ("lite", "m4")
VARIANTS = ("negguide", "selfdistill", "meanpool")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mil-train``."""
    p = subparsers.add_parser("mil-train", help="train an M4 slide classifier (NegGuide MIL) from a cohort CSV")
    p.add_argument("cohort", type=existing_file, help="cohort CSV: slide,label[,mpp] (labels negative/positive or 0/1)")
    p.add_argument("--out", required=True, help="run folder for checkpoints and history")
    p.add_argument("--preset", default="lite", choices=PRESETS,
                   help="lite (64-px tiles at 1.0 um/px, 1/4 width) or m4 (512-px tiles at 0.5 um/px, ResNet-18)")
    p.add_argument("--variant", default="negguide", choices=VARIANTS,
                   help="negguide (M4), selfdistill or meanpool (the ablation's baselines)")
    p.add_argument("--epochs", type=positive_int, default=None, help="default: 12 (lite), 50 (m4)")
    p.add_argument("--steps-per-epoch", type=positive_int, default=None, help="default: 100 (lite), 200 (m4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=float_range(0.0, 1.0, low_inclusive=False, high_inclusive=False), default=None,
                   help="share of positive tiles in positive slides (default 0.2, a fixed prior)")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run.add_argument("--force", action="store_true", help="start over in an --out that holds a run")
    p.add_argument("--val", type=existing_file, default=None,
                   help="validation cohort CSV (default: 20%% of the training slides held out)")
    p.add_argument("--register", metavar="NAME", default=None, help="register the best model under NAME when done")
    p.add_argument("--mpp", type=positive_float(high=100.0), default=None, help="um/px of slides that give none")
    p.add_argument("--max-tiles", type=positive_int, default=2000, help="tissue tiles kept per slide (seeded subset)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: all usable cores)")
    p.add_argument("--device", type=device, default=None, help="cpu, cuda, cuda:N or mps")
    p.set_defaults(func=cmd_mil_train)


def _progress(epochs: int):
    from napari_pathoseg.events import Progress
    from napari_pathoseg.training.engine import EpochEvent, TrainStart

    def on_event(ev: Any) -> None:
        if isinstance(ev, Progress):
            if ev.done == ev.total or ev.done % 10 == 0:
                _err(f"pathoseg mil-train: tiles of {ev.done}/{ev.total} slides ({ev.message})")
        elif isinstance(ev, TrainStart):
            _err(f"pathoseg mil-train: {ev.message}")
        elif isinstance(ev, EpochEvent):
            v = ev.val_metrics
            _err(f"pathoseg mil-train: epoch {ev.epoch + 1}/{epochs}: loss {ev.losses.get('loss', float('nan')):.4f}, "
                 f"val slide AUC {v.get('slide_auc', float('nan')):.3f} accuracy {v.get('slide_accuracy', float('nan')):.3f}"
                 f"{' (best)' if ev.is_best else ''}, {ev.seconds:.0f} s")

    return on_event


def cmd_mil_train(args: argparse.Namespace) -> int:
    from napari_pathoseg.methods.mil.cohort_csv import read_cohort
    from napari_pathoseg.methods.mil.train import (
        DEFAULT_BUDGET,
        MilTrainResult,
        train_mil,
    )
    from napari_pathoseg.training.engine import check_run_folder

    t0 = time.perf_counter()
    cohort = read_cohort(args.cohort, default_mpp=args.mpp)  # every bad-input error before any work
    val = read_cohort(args.val, default_mpp=args.mpp) if args.val else None
    check_run_folder(args.out, resume=args.resume, force=args.force)
    epochs = args.epochs or DEFAULT_BUDGET[args.preset][0]
    command = "pathoseg mil-train " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "pathoseg mil-train"
    meta = {"command": command, "cohort": str(args.cohort), "val_cohort": str(args.val) if args.val else None}
    result = drive(
        with_sigterm(lambda token: train_mil(
            cohort=cohort, val_cohort=val, run_dir=args.out, preset=args.preset, variant=args.variant, seed=args.seed,
            epochs=epochs, steps_per_epoch=args.steps_per_epoch, K=args.k, resume=args.resume, force=args.force,
            threads=args.threads, device=args.device, cancel=token, register_as=args.register,
            max_tiles_per_slide=args.max_tiles, meta=meta,
        )),
        MilTrainResult,
        on_event=_progress(epochs),
        on_cancelled=lambda r: stopped_line(r.done, how_to_resume="add --resume to the same command to continue"),
        label="pathoseg mil-train",
    )
    done = result.done
    print_json({
        "best_checkpoint": result.model_path,
        "best_epoch": done.best_epoch,
        "best_metrics": result.scores,
        "last_checkpoint": done.last_checkpoint,
        "registered": args.register,
        "epochs": [{"epoch": h["epoch"], "losses": h["losses"], "val": h["val"], "seconds": round(h["seconds"], 1)}
                   for h in done.history],
        "wall_seconds": round(time.perf_counter() - t0, 1),
    })
    return 0
