"""The ``pathoseg`` command line: everything the widgets do, headless, for batches.

Each sub-command prints a JSON result on stdout and returns 0, or prints the error
on stderr and returns 2 for bad input (any :class:`~napari_pathoseg.errors.PathosegError`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from napari_pathoseg.errors import PathosegError

__all__ = ["main", "build_parser"]

logger = logging.getLogger(__name__)

#: Modules that add sub-commands through ``add_commands(subparsers)``.
COMMAND_MODULES = (
    "napari_pathoseg.cli.stain",
    "napari_pathoseg.cli.export",
    "napari_pathoseg.cli.train",
    "napari_pathoseg.cli.nuclei",
    "napari_pathoseg.cli.review",
    "napari_pathoseg.cli.finetune",
)


def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _cmd_info(args: argparse.Namespace) -> int:
    from napari_pathoseg.wsi.slide import open_slide

    with open_slide(args.slide) as slide:
        d = slide.metadata.to_dict(with_properties=args.properties)
        d["mpp"] = slide.mpp
    _print_json(d)
    return 0


def _cmd_tiles(args: argparse.Namespace) -> int:
    from napari_pathoseg.wsi.slide import open_slide
    from napari_pathoseg.tiling import tile_grid, write_tiles_csv

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
    _print_json(out)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the bundled sample slide (or SLIDE)."""
    from napari_pathoseg.demo import run_demo

    result = run_demo(
        slide_path=args.slide,
        out_dir=Path(args.out),
        headless=args.headless or not _has_display(),
        nuclei=not args.no_nuclei,
    )
    _print_json(result)
    return 0


def _has_display() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) or sys.platform in ("darwin", "win32")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command registered."""
    p = argparse.ArgumentParser(prog="pathoseg", description="napari-pathoseg, headless.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("info", help="print a slide's metadata as JSON")
    a.add_argument("slide")
    a.add_argument("--properties", action="store_true", help="include the raw vendor properties")
    a.set_defaults(func=_cmd_info)

    a = sub.add_parser("tiles", help="count (and optionally list) the tissue tiles of a slide")
    a.add_argument("slide")
    a.add_argument("--mpp", type=float, default=None, help="target µm per pixel (default: level resolution)")
    a.add_argument("--level", type=int, default=None, help="pyramid level when --mpp is not given")
    a.add_argument("--size", type=int, default=512)
    a.add_argument("--overlap", type=int, default=0)
    a.add_argument("--min-tissue", type=float, default=0.05, help="minimum tissue fraction of a tile")
    a.add_argument("--all", action="store_true", help="keep background tiles too")
    a.add_argument("--csv", default=None, help="write the grid to this CSV file")
    a.set_defaults(func=_cmd_tiles)

    a = sub.add_parser("demo", help="the main job on the bundled sample slide")
    a.add_argument("slide", nargs="?", default=None, help="slide (default: the bundled CMU-1-Small-Region.svs)")
    a.add_argument("--out", default="pathoseg-demo", help="output folder (headless)")
    a.add_argument("--headless", action="store_true", help="do not open napari even when a display exists")
    a.add_argument("--no-nuclei", action="store_true", help="headless: skip the nucleus segmentation step")
    a.set_defaults(func=_cmd_demo)

    for mod_name in COMMAND_MODULES:
        importlib.import_module(mod_name).add_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pathoseg``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except PathosegError as exc:
        print(f"pathoseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pathoseg {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`pathoseg info SLIDE | head`): stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
