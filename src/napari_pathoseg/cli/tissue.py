"""``pathoseg tissue-train`` (M5, both stages) and ``pathoseg tissue`` (tissue maps).

``tissue-train`` trains stage 1 (classifier), makes Grad-CAM++ pseudo masks and trains stage 2
(PSPNet) in one resumable run folder (``--resume`` / ``--force``); progress on stderr, one JSON
document on stdout; Ctrl-C or SIGTERM saves a resumable checkpoint (exit 130).
``tissue-review-export`` writes a run's stage-1 pseudo masks into a review project for the Review
dock; ``tissue-train --reviewed PROJECT`` trains stage 2 on the accepted and corrected ones. See
``docs/tissue.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from napari_pathoseg.cli._driver import (
    device,
    drive,
    existing_file,
    positive_float,
    positive_int,
    print_json,
)
from napari_pathoseg.cli.train import (
    DEFAULT_DATA,
    THREADS_HELP,
    _err,
    threads_arg,
    with_sigterm,
)

__all__ = ["add_commands", "cmd_tissue", "cmd_tissue_review_export", "cmd_tissue_train"]


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``tissue-train`` (and ``tissue``, see :mod:`napari_pathoseg.cli.tissue`)."""
    p = subparsers.add_parser("tissue-train", help="train an M5 tissue model from patch-level labels (both stages)")
    p.add_argument("--preset", default="tissue-lite",
                   help="tissue-lite (PDA + ONS), tissue-lite-ce (plain CE in stage 2), tissue-lite-nopda "
                   "(no progressive dropout attention), m5 (ResNet-38 widths and depth, method-sized)")
    p.add_argument("--out", required=True, help="run folder (stage1/, pseudo/, stage2/)")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="shared data folder holding wsss4luad_tissue_masks (its held-out split is used)")
    p.add_argument("--labels", default=None,
                   help="your own patches instead: a CSV or a folder of multi-hot labels (WSSS4LUAD names included)")
    p.add_argument("--classes", default=None, help="comma-separated class names of --labels (ids 1..n in the map)")
    p.add_argument("--mpp", type=float, default=None, help="µm per pixel of --labels patches (default: the preset's)")
    p.add_argument("--epochs1", type=positive_int, default=20, help="stage 1 epochs (M5: 20)")
    p.add_argument("--steps1", type=positive_int, default=12, help="stage 1 steps per epoch")
    p.add_argument("--epochs2", type=positive_int, default=20, help="stage 2 epochs")
    p.add_argument("--steps2", type=positive_int, default=15, help="stage 2 steps per epoch")
    p.add_argument("--tiles", type=int, default=0,
                   help="WSSS4LUAD only: cut each training patch into tiles of this many px whose multi-hot labels "
                   "are derived from the tile's mask pixels; stage 1 trains on the tiles (0: whole patches)")
    p.add_argument("--label-share", type=positive_float(high=0.99), default=0.05,
                   help="with --tiles: a class is present in a tile from this share of its tissue pixels")
    p.add_argument("--balance", action="store_true",
                   help="class balancing: label vectors sampled ∝ sqrt(count) in stage 1, class-weighted loss in stage 2")
    p.add_argument("--correct", type=int, default=0,
                   help="with --pseudo-from and --tiles: replace the N least confident pseudo masks by their true masks "
                   "(a reviewer's corrections, simulated; the 0/5/10 corrected-patch measurement)")
    p.add_argument("--stage1-only", action="store_true",
                   help="stop after stage 1 and the pseudo masks (scored on the test patches): the PDA ablation")
    p.add_argument("--supervised", action="store_true",
                   help="the fully supervised reference: stage 2 on the true masks of the training patches (CE)")
    p.add_argument("--pseudo-from", default=None,
                   help="skip stage 1: stage 2 on the pseudo masks of this earlier run (ablations on the same masks)")
    p.add_argument("--reviewed", default=None,
                   help="skip stage 1: stage 2 on the pseudo masks accepted or corrected in this tissue review "
                   "project (pathoseg tissue-review-export, then the Review dock); rejected and pending ones are left out")
    p.add_argument("--seed", type=int, default=0)
    run = p.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true", help="continue the run in --out")
    run.add_argument("--force", action="store_true", help="start over in an --out that holds a run")
    p.add_argument("--threads", type=threads_arg, default=None, help=THREADS_HELP)
    p.add_argument("--device", type=device, default=None, help="cpu, cuda, cuda:N or mps")
    p.set_defaults(func=cmd_tissue_train)

    e = subparsers.add_parser("tissue-review-export",
                              help="write an M5 run's stage-1 pseudo masks into a review project (Review dock)")
    e.add_argument("run", help="M5 run folder with stage1/ and pseudo/ (pathoseg tissue-train)")
    e.add_argument("--out", required=True, help="new or empty folder for the review project")
    for flag in ("--data", "--labels", "--classes", "--tiles", "--label-share"):
        act = next(a for a in p._actions if flag in a.option_strings)
        e.add_argument(flag, type=act.type, default=act.default, help=f"as the run had: {act.help}")
    e.add_argument("--force", action="store_true", help="replace a review project in --out")
    e.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    e.add_argument("--device", type=device, default=None, help="cpu, cuda, cuda:N or mps")
    e.set_defaults(func=cmd_tissue_review_export, supervised=False, correct=0, pseudo_from=None, seed=0)

    q = subparsers.add_parser("tissue", help="tissue map of a slide or image (M5): uint8 class ids + per-class areas")
    q.add_argument("input", type=existing_file, help="slide or image file")
    q.add_argument("--out", required=True, help="labels TIFF (uint8 class ids; 0 background)")
    q.add_argument("--probs", default=None, help="also write the class probabilities here (TIFF, model grid)")
    q.add_argument("--model", default="tissue-luad-supervised", help="model name or .safetensors checkpoint")
    q.add_argument("--classes", default=None, help="comma-separated classes the model must have (refused otherwise)")
    q.add_argument("--mpp", type=positive_float(high=100.0), default=None,
                   help="declare the input's µm per pixel (images that do not record it)")
    q.add_argument("--region", default=None, help="x,y,w,h in level-0 pixels (default: everything)")
    q.add_argument("--mode", choices=("literal", "fast"), default="literal",
                   help="literal: M5's 224 px windows, 50 %% overlap, averaged; fast: one pass per 512 px tile")
    q.add_argument("--grid", choices=("auto", "model", "level0"), default="auto",
                   help="labels grid: the model's µm/px, or level 0 of the input (auto: level 0 for a "
                   "single-level image, the model grid for a pyramid)")
    q.add_argument("--batch", type=positive_int, default=2, help="engine tiles per call")
    q.add_argument("--all-tiles", action="store_true", help="do not skip slide tiles without tissue")
    q.add_argument("--work-dir", default=None, help="folder for the stitched probabilities (default: beside --out)")
    q.set_defaults(func=cmd_tissue)


def _progress():
    from napari_pathoseg.methods.tissue.pipeline import StageStart
    from napari_pathoseg.training.engine import EpochEvent, TrainStart

    def on_event(ev: Any) -> None:
        if isinstance(ev, (StageStart, TrainStart)):
            _err(f"pathoseg tissue-train: {ev.message}")
        elif isinstance(ev, EpochEvent):
            v = ev.val_metrics
            _err(f"pathoseg tissue-train: epoch {ev.epoch + 1}: loss {ev.losses.get('loss', float('nan')):.4f}, "
                 f"val mIoU {v.get('miou', float('nan')):.4f} score {v.get('score', float('nan')):.4f}"
                 f"{' (best)' if ev.is_best else ''}, {ev.seconds:.0f} s")

    return on_event


def _load_data(args: argparse.Namespace, cfg: Any) -> Any:
    from napari_pathoseg.errors import PathosegError
    from napari_pathoseg.methods.tissue.data import load_patches, load_wsss4luad
    from napari_pathoseg.methods.tissue.labels import read_label_csv, read_label_folder

    if args.labels is None:
        if args.classes:
            raise PathosegError("--classes goes with --labels; the WSSS4LUAD classes are fixed.")
        if args.tiles and not 32 <= args.tiles <= 1024:
            raise PathosegError(f"--tiles {args.tiles}: give a tile size from 32 to 1024 px (or 0 for whole patches).")
        if args.correct and (args.pseudo_from is None or not args.tiles or args.correct < 0):
            raise PathosegError("--correct N goes with --pseudo-from RUN and --tiles (the run's tile size).")
        return load_wsss4luad(args.data, train_masks=args.supervised or args.correct > 0, tile=args.tiles,
                              min_share=args.label_share)
    if args.tiles:
        raise PathosegError("--tiles derives tile labels from WSSS4LUAD's masks; your --labels patches are used whole.")
    if not args.classes:
        raise PathosegError("--labels needs --classes (comma-separated class names, in the order of the vectors).")
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    src = Path(args.labels)
    labels = read_label_csv(src, classes) if src.is_file() else read_label_folder(src, classes)
    return load_patches(labels, classes, seed=args.seed)


def cmd_tissue_train(args: argparse.Namespace) -> int:
    from napari_pathoseg.methods.tissue.network import get_preset
    from napari_pathoseg.methods.tissue.pipeline import M5Done, iter_m5
    from napari_pathoseg.training.engine import check_run_folder

    cfg = get_preset(args.preset)
    out = Path(args.out)
    if args.reviewed is not None and (args.pseudo_from or args.supervised or args.correct or args.stage1_only):
        from napari_pathoseg.errors import PathosegError

        raise PathosegError("--reviewed trains stage 2 on a review project; leave out --pseudo-from, --supervised, "
                            "--correct and --stage1-only.")
    if args.reviewed is not None:  # a bad project folder is refused before the data are read
        from napari_pathoseg.methods.tissue.review import open_reviewed

        open_reviewed(args.reviewed)
    for sub in ("stage1", "stage2", "supervised"):
        check_run_folder(out / sub, resume=args.resume, force=args.force)
    t0 = time.perf_counter()
    data = _load_data(args, cfg)
    overrides: dict[str, Any] = {}
    if data.classes != list(cfg.classes):
        overrides["classes"] = list(data.classes)
    if args.mpp is not None:
        overrides["mpp"] = float(args.mpp)
    if args.balance:
        overrides["balance"] = True
    if overrides:
        cfg = get_preset(args.preset, **overrides)
    _err(f"pathoseg tissue-train: {len(data.train)} train, {len(data.val)} val, {len(data.test)} test patches "
         f"({data.source}), classes {data.classes}"
         + (f"; {len(data.tiles)} tiles of {data.tile} px, labels {data.summary()['tile_labels']}" if data.tiles else ""))
    command = "pathoseg tissue-train " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "pathoseg tissue-train"
    result = drive(
        with_sigterm(lambda token: iter_m5(
            cfg, data, out_dir=out, epochs1=args.epochs1, steps1=args.steps1, epochs2=args.epochs2,
            steps2=args.steps2, resume=args.resume, force=args.force, cancel=token, threads=args.threads,
            seed=args.seed, device=args.device, supervised=args.supervised, pseudo_from=args.pseudo_from, meta={"command": command},
            stage1_only=args.stage1_only, correct=args.correct, reviewed=args.reviewed,
        )),
        M5Done,
        on_event=_progress(),
        on_cancelled=lambda r: f"{r.message}; add --resume to the same command to continue",
        label="pathoseg tissue-train",
    )
    print_json({"best_checkpoint": str(result.best_checkpoint), "stage1": result.stage1, "stage2": result.stage2,
                "test": result.test, "wall_seconds": round(time.perf_counter() - t0, 1)})
    return 0


def cmd_tissue_review_export(args: argparse.Namespace) -> int:
    from napari_pathoseg.methods.tissue.review import (
        ExportDone,
        ExportEvent,
        check_run,
        iter_export_review,
    )

    check_run(args.run)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    data = _load_data(args, None)

    def on_event(ev: Any) -> None:
        if isinstance(ev, ExportEvent):
            _err(f"pathoseg tissue-review-export: {ev.done}/{ev.total} {ev.name}: confidence {ev.confidence:.3f}")

    result = drive(
        lambda token: iter_export_review(args.run, data, args.out, overwrite=args.force, cancel=token,
                                         device=args.device),
        ExportDone, on_event=on_event, on_cancelled=lambda r: r.message, label="pathoseg tissue-review-export",
    )
    print_json({"project": str(result.project), "tiles": result.tiles, "confidence": result.confidence,
                "next": f"open {result.project} in the Review dock, then: pathoseg tissue-train --reviewed "
                        f"{result.project} --out NEW_RUN"})
    return 0


def _outputs(args: argparse.Namespace) -> tuple[Path, Path | None]:
    from napari_pathoseg._atomic import OutputError, check_output

    out = check_output(args.out, inputs=[args.input], what="--out", kind="tiff", need_folder=True)
    probs = (check_output(args.probs, inputs=[args.input], what="--probs", kind="tiff", need_folder=True)
             if args.probs else None)
    if probs is not None and probs.resolve() == out.resolve():
        raise OutputError(f"--out and --probs are the same file {out}; give each output its own path")
    return out, probs


def cmd_tissue(args: argparse.Namespace) -> int:
    import tempfile

    from napari_pathoseg.cli.nuclei import _parse_region
    from napari_pathoseg.methods.tissue.segment import (
        TissueResult,
        iter_tissue,
        summary,
        write_labels_tiff,
        write_probs_tiff,
    )
    from napari_pathoseg.models.registry import load_model
    from napari_pathoseg.wsi.slide import open_slide

    out, probs = _outputs(args)
    region = _parse_region(args.region)
    model = load_model(args.model, task="tissue")
    if args.classes:
        model.check_classes([c.strip() for c in args.classes.split(",") if c.strip()])
    with open_slide(args.input) as slide, tempfile.TemporaryDirectory(prefix=".tissue-",
                                                                     dir=args.work_dir or str(out.parent)) as wd:
        if slide.mpp is None and args.mpp is None:
            from napari_pathoseg.errors import PathosegError

            raise PathosegError(f"{args.input} does not record its µm per pixel; pass --mpp "
                                f"(the model works at {model.mpp} µm/px).")
        level0 = args.grid == "level0" or (args.grid == "auto" and slide.level_count == 1)

        def save_partial(result: TissueResult) -> str:
            write_labels_tiff(result, out, level0=level0)
            return f"stopped after {result.tiles} of {result.tiles_total} tiles; the finished tiles were saved to {out}"

        result = drive(
            lambda token: iter_tissue(slide, model, mode=args.mode, region=region, mpp=args.mpp,
                                      batch_size=args.batch, tissue_only=False if args.all_tiles else None,
                                      work_dir=wd, cancel=token),
            TissueResult, on_cancelled=save_partial, label="pathoseg tissue",
        )
        info = {"input": str(args.input), **summary(result), "labels": str(write_labels_tiff(result, out, level0=level0)),
                "labels_grid": "level0" if level0 else "model"}
        if probs is not None:
            info["probs"] = str(write_probs_tiff(result, probs))
        del result
    print_json(info)
    return 0
