"""``pathoseg malignancy-train``: train M1's classifier A -> segmenter B -> classifier C.

One resumable command on the training engine (``OUT/A``, ``OUT/B``, ``OUT/C``, then the
released pair ``OUT/malignancy.safetensors``). Data: the user's labels (``--labels`` CSV or
``benign/`` + ``malignant/`` folder, ``--masks`` folder) or the built-in table of the shared
data (``--data-root``). Progress goes to stderr (one line per stage and epoch), the result is
one JSON document on stdout; Ctrl-C or SIGTERM saves a resumable checkpoint of the stage it
was in (exit 130); ``--resume`` continues, ``--force`` starts over. See
``docs/model_card_malignancy.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from napari_pathoseg.cli._driver import (
    device,
    drive,
    positive_float,
    positive_int,
    print_json,
)
from napari_pathoseg.cli.train import _err, stopped_line, with_sigterm
from napari_pathoseg.errors import PathosegError

__all__ = ["add_commands", "cmd_malignancy_train", "per_stage"]


def per_stage(text: str) -> int | dict[str, int]:
    """``"8"`` -> 8; ``"A=8,B=6,C=4"`` -> ``{"A": 8, "B": 6, "C": 4}`` (argparse type)."""
    try:
        if "=" not in text:
            v = int(text)
            if v < 1:
                raise ValueError
            return v
        out = {}
        for part in text.split(","):
            k, _, v = part.partition("=")
            k = k.strip().upper()
            if k not in ("A", "B", "C") or int(v) < 1:
                raise ValueError
            out[k] = int(v)
        return out
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer or A=n,B=n,C=n") from None


def _stages(text: str) -> tuple[str, ...]:
    st = tuple(s.strip().upper() for s in text.split(",") if s.strip())
    if not st or any(s not in ("A", "B", "C") for s in st) or list(st) != sorted(set(st)):
        raise argparse.ArgumentTypeError(f"{text!r}: give stages in order, e.g. A,B,C or B")
    return st


def _share(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0.0 <= v <= 0.9:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text!r} is not a share between 0 and 0.9")
    return v


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``malignancy-train``."""
    p = subparsers.add_parser("malignancy-train",
                              help="train M1 malignancy models: classifier A -> segmenter B -> classifier C")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--labels", help="CSV (image,label[,mask][,mpp]) or a folder with benign/ and malignant/")
    src.add_argument("--data-root", help="the shared data folder: train on the built-in table")
    p.add_argument("--masks", help="folder of malignant-region masks named like their images (with --labels)")
    p.add_argument("--out", required=True, help="run folder (A/, B/, C/, malignancy.safetensors)")
    p.add_argument("--preset", default="lite", choices=("lite", "m1"), help="lite (CPU) or m1 (the method's size)")
    p.add_argument("--stages", type=_stages, default=("A", "B", "C"), help="stages to run, e.g. A,B,C (default)")
    p.add_argument("--epochs", type=per_stage, default=None, help="epochs: N or A=n,B=n,C=n (default A=8,B=8,C=6)")
    p.add_argument("--steps-per-epoch", type=per_stage, default=None, help="steps per epoch: N or A=n,B=n,C=n (40)")
    p.add_argument("--b-init", choices=("A", "scratch"), default="A", help="B's encoder: from A (M1) or random")
    p.add_argument("--c-init", choices=("B", "scratch"), default="B", help="C's encoder: from B (M1) or random")
    p.add_argument("--b-negatives", type=_share, default=None, metavar="F",
                   help="share of B's crops from benign images with empty masks, 0-0.9 (default 0.5; "
                        "our addition beyond M1, 0 = M1 as described)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0, help="seed of the held-out split and of the few masks kept")
    p.add_argument("--val-fraction", type=positive_float(high=0.9), default=0.2, help="held-out share of --labels")
    p.add_argument("--image-mpp", type=positive_float(high=100.0), default=None,
                   help="µm/px of --labels images without an mpp column (default: the model's)")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true", help="continue the run in --out (the stage it was in)")
    run.add_argument("--force", action="store_true", help="start over in an --out that holds a run")
    p.add_argument("--register", metavar="NAME", help="register the trained pair in the user registry")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: all usable cores)")
    p.add_argument("--device", type=device, default=None, help="cpu, cuda, cuda:N or mps")
    p.set_defaults(func=cmd_malignancy_train)


def _progress(label: str):
    from napari_pathoseg.methods.malignancy.train import StageEvent
    from napari_pathoseg.training.engine import EpochEvent, TrainStart

    def on_event(ev: Any) -> None:
        stage = getattr(ev, "stage", "?")
        if isinstance(ev, StageEvent):
            _err(f"{label}: {ev.message}")
        elif isinstance(ev, TrainStart):
            _err(f"{label}: stage {stage}: {ev.message}")  # names what init_from copied
        elif isinstance(ev, EpochEvent):
            v = ev.val_metrics
            metric = (f"val Dice {v.get('dice', float('nan')):.4f}"
                      + (f", with benign images {v['dice_all']:.4f}, benign area marked {v['benign_fp_area']:.3f}"
                         if "dice_all" in v else "") if stage == "B"
                      else f"val AUC {v.get('auc', float('nan')):.4f} accuracy {v.get('accuracy', float('nan')):.4f}")
            _err(f"{label}: stage {stage} epoch {ev.epoch + 1}: loss {ev.losses.get('loss', float('nan')):.4f}, "
                 f"{metric}{' (best)' if ev.is_best else ''}, {ev.seconds:.0f} s")

    return on_event


def cmd_malignancy_train(args: argparse.Namespace) -> int:
    from napari_pathoseg.methods.malignancy.train import (
        MalignancyTrainResult,
        train_malignancy,
    )

    if args.masks and not args.labels:
        raise PathosegError("--masks goes with --labels (the built-in table brings its own masks).")
    label = "pathoseg malignancy-train"
    command = "pathoseg malignancy-train " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else label
    t0 = time.perf_counter()

    def cancelled(result: MalignancyTrainResult) -> str:
        last = [ev for ev in result.stages.values() if ev.cancelled]
        if last:
            return stopped_line(last[-1], how_to_resume="add --resume to the same command to continue")
        return "stopped; add --resume to the same command to continue"

    result = drive(
        with_sigterm(lambda token: train_malignancy(
            labels=args.labels, masks=args.masks, data_root=args.data_root, run_dir=args.out, preset=args.preset,
            stages=args.stages, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, b_init=args.b_init,
            c_init=args.c_init, seed=args.seed, resume=args.resume, force=args.force, threads=args.threads,
            device=args.device, cancel=token, register_as=args.register, val_fraction=args.val_fraction,
            image_mpp=args.image_mpp, split_seed=args.split_seed, command=command,
            **({} if args.b_negatives is None else {"b_negatives": args.b_negatives}))),
        MalignancyTrainResult,
        on_event=_progress(label),
        on_cancelled=cancelled,
        label=label,
    )
    print_json({
        "run_dir": str(result.run_dir),
        "model": None if result.model_path is None else str(result.model_path),
        "registered": result.registered,
        "scores": result.scores,
        "stages": {s: {"best_checkpoint": None if ev.best_checkpoint is None else str(ev.best_checkpoint),
                       "best_epoch": ev.best_epoch, "seconds": round(ev.seconds, 1)}
                   for s, ev in result.stages.items()},
        "wall_seconds": round(time.perf_counter() - t0, 1),
    })
    return 0
