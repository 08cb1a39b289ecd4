"""npe2 reader and writers for QuPath GeoJSON (plain functions, no napari import).

* :func:`get_geojson_reader` opens ``.geojson`` files: annotations (regions) become a
  Shapes layer, detections/cells a Labels layer (or a Points layer of centroids when
  there are very many), placed over the slide when its metadata is known.
* :func:`write_labels_geojson` and :func:`write_shapes_geojson` are npe2 single-layer
  writers (``File > Save Selected Layer(s)``).

Slide metadata comes from the layer's metadata (``"slide"`` as the slide reader stores
it, or ``"pathoseg_slide"``). The reader places a GeoJSON written by napari-pathoseg over
the slide recorded in it (µm per pixel, bounds: :mod:`.slide_record`), so File > Open puts
its layers where the Export dock's "Open GeoJSON over slide" does; a foreign file is
placed over a slide with the same name beside it (``slide.svs`` for ``slide.geojson``),
else in level-0 pixel units.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import shapely

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.export.coords import LevelTransform, layer_placement, metadata_as_dict, slide_metadata_from_layer, transform_from_layer
from napari_pathoseg.export._output import ExportError
from napari_pathoseg.export.labels_export import run_export_labels
from napari_pathoseg.export.qupath import Classification, GeoJSONObject, class_color
from napari_pathoseg.export.raster import rasterize
from napari_pathoseg.export.reader import read_geojson, read_members
from napari_pathoseg.export.shapes_export import run_export_shapes
from napari_pathoseg.export.slide_record import check_same_slide, slide_from_members

__all__ = [
    "get_geojson_reader",
    "geojson_layer_data",
    "write_labels_geojson",
    "write_shapes_geojson",
    "MAX_LABEL_PIXELS",
    "MAX_LABEL_OBJECTS",
]

logger = logging.getLogger(__name__)

LayerData = tuple[Any, dict[str, Any], str]

#: Detections become a Labels layer only when its bounding box has at most this many pixels ...
MAX_LABEL_PIXELS = 32_000_000
#: ... and there are at most this many of them; otherwise a Points layer of centroids.
MAX_LABEL_OBJECTS = 100_000

_REGION_TYPES = ("annotation", "tmaCore", "tile", "root")


def _is_geojson(path: Any) -> bool:
    return isinstance(path, (str, Path)) and str(path).lower().endswith(".geojson")


def get_geojson_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """npe2 reader hook: a reader for ``.geojson`` paths, None for anything else."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or not all(_is_geojson(p) for p in paths):
        return None
    return _read_paths


def _read_paths(path: str | list[str]) -> list[LayerData]:
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    out: list[LayerData] = []
    for p in paths:
        out.extend(geojson_layer_data(p))
    return out


def _sidecar_slide_metadata(path: Path) -> dict[str, Any] | None:
    """Metadata of a slide beside ``path`` with the same stem, if one opens."""
    from napari_pathoseg.wsi.slide import is_slide_path, open_slide

    for cand in sorted(path.parent.glob(path.stem + ".*")):
        if cand == path or not is_slide_path(cand):
            continue
        try:
            with open_slide(cand) as slide:
                logger.info("placing %s over %s", path.name, cand.name)
                return metadata_as_dict(slide.metadata)
        except PathosegError:
            continue
    return None


def _placement(transform: LevelTransform, meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """``scale``/``translate`` over the slide layer, and ``units``: µm when the slide's resolution is known."""
    calibrated = bool(meta and (meta.get("mpp_x") or meta.get("mpp_y")))
    return {**layer_placement(transform, meta), "units": ("µm", "µm") if calibrated else ("pixel", "pixel")}


def _rgba(color: tuple[int, int, int] | None, alpha: float = 1.0) -> list[float]:
    c = color or (255, 255, 0)
    return [c[0] / 255.0, c[1] / 255.0, c[2] / 255.0, alpha]


def geojson_layer_data(
    path: str | Path,
    *,
    slide_metadata: Any | None = None,
    find_slide: bool = True,
    repair: bool = False,
    max_label_pixels: int = MAX_LABEL_PIXELS,
    max_label_objects: int = MAX_LABEL_OBJECTS,
) -> list[LayerData]:
    """Layer-data tuples for a QuPath GeoJSON file.

    Parameters
    ----------
    path : path-like
    slide_metadata : SlideMetadata or dict, optional
        The slide the objects belong to (bounds offset, µm per pixel, extent check).
    find_slide : bool
        Without ``slide_metadata``, look for a slide with the same name beside the file.
    repair : bool
        Repair invalid polygons instead of raising.
    max_label_pixels, max_label_objects : int
        Limits for a Labels layer of detections (else a Points layer of centroids).

    Returns
    -------
    list of (data, kwargs, layer_type)
        Shapes for annotations, Labels or Points for detections/cells, Points for point
        annotations; ``scale``/``translate``/``units`` put them over the slide layer (µm,
        as the slide reader shows a slide, when the resolution is known; level-0 pixels
        otherwise), and ``metadata["slide"]`` keeps the slide metadata so they save back
        in place.

    Notes
    -----
    The slide comes from, in order: ``slide_metadata``; the slide record an export wrote
    in the file (:mod:`~napari_pathoseg.export.slide_record`); with ``find_slide``, a slide
    with the same name beside the file. A foreign GeoJSON with none of these opens in
    level-0 pixel units.
    """
    path = Path(path)
    recorded = slide_from_members(read_members(path), path=path)
    meta = metadata_as_dict(slide_metadata) if slide_metadata is not None else None
    if meta is not None:
        check_same_slide(recorded, meta, path=path)
    elif recorded is not None:
        meta = recorded
        logger.info("placing %s over its slide %s as recorded in the file", path.name, recorded.get("path", ""))
    elif find_slide:
        meta = _sidecar_slide_metadata(path)
    objects = read_geojson(path, slide_metadata=meta, repair=repair)
    level0 = LevelTransform.for_slide(meta)
    place = _placement(level0, meta)
    common_meta: dict[str, Any] = {"geojson": str(path)}
    if meta:
        common_meta["slide"] = {k: v for k, v in meta.items() if k != "properties"}
        common_meta["slide"]["properties"] = {
            k: v for k, v in (meta.get("properties") or {}).items() if k.startswith("openslide.bounds")
        }
    regions = [o for o in objects if o.object_type in _REGION_TYPES]
    detections = [o for o in objects if o.object_type not in _REGION_TYPES]
    out: list[LayerData] = []
    if regions:
        out.extend(_region_layers(regions, path, level0, place, common_meta))
    if detections:
        out.append(_detection_layer(detections, path, level0, place, common_meta, max_label_pixels, max_label_objects))
    if not out:
        logger.warning("%s holds no objects", path)
    return out


def _object_row(o: GeoJSONObject) -> dict[str, Any]:
    return {
        "class": o.classification.name if o.classification else "",
        "object_type": o.object_type,
        "id": o.id or "",
        "name": o.name or "",
    }


def _region_layers(
    objects: Sequence[GeoJSONObject], path: Path, level0: LevelTransform, place: dict, common_meta: dict
) -> list[LayerData]:
    data, types, rows, edge = [], [], [], []
    pts, pt_rows = [], []
    n_holes = 0
    for o in objects:
        row = _object_row(o)
        color = o.classification.color if o.classification else None
        for part in shapely.get_parts(o.geometry):
            if part.geom_type == "Polygon":
                n_holes += len(part.interiors)
                rc = level0.xy_to_index(np.asarray(part.exterior.coords)[:-1])
                data.append(rc)
                types.append("polygon")
            elif part.geom_type == "LineString":
                data.append(level0.xy_to_index(np.asarray(part.coords)))
                types.append("path")
            elif part.geom_type == "Point":
                pts.append(level0.xy_to_index(np.asarray(part.coords))[0])
                pt_rows.append(row)
                continue
            else:
                continue
            rows.append(row)
            edge.append(_rgba(color))
    if n_holes:
        logger.info("%s: %d holes of annotations are not shown (napari shapes have no holes)", path, n_holes)
    out: list[LayerData] = []
    if data:
        features = {k: [r[k] for r in rows] for k in ("class", "object_type", "id", "name")}
        kwargs = {
            "name": f"{path.stem} annotations",
            "shape_type": types,
            "edge_color": np.asarray(edge),
            "face_color": [0.0, 0.0, 0.0, 0.0],
            "edge_width": 2.0,
            "features": features,
            "metadata": {**common_meta, "object_type": "annotation"},
            **place,
        }
        out.append((data, kwargs, "shapes"))
    if pts:
        features = {k: [r[k] for r in pt_rows] for k in ("class", "object_type", "id", "name")}
        out.append(
            (np.asarray(pts), {"name": f"{path.stem} points", "features": features,
                               "metadata": {**common_meta, "object_type": "annotation"}, **place}, "points")
        )
    return out


def _detection_layer(
    objects: Sequence[GeoJSONObject],
    path: Path,
    level0: LevelTransform,
    place: dict,
    common_meta: dict,
    max_label_pixels: int,
    max_label_objects: int,
) -> LayerData:
    geoms = [o.nucleus_geometry if o.nucleus_geometry is not None else o.geometry for o in objects]
    bounds = shapely.bounds(np.asarray(geoms, dtype=object))  # (n, 4) xmin, ymin, xmax, ymax
    rc_min = level0.xy_to_continuous(bounds[:, :2]).min(axis=0)
    rc_max = level0.xy_to_continuous(bounds[:, 2:]).max(axis=0)
    r0, c0 = np.floor(rc_min).astype(int)
    r1, c1 = np.ceil(rc_max).astype(int)
    n_pix = int(r1 - r0) * int(c1 - c0)
    rows = [_object_row(o) for o in objects]
    classes = sorted({r["class"] for r in rows})
    meta = {**common_meta, "object_type": objects[0].object_type}
    if len(objects) <= max_label_objects and n_pix <= max_label_pixels:
        crop = LevelTransform(level0.downsample, (float(r0), float(c0)), level0.bounds)
        labels = rasterize(geoms, shape=(int(r1 - r0), int(c1 - c0)), transform=crop,
                           dtype=np.uint16 if len(geoms) < 65535 else np.uint32)
        features = {"index": list(range(1, len(objects) + 1))}
        for k in ("class", "id"):
            features[k] = [r[k] for r in rows]
        meta["classes"] = {
            name: list(o.classification.color) for o in objects if o.classification for name in [o.classification.name]
        }
        kwargs = {"name": f"{path.stem} detections", "features": features, "metadata": meta,
                  **_placement(crop, common_meta.get("slide"))}
        return (labels, kwargs, "labels")
    logger.info("%s: %d detections shown as centroids (a label image would need %d pixels)", path, len(objects), n_pix)
    cent = shapely.get_coordinates(shapely.centroid(np.asarray(geoms, dtype=object)))
    rc = level0.xy_to_index(cent)
    colours = {c: _rgba(class_color(c) if c else None) for c in classes}
    for o in objects:
        if o.classification:
            colours[o.classification.name] = _rgba(o.classification.color)
    area = shapely.area(np.asarray(geoms, dtype=object))
    size = float(max(2.0, 2.0 * np.sqrt(np.median(area) / np.pi)))
    kwargs = {
        "name": f"{path.stem} detections",
        "features": {k: [r[k] for r in rows] for k in ("class", "id")},
        "face_color": np.asarray([colours[r["class"]] for r in rows]),
        "size": size,
        "metadata": meta,
        **place,
    }
    return (rc, kwargs, "points")


# ---------------------------------------------------------------------------- writers
def _layer_slide(attributes: Mapping[str, Any]) -> dict[str, Any] | None:
    return slide_metadata_from_layer(attributes.get("metadata") or {})


def _features_column(attributes: Mapping[str, Any], names: Sequence[str]) -> list | None:
    feats = attributes.get("features")
    if feats is None:
        feats = attributes.get("properties")
    if feats is None:
        return None
    for name in names:
        try:
            col = feats[name]
        except (KeyError, TypeError, IndexError):
            continue
        return list(np.asarray(col).tolist())
    return None


def _class_option(attributes: Mapping[str, Any]) -> tuple[Classification | None, Any]:
    md = attributes.get("metadata") or {}
    name = md.get("class_name")
    color = md.get("class_color")
    return (Classification.of(name, color) if name else None), md


def write_labels_geojson(path: str, data: Any, attributes: dict) -> list[str]:
    """npe2 writer: a Labels layer -> QuPath GeoJSON (one detection per label) + CSV beside it.

    The layer's metadata may give ``slide`` (placement), ``object_type`` (default
    ``detection``), ``class_name`` / ``class_color``; a ``class`` column of the layer's
    features (with an ``index`` column of label values) gives per-object classes.
    """
    if not _is_geojson(path):
        return []
    # a multiscale layer (whole-slide nuclei) arrives as napari's MultiScaleData: level 0 is the labels
    arr = data[0] if attributes.get("multiscale") or isinstance(data, (list, tuple)) else data
    meta = _layer_slide(attributes)
    transform = transform_from_layer(scale=attributes.get("scale"), translate=attributes.get("translate"), slide_metadata=meta)
    if np.asarray(arr.shape).size > 2:
        raise ExportError(f"{path}: only 2-D label layers can be written as GeoJSON, this one has shape {arr.shape}")
    cls, md = _class_option(attributes)
    classes = None
    col = _features_column(attributes, ("class", "classification"))
    index = _features_column(attributes, ("index", "label"))
    if col is not None and index is not None and len(col) == len(index):
        classes = {int(i): (str(c) if c not in (None, "") else None) for i, c in zip(index, col)}
        classes = {k: v for k, v in classes.items() if v is not None}
    if not meta:
        logger.warning("%s: the layer has no slide metadata; coordinates are layer world units as level-0 pixels", path)
    res = run_export_labels(
        path, arr, transform=transform, slide_metadata=meta, object_type=md.get("object_type", "detection"),
        classification=cls, classes=classes or None, measure=["area", "perimeter", "eccentricity", "solidity"],
        metadata={"source": str(attributes.get("name", "labels"))},
    )
    return [str(res.path)]


def write_shapes_geojson(path: str, data: Any, attributes: dict) -> list[str]:
    """npe2 writer: a Shapes layer -> QuPath GeoJSON (one annotation per shape) + CSV beside it.

    Per-shape classes come from a ``class`` feature column, else the layer's
    ``metadata["class_name"]``; the class colour from the shape's edge colour.
    """
    if not _is_geojson(path):
        return []
    meta = _layer_slide(attributes)
    transform = transform_from_layer(scale=attributes.get("scale"), translate=attributes.get("translate"), slide_metadata=meta)
    cls, md = _class_option(attributes)
    col = _features_column(attributes, ("class", "classification"))
    names = _features_column(attributes, ("name",))
    edge = attributes.get("edge_color")
    classes = None
    if col is not None and len(col) == len(data):
        classes = []
        for k, c in enumerate(col):
            if c in (None, ""):
                classes.append(None)
                continue
            color = None
            if edge is not None and len(np.asarray(edge)) == len(data):
                color = np.asarray(edge, dtype=np.float64)[k][:3]
            classes.append(Classification.of(str(c), color))
    res = run_export_shapes(
        path, list(data), shape_types=attributes.get("shape_type", "polygon"), slide_metadata=meta,
        transform=transform, object_type=md.get("object_type", "annotation"), classification=cls, classes=classes,
        names=[str(n) for n in names] if names is not None and len(names) == len(data) else None,
    )
    return [str(res.path)]
