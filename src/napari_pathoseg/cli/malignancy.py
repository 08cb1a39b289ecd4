"""``pathoseg malignancy``: malignant probability, tile heat map and region mask of a slide or image (M1).

``--json OUT.json`` gets the result: ``probability`` (a plain image: classifier C on the whole
image; a slide: the top-k mean of its tissue tiles, see ``docs/malignancy.md``), ``label``
(``malignant`` when the probability reaches ``--threshold``), ``tiles`` (level-0 ``x, y, w, h``
and C's ``probability`` of every tile that ran), the malignant area and its share of the tissue,
the scale and the model. ``--mask`` writes segmenter B's malignant region as a uint8 0/1 TIFF:
on the input's own pixel grid for a plain image (one level, both sides <= 8192 px), at the
inference level (the model's µm/px, scale and region in the TIFF metadata) for a slide.
``--heatmap`` writes C's tile probabilities as a float32 TIFF (NaN where no tile ran): one pixel
per tile for a slide, the input's pixels for a plain image. The same JSON is printed on stdout.
Ctrl-C stops after the current batch and saves the finished tiles.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from napari_pathoseg._atomic import OutputError, atomic_path, check_output
from napari_pathoseg.cli._driver import (
    drive,
    existing_file,
    fraction,
    mpp_value,
    positive_int,
    print_json,
)
from napari_pathoseg.cli.nuclei import _parse_region

__all__ = ["DEFAULT_MODEL", "PLAIN_MAX_SIDE", "add_commands"]

#: A single-level input up to this side is a plain image: C on the whole image, outputs on its pixel grid.
PLAIN_MAX_SIDE = 8192
DEFAULT_MODEL = "malignancy-lite"


def _outputs(args: argparse.Namespace) -> dict[str, Path]:
    kinds = {"json": "json", "mask": "tiff", "heatmap": "tiff"}
    outs: dict[str, Path] = {}
    for key, kind in kinds.items():
        value = getattr(args, key)
        if not value:
            continue
        p = check_output(value, inputs=[args.input], what=f"--{key}", kind=kind, need_folder=True)
        for other, q in outs.items():
            if p.resolve() == q.resolve():
                raise OutputError(f"--{key} and --{other} are the same file {p}; give each output its own path")
        outs[key] = p
    return outs


def _cmd_malignancy(args: argparse.Namespace) -> int:
    from napari_pathoseg.methods.malignancy.slide import (
        MalignancyResult,
        iter_malignancy,
        write_heatmap_tiff,
        write_mask_tiff,
    )
    from napari_pathoseg.models.registry import load_model
    from napari_pathoseg.wsi.slide import open_slide

    outs = _outputs(args)
    region = _parse_region(args.region)
    model = load_model(args.model, task="malignancy")
    with open_slide(args.input) as slide, \
            tempfile.TemporaryDirectory(prefix=".malignancy-", dir=str(outs["json"].parent)) as wd:
        w0, h0 = slide.metadata.level_dimensions[0]
        plain = slide.level_count == 1 and max(w0, h0) <= PLAIN_MAX_SIDE

        def save(result: MalignancyResult) -> dict[str, Any]:
            _x, _y, rw, rh = result.region
            grid = (rh, rw) if plain else None
            info: dict[str, Any] = {"input": str(args.input), "kind": "plain image" if plain else "slide",
                                    **result.summary(), "tiles": result.tile_table()}
            info["grid"] = "input pixels" if plain else f"inference level ({result.mpp:g} µm/px, scale {result.scale:g})"
            if "mask" in outs:
                info["mask"] = str(write_mask_tiff(result, outs["mask"], grid=grid))
            if "heatmap" in outs:
                info["heatmap"] = str(write_heatmap_tiff(result, outs["heatmap"], grid=grid))
            info["json"] = str(outs["json"])
            with atomic_path(outs["json"]) as tmp:
                Path(tmp).write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
            return info

        def save_partial(result: MalignancyResult) -> str:
            save(result)
            return f"stopped after {result.tiles} of {result.tiles_total} tiles; the finished tiles were saved to {outs['json']}"

        result = drive(
            lambda token: iter_malignancy(
                slide, model=model, region=region, mpp=args.mpp, whole_image=plain, threshold=args.threshold,
                mask_threshold=args.mask_threshold, gate=args.gate, pooling=args.pooling, tissue_only=False if (plain or args.all_tiles) else None,
                with_mask="mask" in outs or not args.no_mask, batch_size=args.batch, work_dir=wd, cancel=token,
            ),
            MalignancyResult,
            on_cancelled=save_partial,
            label="pathoseg malignancy",
        )
        info = save(result)
        del result
    print_json({k: v for k, v in info.items() if k != "tiles"} | {"tiles": len(info["tiles"])})
    return 0


def add_commands(subparsers: Any) -> None:
    """Register ``pathoseg malignancy``."""
    p = subparsers.add_parser("malignancy", help="malignant probability, tile heat map and region mask of a slide or image (M1)")
    p.add_argument("input", type=existing_file, help="slide or image file")
    p.add_argument("--json", required=True, help="result JSON: probability, label, tiles, areas, scale, model")
    p.add_argument("--mask", default=None, help="also write B's malignant region here (TIFF, uint8 0/1)")
    p.add_argument("--heatmap", default=None, help="also write C's tile probabilities here (TIFF, float32, NaN off tissue)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"malignancy model name or .safetensors checkpoint ({DEFAULT_MODEL})")
    p.add_argument("--mpp", type=mpp_value, default=None, help="declare the input's µm per pixel")
    p.add_argument("--region", default=None, help="x,y,w,h in level-0 pixels (default: the whole input)")
    p.add_argument("--threshold", type=fraction, default=None, help="call threshold on the probability, 0-1 (the model's, 0.5)")
    p.add_argument("--mask-threshold", type=fraction, default=None, help="threshold on B's probability, 0-1 (the model's, 0.5)")
    p.add_argument("--gate", action="store_true",
                   help="keep B's region only inside tiles C calls malignant (B alone outlines benign glands too)")
    p.add_argument("--pooling", choices=("topk", "max", "mean"), default="topk",
                   help="slide probability from the tile probabilities: mean of the top 10 %% (default), max or mean")
    p.add_argument("--no-mask", action="store_true", help="skip segmenter B when no --mask is asked (heat map and call only)")
    p.add_argument("--batch", type=positive_int, default=4, help="tiles per network call")
    p.add_argument("--all-tiles", action="store_true", help="do not skip slide tiles without tissue")
    p.set_defaults(func=_cmd_malignancy)
