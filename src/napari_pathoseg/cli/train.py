"""``pathoseg train`` and ``pathoseg evaluate nuclei``.

``pathoseg train`` runs the M2 training task on the training engine through the CLI job driver
(:mod:`napari_pathoseg.cli._driver`): progress goes to stderr (one line per epoch; every 20th
step with ``-v``), the result is one JSON document on stdout. Ctrl-C (or SIGTERM) finishes the
current step, saves a resumable checkpoint and exits 130 with one line naming it; an output
folder holding a run is refused (exit 2) unless ``--resume`` or ``--force``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from napari_pathoseg.cli._driver import device, drive, mpp_value, positive_float, positive_int, print_json

__all__ = ["add_commands", "cmd_train", "cmd_evaluate_nuclei", "DEFAULT_DATA", "SHIPPED_SPLIT", "epoch_line", "threads_arg"]

logger = logging.getLogger(__name__)

#: The shared data folder: ``$PATHOSEG_DATA``, else ``shared/data`` beside the repository checkout.
DEFAULT_DATA = os.environ.get("PATHOSEG_DATA", str(Path(__file__).resolve().parents[3].parent / "shared" / "data"))
SHIPPED_SPLIT = Path(__file__).resolve().parents[1] / "models" / "weights" / "nuclei-lite.split.json"


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``evaluate`` (with ``evaluate nuclei``) to ``subparsers``."""
    p = subparsers.add_parser("train", help="train an M2 nucleus model (AttCycle teacher or TransCycle student)")
    p.add_argument("--preset", default="attcycle-lite",
                   help="model preset: attcycle-lite, attcycle (teacher), transcycle-lite, transcycle (student)")
    p.add_argument("--out", required=True, help="run folder for checkpoints and history")
    p.add_argument("--epochs", type=positive_int, default=24)
    p.add_argument("--steps-per-epoch", type=positive_int, default=150)
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--lr", type=positive_float(high=1.0), default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule", default="cyclegan",
                   help="learning-rate schedule: cyclegan (default), constant, cosine, inverse:<decay>")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run.add_argument("--force", action="store_true", help="start over in an --out that holds a run (replacing it)")
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
    p.add_argument("--threads", type=threads_arg, default=None, help=THREADS_HELP)
    p.add_argument("--device", type=device, default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    p.set_defaults(func=cmd_train)

    ev = subparsers.add_parser("evaluate", help="score a model against ground truth")
    evsub = ev.add_subparsers(dest="evaluate_what", required=True)
    n = evsub.add_parser("nuclei", help="nucleus instance metrics as JSON")
    n.add_argument("--images", required=True, help="folder of RGB images")
    n.add_argument("--masks", required=True, help="folder of instance masks with the same file stems")
    n.add_argument("--model", default="nuclei-lite", help="model name or checkpoint path")
    n.add_argument("--mpp", type=mpp_value, default=None, help="um per pixel of the images (default: model's)")
    n.add_argument("--method", default="auto", choices=("auto", "boundary", "distance"))
    n.add_argument("--per-image", action="store_true", help="include per-image metrics")
    n.set_defaults(func=cmd_evaluate_nuclei)


THREADS_HELP = ("torch CPU threads: a number, or 'auto' (all usable cores, 1 while the machine is busier "
                "than its cores); default: every core this process may use")


def threads_arg(text: str) -> int | str:
    """argparse ``type`` of ``--threads``: an integer >= 1 or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    return positive_int(text)


def _err(text: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(text, file=sys.stderr, flush=True)


def epoch_line(ev: Any, *, epochs: int) -> str:
    """One human line for an epoch event (stderr progress of train / finetune)."""
    aji = ev.val_metrics.get("best_aji", ev.val_metrics.get("aji", float("nan")))
    loss = ev.losses.get("seg", ev.losses.get("total", float("nan")))
    return (f"epoch {ev.epoch + 1}/{epochs}: seg loss {loss:.4f}, val AJI {aji:.4f}"
            f"{' (best)' if ev.is_best else ''}, {ev.seconds:.0f} s")


def training_progress(prog: str, epochs: int):
    """An ``on_event`` for :func:`drive`: epochs and validation on stderr, steps in the log."""
    from napari_pathoseg.training.engine import EpochEvent, StepEvent, TrainStart, ValidationEvent

    def on_event(ev: Any) -> None:
        if isinstance(ev, TrainStart):
            _err(f"{prog}: {ev.message}")
        elif isinstance(ev, StepEvent):
            if ev.step % 20 == 0:
                logger.info("epoch %d step %d/%d %s", ev.epoch + 1, ev.step + 1, ev.steps_per_epoch,
                            {k: round(v, 4) for k, v in ev.losses.items()})
        elif isinstance(ev, ValidationEvent):
            logger.info("epoch %d: validating", ev.epoch + 1)
        elif isinstance(ev, EpochEvent):
            _err(f"{prog}: {epoch_line(ev, epochs=epochs)}")

    return on_event


@contextlib.contextmanager
def sigterm_cancels(token: Any) -> Iterator[None]:
    """While the block runs, SIGTERM (batch schedulers) sets ``token`` like Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: token.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def with_sigterm(events_factory):
    """Wrap ``make_events(token)`` so SIGTERM also sets the token while the events run."""

    def make(token):
        def gen():
            with sigterm_cancels(token):
                yield from events_factory(token)

        return gen()

    return make


def stopped_line(result: Any, *, how_to_resume: str) -> str:
    """The one line for a cancelled training result: where the resumable checkpoint is."""
    if result.last_checkpoint is None:
        return "stopped before the first step; nothing was saved"
    return f"resumable checkpoint saved to {result.last_checkpoint}; {how_to_resume}"


def cmd_train(args: argparse.Namespace) -> int:
    from napari_pathoseg.methods.nuclei.attcycle import get_preset
    from napari_pathoseg.methods.nuclei.datasets import (
        STAIN_AUGMENTATIONS,
        build_m2_data,
        load_nuclei_sources,
        load_split,
        make_split,
        save_split,
    )
    from napari_pathoseg.methods.nuclei.train import DoneEvent, train_m2
    from napari_pathoseg.training.engine import check_run_folder, resolve_schedule

    config = get_preset(args.preset)
    resolve_schedule(args.schedule)
    check_run_folder(args.out, resume=args.resume, force=args.force)  # fail before loading data
    split_path = Path(args.split)
    if split_path.is_file():
        split = load_split(split_path)
    else:
        split = make_split(load_nuclei_sources(args.data, mpp=config.mpp), seed=args.seed)
        save_split(split, split_path)
    extra_x, extra_y = [], []
    if args.pseudo:
        from napari_pathoseg.methods.nuclei.finetune_data import load_pseudo_items

        extra_x, extra_y = load_pseudo_items(Path(args.pseudo), mpp=config.mpp)
    data = build_m2_data(args.data, mpp=config.mpp, split=split, extra_x=extra_x, extra_y=extra_y)
    command = "pathoseg train " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "pathoseg train"
    t0 = time.perf_counter()
    result = drive(
        with_sigterm(lambda token: train_m2(
            config, data, out_dir=args.out, epochs=args.epochs, lr=args.lr, seed=args.seed,
            resume=args.resume, force=args.force, steps_per_epoch=args.steps_per_epoch,
            batch_size=args.batch_size, meta={"command": command, "stain_aug": args.stain_aug}, cancel=token,
            stain_augment=STAIN_AUGMENTATIONS[args.stain_aug], threads=args.threads, device=args.device,
            schedule=args.schedule,
        )),
        DoneEvent,
        on_event=training_progress("pathoseg train", args.epochs),
        on_cancelled=lambda r: stopped_line(r, how_to_resume="add --resume to the same command to continue"),
        label="pathoseg train",
    )
    print_json({
        "best_checkpoint": result.best_checkpoint,
        "best_epoch": result.best_epoch,
        "best_metrics": result.best_metrics,
        "last_checkpoint": result.last_checkpoint,
        "cancelled": False,
        "epochs": [{"epoch": h["epoch"], "losses": h["losses"], "val": h["val"], "seconds": round(h["seconds"], 1)}
                   for h in result.history],
        "wall_seconds": round(time.perf_counter() - t0, 1),
    })
    return 0


def cmd_evaluate_nuclei(args: argparse.Namespace) -> int:
    from napari_pathoseg.methods.nuclei.evaluate import evaluate_folder

    res = evaluate_folder(
        args.images, args.masks, model=args.model, mpp=args.mpp, method=args.method,
        per_image=args.per_image,
    )
    print_json(res)
    return 0
