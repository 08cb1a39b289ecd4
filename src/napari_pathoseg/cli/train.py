"""``pathoseg train`` and ``pathoseg evaluate nuclei`` subcommands.

Wire with ``napari_pathoseg.cli.train.add_commands(subparsers)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

__all__ = ["add_commands", "cmd_train", "cmd_evaluate_nuclei", "DEFAULT_DATA", "SHIPPED_SPLIT"]

logger = logging.getLogger(__name__)

DEFAULT_DATA = os.environ.get("PATHOSEG_DATA", "/work/shared/data")
SHIPPED_SPLIT = Path(__file__).resolve().parents[1] / "models" / "weights" / "nuclei-lite.split.json"


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``evaluate`` (with ``evaluate nuclei``) to ``subparsers``."""
    p = subparsers.add_parser("train", help="train the M2 (AttCycle) nucleus teacher")
    p.add_argument("--preset", default="attcycle-lite", help="model preset (attcycle, attcycle-lite)")
    p.add_argument("--out", required=True, help="output directory for checkpoints and history")
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--steps-per-epoch", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
    p.add_argument("--data", default=DEFAULT_DATA, help="shared data folder (monuseg_train, cpm15_nuclei)")
    p.add_argument(
        "--split", default=str(SHIPPED_SPLIT),
        help="split JSON (train/val/test, X/Y); written there from --seed when missing",
    )
    p.add_argument(
        "--stain-aug", default="hed", choices=("hed", "stain", "none"),
        help="stain augmentation: 'hed' (training.augment, used for nuclei-lite), "
        "'stain' (napari_pathoseg.stain.augment), 'none'",
    )
    p.add_argument(
        "--pseudo", default=None,
        help="pseudo-label review project (pathoseg pseudolabels): accepted tiles join X, "
        "their normalised images join Y",
    )
    p.add_argument(
        "--threads", default="auto",
        help="torch CPU threads: a number, or 'auto' (2, dropping to 1 while the machine is oversubscribed)",
    )
    p.set_defaults(func=cmd_train)

    ev = subparsers.add_parser("evaluate", help="score a model against ground truth")
    evsub = ev.add_subparsers(dest="evaluate_what", required=True)
    n = evsub.add_parser("nuclei", help="nucleus instance metrics as JSON")
    n.add_argument("--images", required=True, help="folder of RGB images")
    n.add_argument("--masks", required=True, help="folder of instance masks with the same file stems")
    n.add_argument("--model", default="nuclei-lite", help="model name or checkpoint path")
    n.add_argument("--mpp", type=float, default=None, help="um per pixel of the images (default: model's)")
    n.add_argument("--method", default="auto", choices=("auto", "boundary", "distance"))
    n.add_argument("--per-image", action="store_true", help="include per-image metrics")
    n.set_defaults(func=cmd_evaluate_nuclei)


def _pseudo_items(project: Path, *, mpp: float):
    """Accepted pseudo-labelled tiles of a review project (``pathoseg pseudolabels``).

    Returns ``(x_items, y_items)``: each tile as read goes to X, its
    teacher-normalised image (pseudo-Y) with the same mask to Y, both weighted
    by the teacher's per-pixel confidence (as in methods.md S3).
    """
    from napari_pathoseg.methods.nuclei.finetune import load_pseudo_items

    return load_pseudo_items(project, mpp=mpp)


def _adapt_threads(torch) -> None:
    """Use up to 2 threads, but 1 while the 1-minute load exceeds the core count.

    Intra-op threads that wait on each other slow down badly when the cores are
    shared with other processes.
    """
    cores = min(2, os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    want = 1 if load > cores + 1 else cores
    if torch.get_num_threads() != want:
        logger.info("load %.1f: using %d torch threads", load, want)
        torch.set_num_threads(want)


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from napari_pathoseg.methods.nuclei.attcycle import get_preset
    from napari_pathoseg.methods.nuclei.datasets import (
        STAIN_AUGMENTATIONS,
        build_m2_data,
        load_nuclei_sources,
        load_split,
        make_split,
        save_split,
    )
    from napari_pathoseg.methods.nuclei.train import train_m2

    auto_threads = str(args.threads) == "auto"
    if auto_threads:
        _adapt_threads(torch)
    else:
        torch.set_num_threads(int(args.threads))
    config = get_preset(args.preset)
    split_path = Path(args.split)
    if split_path.is_file():
        split = load_split(split_path)
    else:
        split = make_split(load_nuclei_sources(args.data, mpp=config.mpp), seed=args.seed)
        save_split(split, split_path)
    extra_x, extra_y = [], []
    if args.pseudo:
        extra_x, extra_y = _pseudo_items(Path(args.pseudo), mpp=config.mpp)
    data = build_m2_data(args.data, mpp=config.mpp, split=split, extra_x=extra_x, extra_y=extra_y)
    command = "pathoseg train " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "pathoseg train"
    # SIGTERM / Ctrl-C stop after the current step with a resumable checkpoint
    cancel = threading.Event()
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, lambda *_: cancel.set())
        except ValueError:  # not in the main thread
            pass
    t0 = time.perf_counter()
    result = None
    try:
        result = _drive(train_m2(
            config, data, out_dir=args.out, epochs=args.epochs, lr=args.lr, seed=args.seed,
            resume=args.resume, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
            meta={"command": command, "stain_aug": args.stain_aug}, cancel=cancel,
            stain_augment=STAIN_AUGMENTATIONS[args.stain_aug],
        ), auto_threads=auto_threads, torch=torch)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(json.dumps({
        "best_checkpoint": str(result.best_checkpoint) if result and result.best_checkpoint else None,
        "best_metrics": result.best_metrics if result else {},
        "cancelled": bool(result and result.cancelled),
        "last_checkpoint": str(result.last_checkpoint) if result and result.last_checkpoint else None,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }), flush=True)
    return 0


def _drive(events, *, auto_threads: bool, torch):
    from napari_pathoseg.methods.nuclei.train import DoneEvent, EpochEvent, StepEvent

    result = None
    last_check = time.monotonic()
    for ev in events:
        if isinstance(ev, StepEvent) and ev.step % 20 == 0:
            logger.info("epoch %d step %d/%d %s", ev.epoch, ev.step, ev.steps_per_epoch,
                        {k: round(v, 4) for k, v in ev.losses.items()})
        if auto_threads and time.monotonic() - last_check > 20.0:
            _adapt_threads(torch)
            last_check = time.monotonic()
        if isinstance(ev, EpochEvent):
            logger.info("epoch %d val aji %.4f", ev.epoch, ev.val_metrics.get("aji", float("nan")))
            print(json.dumps({"epoch": ev.epoch, "losses": ev.losses, "val": ev.val_metrics,
                              "best": ev.is_best, "seconds": round(ev.seconds, 1)}), flush=True)
        elif isinstance(ev, DoneEvent):
            result = ev
    return result


def cmd_evaluate_nuclei(args: argparse.Namespace) -> int:
    from napari_pathoseg.methods.nuclei.evaluate import evaluate_folder

    res = evaluate_folder(
        args.images, args.masks, model=args.model, mpp=args.mpp, method=args.method,
        per_image=args.per_image,
    )
    print(json.dumps(res, indent=1))
    return 0
