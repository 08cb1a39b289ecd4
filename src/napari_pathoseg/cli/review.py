"""``pathoseg pseudolabel``: generate a pseudo-label review project headless.

Example::

    pathoseg pseudolabel slide.svs --out review/ --model nuclei-lite --threshold 0.9

prints one JSON object (project folder, tiles processed and kept, counts, score summary). It runs
on the CLI job driver (:mod:`napari_pathoseg.cli._driver`): Ctrl-C stops after the current batch,
keeps the tiles finished so far and exits 130 with one line saying where they are.
``--out`` may not be the input or a folder holding it (``--overwrite`` would delete the
project's old tiles while they are read); this is checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import numpy as np

from napari_pathoseg.cli._driver import (
    device,
    drive,
    existing_path,
    fraction,
    mpp_value,
    positive_int,
    print_json,
)
from napari_pathoseg.errors import PathosegError
from napari_pathoseg.review.generate import (
    GenerationDone,
    GenerationProgress,
    check_source_outside,
    generate_pseudolabels,
)

__all__ = ["add_commands", "pseudolabel_command"]

logger = logging.getLogger(__name__)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``pseudolabel`` subcommand to the ``pathoseg`` parser."""
    p = subparsers.add_parser(
        "pseudolabel",
        help="run a teacher model over unlabelled tiles and write a review project",
        description=(
            "Run a nucleus model over the tissue tiles of a slide or the images of a folder, "
            "score each tile by its mean per-pixel confidence max(p, 1-p), and store tiles, "
            "masks and scores in a review project folder (open it in the Review dock). "
            "Ctrl-C stops after the current batch and keeps the tiles finished so far."
        ),
    )
    p.add_argument("input", type=existing_path, help="slide file or folder of image tiles")
    p.add_argument("--out", required=True, help="review project folder to create")
    p.add_argument("--model", default="nuclei-lite", help="model name or checkpoint path (default: nuclei-lite)")
    p.add_argument("--threshold", type=fraction, default=0.0, help="keep tiles scoring at least this (0-1; default 0 keeps all)")
    p.add_argument("--max-tiles", type=positive_int, default=None, help="process at most this many tiles")
    p.add_argument("--mpp", type=mpp_value, default=None, help="working resolution in µm/px (default: the model's)")
    p.add_argument("--source-mpp", type=mpp_value, default=None, help="resolution of folder images in µm/px (default: same as --mpp)")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--device", type=device, default=None, help="torch device (default: CUDA/MPS when present, else CPU)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing project in --out")
    p.set_defaults(func=pseudolabel_command)


def pseudolabel_command(args: argparse.Namespace, *, model: Any = None) -> int:
    """Run ``pathoseg pseudolabel``; prints a JSON result and returns the exit code.

    Bad input raises :class:`~napari_pathoseg.errors.PathosegError` (the ``pathoseg``
    entry point reports it on stderr with exit code 2). Ctrl-C stops after the current batch:
    :class:`~napari_pathoseg.cli._driver.JobCancelled` says how many tiles were kept and where
    (exit 130).

    Parameters
    ----------
    args : argparse.Namespace
        Parsed arguments (see :func:`add_commands`).
    model : NucleusModel-like, optional
        A model with ``predict``, ``to_instances``, ``mpp`` and ``tile_size``; loaded with
        :func:`napari_pathoseg.models.registry.load_model` from ``args.model`` when None.
    """
    check_source_outside(args.input, args.out)  # before the (slow) model load
    if model is None:
        try:
            from napari_pathoseg.models.registry import load_model
        except ImportError as exc:
            raise PathosegError(
                f"The model registry is not available ({exc}); install napari-pathoseg completely."
            ) from exc
        model = load_model(args.model, device=args.device)
    mpp = args.mpp if args.mpp is not None else getattr(model, "mpp", None)
    tile_size = int(getattr(model, "tile_size", 256))

    def events(token: Any) -> Any:
        return generate_pseudolabels(
            args.input,
            args.out,
            predict=model.predict,
            to_instances=model.to_instances,
            model_name=str(args.model),
            tile_size=tile_size,
            mpp=mpp,
            source_mpp=args.source_mpp,
            threshold=args.threshold,
            max_tiles=args.max_tiles,
            batch_size=args.batch_size,
            overwrite=args.overwrite,
            cancel=token,
        )

    def progress(event: Any) -> None:
        if isinstance(event, GenerationProgress):
            logger.info("pseudo-labels: %d/%d tiles, %d kept", event.done, event.total, event.kept)

    done_event = drive(events, GenerationDone, on_event=progress,
                       on_cancelled=lambda done: done.message, label="pathoseg pseudolabel")
    project = done_event.project
    scores = np.array([r.score for r in project.tiles()], dtype=np.float64)
    print_json({
        "command": "pseudolabel",
        "project": str(project.root),
        "source": str(project.source_path),
        "model": project.info.model,
        "tile_size": project.info.tile_size,
        "mpp": project.info.mpp,
        "processed": done_event.processed,
        "kept": done_event.kept,
        "threshold": project.threshold,
        "counts": project.counts(),
        "score_min": float(scores.min()) if scores.size else None,
        "score_mean": float(scores.mean()) if scores.size else None,
        "score_max": float(scores.max()) if scores.size else None,
    })
    return 0
