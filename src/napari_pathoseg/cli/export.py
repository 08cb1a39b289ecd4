"""``pathoseg export`` and ``pathoseg import``: QuPath GeoJSON from the command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.export.geojson import ExportError, LevelTransform, read_geojson, run_export_labels, write_labels_tiff

__all__ = ["add_commands", "load_labels"]

logger = logging.getLogger(__name__)


def load_labels(path: str | Path) -> Any:
    """A 2-D label image from ``.tif/.tiff`` (lazy, via zarr), ``.png``, ``.npy`` or ``.zarr``.

    Returns
    -------
    numpy or dask (rows, cols) integer array
        For pyramidal TIFF / zarr groups, the full-resolution level.
    """
    import dask.array as da

    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no such label file")
    name = path.name.lower()
    try:
        if name.endswith((".tif", ".tiff")):
            import tifffile
            import zarr

            store = tifffile.imread(path, aszarr=True)
            z = zarr.open(store, mode="r")
            arr = z[0] if isinstance(z, zarr.Group) else z
            labels = da.from_zarr(arr)
        elif name.endswith(".npy"):
            labels = np.load(path, mmap_mode="r", allow_pickle=False)
        elif name.endswith(".zarr") or path.is_dir():
            import zarr

            z = zarr.open(str(path), mode="r")
            labels = da.from_zarr(z[sorted(z.array_keys())[0]] if isinstance(z, zarr.Group) else z)
        elif name.endswith(".png"):
            from PIL import Image

            with Image.open(path) as im:
                labels = np.asarray(im)
        else:
            raise ExportError(f"{path}: unsupported label file; use .tif, .png, .npy or .zarr")
    except PathosegError:
        raise
    except Exception as exc:  # readers raise many types on damaged files
        raise ExportError(f"{path}: cannot read the label image ({exc})") from None
    if labels.ndim == 3 and labels.shape[0] == 1:
        labels = labels[0]
    if labels.ndim != 2:
        raise ExportError(f"{path}: a label image must be 2-D, got shape {tuple(labels.shape)}")
    return labels


def _infer_level(slide: Any, shape: tuple[int, int], path: Path) -> int:
    for level, (w, h) in enumerate(slide.metadata.level_dimensions):
        if (h, w) == tuple(shape):
            return level
    dims = ", ".join(f"{h}x{w}" for w, h in slide.metadata.level_dimensions)
    raise ExportError(
        f"{path}: labels of {shape[0]}x{shape[1]} match no level of the slide ({dims} rows x cols); "
        "pass --level (and --origin ROW COL for a crop)"
    )


def _check_level(slide: Any, level: int, slide_path: str) -> None:
    """Refuse a ``--level`` the slide does not have."""
    if not 0 <= level < slide.level_count:
        raise ExportError(f"--level {level} does not exist in {slide_path} (levels 0..{slide.level_count - 1})")


def _print_json(result: dict[str, Any]) -> None:
    """A command's result on stdout, as indented JSON."""
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _cmd_export(args: argparse.Namespace) -> int:
    from napari_pathoseg.wsi.slide import open_slide

    labels_path = Path(args.labels)
    labels = load_labels(labels_path)
    prob = load_labels_float(args.probability) if args.probability else None
    with open_slide(args.slide) as slide:
        level = args.level if args.level is not None else _infer_level(slide, labels.shape, labels_path)
        _check_level(slide, level, args.slide)
        measure = None
        if args.no_measure:
            measure = []
        elif args.measure:
            measure = [m.strip() for m in args.measure.split(",") if m.strip()]
        metadata = {}
        if args.model:
            metadata["model"] = args.model
        res = run_export_labels(
            args.out,
            labels,
            slide=slide,
            level=level,
            origin=tuple(args.origin),
            object_type=args.object_type,
            classification=args.class_name,
            color=args.color,
            measure=measure,
            probability=prob,
            metadata=metadata or None,
            measurements_path=not args.no_measure,
        )
    out = res.to_dict()
    out.update({"labels": str(labels_path), "slide": str(args.slide), "level": level})
    _print_json(out)
    return 0


def load_labels_float(path: str | Path) -> Any:
    """A 2-D probability map (same readers as :func:`load_labels`, any numeric dtype)."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no such probability file")
    if path.name.lower().endswith(".npy"):
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    else:
        import tifffile

        try:
            arr = tifffile.imread(path)
        except Exception as exc:
            raise ExportError(f"{path}: cannot read the probability map ({exc})") from None
    if arr.ndim != 2:
        raise ExportError(f"{path}: the probability map must be 2-D (rows, cols), got shape {arr.shape}")
    return arr


def _cmd_import(args: argparse.Namespace) -> int:
    from napari_pathoseg.wsi.slide import open_slide

    with open_slide(args.slide) as slide:
        meta = slide.metadata
        _check_level(slide, args.level, args.slide)
        objects = read_geojson(args.geojson, slide_metadata=meta, repair=args.repair)
        if args.object_type:
            objects = [o for o in objects if o.object_type == args.object_type]
        w, h = meta.level_dimensions[args.level]
        transform = LevelTransform.for_slide(meta, level=args.level)
        out = write_labels_tiff(args.out, objects, shape=(h, w), transform=transform)
    counts: dict[str, int] = {}
    for o in objects:
        key = o.classification.name if o.classification else ""
        counts[key] = counts.get(key, 0) + 1
    result = {
        "geojson": str(args.geojson),
        "slide": str(args.slide),
        "out": str(out),
        "level": args.level,
        "shape": [h, w],
        "n_objects": len(objects),
        "classes": counts,
    }
    _print_json(result)
    return 0


def _color(text: str) -> tuple[int, int, int]:
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"colour must be R,G,B with integers 0-255, got {text!r}") from None
    if len(parts) != 3 or min(parts) < 0 or max(parts) > 255:
        raise argparse.ArgumentTypeError(f"colour must be R,G,B with integers 0-255, got {text!r}")
    return tuple(parts)  # type: ignore[return-value]


def add_commands(subparsers: Any) -> None:
    """Register ``export`` and ``import`` on the ``pathoseg`` parser."""
    p = subparsers.add_parser(
        "export",
        help="label image -> QuPath GeoJSON (+ measurements CSV beside it)",
        description="Export a label image (one id per object) over SLIDE to QuPath GeoJSON, with a CSV of measurements.",
    )
    p.add_argument("labels", help="label image: .tif/.tiff (lazy), .png, .npy or .zarr")
    p.add_argument("--slide", required=True, help="the slide the labels were computed on")
    p.add_argument("--out", required=True, help="output .geojson (the CSV goes beside it)")
    p.add_argument("--class", dest="class_name", default="Nucleus", help="class name (default: Nucleus)")
    p.add_argument("--color", type=_color, default=None, help="class colour R,G,B (default: QuPath's / derived from the name)")
    p.add_argument("--object-type", choices=["detection", "annotation", "cell", "tile"], default="detection")
    p.add_argument("--level", type=int, default=None, help="slide level of the labels (default: matched by size)")
    p.add_argument("--origin", type=float, nargs=2, default=(0.0, 0.0), metavar=("ROW", "COL"),
                   help="offset of the labels in the level's pixels (for crops)")
    p.add_argument("--probability", default=None, help="probability map (.npy/.tif) of the labels' shape, for Confidence")
    p.add_argument("--measure", default=None,
                   help="comma-separated: area,perimeter,eccentricity,solidity,hematoxylin,eosin,confidence")
    p.add_argument("--no-measure", action="store_true", help="geometry only, no CSV")
    p.add_argument("--model", default=None, help="model name written in each object's metadata")
    p.set_defaults(func=_cmd_export)

    p = subparsers.add_parser(
        "import",
        help="QuPath GeoJSON -> label image (tiled TIFF) at a slide level",
        description="Rasterise the polygons of a QuPath GeoJSON over SLIDE into a tiled label TIFF (labels 1..n in file order).",
    )
    p.add_argument("geojson", help="QuPath GeoJSON (0.4+ or older)")
    p.add_argument("--slide", required=True, help="the slide the objects belong to")
    p.add_argument("--out", required=True, help="output label .tif")
    p.add_argument("--level", type=int, default=0, help="slide level of the output (default 0)")
    p.add_argument("--object-type", choices=["detection", "annotation", "cell", "tile", "tmaCore"], default=None,
                   help="keep only objects of this type")
    p.add_argument("--repair", action="store_true", help="repair invalid polygons instead of failing")
    p.set_defaults(func=_cmd_import)
