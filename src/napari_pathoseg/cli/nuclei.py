"""``pathoseg nuclei``: segment the nuclei of a slide or image; write uint32 instance labels."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.methods.nuclei.segment import overlay_picture, segment_nuclei, write_labels_tiff, write_table_csv, _write_rgb_tiff
from napari_pathoseg.wsi.slide import open_slide

__all__ = ["add_commands"]


def _parse_region(text: str | None) -> tuple[int, int, int, int] | None:
    if not text:
        return None
    try:
        vals = tuple(int(float(v)) for v in text.split(","))
    except ValueError as exc:
        raise PathosegError(f"--region must be x,y,w,h in level-0 pixels, got {text!r}") from exc
    if len(vals) != 4:
        raise PathosegError(f"--region must be x,y,w,h in level-0 pixels, got {text!r}")
    return vals  # type: ignore[return-value]


def _cmd_nuclei(args: argparse.Namespace) -> int:
    from napari_pathoseg.models.registry import load_model

    model = load_model(args.model)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work_parent = args.work_dir or str(out.parent)
    with open_slide(args.input) as slide, tempfile.TemporaryDirectory(prefix=".nuclei-", dir=work_parent) as wd:
        result = segment_nuclei(
            slide,
            model,
            region=_parse_region(args.region),
            mpp=args.mpp,
            overlap=args.overlap,
            batch_size=args.batch,
            tissue_only=None if not args.all_tiles else False,
            with_normalized=bool(args.normalized),
            work_dir=wd,
        )
        write_labels_tiff(result, out)
        info: dict[str, Any] = {
            "input": str(args.input),
            "labels": str(out),
            "model": result.model,
            "region_xywh": list(result.region),
            "n_nuclei": result.n_nuclei,
            "tiles": result.tiles,
            "model_mpp": result.mpp,
            "timings": result.timings,
        }
        if args.table:
            info["table"] = str(write_table_csv(result, args.table))
        if args.normalized:
            info["normalized"] = str(_write_rgb_tiff(result.normalized, Path(args.normalized)))
        if args.overlay:
            from napari_pathoseg.demo import save_png

            info["overlay"] = str(save_png(args.overlay, overlay_picture(slide, result)))
    print(json.dumps(info, indent=2))
    return 0


def add_commands(subparsers: Any) -> None:
    """Register ``pathoseg nuclei``."""
    p = subparsers.add_parser("nuclei", help="segment nuclei on a slide or image; write uint32 instance labels")
    p.add_argument("input", help="slide or image file")
    p.add_argument("--out", required=True, help="labels TIFF (uint32, level-0 grid of the region)")
    p.add_argument("--region", default=None, help="x,y,w,h in level-0 pixels (default: the whole slide's tissue)")
    p.add_argument("--model", default="nuclei-lite", help="model name or .safetensors checkpoint")
    p.add_argument("--mpp", type=float, default=None, help="declare the input's µm per pixel (plain images)")
    p.add_argument("--overlap", type=int, default=64, help="tile overlap in model pixels")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--all-tiles", action="store_true", help="do not skip tiles without tissue")
    p.add_argument("--table", default=None, help="write the per-nucleus table here (CSV)")
    p.add_argument("--normalized", default=None, help="write the stain-normalised image here (TIFF, model grid)")
    p.add_argument("--overlay", default=None, help="write a PNG of the region with nucleus outlines")
    p.add_argument("--work-dir", default=None, help="folder for memory-mapped intermediates (default: beside --out)")
    p.set_defaults(func=_cmd_nuclei)
