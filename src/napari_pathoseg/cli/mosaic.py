"""``pathoseg mosaic``: lay real labelled tiles into a pyramidal slide with ground truth beside it.

Examples
--------
``pathoseg mosaic --data shared/data/kather2016_texture_tiles --kind tissue-classes --out
cohort/t0.tif --size 8192 --mpp 0.5 --seed 0 --tumour-fraction 0.15`` writes ``t0.tif`` (RGB
pyramid), ``t0.labels.tif`` (label pyramid), ``t0.cells.csv`` and ``t0.mosaic.json`` (slide
label, rule, provenance, licence) and prints a JSON summary. ``--tumour-fraction 0`` makes a
normal slide. ``pathoseg mosaic --data DIR --info`` lists a data set's classes and labels.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from napari_pathoseg.cli._driver import (
    drive,
    existing_dir,
    fraction,
    nonnegative_int,
    positive_float,
    positive_int,
    print_json,
)
from napari_pathoseg.errors import PathosegError

__all__ = ["add_commands", "run_mosaic", "parse_size", "parse_classes"]


def parse_size(text: str) -> tuple[int, int]:
    """``"8192"`` -> (8192, 8192); ``"8192x4096"`` (width x height) -> (4096, 8192) as (rows, cols)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"must be N or WIDTHxHEIGHT in pixels, got {text!r}")
    w = int(m.group(1))
    h = int(m.group(2)) if m.group(2) else w
    if not (64 <= w <= 2**20 and 64 <= h <= 2**20):
        raise argparse.ArgumentTypeError(f"sides must be 64..1048576 px, got {text!r}")
    return h, w


def parse_classes(items: list[str]) -> dict[str, float]:
    """``["TUM=2", "STR"]`` -> ``{"TUM": 2.0, "STR": 1.0}``.

    Raises
    ------
    PathosegError
        A weight is not a positive number.
    """
    out: dict[str, float] = {}
    for item in items:
        name, sep, weight = item.partition("=")
        try:
            w = float(weight) if sep else 1.0
        except ValueError:
            raise PathosegError(f"--classes {item}: the weight after '=' must be a number, e.g. TUM=2") from None
        if not w > 0:
            raise PathosegError(f"--classes {item}: the weight must be positive")
        out[name.strip()] = w
    return out


def add_commands(subparsers: Any) -> None:
    """Register ``mosaic`` on the ``pathoseg`` sub-command parser."""
    from napari_pathoseg.wsi.mosaic_sources import KINDS

    p = subparsers.add_parser(
        "mosaic",
        help="make a large pyramidal slide from real labelled tiles, with ground truth (labels TIFF, cells CSV, JSON)",
        description=(
            "Lay real labelled tiles (NCT-CRC, Kather 2016, EBHI-Seg, GlaS, OCDC, WSSS4LUAD folders) on a grid at one "
            "µm/px inside a smooth tissue outline, streaming a pyramidal TIFF, with a label TIFF, a per-cell CSV and a "
            "JSON sidecar (slide label and its rule, provenance, licence) beside it. Same seed, same bytes. "
            "Several source data sets are non-commercial: never commit or redistribute the results."
        ),
    )
    p.add_argument("--data", required=True, type=existing_dir, help="a labelled tile data set folder (with index.csv)")
    p.add_argument("--kind", choices=KINDS, default=None, help="refuse a data set of the other kind")
    p.add_argument("--info", action="store_true", help="print the data set's classes, labels and scale, and stop")
    p.add_argument("--out", default=None, help="output slide .tif (sidecars are written beside it)")
    p.add_argument("--size", type=parse_size, default=(8192, 8192), help="N or WIDTHxHEIGHT in level-0 px (default 8192)")
    p.add_argument("--mpp", type=positive_float(high=100.0), default=0.5, help="target µm per level-0 pixel (default 0.5)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--classes", nargs="+", default=None, metavar="NAME[=WEIGHT]", help="tissue classes to draw, with weights")
    p.add_argument("--tumour-fraction", type=fraction, default=None, help="share of tissue cells from tumour classes (0: normal slide)")
    p.add_argument("--tumour-classes", nargs="+", default=None, metavar="NAME", help="classes that are tumour (default: the data set's)")
    p.add_argument("--cell-um", type=positive_float(high=10_000.0), default=None, help="cell side in µm (default: smallest tile)")
    p.add_argument("--source-mpp", type=positive_float(high=100.0), default=None, help="µm/px of the source tiles (default: the data set's)")
    p.add_argument("--no-outline", action="store_true", help="tissue everywhere (no outline on glass)")
    p.add_argument("--tissue-area", type=float, default=0.6, help="share of the slide inside the outline (default 0.6)")
    p.add_argument("--cluster", type=float, default=2.0, help="smoothness of class regions in cells (0: cell by cell)")
    p.add_argument("--min-tumour-um2", type=float, default=10_000.0, help="slide label rule: tumour area needed for 'tumour'")
    p.add_argument("--tile-size", type=positive_int, default=256, help="TIFF tile side (multiple of 16)")
    p.add_argument("--compression", choices=("jpeg", "zlib", "none"), default="jpeg", help="RGB compression (labels are zlib)")
    p.add_argument("--quality", type=positive_int, default=90, help="JPEG quality")
    p.add_argument("--cache-mb", type=positive_float(), default=None,
                   help="memory for resampled source tiles (default: two rows of cells, >= 32 MB)")
    p.add_argument("--force", action="store_true", help="replace existing outputs")
    p.set_defaults(func=run_mosaic)


def _info(args: argparse.Namespace) -> int:
    from napari_pathoseg.wsi.mosaic_sources import load_mosaic_dataset

    ds = load_mosaic_dataset(args.data, kind=args.kind, mpp=args.source_mpp)
    print_json(
        {
            **ds.provenance(),
            "classes": {c: len(ds.tiles_of(c)) for c in ds.classes},
            "tissue_classes": list(ds.tissue_classes),
            "background_classes": list(ds.background_classes),
            "tumour_classes": list(ds.tumour_classes),
            "label_ids": {str(i): n for i, n in sorted(ds.labels.items())},
        }
    )
    return 0


def run_mosaic(args: argparse.Namespace) -> int:
    """The ``mosaic`` command: make the mosaic, print its summary as JSON."""
    from napari_pathoseg.wsi.mosaic import MosaicResult, iter_make_mosaic

    if args.info:
        return _info(args)
    if args.out is None:
        raise PathosegError("give --out SLIDE.tif (or --info to list the data set's classes)")
    options = dict(
        kind=args.kind,
        size=args.size,
        mpp=args.mpp,
        seed=args.seed,
        classes=parse_classes(args.classes) if args.classes else None,
        tumour_fraction=args.tumour_fraction,
        tumour_classes=args.tumour_classes,
        cell_um=args.cell_um,
        source_mpp=args.source_mpp,
        outline=not args.no_outline,
        tissue_area=args.tissue_area,
        cluster=args.cluster,
        min_tumour_um2=args.min_tumour_um2,
        tile=args.tile_size,
        compression=args.compression,
        quality=args.quality,
        overwrite=args.force,
        cache_mb=args.cache_mb,
    )
    result = drive(lambda token: iter_make_mosaic(args.data, args.out, cancel=token, **options), MosaicResult, label="pathoseg mosaic")
    print_json(result.to_dict())
    return 0
