"""QuPath-compatible GeoJSON: streaming export of label images and shapes, and import.

Export writes a ``FeatureCollection`` with one ``Feature`` per object to a temporary
file beside the destination, feature by feature, and moves it into place at the end
(``os.replace``), so a cancelled or failed export never leaves a half-written file.
Label images (numpy or dask, any pyramid level) are read in chunks: a first pass finds
every object's bounding box (:func:`scipy.ndimage.find_objects` per chunk), a second
pass traces, validates and measures the objects owned by each chunk inside a window
extended by a halo, so memory is bounded by the chunk size, not the slide size.

Import (:func:`read_geojson`, :func:`iter_geojson`) streams features out of the file
too and accepts QuPath 0.4+ and the older forms (``object_type``, ``colorRGB``, string
classifications, measurement lists, bare feature lists).

Coordinates go through :class:`~napari_pathoseg.export.coords.LevelTransform` only.
The format is described in ``docs/geojson.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Iterator, Mapping, Sequence

import numpy as np
import shapely
from scipy import ndimage as ndi
from shapely.geometry import mapping, shape as shapely_shape

from napari_pathoseg.errors import CancelledError, GeoJSONError
from napari_pathoseg.export._atomic import AtomicFile, ExportError
from napari_pathoseg.export._trace import TracedRings, trace_labels
from napari_pathoseg.export.coords import LevelTransform, _world_mpp, metadata_as_dict
from napari_pathoseg.export.measurements import CsvTableWriter, geometry_measurements, measure_window, measurement_names

__all__ = [
    "OBJECT_TYPES",
    "DEFAULT_CLASS_COLORS",
    "ExportError",
    "Classification",
    "ExportProgress",
    "ExportResult",
    "GeoJSONObject",
    "class_color",
    "rings_to_geometries",
    "labels_to_geometries",
    "shapes_to_geometries",
    "iter_export_labels",
    "run_export_labels",
    "iter_export_shapes",
    "run_export_shapes",
    "iter_geojson",
    "read_geojson",
    "slide_extent",
    "rasterize",
    "iter_label_tiles",
    "write_labels_tiff",
]

logger = logging.getLogger(__name__)

#: ``objectType`` values QuPath accepts.
OBJECT_TYPES = ("annotation", "detection", "cell", "tile", "tmaCore", "root")
_OBJECT_TYPE_LOOKUP = {t.lower(): t for t in OBJECT_TYPES}
_OBJECT_TYPE_LOOKUP.update({"tma_core": "tmaCore", "tmacore": "tmaCore"})

#: QuPath's default colours of its built-in classes; other names get a stable hashed colour.
DEFAULT_CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "Tumor": (200, 0, 0),
    "Tumour": (200, 0, 0),
    "Stroma": (150, 200, 150),
    "Immune cells": (160, 90, 160),
    "Necrosis": (50, 50, 50),
    "Other": (255, 200, 0),
    "Region*": (0, 0, 180),
    "Ignore*": (180, 180, 180),
    "Positive": (200, 50, 50),
    "Negative": (112, 112, 225),
    "Nucleus": (200, 0, 0),
}

#: Default limit of one object's bounding box, in pixels of its level.
MAX_OBJECT_PIXELS = 64_000_000


# ---------------------------------------------------------------------------- classes
def class_color(name: str) -> tuple[int, int, int]:
    """QuPath's colour for a built-in class, else a stable colour derived from the name."""
    if name in DEFAULT_CLASS_COLORS:
        return DEFAULT_CLASS_COLORS[name]
    h = hashlib.md5(name.encode("utf-8")).digest()
    return (64 + h[0] % 192, 64 + h[1] % 192, 64 + h[2] % 192)


def _check_color(color: Any, *, what: str) -> tuple[int, int, int]:
    """(r, g, b) 0-255 ints from 0-255 numbers or 0-1 floats (napari colours)."""
    try:
        arr = np.asarray(color).ravel()
        if arr.dtype.kind not in "iuf":
            raise TypeError
        floats = arr.dtype.kind == "f"
        arr = arr.astype(np.float64)
    except (TypeError, ValueError):
        raise ExportError(f"{what}: colour must be (r, g, b) with values 0-255 (or 0-1 floats), got {color!r}") from None
    if arr.size not in (3, 4) or not np.all(np.isfinite(arr)):
        raise ExportError(f"{what}: colour must be (r, g, b) with values 0-255 (or 0-1 floats), got {color!r}")
    arr = arr[:3]
    if floats and arr.max() <= 1.0:
        arr = arr * 255.0
    if arr.min() < 0 or arr.max() > 255:
        raise ExportError(f"{what}: colour values must be within 0-255, got {color!r}")
    return tuple(int(round(v)) for v in arr)  # type: ignore[return-value]


@dataclass(frozen=True)
class Classification:
    """A QuPath classification: a name and the colour QuPath must always receive with it."""

    name: str
    color: tuple[int, int, int]

    @classmethod
    def of(cls, value: "Classification | str | Mapping[str, Any] | None", color: Any = None) -> "Classification | None":
        """Build from a name (colour from :func:`class_color` unless given), a dict or None."""
        if value is None or isinstance(value, Classification):
            return value
        if isinstance(value, Mapping):
            name = value.get("name")
            color = value.get("color", color)
        else:
            name = value
        if not isinstance(name, str) or not name.strip():
            raise ExportError(f"a class name must be a non-empty string, got {name!r}")
        name = name.strip()
        rgb = class_color(name) if color is None else _check_color(color, what=f"class {name!r}")
        return cls(name=name, color=rgb)

    def to_json(self) -> dict[str, Any]:
        """``{"name": ..., "color": [r, g, b]}``."""
        return {"name": self.name, "color": list(self.color)}


# ---------------------------------------------------------------------------- events
@dataclass(frozen=True)
class ExportProgress:
    """One step of a long export or import."""

    done: int
    total: int
    message: str = ""

    @property
    def fraction(self) -> float:
        """Done / total in [0, 1]."""
        return 1.0 if self.total <= 0 else min(1.0, self.done / self.total)


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote."""

    path: Path
    n_objects: int
    n_skipped: int = 0
    measurements_path: Path | None = None
    seconds: float = 0.0

    @property
    def objects_per_second(self) -> float:
        """Export throughput."""
        return self.n_objects / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "path": str(self.path),
            "n_objects": self.n_objects,
            "n_skipped": self.n_skipped,
            "measurements_path": str(self.measurements_path) if self.measurements_path else None,
            "seconds": round(self.seconds, 3),
            "objects_per_second": round(self.objects_per_second, 1) if self.seconds > 0 else None,
        }


# ---------------------------------------------------------------------------- writer
class _FeatureCollectionWriter(AtomicFile):
    """Writes a FeatureCollection feature by feature to a temp file, then moves it into place."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, mode="wb")
        self._fh.write(b'{"type":"FeatureCollection","features":[\n')
        self.n = 0

    def write(self, feature_texts: Sequence[bytes]) -> None:
        if not feature_texts:
            return
        if self.n:
            self._fh.write(b",\n")
        self._fh.write(b",\n".join(feature_texts))
        self.n += len(feature_texts)

    def commit(self) -> Path:
        self._fh.write(b"\n]}\n")
        return super().commit()


def _csv_destination(path: Path, measurements_path: str | os.PathLike | None | bool, measured: bool) -> Path | None:
    """Where an export's CSV table goes (None: no table).

    ``measurements_path`` True (the default) puts ``OUT.csv`` beside ``OUT.geojson`` when
    something is ``measured``; None or False writes no table; a path is used as it is.
    """
    if measurements_path is True:
        return path.with_suffix(".csv") if measured else None
    if measurements_path in (None, False):
        return None
    return Path(measurements_path)  # type: ignore[arg-type]


def _commit_outputs(writer: _FeatureCollectionWriter, table: CsvTableWriter | None) -> tuple[Path, Path | None]:
    """Move the GeoJSON and the CSV table (if any) into place; returns both paths."""
    return writer.commit(), (table.commit() if table is not None else None)


def _abort_outputs(writer: _FeatureCollectionWriter, table: CsvTableWriter | None) -> None:
    """Delete the temporary GeoJSON and CSV table (if any) of a failed or cancelled export."""
    writer.abort()
    if table is not None:
        table.abort()


def _uuid_strings(n: int) -> list[bytes]:
    """``n`` random (version 4) UUIDs as ASCII bytes."""
    if n == 0:
        return []
    raw = np.frombuffer(os.urandom(16 * n), dtype=np.uint8).reshape(n, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    hexes = raw.tobytes().hex().encode("ascii")
    out = []
    for k in range(n):
        h = hexes[32 * k : 32 * k + 32]
        out.append(b"-".join((h[:8], h[8:12], h[12:16], h[16:20], h[20:])))
    return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


_STD_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default)

try:  # orjson writes numpy arrays directly and ~5-10x faster; the standard library is the fallback
    import orjson as _orjson

    _ORJSON_OPTS = _orjson.OPT_SERIALIZE_NUMPY

    def _dumps(obj: Any) -> bytes:
        return _orjson.dumps(obj, option=_ORJSON_OPTS)

except ImportError:  # pragma: no cover - depends on the environment

    def _dumps(obj: Any) -> bytes:
        return _STD_ENCODER.encode(obj).encode("utf-8")


_POLY_OPEN = b'{"type":"Polygon","coordinates":['
_MULTI_OPEN = b'{"type":"MultiPolygon","coordinates":['
_CLOSE2 = b"]}"


def _properties_prefix(
    object_type: str, classification: Classification | None, metadata: Mapping[str, str] | None,
    name: str | None = None,
) -> bytes:
    """The constant part of a feature's properties (without the closing brace)."""
    props: dict[str, Any] = {"objectType": object_type}
    if name:
        props["name"] = str(name)
    if classification is not None:
        props["classification"] = classification.to_json()
    props["isLocked"] = False
    if metadata:
        props["metadata"] = {str(k): str(v) for k, v in metadata.items()}
    return _dumps(props)[:-1]


def _measurements_text(values: Mapping[str, float]) -> bytes:
    clean = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
    return _dumps(clean)


def _feature_text(uid: bytes, geometry_text: bytes, prefix: bytes, measurements: bytes | None) -> bytes:
    props = prefix
    if measurements is not None:
        props += b',"measurements":' + measurements
    return b'{"type":"Feature","id":"' + uid + b'","geometry":' + geometry_text + b',"properties":' + props + b"}}"


def _check_object_type(object_type: str) -> str:
    ot = _OBJECT_TYPE_LOOKUP.get(str(object_type).lower())
    if ot is None:
        raise ExportError(f"objectType {object_type!r} is not one QuPath accepts; use one of {list(OBJECT_TYPES)}")
    return ot


# ---------------------------------------------------------------------------- geometry
def _geometry_text_from_rings(rings: list[np.ndarray], outer: list[bool]) -> bytes:
    """GeoJSON bytes of one object's closed, oriented rings (QuPath xy): Polygon or MultiPolygon."""
    groups = _group_rings(rings, outer)
    if len(groups) == 1:
        return _POLY_OPEN + b",".join(_dumps(rings[i]) for i in groups[0]) + _CLOSE2
    parts = (b"[" + b",".join(_dumps(rings[i]) for i in g) + b"]" for g in groups)
    return _MULTI_OPEN + b",".join(parts) + _CLOSE2


def _group_rings(rings: list[np.ndarray], outer: list[bool]) -> list[list[int]]:
    """Assign each hole to the smallest outer ring that contains it."""
    outers = [i for i, o in enumerate(outer) if o]
    holes = [i for i, o in enumerate(outer) if not o]
    groups = {i: [i] for i in outers}
    if holes and len(outers) == 1:
        groups[outers[0]].extend(holes)
    elif holes:
        polys = {i: shapely.Polygon(rings[i]) for i in outers}
        areas = {i: polys[i].area for i in outers}
        for h in holes:
            pt = shapely.Polygon(rings[h]).representative_point()
            owners = [i for i in outers if polys[i].contains(pt)]
            if not owners:
                raise ExportError("internal tracing error: a hole has no outer ring")
            groups[min(owners, key=areas.get)].append(h)
    return [groups[i] for i in outers]


def rings_to_geometries(rings: TracedRings, *, ids: np.ndarray, offset: tuple[int, int] = (0, 0)) -> list[Any]:
    """shapely (Multi)Polygons in window ``(row, col)`` continuous coordinates, one per id.

    Parameters
    ----------
    rings : TracedRings
        From :func:`~napari_pathoseg.export._trace.trace_labels`.
    ids : (n,) int array
        Sorted labels; an id without rings gets an empty polygon.
    offset : (int, int)
        Added to the coordinates.

    Returns
    -------
    list of shapely geometries (coordinates ``(row, col)``)
    """
    verts = rings.vertices + np.asarray(offset)
    out = []
    lo = np.searchsorted(rings.labels, ids, side="left")
    hi = np.searchsorted(rings.labels, ids, side="right")
    for a, b in zip(lo.tolist(), hi.tolist()):
        if a == b:
            out.append(shapely.Polygon())
            continue
        rs = [verts[rings.offsets[k] : rings.offsets[k + 1]] for k in range(a, b)]
        outer = [bool(rings.area[k] > 0) for k in range(a, b)]
        if sum(outer) == 1 and len(rs) == 1:
            out.append(shapely.Polygon(rs[0]))
            continue
        groups = _group_rings(rs, outer)
        polys = [shapely.Polygon(rs[g[0]], [rs[i] for i in g[1:]]) for g in groups]
        out.append(polys[0] if len(polys) == 1 else shapely.MultiPolygon(polys))
    return out


def labels_to_geometries(labels: np.ndarray, *, transform: LevelTransform | None = None) -> dict[int, Any]:
    """Outlines of every object of an in-memory label image as shapely geometries in QuPath ``(x, y)``.

    Parameters
    ----------
    labels : (rows, cols) integer array
    transform : LevelTransform, optional
        Defaults to level 0 without offsets.

    Returns
    -------
    dict
        label -> shapely Polygon / MultiPolygon (pixel-edge outlines, holes kept).
    """
    labels = _check_labels_array(np.asarray(labels), name="labels")
    transform = transform or LevelTransform()
    ids = np.unique(labels)
    ids = ids[ids != 0].astype(np.int64)
    geoms = rings_to_geometries(trace_labels(labels, ids=ids), ids=ids)
    out = {}
    for i, g in zip(ids.tolist(), geoms):
        out[i] = shapely.transform(g, lambda rc: transform.continuous_to_xy(rc))
    return out


def _repair(geom: Any) -> Any:
    """Valid polygonal geometry from a possibly invalid one (empty when nothing polygonal is left)."""
    if geom.is_valid:
        return geom
    fixed = shapely.make_valid(geom)
    parts = [p for p in shapely.get_parts(fixed) if p.geom_type in ("Polygon", "MultiPolygon") and not p.is_empty]
    if not parts:
        return shapely.Polygon()
    merged = shapely.union_all(parts)
    return _single_part(merged)


def _single_part(geom: Any) -> Any:
    if geom.geom_type == "MultiPolygon" and len(geom.geoms) == 1:
        return geom.geoms[0]
    if geom.geom_type == "MultiLineString" and len(geom.geoms) == 1:
        return geom.geoms[0]
    return geom


def _snap(geom: Any, decimals: int) -> Any:
    """Geometry on the ``10**-decimals`` grid it will be written with, still valid (slivers dropped).

    An empty geometry is returned as it is.
    """
    if geom.is_empty:
        return geom
    snapped = shapely.set_precision(geom, 10.0**-decimals)
    if snapped.geom_type in ("MultiPolygon", "GeometryCollection") and not snapped.is_empty:
        parts = [p for p in shapely.get_parts(snapped) if p.geom_type == "Polygon" and p.area > 0]
        snapped = shapely.MultiPolygon(parts) if len(parts) > 1 else (parts[0] if parts else shapely.Polygon())
    return _single_part(snapped)


def _geometry_text(geom: Any, decimals: int) -> bytes:
    """GeoJSON bytes of a shapely geometry (QuPath xy), closed rings, CCW exteriors, on the decimal grid."""
    geom = _snap(geom, decimals)
    if geom.geom_type in ("Polygon", "MultiPolygon"):
        geom = shapely.orient_polygons(geom, exterior_cw=False)
    return _dumps(mapping(geom))


def _ellipse_polygon(vertices: np.ndarray, n: int = 64) -> np.ndarray:
    """Polygon (n, 2) approximating a napari ellipse given by its 4 bounding-box corners."""
    centre = vertices.mean(axis=0)
    a = (vertices[1] - vertices[0]) / 2.0
    b = (vertices[3] - vertices[0]) / 2.0
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return centre + np.cos(t)[:, None] * a + np.sin(t)[:, None] * b


def shapes_to_geometries(
    data: Sequence[np.ndarray],
    shape_types: str | Sequence[str] = "polygon",
    *,
    transform: LevelTransform | None = None,
) -> list[Any]:
    """napari shapes -> valid shapely geometries in QuPath ``(x, y)``.

    Parameters
    ----------
    data : sequence of (N, D) arrays
        Vertices in napari data coordinates (the last two columns are ``(row, col)``,
        pixel centres at integers).
    shape_types : str or sequence of str
        napari shape types: ``polygon``, ``rectangle``, ``ellipse`` (polygons), ``path``,
        ``line`` (line strings).
    transform : LevelTransform, optional
        Layer pixels -> QuPath (level 0 without offsets when None).

    Returns
    -------
    list
        One geometry per shape; self-intersecting polygons are repaired with
        :func:`shapely.make_valid`; degenerate ones become empty geometries.
    """
    transform = transform or LevelTransform()
    n = len(data)
    types = [shape_types] * n if isinstance(shape_types, str) else list(shape_types)
    if len(types) != n:
        raise ExportError(f"got {n} shapes but {len(types)} shape types")
    out = []
    for k, (verts, st) in enumerate(zip(data, types)):
        v = np.asarray(verts, dtype=np.float64)
        if v.ndim != 2 or v.shape[1] < 2 or not np.all(np.isfinite(v)):
            raise ExportError(f"shape {k}: vertices must be an (N, 2) array of finite numbers, got shape {v.shape}")
        rc = v[:, -2:]
        st = str(st).lower()
        if st == "ellipse":
            if rc.shape[0] != 4:
                raise ExportError(f"shape {k}: an ellipse needs its 4 bounding-box corners, got {rc.shape[0]} vertices")
            rc = _ellipse_polygon(rc)
            st = "polygon"
        xy = transform.index_to_xy(rc)
        if st in ("polygon", "rectangle"):
            if len(xy) < 3:
                out.append(shapely.Polygon())
                continue
            out.append(_repair(shapely.Polygon(xy)))
        elif st in ("path", "line"):
            out.append(shapely.LineString(xy) if len(xy) >= 2 else shapely.LineString())
        else:
            raise ExportError(f"shape {k}: napari shape type {st!r} cannot be exported; use polygon, rectangle, ellipse, path or line")
    return out


# ---------------------------------------------------------------------------- labels export
def _check_labels_array(labels: Any, *, name: str) -> Any:
    if labels.ndim != 2:
        raise ExportError(
            f"{name}: a label image must be 2-D (rows, cols), got shape {tuple(labels.shape)}; "
            "pass one plane (e.g. labels[0]) or the level-0 array of a multiscale layer"
        )
    if np.dtype(labels.dtype).kind not in "iub":
        raise ExportError(f"{name}: a label image must hold integers, got dtype {labels.dtype}; convert it with astype(np.int32)")
    return labels


def _read_block(labels: Any, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    block = labels[r0:r1, c0:c1]
    if hasattr(block, "compute"):
        block = block.compute(scheduler="sync")
    block = np.asarray(block)
    if block.dtype.kind == "b":
        block = block.astype(np.uint8)
    if block.dtype.kind == "i" and block.size and block.min() < 0:
        raise ExportError(f"labels hold negative values (min {int(block.min())}); labels must be >= 0 with 0 = background")
    return block


def _chunk_objects(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and their (r0, r1, c0, c1) boxes in one block."""
    if block.size == 0:
        return np.zeros(0, np.int64), np.zeros((0, 4), np.int64)
    mx = int(block.max())
    if mx == 0:
        return np.zeros(0, np.int64), np.zeros((0, 4), np.int64)
    if mx <= max(4 * block.size, 1 << 16):
        sl = ndi.find_objects(block.astype(np.int64, copy=False) if block.dtype.kind == "u" and block.dtype.itemsize == 8 else block)
        ids = [i + 1 for i, s in enumerate(sl) if s is not None]
        boxes = [(s[0].start, s[0].stop, s[1].start, s[1].stop) for s in sl if s is not None]
        return np.asarray(ids, np.int64), np.asarray(boxes, np.int64).reshape(-1, 4)
    uniq, inv = np.unique(block, return_inverse=True)
    sl = ndi.find_objects(inv.reshape(block.shape).astype(np.int64))
    ids, boxes = [], []
    for i, s in enumerate(sl):
        if s is None or uniq[i] == 0:
            continue
        ids.append(int(uniq[i]))
        boxes.append((s[0].start, s[0].stop, s[1].start, s[1].stop))
    return np.asarray(ids, np.int64), np.asarray(boxes, np.int64).reshape(-1, 4)


def _global_boxes(labels: Any, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Every object's label and bounding box over the whole image (one chunked pass)."""
    rows, cols = labels.shape
    all_ids, all_boxes = [], []
    for r0 in range(0, rows, chunk):
        for c0 in range(0, cols, chunk):
            block = _read_block(labels, r0, min(rows, r0 + chunk), c0, min(cols, c0 + chunk))
            ids, boxes = _chunk_objects(block)
            if ids.size:
                all_ids.append(ids)
                all_boxes.append(boxes + np.array([r0, r0, c0, c0]))
    if not all_ids:
        return np.zeros(0, np.int64), np.zeros((0, 4), np.int64)
    ids = np.concatenate(all_ids)
    boxes = np.concatenate(all_boxes)
    order = np.argsort(ids, kind="stable")
    ids, boxes = ids[order], boxes[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    gids = ids[starts]
    gbox = np.stack(
        [
            np.minimum.reduceat(boxes[:, 0], starts),
            np.maximum.reduceat(boxes[:, 1], starts),
            np.minimum.reduceat(boxes[:, 2], starts),
            np.maximum.reduceat(boxes[:, 3], starts),
        ],
        axis=1,
    )
    return gids, gbox


def _rgb_window(slide: Any, transform: LevelTransform, r0: int, c0: int, h: int, w: int) -> np.ndarray:
    """The slide's RGB pixels under a label window (resampled when the level does not match)."""
    ds_r, ds_c = transform.downsample
    o_r, o_c = transform.origin
    ds = min(ds_r, ds_c)
    level = slide.best_level_for_downsample(ds)
    lds = float(slide.metadata.level_downsamples[level])
    top = (r0 + o_r) * ds_r / lds
    left = (c0 + o_c) * ds_c / lds
    if (
        abs(ds_r - lds) < 1e-3 * lds
        and abs(ds_c - lds) < 1e-3 * lds
        and abs(top - round(top)) < 1e-6
        and abs(left - round(left)) < 1e-6
    ):
        return slide.read_region(level=level, row=int(round(top)), col=int(round(left)), height=h, width=w)
    from skimage.transform import resize

    hh = max(1, int(math.ceil(h * ds_r / lds)))
    ww = max(1, int(math.ceil(w * ds_c / lds)))
    region = slide.read_region(level=level, row=int(math.floor(top)), col=int(math.floor(left)), height=hh, width=ww)
    out = resize(region, (h, w), order=1, preserve_range=True, anti_aliasing=True)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _label_class(
    label: int, default_cls: Classification | None, classes: Mapping[int, Any] | None
) -> Classification | None:
    """Class of one label: its entry in ``classes`` (None there means unclassified), else the default."""
    if classes is not None and label in classes:
        return Classification.of(classes[label])
    return default_cls


def _check_probability(probability: Any, shape: tuple[int, int]) -> Any:
    if probability is None:
        return None
    if tuple(probability.shape) != tuple(shape):
        raise ExportError(
            f"the probability map has shape {tuple(probability.shape)} but the labels have {tuple(shape)}; "
            "pass the (rows, cols) probability of the object class at the labels' level"
        )
    return probability


def iter_export_labels(
    path: str | os.PathLike,
    labels: Any,
    *,
    slide: Any | None = None,
    slide_metadata: Any | None = None,
    level: int = 0,
    downsample: float | tuple[float, float] | None = None,
    origin: tuple[float, float] = (0.0, 0.0),
    transform: LevelTransform | None = None,
    object_type: str = "detection",
    classification: Classification | str | None = "Nucleus",
    color: Any = None,
    classes: Mapping[int, Classification | str | None] | None = None,
    measure: Sequence[str] | None = None,
    probability: Any | None = None,
    metadata: Mapping[str, str] | None = None,
    object_metadata: Mapping[int, Mapping[str, str]] | None = None,
    measurements_path: str | os.PathLike | None | bool = True,
    chunk_size: int = 1024,
    halo: int = 128,
    decimals: int = 2,
    max_object_pixels: int = MAX_OBJECT_PIXELS,
    validate: bool = True,
) -> Generator[ExportProgress | ExportResult, None, None]:
    """Export a label image to QuPath GeoJSON, streaming; yields progress, then the result.

    Parameters
    ----------
    path : path-like
        Output ``.geojson``.
    labels : (rows, cols) integer numpy or dask array
        0 = background, one id per object, at pyramid ``level`` (or ``downsample``).
    slide : Slide, optional
        The slide under the labels: its metadata places the objects and its pixels give
        the haematoxylin/eosin measurements.
    slide_metadata : SlideMetadata or dict, optional
        Used when ``slide`` is not given.
    level : int
        Pyramid level of ``labels``.
    downsample : float or (float, float), optional
        Down-sample of ``labels`` when it is not a pyramid level.
    origin : (float, float)
        ``(row, col)`` of ``labels[0, 0]`` in the level's pixels (for crops).
    transform : LevelTransform, optional
        Overrides ``level``/``downsample``/``origin``/bounds.
    object_type : str
        ``detection`` (nuclei) or ``annotation`` (regions), or another QuPath type.
    classification : Classification or str or None
        Class of every object (None: unclassified).
    color : (r, g, b), optional
        Colour of ``classification`` (QuPath's / a stable colour when None).
    classes : mapping label -> class, optional
        Per-object classes, overriding ``classification``.
    measure : sequence of str, optional
        Keys of :data:`~napari_pathoseg.export.measurements.MEASUREMENTS`; default: the
        shape measurements, plus stain ones when ``slide`` is given and ``confidence``
        when ``probability`` is given. ``[]`` measures nothing.
    probability : (rows, cols) array, optional
        The model's probability of the object class, same shape as ``labels``.
    metadata : mapping str -> str, optional
        Written on every feature (e.g. ``{"model": "nuclei-lite", "version": "1"}``).
    object_metadata : mapping label -> mapping, optional
        Per-object metadata (e.g. ``{"review": "accepted"}``), merged over ``metadata``.
    measurements_path : path-like, True, False or None
        CSV table (object id, label, class, centroid and measurements); True (default)
        writes ``OUT.csv`` beside ``OUT.geojson`` when something is measured.
    chunk_size, halo : int
        Chunk edge and extra border (pixels of the level) read around each chunk.
    decimals : int
        Coordinate decimals.
    max_object_pixels : int
        Refuse objects whose bounding box exceeds this many pixels.
    validate : bool
        Check every outline with :func:`shapely.is_valid` and repair invalid ones with
        :func:`shapely.make_valid` (outlines traced from pixels are valid by construction;
        the check costs ~25 % of the export time).

    Yields
    ------
    ExportProgress
        After each chunk.
    ExportResult
        Last.
    """
    t0 = time.perf_counter()
    path = Path(path)
    labels = _check_labels_array(labels, name="labels")
    object_type = _check_object_type(object_type)
    default_cls = Classification.of(classification, color)
    if slide is not None and slide_metadata is None:
        slide_metadata = slide.metadata
    meta = metadata_as_dict(slide_metadata)
    if transform is None:
        transform = LevelTransform.for_slide(meta or None, level=level, downsample=downsample, origin=origin)
    calibrated = bool(meta.get("mpp_x") or meta.get("mpp_y"))
    mpp_y, mpp_x = _world_mpp(meta)
    pixel_size = (mpp_y * transform.downsample[0], mpp_x * transform.downsample[1]) if calibrated else transform.downsample
    probability = _check_probability(probability, labels.shape)
    if measure is None:
        measure = ["area", "perimeter", "eccentricity", "solidity"]
        if slide is not None:
            measure += ["hematoxylin", "eosin"]
        if probability is not None:
            measure.append("confidence")
    measure = list(measure)
    names = measurement_names(measure, calibrated=calibrated)
    if ("hematoxylin" in measure or "eosin" in measure) and slide is None:
        raise ExportError("haematoxylin/eosin measurements need the slide: pass slide=, or drop them from measure")
    if "confidence" in measure and probability is None:
        raise ExportError("the confidence measurement needs probability=, the model's probability map")
    if chunk_size < 16 or halo < 0:
        raise ExportError(f"chunk_size must be >= 16 and halo >= 0, got {chunk_size} and {halo}")
    cls_cache: dict[Any, bytes] = {}
    base_meta = dict(metadata or {})

    def prefix_for(label: int) -> bytes:
        cls = _label_class(label, default_cls, classes)
        om = object_metadata.get(label) if object_metadata else None
        key = (cls, None if om is None else tuple(sorted(om.items())))
        text = cls_cache.get(key)
        if text is None:
            md = dict(base_meta)
            if om:
                md.update(om)
            text = _properties_prefix(object_type, cls, md)
            if len(cls_cache) < 10000:
                cls_cache[key] = text
        return text

    csv_path = _csv_destination(path, measurements_path, bool(measure))

    yield ExportProgress(0, 0, "finding objects")
    gids, gbox = _global_boxes(labels, chunk_size)
    total = int(gids.size)
    logger.info("exporting %d objects to %s", total, path)
    writer = _FeatureCollectionWriter(path)
    table = None
    try:
        if csv_path is not None:
            columns = ["id", "label", "class", "centroid_x", "centroid_y"] + [names[m] for m in measure]
            table = CsvTableWriter(csv_path, columns)
        rows, cols = labels.shape
        done = 0
        skipped = 0
        yield ExportProgress(0, total, f"{total} objects")
        for r0 in range(0, rows, chunk_size):
            for c0 in range(0, cols, chunk_size):
                own = (gbox[:, 0] >= r0) & (gbox[:, 0] < r0 + chunk_size) & (gbox[:, 2] >= c0) & (gbox[:, 2] < c0 + chunk_size)
                if not own.any():
                    continue
                wr1 = min(rows, r0 + chunk_size + halo)
                wc1 = min(cols, c0 + chunk_size + halo)
                fits = own & (gbox[:, 1] <= wr1) & (gbox[:, 3] <= wc1)
                big = np.flatnonzero(own & ~fits)
                jobs = []
                if fits.any():
                    sel = np.flatnonzero(fits)
                    wr1b = int(gbox[sel, 1].max())
                    wc1b = int(gbox[sel, 3].max())
                    jobs.append((r0, c0, wr1b, wc1b, gids[sel]))
                for k in big.tolist():
                    br0, br1, bc0, bc1 = (int(v) for v in gbox[k])
                    if (br1 - br0) * (bc1 - bc0) > max_object_pixels:
                        raise ExportError(
                            f"object {int(gids[k])} spans {br1 - br0} x {bc1 - bc0} pixels at this level, more than "
                            f"max_object_pixels={max_object_pixels}; export its label image from a coarser level "
                            "(--level) or raise max_object_pixels"
                        )
                    jobs.append((br0, bc0, br1, bc1, gids[k : k + 1]))
                for wr0, wc0, wr1_, wc1_, ids in jobs:
                    n_written, n_skip = _export_window(
                        writer,
                        table,
                        labels,
                        ids,
                        (wr0, wc0, wr1_, wc1_),
                        transform=transform,
                        prefix_for=prefix_for,
                        default_cls=default_cls,
                        classes=classes,
                        measure=measure,
                        names=names,
                        pixel_size=pixel_size,
                        slide=slide,
                        probability=probability,
                        decimals=decimals,
                        validate=validate,
                    )
                    done += n_written
                    skipped += n_skip
                yield ExportProgress(done + skipped, total, f"{done} of {total} objects")
        out_path, csv_out = _commit_outputs(writer, table)
    except BaseException:
        _abort_outputs(writer, table)
        raise
    result = ExportResult(out_path, done, skipped, csv_out, time.perf_counter() - t0)
    logger.info("exported %d objects in %.2f s", done, result.seconds)
    yield result


def _closed_rings(rings: TracedRings, xy: np.ndarray, decimals: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All rings closed and reversed (RFC 7946 orientation in x, y), rounded; ints when exact.

    Returns
    -------
    coords : (V + R, 2) int64 or float64
    offsets : (R + 1,) int64
        Ring ``k`` is ``coords[offsets[k]:offsets[k + 1]]``.
    ring_of_vertex : (V + R,) int64
    """
    n_rings = rings.offsets.size - 1
    length = np.diff(rings.offsets)
    offsets = rings.offsets + np.arange(n_rings + 1)
    ring_of = np.repeat(np.arange(n_rings), length + 1)
    t = np.arange(offsets[-1]) - offsets[:-1][ring_of]
    src = rings.offsets[:-1][ring_of] + length[ring_of] - 1 - (t % length[ring_of])
    coords = np.round(xy[src], decimals)
    if coords.size and np.array_equal(coords, np.rint(coords)) and np.abs(coords).max() < 2**52:
        coords = coords.astype(np.int64)
    return np.ascontiguousarray(coords), offsets, ring_of


def _export_window(
    writer: _FeatureCollectionWriter,
    table: CsvTableWriter | None,
    labels: Any,
    ids: np.ndarray,
    box: tuple[int, int, int, int],
    *,
    transform: LevelTransform,
    prefix_for: Callable[[int], bytes],
    default_cls: Classification | None,
    classes: Mapping[int, Any] | None,
    measure: Sequence[str],
    names: Mapping[str, str],
    pixel_size: tuple[float, float],
    slide: Any,
    probability: Any,
    decimals: int,
    validate: bool,
) -> tuple[int, int]:
    r0, c0, r1, c1 = box
    window = _read_block(labels, r0, r1, c0, c1)
    ids = np.sort(ids)
    rings = trace_labels(window, ids=ids)
    xy = transform.continuous_to_xy(rings.vertices + np.array([r0, c0]))
    coords, offs, ring_of = _closed_rings(rings, xy, decimals)
    lo = np.searchsorted(rings.labels, ids, side="left")
    hi = np.searchsorted(rings.labels, ids, side="right")
    n_rings_of = hi - lo
    simple = (n_rings_of == 1) & (rings.area[np.minimum(lo, max(rings.area.size - 1, 0))] > 0) if rings.area.size else np.zeros(ids.size, bool)
    # shapely geometries of all objects: vectorised for single-ring objects, grouped otherwise
    geoms = np.empty(ids.size, dtype=object)
    need_geoms = validate or "solidity" in measure
    if need_geoms and rings.area.size:
        lr = shapely.linearrings(coords.astype(np.float64), indices=ring_of)
        geoms[simple] = shapely.polygons(lr[lo[simple]])
        for k in np.flatnonzero(~simple).tolist():
            if n_rings_of[k] == 0:
                geoms[k] = shapely.Polygon()
                continue
            rs = [coords[offs[j] : offs[j + 1]] for j in range(lo[k], hi[k])]
            outer = [bool(rings.area[j] > 0) for j in range(lo[k], hi[k])]
            groups = _group_rings(rs, outer)
            polys = [shapely.Polygon(rs[g[0]], [rs[i] for i in g[1:]]) for g in groups]
            geoms[k] = polys[0] if len(polys) == 1 else shapely.MultiPolygon(polys)
    valid = shapely.is_valid(geoms) if validate and rings.area.size else np.ones(ids.size, bool)
    meas: dict[str, np.ndarray] = {}
    if measure or table is not None:
        rgb = None
        if slide is not None and ("hematoxylin" in measure or "eosin" in measure):
            rgb = _rgb_window(slide, transform, r0, c0, r1 - r0, c1 - c0)
        prob = None
        if probability is not None and "confidence" in measure:
            prob = probability[r0:r1, c0:c1]
            prob = np.asarray(prob.compute(scheduler="sync") if hasattr(prob, "compute") else prob)
        convex = None
        if "solidity" in measure:
            convex = shapely.area(shapely.convex_hull(geoms)) / (transform.downsample[0] * transform.downsample[1])
        meas = measure_window(
            window, ids, measure=measure, pixel_size=pixel_size, rgb=rgb, probability=prob, convex_area=convex
        )
    uids = _uuid_strings(ids.size)
    meas_names = [names[m] for m in measure]
    meas_table = np.stack([meas[m] for m in measure], axis=1) if measure else None
    meas_rows = meas_table.tolist() if meas_table is not None else None
    finite = np.isfinite(meas_table).all(axis=1) if meas_table is not None else None
    texts: list[bytes] = []
    rows_out = []
    n_skip = 0
    if table is not None:
        cxy = np.round(transform.index_to_xy(np.stack([meas["centroid_row"] + r0, meas["centroid_col"] + c0], axis=1)), 2)
    ids_list = ids.tolist()
    for k, label in enumerate(ids_list):
        if n_rings_of[k] == 0:
            n_skip += 1
            continue
        if not valid[k]:
            fixed = _snap(_repair(geoms[k]), decimals)
            if fixed.is_empty:
                logger.warning("object %d has no valid outline; skipped", label)
                n_skip += 1
                continue
            geom_text = _geometry_text(fixed, decimals)
        elif simple[k]:
            j = lo[k]
            geom_text = _POLY_OPEN + _dumps(coords[offs[j] : offs[j + 1]]) + _CLOSE2
        else:
            rs = [coords[offs[j] : offs[j + 1]] for j in range(lo[k], hi[k])]
            outer = [bool(rings.area[j] > 0) for j in range(lo[k], hi[k])]
            geom_text = _geometry_text_from_rings(rs, outer)
        mtext = None
        if meas_rows is not None:
            values = dict(zip(meas_names, meas_rows[k]))
            mtext = _dumps(values) if finite[k] else _measurements_text(values)
        texts.append(_feature_text(uids[k], geom_text, prefix_for(label), mtext))
        if table is not None:
            cls = _label_class(label, default_cls, classes)
            rows_out.append(
                [uids[k].decode(), label, cls.name if cls else "", float(cxy[k, 0]), float(cxy[k, 1])] + (meas_rows[k] if meas_rows else [])
            )
    writer.write(texts)
    if table is not None:
        table.write_rows(rows_out)
    return len(texts), n_skip


def _drive(gen: Iterator[Any], progress: Callable[[ExportProgress], None] | None, cancel: Callable[[], bool] | None) -> Any:
    result = None
    for event in gen:
        if isinstance(event, ExportProgress):
            if progress is not None:
                progress(event)
            if cancel is not None and cancel():
                gen.close()  # type: ignore[attr-defined]
                raise CancelledError("export cancelled; no file was written")
        else:
            result = event
    return result


def run_export_labels(
    path: str | os.PathLike,
    labels: Any,
    *,
    progress: Callable[[ExportProgress], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    **kwargs: Any,
) -> ExportResult:
    """Run :func:`iter_export_labels` to the end (``progress`` callback, ``cancel`` token).

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> lab = np.zeros((32, 32), np.int32); lab[4:10, 4:12] = 1; lab[20:28, 20:26] = 2
    >>> out = Path(tempfile.mkdtemp()) / "nuclei.geojson"
    >>> run_export_labels(out, lab, measure=[]).n_objects
    2
    """
    return _drive(iter_export_labels(path, labels, **kwargs), progress, cancel)


# ---------------------------------------------------------------------------- shapes export
def iter_export_shapes(
    path: str | os.PathLike,
    data: Sequence[np.ndarray],
    *,
    shape_types: str | Sequence[str] = "polygon",
    slide_metadata: Any | None = None,
    transform: LevelTransform | None = None,
    object_type: str = "annotation",
    classification: Classification | str | None = None,
    color: Any = None,
    classes: Sequence[Classification | str | None] | None = None,
    names: Sequence[str | None] | None = None,
    measure: bool = True,
    metadata: Mapping[str, str] | None = None,
    measurements_path: str | os.PathLike | None | bool = True,
    decimals: int = 2,
) -> Generator[ExportProgress | ExportResult, None, None]:
    """Export napari shapes (hand-drawn regions) to QuPath GeoJSON; yields progress, then the result.

    Parameters
    ----------
    path : path-like
        Output ``.geojson``.
    data : sequence of (N, 2) arrays
        Shape vertices ``(row, col)`` in the layer's data coordinates.
    shape_types : str or sequence of str
        napari shape types.
    slide_metadata : SlideMetadata or dict, optional
        Gives the bounds offset and µm per pixel.
    transform : LevelTransform, optional
        Layer pixels -> QuPath; level 0 of the slide when None.
    object_type : str
        ``annotation`` (default, editable regions) or ``detection``.
    classification, color : optional
        Class of every shape.
    classes : sequence, optional
        Per-shape class (overrides ``classification``; None entries use it).
    names : sequence of str, optional
        Per-shape QuPath object names.
    measure : bool
        Write area and perimeter (µm when the resolution is known).
    metadata : mapping, optional
        Written on every feature.
    measurements_path : path-like, True, False or None
        CSV beside the GeoJSON by default.
    decimals : int
        Coordinate decimals.
    """
    t0 = time.perf_counter()
    path = Path(path)
    object_type = _check_object_type(object_type)
    meta = metadata_as_dict(slide_metadata)
    transform = transform or LevelTransform.for_slide(meta or None)
    default_cls = Classification.of(classification, color)
    n = len(data)
    if classes is not None and len(classes) != n:
        raise ExportError(f"got {n} shapes but {len(classes)} classes")
    if names is not None and len(names) != n:
        raise ExportError(f"got {n} shapes but {len(names)} names")
    geoms = shapes_to_geometries(data, shape_types, transform=transform)
    mpp = meta.get("mpp_x") or meta.get("mpp_y")
    if meta.get("mpp_x") and meta.get("mpp_y"):
        mpp = (float(meta["mpp_x"]) + float(meta["mpp_y"])) / 2.0
    csv_path = _csv_destination(path, measurements_path, measure)
    writer = _FeatureCollectionWriter(path)
    table = None
    try:
        uids = _uuid_strings(n)
        rows = []
        skipped = 0
        texts = []
        for k, geom in enumerate(geoms):
            geom = _snap(geom, decimals)
            if geom.is_empty:
                logger.warning("shape %d is degenerate (no area or length) and was skipped", k)
                skipped += 1
                continue
            cls = default_cls
            if classes is not None and classes[k] is not None:
                cls = Classification.of(classes[k])
            m = geometry_measurements(geom, pixel_size=mpp) if measure else {}
            name = names[k] if names is not None else None
            texts.append(
                _feature_text(
                    uids[k], _geometry_text(geom, decimals), _properties_prefix(object_type, cls, metadata, name),
                    _measurements_text(m) if measure else None,
                )
            )
            c = geom.centroid
            rows.append((uids[k].decode(), k, cls.name if cls else "", round(c.x, 2), round(c.y, 2), m))
            if (k + 1) % 1000 == 0:
                yield ExportProgress(k + 1, n, f"{k + 1} of {n} shapes")
        writer.write(texts)
        if csv_path is not None:
            mcols = list(dict.fromkeys(name for *_, m in rows for name in m))
            table = CsvTableWriter(csv_path, ["id", "index", "class", "centroid_x", "centroid_y"] + mcols)
            table.write_rows([list(r[:5]) + [r[5].get(c, float("nan")) for c in mcols] for r in rows])
        out, csv_out = _commit_outputs(writer, table)
    except BaseException:
        _abort_outputs(writer, table)
        raise
    yield ExportProgress(n, n, f"{n - skipped} shapes written")
    yield ExportResult(out, n - skipped, skipped, csv_out, time.perf_counter() - t0)


def run_export_shapes(
    path: str | os.PathLike,
    data: Sequence[np.ndarray],
    *,
    progress: Callable[[ExportProgress], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    **kwargs: Any,
) -> ExportResult:
    """Run :func:`iter_export_shapes` to the end."""
    return _drive(iter_export_shapes(path, data, **kwargs), progress, cancel)


# ---------------------------------------------------------------------------- import
@dataclass
class GeoJSONObject:
    """One object read from a GeoJSON file.

    Attributes
    ----------
    geometry : shapely geometry
        In the file's QuPath frame (level-0 ``(x, y)``, bounds offset not added).
    object_type : str
        One of :data:`OBJECT_TYPES`.
    classification : Classification or None
    measurements : dict of str -> float
    metadata : dict of str -> str
    id : str or None
    name : str or None
    nucleus_geometry : shapely geometry or None
        Nucleus of a ``cell`` object.
    """

    geometry: Any
    object_type: str = "annotation"
    classification: Classification | None = None
    measurements: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    id: str | None = None
    name: str | None = None
    nucleus_geometry: Any = None


_WS = " \t\n\r"


class _StreamJSON:
    """Incremental reader of top-level JSON values with :meth:`json.JSONDecoder.raw_decode`."""

    def __init__(self, fh: Any, path: Path, block: int = 1 << 20) -> None:
        self.fh, self.path, self.block = fh, path, block
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.decoder = json.JSONDecoder()

    def _more(self) -> bool:
        if self.eof:
            return False
        data = self.fh.read(self.block)
        if not data:
            self.eof = True
            return False
        if self.pos > (1 << 20):
            self.buf = self.buf[self.pos :]
            self.pos = 0
        self.buf += data
        return True

    def peek(self) -> str:
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WS:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more():
                return ""

    def expect(self, chars: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            raise GeoJSONError(
                f"{self.path}: not valid JSON near character {self.pos} (expected {chars!r}, found {c or 'end of file'!r}); "
                "check the file was fully written"
            )
        self.pos += 1
        return c

    def value(self) -> Any:
        self.peek()
        while True:
            try:
                val, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                if self._more():
                    continue
                raise GeoJSONError(f"{self.path}: not valid JSON ({exc.msg} near character {exc.pos}); check the file was fully written") from None
            # a number at the end of the buffer may continue in the next block
            if end >= len(self.buf) and not self.eof and self._more():
                continue
            self.pos = end
            return val

    def array(self) -> Iterator[Any]:
        self.expect("[")
        if self.peek() == "]":
            self.pos += 1
            return
        while True:
            yield self.value()
            if self.expect(",]") == "]":
                return


def _iter_raw_features(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, "r", encoding="utf-8-sig") as fh:
        s = _StreamJSON(fh, path)
        first = s.peek()
        if first == "[":
            yield from enumerate(s.array())
            return
        if first != "{":
            raise GeoJSONError(f"{path}: not a GeoJSON file (it does not start with '{{' or '['); export it from QuPath as GeoJSON")
        s.pos += 1
        top: dict[str, Any] = {}
        saw_features = False
        if s.peek() == "}":
            s.pos += 1
        else:
            while True:
                key = s.value()
                if not isinstance(key, str):
                    raise GeoJSONError(f"{path}: not valid JSON (object key expected near character {s.pos})")
                s.expect(":")
                if key == "features" and s.peek() == "[":
                    saw_features = True
                    yield from enumerate(s.array())
                else:
                    top[key] = s.value()
                if s.expect(",}") == "}":
                    break
        if saw_features:
            if top.get("type") not in (None, "FeatureCollection"):
                logger.warning("%s: top-level type %r with a features list read as a FeatureCollection", path, top.get("type"))
            return
        kind = top.get("type")
        if kind == "Feature" or "geometry" in top:
            yield 0, top
        elif kind in ("Polygon", "MultiPolygon", "LineString", "MultiLineString", "Point", "MultiPoint", "GeometryCollection"):
            yield 0, {"type": "Feature", "geometry": top, "properties": {}}
        elif kind == "FeatureCollection":
            raise GeoJSONError(f"{path}: FeatureCollection without a 'features' list; the file is malformed")
        else:
            raise GeoJSONError(
                f"{path}: no features found (top-level type {kind!r}); expected a FeatureCollection, a Feature or a list of features"
            )


def _parse_color(value: Any, where: str) -> tuple[int, int, int] | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise GeoJSONError(f"{where}: colour {value!r} is not a colour")
    if isinstance(value, (int, np.integer)):
        v = int(value) & 0xFFFFFFFF
        return ((v >> 16) & 255, (v >> 8) & 255, v & 255)
    if isinstance(value, (list, tuple)) and len(value) in (3, 4) and all(isinstance(x, (int, float)) for x in value):
        arr = [int(round(float(x))) for x in value[:3]]
        if min(arr) < 0 or max(arr) > 255:
            raise GeoJSONError(f"{where}: colour {value!r} has values outside 0-255")
        return tuple(arr)  # type: ignore[return-value]
    if isinstance(value, str) and value.startswith("#") and len(value) == 7:
        try:
            return (int(value[1:3], 16), int(value[3:5], 16), int(value[5:7], 16))
        except ValueError:
            pass
    raise GeoJSONError(f"{where}: colour {value!r} is neither [r, g, b] nor a packed RGB integer")


def _parse_classification(props: Mapping[str, Any], where: str) -> Classification | None:
    value = props.get("classification")
    if value is None:
        return None
    if isinstance(value, str):
        return Classification(value, class_color(value)) if value else None
    if isinstance(value, Mapping):
        name = value.get("name")
        if name is None and "names" in value and isinstance(value["names"], list):
            name = ": ".join(str(n) for n in value["names"])
        if not isinstance(name, str) or not name:
            return None
        color = _parse_color(value.get("color", value.get("colorRGB")), where)
        return Classification(name, color if color is not None else class_color(name))
    raise GeoJSONError(f"{where}: classification must be a name or {{name, color}}, got {type(value).__name__}")


def _parse_measurements(value: Any, where: str) -> dict[str, float]:
    if value is None:
        return {}
    items: Iterable[tuple[Any, Any]]
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, list):
        items = []
        for m in value:
            if not isinstance(m, Mapping) or "name" not in m:
                raise GeoJSONError(f"{where}: a measurement list must hold {{name, value}} entries, got {m!r}")
            items.append((m["name"], m.get("value")))
    else:
        raise GeoJSONError(f"{where}: measurements must be a map or a list of {{name, value}}, got {type(value).__name__}")
    out = {}
    for k, v in items:
        try:
            out[str(k)] = float("nan") if v is None else float(v)
        except (TypeError, ValueError):
            raise GeoJSONError(f"{where}: measurement {k!r} is not a number ({v!r})") from None
    return out


def _parse_geometry(value: Any, where: str) -> Any:
    if not isinstance(value, Mapping) or "type" not in value:
        raise GeoJSONError(f"{where}: geometry must be a GeoJSON geometry object, got {value!r:.80}")
    try:
        geom = shapely_shape(value)
    except Exception as exc:  # shapely raises several types for bad coordinates
        raise GeoJSONError(f"{where}: unreadable {value.get('type')} geometry ({exc})") from None
    if geom.is_empty:
        raise GeoJSONError(f"{where}: the geometry is empty")
    coords = shapely.get_coordinates(geom)
    if not np.all(np.isfinite(coords)):
        raise GeoJSONError(f"{where}: the geometry has non-finite coordinates")
    return geom


def slide_extent(slide_metadata: Any) -> tuple[float, float] | None:
    """QuPath ``(width, height)`` of a slide (level 0 cropped to the OpenSlide bounds), or None."""
    meta = metadata_as_dict(slide_metadata)
    dims = meta.get("level_dimensions")
    if not dims:
        return None
    w, h = float(dims[0][0]), float(dims[0][1])
    props = meta.get("properties") or {}
    bw = props.get("openslide.bounds-width")
    bh = props.get("openslide.bounds-height")
    try:
        w = float(bw) if bw is not None else w - float(meta.get("bounds_x") or 0)
        h = float(bh) if bh is not None else h - float(meta.get("bounds_y") or 0)
    except ValueError:
        pass
    return (w, h)


def iter_geojson(
    path: str | os.PathLike,
    *,
    slide_metadata: Any | None = None,
    repair: bool = False,
    margin: float | None = None,
) -> Iterator[GeoJSONObject]:
    """Stream the objects of a QuPath GeoJSON file (0.4+ and older forms).

    Parameters
    ----------
    path : path-like
        A ``.geojson`` (or ``.json``) file: a FeatureCollection, a bare list of features,
        or a single Feature.
    slide_metadata : SlideMetadata or dict, optional
        When given, objects lying entirely outside the slide (beyond ``margin``) raise.
    repair : bool
        Repair invalid polygons with :func:`shapely.make_valid` instead of raising.
    margin : float, optional
        Tolerance outside the slide, level-0 pixels (default 5 % of the larger side).

    Yields
    ------
    GeoJSONObject

    Raises
    ------
    GeoJSONError
        Malformed JSON or features, unknown object types, invalid geometry (unless
        ``repair``), objects far outside the slide.
    """
    path = Path(path)
    if not path.is_file():
        raise GeoJSONError(f"{path}: no such file")
    extent = slide_extent(slide_metadata) if slide_metadata is not None else None
    if extent is not None and margin is None:
        margin = 0.05 * max(extent)
    for i, feat in _iter_raw_features(path):
        if not isinstance(feat, Mapping):
            raise GeoJSONError(f"{path}: feature {i} is a {type(feat).__name__}, not a Feature object")
        fid = feat.get("id")
        where = f"{path}: feature {i}" + (f" (id {fid})" if fid is not None else "")
        ftype = feat.get("type", "Feature")
        if ftype != "Feature":
            raise GeoJSONError(f"{where}: type is {ftype!r}, expected 'Feature'")
        props = feat.get("properties") or {}
        if not isinstance(props, Mapping):
            raise GeoJSONError(f"{where}: properties must be an object")
        raw_type = props.get("objectType", props.get("object_type"))
        if raw_type is None and isinstance(props.get("type"), str) and props["type"].lower() in _OBJECT_TYPE_LOOKUP:
            raw_type = props["type"]
        if raw_type is None:
            raw_type = "annotation"
        object_type = _OBJECT_TYPE_LOOKUP.get(str(raw_type).lower())
        if object_type is None:
            raise GeoJSONError(f"{where}: objectType {raw_type!r} is not a QuPath object type ({', '.join(OBJECT_TYPES)})")
        if feat.get("geometry") is None:
            if object_type == "root":
                continue
            raise GeoJSONError(f"{where}: the feature has no geometry")
        geom = _parse_geometry(feat["geometry"], where)
        if not geom.is_valid:
            if not repair:
                raise GeoJSONError(
                    f"{where}: invalid geometry ({shapely.is_valid_reason(geom)}); fix it in QuPath "
                    "(e.g. Objects > Annotations > Simplify shape) or import with repair=True / --repair"
                )
            geom = _repair(geom) if geom.geom_type in ("Polygon", "MultiPolygon") else shapely.make_valid(geom)
            if geom.is_empty:
                raise GeoJSONError(f"{where}: the geometry has no area left after repair")
        if extent is not None:
            x0, y0, x1, y1 = geom.bounds
            w, h = extent
            if x1 < -margin or y1 < -margin or x0 > w + margin or y0 > h + margin:
                raise GeoJSONError(
                    f"{where}: the object lies at x {x0:.0f}..{x1:.0f}, y {y0:.0f}..{y1:.0f}, far outside the slide "
                    f"({w:.0f} x {h:.0f} level-0 pixels); is this GeoJSON from another slide, or in µm instead of pixels?"
                )
        nucleus = None
        if props.get("nucleusGeometry") is not None:
            nucleus = _parse_geometry(props["nucleusGeometry"], where + " nucleusGeometry")
        md = props.get("metadata") or {}
        if not isinstance(md, Mapping):
            raise GeoJSONError(f"{where}: metadata must be a map of strings")
        name = props.get("name")
        yield GeoJSONObject(
            geometry=geom,
            object_type=object_type,
            classification=_parse_classification(props, where),
            measurements=_parse_measurements(props.get("measurements"), where),
            metadata={str(k): str(v) for k, v in md.items()},
            id=None if fid is None else str(fid),
            name=None if name is None else str(name),
            nucleus_geometry=nucleus,
        )


def read_geojson(
    path: str | os.PathLike,
    *,
    slide_metadata: Any | None = None,
    repair: bool = False,
    margin: float | None = None,
) -> list[GeoJSONObject]:
    """Read every object of a QuPath GeoJSON file; see :func:`iter_geojson`.

    Examples
    --------
    >>> import tempfile, json
    >>> p = Path(tempfile.mkdtemp()) / "a.geojson"
    >>> _ = p.write_text(json.dumps([{"type": "Feature", "geometry": {"type": "Polygon",
    ...     "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 0]]]},
    ...     "properties": {"object_type": "detection", "classification": {"name": "Tumor", "colorRGB": -3670016}}}]))
    >>> obj = read_geojson(p)[0]
    >>> obj.object_type, obj.classification.color
    ('detection', (200, 0, 0))
    """
    return list(iter_geojson(path, slide_metadata=slide_metadata, repair=repair, margin=margin))


# ---------------------------------------------------------------------------- rasterising
def _polygons_of(geom: Any) -> list[Any]:
    return [g for g in shapely.get_parts(geom) if g.geom_type == "Polygon" and not g.is_empty] if geom.geom_type in (
        "Polygon", "MultiPolygon", "GeometryCollection") else []


def _draw_geometry(out: np.ndarray, geom: Any, value: int, transform: LevelTransform) -> None:
    """Fill ``geom`` (QuPath xy) into ``out`` with ``value``: pixels whose centre is inside, holes kept."""
    from skimage.draw import polygon as draw_polygon

    rows, cols = out.shape
    for poly in _polygons_of(geom):
        ext = transform.xy_to_index(np.asarray(poly.exterior.coords))
        r0 = max(0, int(math.floor(ext[:, 0].min())))
        r1 = min(rows, int(math.ceil(ext[:, 0].max())) + 1)
        c0 = max(0, int(math.floor(ext[:, 1].min())))
        c1 = min(cols, int(math.ceil(ext[:, 1].max())) + 1)
        if r1 <= r0 or c1 <= c0:
            continue
        mask = np.zeros((r1 - r0, c1 - c0), dtype=bool)
        rr, cc = draw_polygon(ext[:, 0] - r0, ext[:, 1] - c0, shape=mask.shape)
        mask[rr, cc] = True
        for ring in poly.interiors:
            hole = transform.xy_to_index(np.asarray(ring.coords))
            rr, cc = draw_polygon(hole[:, 0] - r0, hole[:, 1] - c0, shape=mask.shape)
            mask[rr, cc] = False
        out[r0:r1, c0:c1][mask] = value


def rasterize(
    objects: Sequence[GeoJSONObject | Any],
    *,
    shape: tuple[int, int],
    transform: LevelTransform | None = None,
    values: Sequence[int] | None = None,
    dtype: Any = np.int32,
) -> np.ndarray:
    """Rasterise polygons into a label image (pixels whose centre is inside; holes kept).

    Parameters
    ----------
    objects : sequence of GeoJSONObject or shapely geometries
        Geometries in QuPath ``(x, y)``; lines and points are skipped.
    shape : (rows, cols)
        Output shape (pixels of the level described by ``transform``).
    transform : LevelTransform, optional
        Output pixels <-> QuPath (level 0 without offsets when None).
    values : sequence of int, optional
        Label of each object (1..n by default); later objects overwrite earlier ones.
    dtype : numpy dtype
        Output dtype.

    Returns
    -------
    (rows, cols) array
    """
    transform = transform or LevelTransform()
    out = np.zeros(tuple(int(v) for v in shape), dtype=dtype)
    vals = range(1, len(objects) + 1) if values is None else values
    if len(vals) != len(objects):
        raise GeoJSONError(f"got {len(objects)} objects but {len(vals)} label values")
    for obj, v in zip(objects, vals):
        geom = obj.geometry if isinstance(obj, GeoJSONObject) else obj
        _draw_geometry(out, geom, int(v), transform)
    return out


def iter_label_tiles(
    objects: Sequence[GeoJSONObject | Any],
    *,
    shape: tuple[int, int],
    transform: LevelTransform | None = None,
    tile: int = 512,
    dtype: Any = np.uint32,
) -> Iterator[np.ndarray]:
    """Rasterise objects tile by tile (row-major), each tile ``(tile, tile)`` (memory: one tile).

    Objects are looked up per tile in an :class:`shapely.STRtree`; labels are 1..n in order.
    """
    transform = transform or LevelTransform()
    geoms = [o.geometry if isinstance(o, GeoJSONObject) else o for o in objects]
    tree = shapely.STRtree(geoms)
    rows, cols = shape
    for r0 in range(0, rows, tile):
        for c0 in range(0, cols, tile):
            corners = transform.continuous_to_xy(np.array([[r0, c0], [r0 + tile, c0 + tile]], dtype=np.float64))
            box = shapely.box(*corners.min(axis=0), *corners.max(axis=0))
            idx = np.sort(tree.query(box))
            out = np.zeros((tile, tile), dtype=dtype)
            if idx.size:
                sub = LevelTransform(transform.downsample, (transform.origin[0] + r0, transform.origin[1] + c0), transform.bounds)
                for k in idx.tolist():
                    _draw_geometry(out, geoms[k], k + 1, sub)
                out[max(0, rows - r0) :, :] = 0
                out[:, max(0, cols - c0) :] = 0
            yield out


def write_labels_tiff(
    path: str | os.PathLike,
    objects: Sequence[GeoJSONObject | Any],
    *,
    shape: tuple[int, int],
    transform: LevelTransform | None = None,
    tile: int = 512,
    progress: Callable[[ExportProgress], None] | None = None,
) -> Path:
    """Write the rasterised objects to a tiled, compressed (Big)TIFF, one tile in memory at a time.

    Parameters
    ----------
    path : path-like
        Output ``.tif``.
    objects : sequence
        As for :func:`rasterize`; label ``k + 1`` for ``objects[k]``.
    shape : (rows, cols)
    transform : LevelTransform, optional
    tile : int
        Tile edge (multiple of 16).
    progress : callable, optional
        Called with :class:`ExportProgress` per row of tiles.

    Returns
    -------
    Path
    """
    import tifffile

    path = Path(path)
    if tile % 16:
        raise ExportError(f"tile must be a multiple of 16, got {tile}")
    n = len(objects)
    dtype = np.uint16 if n < 65535 else np.uint32
    rows, cols = (int(v) for v in shape)
    n_tiles = math.ceil(rows / tile) * math.ceil(cols / tile)

    def tiles() -> Iterator[np.ndarray]:
        for k, t in enumerate(iter_label_tiles(objects, shape=(rows, cols), transform=transform, tile=tile, dtype=dtype)):
            if progress is not None and (k + 1) % max(1, math.ceil(cols / tile)) == 0:
                progress(ExportProgress(k + 1, n_tiles, "rasterising"))
            yield t

    parent = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.tif", dir=parent)
    os.close(fd)
    try:
        tifffile.imwrite(
            tmp, tiles(), shape=(rows, cols), dtype=dtype, tile=(tile, tile), compression="zlib",
            bigtiff=rows * cols * np.dtype(dtype).itemsize > 2**31, metadata=None,
        )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
