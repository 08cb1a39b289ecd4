"""``pathoseg normalize``: write a stain-normalised copy of a slide, headless.

Examples
--------
``pathoseg normalize slide.svs --method macenko --target reference.png --out slide_norm.tif
--save-normalizer lab_reference.json`` fits a Macenko normaliser to ``reference.png``,
estimates the slide's stains once from tissue tiles across it, streams the normalised
slide into a pyramidal TIFF and prints a JSON summary. ``--target lab_reference.json``
reuses a saved normaliser.

No output may name an input: ``--out`` and ``--save-normalizer`` are refused (before any work)
when they are the slide, the ``--target`` or each other. It runs on the CLI job driver
(:mod:`napari_pathoseg.cli._driver`): Ctrl-C stops the TIFF write at the next tile (nothing is
left behind) and exits 130 with one line.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from napari_pathoseg._atomic import check_output
from napari_pathoseg.cli._driver import (
    existing_file,
    int_range,
    nonnegative_int,
    positive_int,
    print_json,
    sigint_cancels,
)
from napari_pathoseg.errors import CancelledError, StainError
from napari_pathoseg.events import CancelToken

__all__ = ["add_commands", "run_normalize"]

logger = logging.getLogger(__name__)


def add_commands(subparsers: Any) -> None:
    """Register ``normalize`` on the ``pathoseg`` sub-command parser."""
    from napari_pathoseg.stain.normalizers import available_normalizers

    p = subparsers.add_parser(
        "normalize",
        help="stain-normalise a slide into a pyramidal TIFF (Macenko, Vahadane, Reinhard)",
        description=(
            "Fit a stain normaliser to a reference (an image or slide file, or a saved "
            "normaliser .json), estimate the slide's stains once from tissue across it, and "
            "stream the normalised slide into a tiled pyramidal TIFF. Prints JSON."
        ),
    )
    p.add_argument("slide", type=existing_file, help="slide or image to normalise")
    p.add_argument(
        "--method",
        choices=available_normalizers(),
        default=None,
        help="normalisation method (default macenko; a saved normaliser brings its own)",
    )
    p.add_argument("--target", type=existing_file, required=True, help="reference image/slide file, or a saved normaliser .json")
    p.add_argument("--out", default=None, help="output pyramidal TIFF (.tif)")
    p.add_argument("--save-normalizer", default=None, metavar="PATH", help="save the fitted normaliser as JSON")
    p.add_argument("--level", type=nonnegative_int, default=0, help="slide level written as the output's full resolution")
    p.add_argument("--tile-size", type=positive_int, default=512, help="TIFF tile side (multiple of 16)")
    p.add_argument("--compression", choices=("jpeg", "zlib", "none"), default="jpeg")
    p.add_argument("--quality", type=int_range(1, 100), default=90, help="JPEG quality (1-100)")
    p.add_argument("--n-tiles", type=positive_int, default=32, help="tissue tiles sampled to estimate the slide's stains")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the tissue sample")
    p.set_defaults(func=run_normalize)


def _load_target(args: argparse.Namespace):
    from napari_pathoseg.stain.normalizers import get_normalizer, load_normalizer
    from napari_pathoseg.stain.slide import fit_to_slide
    from napari_pathoseg.wsi.slide import open_slide

    target = Path(args.target)
    if target.suffix.lower() == ".json":
        norm = load_normalizer(target)
        if args.method is not None and args.method != norm.name:
            raise StainError(
                f"{target}: this saved normaliser is {norm.name!r} but --method {args.method} was given; "
                "drop --method or fit a new one from a reference image"
            )
        return norm
    norm = get_normalizer(args.method or "macenko")
    with open_slide(target) as ref:
        fit_to_slide(norm, ref, n_tiles=args.n_tiles, seed=args.seed)
    return norm


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse, before any work, outputs that name an input (the slide, the target) or each other."""
    inputs = (args.slide, args.target)
    if args.out is not None:
        check_output(args.out, inputs=inputs, what="--out", kind="tiff", need_folder=True)
        if Path(args.out).suffix.lower() not in (".tif", ".tiff"):
            raise StainError(f"{args.out}: the output must be a .tif or .tiff file")
    if args.save_normalizer is not None:
        check_output(args.save_normalizer, inputs=inputs, what="--save-normalizer", kind="json", need_folder=True)
    if args.out is not None and args.save_normalizer is not None:
        if Path(args.out).expanduser().resolve() == Path(args.save_normalizer).expanduser().resolve():
            raise StainError(f"--out and --save-normalizer both name {args.out}; give two different files")


def run_normalize(args: argparse.Namespace) -> int:
    """Run ``pathoseg normalize`` (prints a JSON summary; returns the exit code)."""
    from napari_pathoseg.wsi.slide import open_slide
    from napari_pathoseg.stain.slide import estimate_slide_stain, write_normalized_tiff

    if args.out is None and args.save_normalizer is None:
        raise StainError("nothing to do: give --out OUT.tif and/or --save-normalizer PATH")
    _check_outputs(args)
    t0 = time.perf_counter()
    norm = _load_target(args)
    result: dict[str, Any] = {
        "command": "normalize",
        "slide": str(args.slide),
        "method": norm.name,
        "target": {"reference": norm.reference or str(args.target), **norm.target.to_dict()},  # type: ignore[union-attr]
    }
    if args.save_normalizer:
        result["normalizer"] = str(norm.save(args.save_normalizer))
    if args.out:
        out = Path(args.out)
        token = CancelToken()
        with open_slide(args.slide) as slide, sigint_cancels(token, label="pathoseg normalize"):
            source = estimate_slide_stain(slide, norm, n_tiles=args.n_tiles, seed=args.seed)
            try:
                written = write_normalized_tiff(
                    slide,
                    norm,
                    out,
                    source=source,
                    level=args.level,
                    tile_size=args.tile_size,
                    compression=None if args.compression == "none" else args.compression,
                    quality=args.quality,
                    cancel=token.is_set,
                )
            except CancelledError as exc:
                if "normalizer" in result:
                    raise CancelledError(f"{exc} (the normaliser was saved to {result['normalizer']})") from None
                raise
        result["out"] = written.to_dict()
    result["seconds"] = round(time.perf_counter() - t0, 3)
    print_json(result)
    return 0
