"""``pathoseg export`` and ``pathoseg import``: QuPath GeoJSON from the command line.

Where the labels sit on the slide, in this order:

1. ``--origin X,Y``: the labels' top-left corner in level-0 pixels, x first, like
   ``pathoseg nuclei --region x,y,w,h`` (``--level`` says the labels' level, default 0);
2. the ``region_xywh`` the labels TIFF of ``pathoseg nuclei`` records in its metadata
   (a ``--region`` crop is placed without any option);
3. the slide level whose size equals the labels' (``--level`` to choose it).

The old ``--origin ROW COL`` (two numbers, in the level's pixels) is still accepted with a
deprecation line on stderr.

Outputs never replace an input (:func:`napari_pathoseg._atomic.check_output`). The
measurement table goes to ``--table PATH`` (replaced if it exists: it was asked for), or by
default to ``OUT.csv`` beside the GeoJSON unless a file there is not a table an export
wrote (e.g. the table of ``pathoseg nuclei --table``): then the export refuses and says so.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathoseg._atomic import check_output
from napari_pathoseg.cli._driver import drive, print_json
from napari_pathoseg.errors import PathosegError
from napari_pathoseg.export._output import ExportError
from napari_pathoseg.export.coords import LevelTransform
from napari_pathoseg.export.labels_export import iter_export_labels
from napari_pathoseg.export.qupath import ExportResult
from napari_pathoseg.export.raster import write_labels_tiff
from napari_pathoseg.export.reader import read_geojson, read_members
from napari_pathoseg.export.slide_record import check_same_slide, slide_from_members

__all__ = ["add_commands", "load_labels", "load_labels_float", "labels_region"]

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


def labels_region(path: str | Path) -> dict[str, Any] | None:
    """The placement a labels TIFF of ``pathoseg nuclei`` records in its metadata, or None.

    Returns
    -------
    dict or None
        ``{"region_xywh": (x, y, w, h), "level0": bool, "model": str or None}``: the
        region in level-0 pixels; ``level0`` False means the labels are at the model's
        resolution over that region. None for other files or TIFFs without a region.

    Raises
    ------
    ExportError
        The recorded region is not four numbers with a positive size.
    """
    path = Path(path)
    if not path.name.lower().endswith((".tif", ".tiff")):
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            shaped = tf.shaped_metadata
    except Exception:  # unreadable files are reported by load_labels
        return None
    if not shaped or not isinstance(shaped[0], dict) or "region_xywh" not in shaped[0]:
        return None
    md = shaped[0]
    region = md["region_xywh"]
    ok = isinstance(region, (list, tuple)) and len(region) == 4
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in region)
    if not ok or region[2] <= 0 or region[3] <= 0:
        raise ExportError(f"{path}: its metadata region_xywh {region!r} is not x,y,w,h; pass --origin X,Y (and --level) instead")
    model = md.get("model")
    return {"region_xywh": tuple(float(v) for v in region), "level0": bool(md.get("level0", True)),
            "model": str(model) if model else None}


def load_labels_float(path: str | Path) -> Any:
    """A 2-D probability map (same readers as :func:`load_labels`, any numeric dtype)."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no such probability file")
    if path.name.lower().endswith(".npy"):
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ExportError(f"{path}: cannot read the probability map ({exc}); save it as a numeric .npy or .tif") from None
    else:
        import tifffile

        try:
            arr = tifffile.imread(path)
        except Exception as exc:
            raise ExportError(f"{path}: cannot read the probability map ({exc})") from None
    if arr.ndim != 2:
        raise ExportError(f"{path}: the probability map must be 2-D (rows, cols), got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise ExportError(f"{path}: the probability map must hold numbers, got dtype {arr.dtype}")
    return arr


def _infer_level(slide: Any, shape: tuple[int, int], path: Path) -> int:
    for level, (w, h) in enumerate(slide.metadata.level_dimensions):
        if (h, w) == tuple(shape):
            return level
    dims = ", ".join(f"{h}x{w}" for w, h in slide.metadata.level_dimensions)
    raise ExportError(
        f"{path}: labels of {shape[0]}x{shape[1]} match no level of the slide ({dims} rows x cols); "
        "for a crop pass --origin X,Y (its top-left corner in level-0 pixels, like --region) and --level"
    )


def _check_level(slide: Any, level: int, slide_path: str) -> None:
    """Refuse a ``--level`` the slide does not have."""
    if not 0 <= level < slide.level_count:
        raise ExportError(f"--level {level} does not exist in {slide_path} (levels 0..{slide.level_count - 1})")


def _parse_origin(tokens: list[str] | None) -> tuple[str, tuple[float, float]] | None:
    """``("xy", (x, y))`` for ``--origin X,Y``; ``("rowcol", (row, col))`` for the deprecated two-number form."""
    if tokens is None:
        return None
    text = " ".join(tokens)
    try:
        if len(tokens) == 1 and tokens[0].count(",") == 1:
            x, y = (float(v) for v in tokens[0].split(","))
            kind, values = "xy", (x, y)
        elif len(tokens) == 2 and not any("," in t for t in tokens):
            kind, values = "rowcol", (float(tokens[0]), float(tokens[1]))
        else:
            raise ValueError
    except ValueError:
        raise ExportError(f"--origin takes X,Y in level-0 pixels, like --region x,y,w,h; got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise ExportError(f"--origin must be finite numbers, got {text!r}")
    return kind, values


def _placement(args: argparse.Namespace, slide: Any, shape: tuple[int, int], labels_path: Path) -> dict[str, Any]:
    """``level``/``downsample``/``origin`` keyword arguments of the export, and how they were found."""
    meta = slide.metadata
    origin = _parse_origin(args.origin)
    recorded = labels_region(labels_path)
    rows, cols = shape
    if args.level is not None:
        _check_level(slide, args.level, args.slide)
    if origin is not None and origin[0] == "rowcol":
        row, col = origin[1]
        level = args.level if args.level is not None else _infer_level(slide, shape, labels_path)
        ds = float(meta.level_downsamples[level])
        sys.stderr.write(
            f"pathoseg export: warning: --origin ROW COL is deprecated; write --origin X,Y in level-0 pixels "
            f"(x first, like --region): here --origin {col * ds:g},{row * ds:g}\n"
        )
        return {"level": level, "downsample": None, "origin": (row, col), "placement": "--origin ROW COL (deprecated)"}
    if origin is not None:
        x, y = origin[1]
        level = args.level if args.level is not None else 0
        ds = float(meta.level_downsamples[level])
        return {"level": level, "downsample": None, "origin": (y / ds, x / ds), "placement": "--origin"}
    if recorded is not None:
        x, y, w, h = recorded["region_xywh"]
        if args.level is not None:
            ds = float(meta.level_downsamples[args.level])
            return {"level": args.level, "downsample": None, "origin": (y / ds, x / ds),
                    "placement": "region_xywh of the labels", "model": recorded["model"]}
        if recorded["level0"]:
            if (rows, cols) != (int(round(h)), int(round(w))):
                raise ExportError(
                    f"{labels_path}: labels of {rows}x{cols} but its metadata says a level-0 region of {int(h)}x{int(w)} "
                    "(rows x cols); pass --origin X,Y and --level"
                )
            return {"level": 0, "downsample": None, "origin": (y, x), "placement": "region_xywh of the labels",
                    "model": recorded["model"]}
        ds_r, ds_c = h / rows, w / cols  # labels at the model's grid over the region
        return {"level": 0, "downsample": (ds_r, ds_c), "origin": (y / ds_r, x / ds_c),
                "placement": "region_xywh of the labels (model resolution)", "model": recorded["model"]}
    level = args.level if args.level is not None else _infer_level(slide, shape, labels_path)
    return {"level": level, "downsample": None, "origin": (0.0, 0.0), "placement": "--level" if args.level is not None else "size"}


def _check_inside(meta: Any, place: dict[str, Any], shape: tuple[int, int], labels_path: Path) -> tuple[float, float]:
    """Refuse labels placed beyond the slide; returns their top-left ``(x, y)`` in level-0 pixels."""
    ds = place["downsample"] or float(meta.level_downsamples[place["level"]])
    ds_r, ds_c = (ds, ds) if np.isscalar(ds) else ds
    top, left = place["origin"][0] * ds_r, place["origin"][1] * ds_c
    bottom, right = top + shape[0] * ds_r, left + shape[1] * ds_c
    w0, h0 = meta.level_dimensions[0]
    if top < -ds_r or left < -ds_c or bottom > h0 + ds_r or right > w0 + ds_c:
        raise ExportError(
            f"{labels_path}: placed at x {left:.0f}..{right:.0f}, y {top:.0f}..{bottom:.0f} (level-0 pixels) the labels "
            f"extend beyond the slide ({w0} x {h0}); check --origin X,Y (x first, level-0 pixels, like --region) and --level"
        )
    return left, top


def _table_option(args: argparse.Namespace, out: Path, inputs: list[Any]) -> Any:
    """``measurements_path`` of the export: False, an explicit path, or True (``OUT.csv`` beside, if free)."""
    if args.no_measure or args.no_table:
        return False
    if args.table:
        return check_output(args.table, inputs=[*inputs, out], what="--table", kind="csv", need_folder=True)
    check_output(out.with_suffix(".csv"), inputs=inputs, what="the table beside --out", kind="csv", need_folder=True)
    return True


def _cmd_export(args: argparse.Namespace) -> int:
    from napari_pathoseg.wsi.slide import open_slide

    labels_path = Path(args.labels)
    inputs = [labels_path, args.slide, args.probability]
    out = check_output(args.out, inputs=inputs, what="--out", kind="json", need_folder=True)
    table = _table_option(args, out, inputs)
    labels = load_labels(labels_path)
    prob = load_labels_float(args.probability) if args.probability else None
    with open_slide(args.slide) as slide:
        place = _placement(args, slide, tuple(labels.shape), labels_path)
        origin_xy = _check_inside(slide.metadata, place, tuple(labels.shape), labels_path)
        measure = None
        if args.no_measure:
            measure = []
        elif args.measure:
            measure = [m.strip() for m in args.measure.split(",") if m.strip()]
        model = args.model or place.get("model")
        kwargs = dict(
            slide=slide,
            level=place["level"],
            downsample=place["downsample"],
            origin=place["origin"],
            object_type=args.object_type,
            classification=args.class_name,
            color=args.color,
            measure=measure,
            probability=prob,
            metadata={"model": model} if model else None,
            measurements_path=table,
        )
        res = drive(lambda token: iter_export_labels(out, labels, cancel=token, **kwargs), ExportResult, label="pathoseg export")
    result = res.to_dict()
    result.update({
        "labels": str(labels_path), "slide": str(args.slide), "level": place["level"],
        "origin_xy": [round(origin_xy[0], 3), round(origin_xy[1], 3)], "placement": place["placement"],
    })
    print_json(result)
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from napari_pathoseg.wsi.slide import open_slide

    out = check_output(args.out, inputs=[args.geojson, args.slide], what="--out", kind="tiff", need_folder=True)
    with open_slide(args.slide) as slide:
        meta = slide.metadata
        _check_level(slide, args.level, args.slide)
        if Path(args.geojson).is_file():
            check_same_slide(slide_from_members(read_members(args.geojson), path=args.geojson), meta, path=args.geojson)
        objects = read_geojson(args.geojson, slide_metadata=meta, repair=args.repair)
        if args.object_type:
            objects = [o for o in objects if o.object_type == args.object_type]
        w, h = meta.level_dimensions[args.level]
        transform = LevelTransform.for_slide(meta, level=args.level)
        out = write_labels_tiff(out, objects, shape=(h, w), transform=transform)
    counts: dict[str, int] = {}
    for o in objects:
        key = o.classification.name if o.classification else ""
        counts[key] = counts.get(key, 0) + 1
    print_json({
        "geojson": str(args.geojson),
        "slide": str(args.slide),
        "out": str(out),
        "level": args.level,
        "shape": [h, w],
        "n_objects": len(objects),
        "classes": counts,
    })
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
        help="label image -> QuPath GeoJSON (+ measurements CSV)",
        description=(
            "Export a label image (one id per object) over SLIDE to QuPath GeoJSON, with a CSV of measurements. "
            "Labels of `pathoseg nuclei --region` are placed from their TIFF metadata; other crops need --origin X,Y."
        ),
    )
    p.add_argument("labels", help="label image: .tif/.tiff (lazy), .png, .npy or .zarr")
    p.add_argument("--slide", required=True, help="the slide the labels were computed on")
    p.add_argument("--out", required=True, help="output .geojson (never one of the inputs)")
    p.add_argument("--class", dest="class_name", default="Nucleus", help="class name (default: Nucleus)")
    p.add_argument("--color", type=_color, default=None, help="class colour R,G,B (default: QuPath's / derived from the name)")
    p.add_argument("--object-type", choices=["detection", "annotation", "cell", "tile"], default="detection")
    p.add_argument("--level", type=int, default=None,
                   help="slide level of the labels (default: from the labels' metadata, else matched by size; 0 with --origin)")
    p.add_argument("--origin", nargs="+", default=None, metavar="X,Y",
                   help="top-left corner of the labels in level-0 pixels, x first, like --region "
                        "(default: the region recorded in a `pathoseg nuclei` labels TIFF, else 0,0)")
    p.add_argument("--probability", default=None, help="probability map (.npy/.tif) of the labels' shape, for Confidence")
    p.add_argument("--measure", default=None,
                   help="comma-separated: area,perimeter,eccentricity,solidity,hematoxylin,eosin,confidence")
    p.add_argument("--no-measure", action="store_true", help="geometry only: no measurements, no CSV")
    p.add_argument("--table", default=None,
                   help="write the measurement CSV here (default: OUT.csv beside --out, never over a file an export did not write)")
    p.add_argument("--no-table", action="store_true", help="measurements in the GeoJSON only, no CSV")
    p.add_argument("--model", default=None, help="model name written in each object's metadata (default: the labels' model)")
    p.set_defaults(func=_cmd_export)

    p = subparsers.add_parser(
        "import",
        help="QuPath GeoJSON -> label image (tiled TIFF) at a slide level",
        description="Rasterise the polygons of a QuPath GeoJSON over SLIDE into a tiled label TIFF (labels 1..n in file order).",
    )
    p.add_argument("geojson", help="QuPath GeoJSON (0.4+ or older)")
    p.add_argument("--slide", required=True, help="the slide the objects belong to")
    p.add_argument("--out", required=True, help="output label .tif (never one of the inputs)")
    p.add_argument("--level", type=int, default=0, help="slide level of the output (default 0)")
    p.add_argument("--object-type", choices=["detection", "annotation", "cell", "tile", "tmaCore"], default=None,
                   help="keep only objects of this type")
    p.add_argument("--repair", action="store_true", help="repair invalid polygons instead of failing")
    p.set_defaults(func=_cmd_import)
