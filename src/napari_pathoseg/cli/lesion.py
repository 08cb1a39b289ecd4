"""``pathoseg lesion``: lesion probability map, mask and regions of a slide or image (M3).

The probability is written as a TIFF: uint8 0-255 (probability x 255, default) or float32 0-1
(``--float``). A plain image (one level, both sides <= 8192 px) gets it on its own pixel grid
(the region's); a slide gets it at the inference level (the model's µm/px), with the µm/px,
region and scale in the TIFF metadata. The JSON summary on stdout gives the lesion area (µm²),
the fraction of the tissue and the number of regions. Ctrl-C stops after the current batch and
writes the finished part.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from napari_pathoseg._atomic import OutputError, check_output
from napari_pathoseg.cli._driver import drive, existing_file, nonnegative_int, positive_float, positive_int, print_json
from napari_pathoseg.cli.nuclei import _parse_region
from napari_pathoseg.errors import PathosegError

__all__ = ["add_commands", "PLAIN_MAX_SIDE"]

#: A single-level input up to this side is a plain image: outputs on its own pixel grid.
PLAIN_MAX_SIDE = 8192


def _threshold(text: str) -> float:
    from napari_pathoseg.methods.lesion.detect import check_threshold

    try:
        return check_threshold(text)
    except PathosegError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_lesion(args: argparse.Namespace) -> int:
    from napari_pathoseg.methods.lesion.detect import (
        LesionResult,
        export_regions_geojson,
        iter_detect_lesions,
        write_mask_tiff,
        write_probability_tiff,
    )
    from napari_pathoseg.models.registry import load_model
    from napari_pathoseg.wsi.slide import open_slide

    outs: dict[str, Path] = {}
    for key in ("out", "mask", "geojson"):
        value = getattr(args, key)
        if value:
            kind = "json" if key == "geojson" else "tiff"
            p = check_output(value, inputs=[args.input], what=f"--{key}", kind=kind, need_folder=True)
            for other, q in outs.items():
                if p.resolve() == q.resolve():
                    raise OutputError(f"--{key} and --{other} are the same file {p}; give each output its own path")
            outs[key] = p
    region = _parse_region(args.region)
    model = load_model(args.model, task="lesion")
    dtype = "float32" if args.float else "uint8"
    with open_slide(args.input) as slide, tempfile.TemporaryDirectory(prefix=".lesion-", dir=str(outs["out"].parent)) as wd:
        w0, h0 = slide.metadata.level_dimensions[0]
        plain = slide.level_count == 1 and max(w0, h0) <= PLAIN_MAX_SIDE
        rw, rh = (region[2], region[3]) if region else (w0, h0)

        def save(result: LesionResult) -> dict[str, Any]:
            grid = (min(rh, h0), min(rw, w0)) if plain else None
            info = {"probability": str(write_probability_tiff(result, outs["out"], dtype=dtype, grid=grid)),
                    "probability_encoding": "uint8 0-255 = probability x 255" if dtype == "uint8" else "float32 0-1",
                    "grid": "input pixels" if plain else f"inference level ({result.mpp:g} µm/px)"}
            if "mask" in outs:
                info["mask"] = str(write_mask_tiff(result, outs["mask"], grid=grid))
            if "geojson" in outs:
                info["geojson"] = str(outs["geojson"])
                info["geojson_regions"] = export_regions_geojson(result, slide, outs["geojson"])
            return info

        def save_partial(result: LesionResult) -> str:
            saved = save(result)
            return (f"stopped after {result.tiles} of {result.tiles_total} tiles; the finished part was saved to "
                    f"{saved['probability']}")

        result = drive(
            lambda token: iter_detect_lesions(
                slide, model, mpp=args.mpp, region=region, threshold=args.threshold,
                fill_holes=not args.no_fill_holes, min_area_um2=args.min_area, overlap=args.overlap,
                batch_size=args.batch, tissue_only=False if (args.all_tiles or plain) else None, work_dir=wd, cancel=token,
            ),
            LesionResult,
            on_cancelled=save_partial,
            label="pathoseg lesion",
        )
        info = {"input": str(args.input), **result.summary(), **save(result)}
        del result
    print_json(info)
    return 0


def add_commands(subparsers: Any) -> None:
    """Register ``pathoseg lesion``."""
    p = subparsers.add_parser("lesion", help="lesion probability map, mask and regions of a slide or image (M3)")
    p.add_argument("input", type=existing_file, help="slide or image file")
    p.add_argument("--out", required=True, help="probability TIFF (uint8 0-255 by default; --float for float32 0-1)")
    p.add_argument("--mask", default=None, help="also write the lesion mask here (TIFF, uint8 0/1, same grid)")
    p.add_argument("--geojson", default=None, help="also export the lesion regions here (QuPath GeoJSON annotations)")
    p.add_argument("--model", default="lesion-lite", help="lesion model name or .safetensors checkpoint")
    p.add_argument("--mpp", type=positive_float(high=100.0), default=None, help="declare the input's µm per pixel")
    p.add_argument("--threshold", type=_threshold, default=0.5, help="probability threshold of the mask, 0-1 (0.5)")
    p.add_argument("--region", default=None, help="x,y,w,h in level-0 pixels (default: the whole slide)")
    p.add_argument("--min-area", type=positive_float(high=1e12), default=0.0,
                   help="remove lesion regions smaller than this many µm² (default: keep all)")
    p.add_argument("--no-fill-holes", action="store_true", help="keep holes inside lesion regions")
    p.add_argument("--float", action="store_true", help="write the probability as float32 0-1")
    p.add_argument("--overlap", type=nonnegative_int, default=32, help="tile overlap in model pixels")
    p.add_argument("--batch", type=positive_int, default=4, help="tiles per network call")
    p.add_argument("--all-tiles", action="store_true", help="do not skip slide tiles without tissue")
    p.set_defaults(func=_cmd_lesion)
