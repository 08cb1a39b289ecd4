"""``pathoseg nuclei``: segment the nuclei of a slide or image; write uint32 instance labels.

Ctrl-C stops after the current batch of tiles and saves the nuclei of the finished tiles
(labels and table) before exiting with 130.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from napari_pathoseg._atomic import OutputError, check_output
from napari_pathoseg.cli._driver import drive, existing_file, mpp_value, nonnegative_int, positive_int, print_json
from napari_pathoseg.errors import PathosegError
from napari_pathoseg.methods.nuclei.segment import (
    NucleiResult,
    iter_segment_nuclei,
    overlay_picture,
    write_labels_tiff,
    write_normalized_tiff,
    write_table_csv,
)
from napari_pathoseg.wsi.slide import open_slide

__all__ = ["add_commands"]

OUTPUTS = ("out", "table", "normalized", "overlay")


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


#: What each output holds: an existing file of another kind is never replaced.
_KINDS = {"out": "tiff", "table": "csv", "normalized": "tiff", "overlay": "png"}


def _check_outputs(args: argparse.Namespace) -> dict[str, Path]:
    """Every output path given, refused when it names the input or another output."""
    outs: dict[str, Path] = {}
    for key in OUTPUTS:
        value = getattr(args, key)
        if not value:
            continue
        what = f"--{key}"
        p = check_output(value, inputs=[args.input], what=what, kind=_KINDS.get(key), need_folder=True)
        for other, q in outs.items():
            if p.resolve() == q.resolve():
                raise OutputError(f"{what} and --{other} are the same file {p}; give each output its own path")
        outs[key] = p
    return outs


def _save(result: NucleiResult, slide: Any, outs: dict[str, Path]) -> dict[str, Any]:
    info: dict[str, Any] = {"labels": str(write_labels_tiff(result, outs["out"]))}
    if "table" in outs:
        info["table"] = str(write_table_csv(result, outs["table"]))
    if "normalized" in outs:
        info["normalized"] = str(write_normalized_tiff(result, outs["normalized"]))
    if "overlay" in outs:
        from napari_pathoseg.demo import save_png

        info["overlay"] = str(save_png(outs["overlay"], overlay_picture(slide, result)))
    return info


def _cmd_nuclei(args: argparse.Namespace) -> int:
    from napari_pathoseg.models.registry import load_model

    outs = _check_outputs(args)
    if args.work_dir and not Path(args.work_dir).expanduser().is_dir():
        raise OutputError(f"--work-dir {args.work_dir} is not a folder; create it first or leave it out")
    region = _parse_region(args.region)
    model = load_model(args.model)
    work_parent = args.work_dir or str(outs["out"].parent)
    with open_slide(args.input) as slide, tempfile.TemporaryDirectory(prefix=".nuclei-", dir=work_parent) as wd:

        def save_partial(result: NucleiResult) -> str:
            saved = _save(result, slide, {k: v for k, v in outs.items() if k in ("out", "table")})
            return (
                f"stopped after {result.tiles} of {result.tiles_total} tiles; the {result.n_nuclei} nuclei found so far "
                f"were saved to {', '.join(saved.values())}"
            )

        result = drive(
            lambda token: iter_segment_nuclei(
                slide,
                model,
                region=region,
                mpp=args.mpp,
                overlap=args.overlap,
                batch_size=args.batch,
                tissue_only=False if args.all_tiles else None,
                with_normalized=bool(args.normalized),
                work_dir=wd,
                cancel=token,
            ),
            NucleiResult,
            on_cancelled=save_partial,
            label="pathoseg nuclei",
        )
        info: dict[str, Any] = {
            "input": str(args.input),
            "model": result.model,
            "region_xywh": list(result.region),
            "n_nuclei": result.n_nuclei,
            "tiles": result.tiles,
            "model_mpp": result.mpp,
            "timings": result.timings,
            **_save(result, slide, outs),
        }
        del result  # its arrays map files in the work folder, removed next
    print_json(info)
    return 0


def add_commands(subparsers: Any) -> None:
    """Register ``pathoseg nuclei``."""
    p = subparsers.add_parser("nuclei", help="segment nuclei on a slide or image; write uint32 instance labels")
    p.add_argument("input", type=existing_file, help="slide or image file")
    p.add_argument("--out", required=True, help="labels TIFF (uint32, level-0 grid of the region)")
    p.add_argument("--region", default=None, help="x,y,w,h in level-0 pixels (default: the whole slide's tissue)")
    p.add_argument("--model", default="nuclei-lite", help="model name or .safetensors checkpoint")
    p.add_argument("--mpp", type=mpp_value, default=None, help="declare the input's µm per pixel (plain images)")
    p.add_argument("--overlap", type=nonnegative_int, default=64, help="tile overlap in model pixels")
    p.add_argument("--batch", type=positive_int, default=4, help="tiles per network call")
    p.add_argument("--all-tiles", action="store_true", help="do not skip tiles without tissue")
    p.add_argument("--table", default=None, help="write the per-nucleus table here (CSV)")
    p.add_argument("--normalized", default=None, help="write the stain-normalised image here (TIFF, model grid)")
    p.add_argument("--overlay", default=None, help="write a PNG of the region with nucleus outlines")
    p.add_argument("--work-dir", default=None, help="folder for the intermediate label files (default: beside --out)")
    p.set_defaults(func=_cmd_nuclei)
