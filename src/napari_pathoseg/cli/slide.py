"""``pathoseg info``, ``pathoseg tiles`` and ``pathoseg demo``: a slide's metadata, its tile grid, the demo.

Examples
--------
``pathoseg info slide.svs`` prints the slide's metadata (levels, µm per pixel, vendor) as JSON.
``pathoseg tiles slide.svs --mpp 0.5 --size 256 --csv grid.csv`` counts the tissue tiles of a
256-pixel grid at 0.5 µm/px and writes the grid as CSV. ``pathoseg demo --headless`` runs the main
job on the bundled sample slide.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from napari_pathoseg._atomic import check_output
from napari_pathoseg.cli._driver import (
    existing_path,
    float_range,
    fraction,
    int_range,
    nonnegative_int,
    print_json,
)

__all__ = ["add_commands"]


def _cmd_info(args: argparse.Namespace) -> int:
    from napari_pathoseg.wsi.slide import open_slide

    with open_slide(args.slide) as slide:
        d = slide.metadata.to_dict(with_properties=args.properties)
        d["mpp"] = slide.mpp
    print_json(d)
    return 0


def _cmd_tiles(args: argparse.Namespace) -> int:
    from napari_pathoseg.tiling import tile_grid, write_tiles_csv
    from napari_pathoseg.wsi.slide import open_slide

    if args.csv:
        check_output(args.csv, inputs=[args.slide], what="--csv", kind="csv", need_folder=True)
    with open_slide(args.slide) as slide:
        tiles = tile_grid(
            slide,
            mpp=args.mpp,
            level=args.level,
            size=args.size,
            overlap=args.overlap,
            tissue_only=not args.all,
            min_tissue=args.min_tissue,
        )
        out: dict[str, Any] = {
            "slide": str(args.slide),
            "n_tiles": len(tiles),
            "level": tiles[0].level if tiles else None,
            "size": args.size,
            "overlap": args.overlap,
            "mpp": args.mpp,
        }
        if args.csv:
            out["csv"] = str(write_tiles_csv(tiles, args.csv))
    print_json(out)
    return 0


def _has_display() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) or sys.platform in ("darwin", "win32")


def _cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the bundled sample slide (or SLIDE)."""
    from napari_pathoseg._atomic import OutputError
    from napari_pathoseg.demo import run_demo

    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; the demo writes into a folder: give a folder path")
    result = run_demo(
        slide_path=args.slide,
        out_dir=Path(args.out),
        headless=args.headless or not _has_display(),
        nuclei=not args.no_nuclei,
    )
    print_json(result)
    return 0


def add_commands(subparsers: Any) -> None:
    """Register ``info``, ``tiles`` and ``demo`` on the ``pathoseg`` sub-command parser."""
    a = subparsers.add_parser("info", help="print a slide's metadata as JSON")
    a.add_argument("slide", type=existing_path)
    a.add_argument("--properties", action="store_true", help="include the raw vendor properties")
    a.set_defaults(func=_cmd_info)

    a = subparsers.add_parser("tiles", help="count (and optionally list) the tissue tiles of a slide")
    a.add_argument("slide", type=existing_path)
    a.add_argument("--mpp", type=float_range(0.01, 1000.0), default=None, help="target µm per pixel (default: level resolution)")
    a.add_argument("--level", type=nonnegative_int, default=None, help="pyramid level when --mpp is not given")
    a.add_argument("--size", type=int_range(16, 16384), default=512, help="tile side in pixels (16-16384)")
    a.add_argument("--overlap", type=nonnegative_int, default=0, help="overlap between tiles in pixels")
    a.add_argument("--min-tissue", type=fraction, default=0.05, help="minimum tissue fraction of a tile (0-1)")
    a.add_argument("--all", action="store_true", help="keep background tiles too")
    a.add_argument("--csv", default=None, help="write the grid to this CSV file")
    a.set_defaults(func=_cmd_tiles)

    a = subparsers.add_parser("demo", help="the main job on the bundled sample slide")
    a.add_argument("slide", nargs="?", type=existing_path, default=None, help="slide (default: the bundled CMU-1-Small-Region.svs)")
    a.add_argument("--out", default="pathoseg-demo", help="output folder (headless)")
    a.add_argument("--headless", action="store_true", help="do not open napari even when a display exists")
    a.add_argument("--no-nuclei", action="store_true", help="headless: skip the nucleus segmentation step")
    a.set_defaults(func=_cmd_demo)
