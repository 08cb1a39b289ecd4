"""``pathoseg lesion-train``: train an M3 lesion model on the training engine.

Progress goes to stderr (one line per epoch), the result is one JSON document on stdout;
Ctrl-C or SIGTERM saves a resumable checkpoint (exit 130); ``--resume`` continues a run,
``--force`` starts over. See ``docs/lesion.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from napari_pathoseg.cli._driver import device, drive, positive_int, print_json
from napari_pathoseg.cli.train import DEFAULT_DATA, _err, stopped_line, with_sigterm

__all__ = ["add_commands", "cmd_lesion_train", "SHIPPED_SPLIT"]

#: The split the shipped lesion-lite was trained and tested on.
SHIPPED_SPLIT = Path(__file__).resolve().parents[1] / "models" / "weights" / "lesion-lite.split.json"


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lesion-train``."""
    p = subparsers.add_parser("lesion-train", help="train an M3 lesion model (FPN, focal loss, multi-scale)")
    p.add_argument("--preset", default="lesion-lite",
                   help="lesion-lite (multi-scale + focal), lesion-lite-single (single-scale + focal), "
                   "lesion-lite-bce (single-scale + cross-entropy), m3 (ResNet-50, method-sized)")
    p.add_argument("--out", required=True, help="run folder for checkpoints and history")
    p.add_argument("--epochs", type=positive_int, default=25)
    p.add_argument("--steps-per-epoch", type=positive_int, default=50)
    p.add_argument("--seed", type=int, default=0)
    run = p.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run.add_argument("--force", action="store_true", help="start over in an --out that holds a run")
    p.add_argument("--data", default=DEFAULT_DATA, help="shared data folder (ebhi_seg_crc, glas_subset, ocdc_..., wsss4luad_...)")
    p.add_argument("--split", default=str(SHIPPED_SPLIT), help="split JSON; made (seed 0) and written there when missing")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: all usable cores)")
    p.add_argument("--device", type=device, default=None, help="cpu, cuda, cuda:N or mps")
    p.set_defaults(func=cmd_lesion_train)


def _progress(epochs: int):
    from napari_pathoseg.training.engine import EpochEvent, TrainStart

    def on_event(ev: Any) -> None:
        if isinstance(ev, TrainStart):
            _err(f"pathoseg lesion-train: {ev.message}")
        elif isinstance(ev, EpochEvent):
            v = ev.val_metrics
            _err(f"pathoseg lesion-train: epoch {ev.epoch + 1}/{epochs}: loss {ev.losses.get('loss', float('nan')):.4f}, "
                 f"val AUC {v.get('auc', float('nan')):.4f} Dice {v.get('dice', float('nan')):.4f}"
                 f"{' (best)' if ev.is_best else ''}, {ev.seconds:.0f} s")

    return on_event


def cmd_lesion_train(args: argparse.Namespace) -> int:
    from napari_pathoseg.methods.lesion.data import fit_reference, load_lesion_data, load_split, make_split, save_split
    from napari_pathoseg.methods.lesion.network import get_preset
    from napari_pathoseg.methods.lesion.train import M3Task
    from napari_pathoseg.training.engine import DoneEvent, check_run_folder, iter_train

    cfg = get_preset(args.preset)
    check_run_folder(args.out, resume=args.resume, force=args.force)  # fail before loading data
    split_path = Path(args.split)
    if split_path.is_file():
        split = load_split(split_path)
    else:
        split = make_split(args.data, seed=0)
        save_split(split, split_path)
    t0 = time.perf_counter()
    norm = fit_reference(args.data)
    cfg.stain = norm.to_dict()
    cfg.stain.pop("written_by", None)
    data = load_lesion_data(args.data, split=split, mpp=cfg.mpp, hires_factor=cfg.hires_factor,
                            normalizer=norm, parts=("train", "val"))
    _err(f"pathoseg lesion-train: data {data.summary()} loaded in {time.perf_counter() - t0:.0f} s")
    task = M3Task(cfg, data)
    command = "pathoseg lesion-train " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "pathoseg lesion-train"
    meta = {"command": command, "split": str(split_path.name)}
    result = drive(
        with_sigterm(lambda token: iter_train(
            task, out_dir=args.out, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, resume=args.resume,
            force=args.force, cancel=token, threads=args.threads, seed=args.seed,
            schedule=f"inverse:{cfg.lr_decay}", device=args.device, meta=meta,
        )),
        DoneEvent,
        on_event=_progress(args.epochs),
        on_cancelled=lambda r: stopped_line(r, how_to_resume="add --resume to the same command to continue"),
        label="pathoseg lesion-train",
    )
    print_json({
        "best_checkpoint": result.best_checkpoint,
        "best_epoch": result.best_epoch,
        "best_metrics": result.best_metrics,
        "last_checkpoint": result.last_checkpoint,
        "epochs": [{"epoch": h["epoch"], "losses": h["losses"], "val": h["val"], "seconds": round(h["seconds"], 1)}
                   for h in result.history],
        "wall_seconds": round(time.perf_counter() - t0, 1),
    })
    return 0
