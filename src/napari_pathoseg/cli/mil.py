"""``pathoseg mil``: the slide call of a slide or image and its tile heat map (M4).

``OUT.json`` holds the slide ``probability`` and ``label``, how they were made (``pooling``,
``model``, ``mpp``, tile size, entropy threshold) and ``tiles``: every tissue tile kept by the
entropy filter, with its level-0 ``x``, ``y``, ``w``, ``h`` and positive ``probability``.
``--heatmap`` writes the tile probabilities as a float32 TIFF with one pixel per tile (NaN where
no tissue tile ran; µm per pixel in the resolution tags, level-0 origin and cell size in the
metadata). Glass is dropped by M4's entropy filter (``--tissue-mask`` also skips tiles off the
slide's tissue mask first: faster on slides with much glass). Stdout gets the same summary without the tile list. Ctrl-C stops after the current
batch and saves the call of the finished tiles (marked ``"cancelled": true``), exit 130.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from napari_pathoseg._atomic import OutputError, check_output, write_json
from napari_pathoseg.cli._driver import (
    drive,
    existing_file,
    mpp_value,
    positive_int,
    print_json,
)
from napari_pathoseg.cli.nuclei import _parse_region

__all__ = ["DEFAULT_MODEL", "add_commands"]

#: The shipped slide classifier.
DEFAULT_MODEL = "slidecls-crc-lite"


def _outputs(args: argparse.Namespace) -> dict[str, Path]:
    outs = {"json": check_output(args.json, inputs=[args.input], what="--json", kind="json", need_folder=True)}
    if args.heatmap:
        heat = check_output(args.heatmap, inputs=[args.input], what="--heatmap", kind="tiff", need_folder=True)
        if heat.resolve() == outs["json"].resolve():
            raise OutputError(f"--heatmap and --json are the same file {heat}; give each output its own path")
        outs["heatmap"] = heat
    return outs


def _cmd_mil(args: argparse.Namespace) -> int:
    from napari_pathoseg.methods.mil.classify import (
        ClassifyResult,
        iter_classify,
        write_heatmap_tiff,
    )
    from napari_pathoseg.models.registry import load_model
    from napari_pathoseg.wsi.slide import open_slide

    outs = _outputs(args)
    region = _parse_region(args.region)
    model = load_model(args.model, task="slide")

    def save(result: ClassifyResult) -> dict[str, Any]:
        doc = {"input": str(args.input), **result.summary()}
        saved = {"json": str(write_json(outs["json"], doc))}
        if "heatmap" in outs:
            saved["heatmap"] = str(write_heatmap_tiff(result, outs["heatmap"]))
        return saved

    def save_partial(result: ClassifyResult) -> str:
        saved = save(result)
        return (f"stopped after {result.tiles_run} of {result.tiles_total} tiles; the call of the finished tiles "
                f"was saved to {saved['json']}")

    with open_slide(args.input) as slide:
        result = drive(
            lambda token: iter_classify(slide, model=model, mpp=args.mpp, region=region, batch_size=args.batch,
                                        tissue_mask=args.tissue_mask, cancel=token),
            ClassifyResult,
            on_cancelled=save_partial,
            label="pathoseg mil",
        )
        saved = save(result)
    print_json({"input": str(args.input), **result.summary(with_tiles=False), **saved})
    return 0


def add_commands(subparsers: Any) -> None:
    """Register ``pathoseg mil``."""
    p = subparsers.add_parser("mil", help="slide classification (M4): slide call, probability and tile heat map")
    p.add_argument("input", type=existing_file, help="slide or image file")
    p.add_argument("--json", required=True, help="write the call and every tissue tile's probability here (JSON)")
    p.add_argument("--heatmap", default=None, help="also write the tile heat map here (float32 TIFF, one pixel per tile)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"slide model name or .safetensors checkpoint ({DEFAULT_MODEL})")
    p.add_argument("--mpp", type=mpp_value, default=None, help="declare the input's µm per pixel")
    p.add_argument("--region", default=None, help="x,y,w,h in level-0 pixels (default: the whole slide)")
    p.add_argument("--batch", type=positive_int, default=16, help="tiles per network call (16)")
    p.add_argument("--tissue-mask", action="store_true",
                   help="skip tiles off the slide's tissue mask before the entropy filter (faster on slides with much "
                        "glass; drops some pale tissue)")
    p.set_defaults(func=_cmd_mil)
