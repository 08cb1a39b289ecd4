"""``pathoseg finetune``: fine-tune a nucleus student on strong labels + accepted pseudo-labels (resumable)."""

from __future__ import annotations

import json
from typing import Any

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.methods.nuclei.finetune import FinetuneConfig, FinetuneDone, iter_finetune

__all__ = ["add_commands"]



def add_commands(subparsers: Any) -> None:
    """Add ``pathoseg finetune`` (strong labels + review-project pseudo-labels, resumable)."""
    p = subparsers.add_parser(
        "finetune", help="fine-tune a nucleus student on strong labels + accepted pseudo-labels (resumable)"
    )
    p.add_argument("--out", required=True, help="output folder; an existing run there is resumed")
    p.add_argument("--name", required=True, help="name to register the finished model under")
    p.add_argument("--base", default="nuclei-lite", help="base model name or .safetensors ('none': fresh)")
    p.add_argument("--preset", default="transcycle-lite", help="student preset")
    p.add_argument("--strong", action="append", default=[], help="strong-label folder (repeatable)")
    p.add_argument("--strong-mpp", type=float, default=None, help="µm/px of plain images/ folders")
    p.add_argument("--project", action="append", default=[], help="review project folder (repeatable)")
    p.add_argument("--include-pending", action="store_true", help="also pending tiles scoring >= --min-score")
    p.add_argument("--min-score", type=float, default=None, help="score threshold for --include-pending")
    p.add_argument("--split", default=None, help="split JSON (test images left out, val images validate)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--steps-per-epoch", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda or mps (default: best available)")
    p.add_argument("--no-register", action="store_true", help="do not register the finished model")
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args: Any) -> int:
    """Run ``pathoseg finetune``; prints one JSON line per epoch and a final JSON object.

    Ctrl-C finishes the current step and saves a resumable checkpoint.
    """
    import signal
    import threading

    from napari_pathoseg.methods.nuclei.train import EpochEvent

    cancel = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, lambda *a: cancel.set())
    try:
        config = FinetuneConfig(
            out_dir=args.out, name=args.name, base=None if str(args.base).lower() == "none" else args.base,
            preset=args.preset, strong=tuple(args.strong), strong_mpp=args.strong_mpp,
            projects=tuple(args.project), include_pending=args.include_pending, min_score=args.min_score,
            split=args.split, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
            batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
            register=not args.no_register,
        )
        done = None
        for ev in iter_finetune(config, cancel=cancel):
            if isinstance(ev, EpochEvent):
                print(json.dumps({"epoch": ev.epoch, "losses": ev.losses, "val": ev.val_metrics,
                                  "best": ev.is_best, "seconds": round(ev.seconds, 1)}), flush=True)
            elif isinstance(ev, FinetuneDone):
                done = ev
    except PathosegError as exc:
        print(json.dumps({"error": str(exc)}))
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    assert done is not None
    print(json.dumps({
        "cancelled": done.cancelled,
        "best_checkpoint": str(done.best_checkpoint) if done.best_checkpoint else None,
        "last_checkpoint": str(done.last_checkpoint) if done.last_checkpoint else None,
        "best_metrics": done.best_metrics,
        "registered": done.registered,
        "initialised_from": done.initialised_from,
    }), flush=True)
    return 0
