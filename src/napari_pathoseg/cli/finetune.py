"""``pathoseg finetune``: fine-tune a nucleus model on strong labels + accepted pseudo-labels (resumable).

By default the student is the base model itself (same architecture, started from its weights).
Progress goes to stderr (one line per epoch); the result (best checkpoint, validation metrics of
the new model and of its base, registry entry, warnings) is one JSON document on stdout. Running
the same command again resumes the run in ``--out``; ``--force`` starts over. Ctrl-C finishes
the current step, saves a resumable checkpoint and exits 130 with one line naming it.
"""

from __future__ import annotations

import argparse
from typing import Any

from napari_pathoseg.cli._driver import device, drive, fraction, mpp_value, positive_float, positive_int, print_json
from napari_pathoseg.cli.train import THREADS_HELP, threads_arg

__all__ = ["add_commands", "cmd_finetune"]


def add_commands(subparsers: Any) -> None:
    """Add ``pathoseg finetune`` (strong labels + review-project pseudo-labels, resumable)."""
    p = subparsers.add_parser(
        "finetune", help="fine-tune a nucleus model on strong labels + accepted pseudo-labels (resumable)"
    )
    p.add_argument("--out", required=True, help="run folder; a run already there is resumed")
    p.add_argument("--name", required=True, help="name to register the finished model under")
    p.add_argument("--base", default="nuclei-lite", help="base model name or .safetensors ('none': fresh)")
    p.add_argument("--preset", default=None,
                   help="student architecture (default: the base's own, i.e. fine-tune the base; "
                   "transcycle-lite without a base)")
    p.add_argument("--strong", action="append", default=[], help="strong-label folder (repeatable)")
    p.add_argument("--strong-mpp", type=mpp_value, default=None, help="µm/px of plain images/ folders")
    p.add_argument("--project", action="append", default=[], help="review project folder (repeatable)")
    p.add_argument("--include-pending", action="store_true", help="also pending tiles scoring >= --min-score")
    p.add_argument("--min-score", type=fraction, default=None, help="score threshold for --include-pending")
    p.add_argument("--split", default=None, help="split JSON (test images left out, val images validate)")
    p.add_argument("--epochs", type=positive_int, default=10)
    p.add_argument("--steps-per-epoch", type=positive_int, default=100)
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--lr", type=positive_float(high=1.0), default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=device, default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument("--threads", type=threads_arg, default=None, help=THREADS_HELP)
    p.add_argument("--force", action="store_true", help="start over in an --out that holds a run (replacing it)")
    p.add_argument("--no-register", action="store_true", help="do not register the finished model")
    p.add_argument("--min-aji", type=fraction, default=0.05,
                   help="registration floor: a best validation AJI below it is not registered (default 0.05)")
    p.add_argument("--force-register", action="store_true", help="register even below --min-aji")
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> int:
    """Run ``pathoseg finetune``; one JSON document on stdout, progress and warnings on stderr."""
    from napari_pathoseg.cli.train import _err, stopped_line, training_progress, with_sigterm
    from napari_pathoseg.methods.nuclei.finetune import FinetuneConfig, FinetuneDone, FinetuneStage, iter_finetune

    config = FinetuneConfig(
        out_dir=args.out, name=args.name, base=None if str(args.base).lower() == "none" else args.base,
        preset=args.preset, strong=tuple(args.strong), strong_mpp=args.strong_mpp,
        projects=tuple(args.project), include_pending=args.include_pending, min_score=args.min_score,
        split=args.split, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device, threads=args.threads,
        register=not args.no_register, min_aji=args.min_aji, force_register=args.force_register,
    )
    progress = training_progress("pathoseg finetune", args.epochs)

    def on_event(ev: Any) -> None:
        if isinstance(ev, FinetuneStage):
            _err(f"pathoseg finetune: {ev.message}")
        else:
            progress(ev)

    done = drive(
        with_sigterm(lambda token: iter_finetune(config, cancel=token, force=args.force)),
        FinetuneDone,
        on_event=on_event,
        on_cancelled=lambda r: stopped_line(r, how_to_resume="run the same command again to continue"),
        label="pathoseg finetune",
    )
    for w in done.warnings:
        _err(f"pathoseg finetune: warning: {w}")
    print_json({
        "cancelled": False,
        "best_checkpoint": done.best_checkpoint,
        "last_checkpoint": done.last_checkpoint,
        "best_metrics": done.best_metrics,
        "base_metrics": done.base_metrics,
        "registered": done.registered,
        "initialised_from": done.initialised_from,
        "init": done.init,
        "warnings": done.warnings,
        "epochs": [{"epoch": h["epoch"], "losses": h["losses"], "val": h["val"], "seconds": round(h["seconds"], 1)}
                   for h in done.history],
    })
    return 0
