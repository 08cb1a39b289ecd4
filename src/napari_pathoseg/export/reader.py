"""Import of QuPath GeoJSON (0.4+ and older forms), streamed feature by feature.

:func:`read_geojson` and :func:`iter_geojson` parse the file with
:meth:`json.JSONDecoder.raw_decode` on 1 MiB blocks, so a file of 200,000 nuclei is never
held as one JSON document. They accept QuPath 0.4+ and the older forms (``object_type``,
``colorRGB``, string classifications, measurement lists, bare feature lists).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import shapely
from shapely.geometry import shape as shapely_shape

from napari_pathoseg.errors import GeoJSONError
from napari_pathoseg.export.coords import metadata_as_dict
from napari_pathoseg.export.geometry import _repair
from napari_pathoseg.export.qupath import _OBJECT_TYPE_LOOKUP, OBJECT_TYPES, Classification, GeoJSONObject, class_color

__all__ = ["iter_geojson", "read_geojson", "read_members", "slide_extent"]

logger = logging.getLogger(__name__)

_WS = " \t\n\r"

#: Largest |coordinate| accepted, level-0 pixels (the largest slide side accepted, x 5).
MAX_COORDINATE = 1e7


class _StreamJSON:
    """Incremental reader of top-level JSON values with :meth:`json.JSONDecoder.raw_decode`."""

    def __init__(self, fh: Any, path: Path, block: int = 1 << 20) -> None:
        self.fh, self.path, self.block = fh, path, block
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.decoder = json.JSONDecoder()

    def _more(self, *, grow: bool = False) -> bool:
        """Read the next block; ``grow``: at least as much as is pending (a value decoded again
        after each read then costs O(its size) in total, not O(size^2 / block))."""
        if self.eof:
            return False
        size = max(self.block, len(self.buf) - self.pos) if grow else self.block
        try:
            data = self.fh.read(size)
        except UnicodeDecodeError as exc:
            raise GeoJSONError(
                f"{self.path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} near byte {exc.start} of a block); "
                "GeoJSON must be UTF-8: export it again from QuPath or re-save it as UTF-8"
            ) from None
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
                if self._more(grow=True):
                    continue
                raise GeoJSONError(f"{self.path}: not valid JSON ({exc.msg} near character {exc.pos}); check the file was fully written") from None
            except RecursionError:
                raise GeoJSONError(f"{self.path}: JSON nested too deeply near character {self.pos}; this is not a QuPath GeoJSON file") from None
            except ValueError as exc:  # e.g. an integer of thousands of digits
                raise GeoJSONError(f"{self.path}: unreadable JSON value near character {self.pos} ({exc}); check the file") from None
            # a number at the end of the buffer may continue in the next block
            if end >= len(self.buf) and not self.eof and self._more(grow=True):
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


def read_members(path: str | os.PathLike) -> dict[str, Any]:
    """Top-level members of a GeoJSON object that come before its ``features`` (read without them).

    Exports write their slide record there (:mod:`~napari_pathoseg.export.slide_record`),
    so it is found by reading the first block of the file only. A bare list of features
    has no members (``{}``).

    Raises
    ------
    GeoJSONError
        The file is missing or its start is not valid JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise GeoJSONError(f"{path}: no such file")
    out: dict[str, Any] = {}
    with open(path, "r", encoding="utf-8-sig") as fh:
        s = _StreamJSON(fh, path)
        if s.peek() != "{":
            return out
        s.pos += 1
        if s.peek() == "}":
            return out
        while True:
            key = s.value()
            if not isinstance(key, str):
                raise GeoJSONError(f"{path}: not valid JSON (object key expected near character {s.pos})")
            s.expect(":")
            if key == "features":
                return out
            out[key] = s.value()
            if s.expect(",}") == "}":
                return out


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


def _fast_polygon(value: Mapping[str, Any]) -> Any:
    """A Polygon built through numpy (large outlines: ~10x faster than ``shape()``), else None."""
    if value.get("type") != "Polygon":
        return None
    rings = value.get("coordinates")
    if not isinstance(rings, list) or not rings:
        return None
    try:
        arrays = [np.asarray(r, dtype=np.float64) for r in rings]
    except (TypeError, ValueError, OverflowError):
        return None
    if any(a.ndim != 2 or a.shape[1] not in (2, 3) or len(a) < 4 for a in arrays):
        return None
    arrays = [a[:, :2] for a in arrays]
    return shapely.polygons(shapely.linearrings(arrays[0]), holes=[shapely.linearrings(a) for a in arrays[1:]] or None)


def _parse_geometry(value: Any, where: str) -> Any:
    if not isinstance(value, Mapping) or "type" not in value:
        raise GeoJSONError(f"{where}: geometry must be a GeoJSON geometry object, got {value!r:.80}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # NaN coordinates: refused below
            geom = _fast_polygon(value) or shapely_shape(value)
    except RecursionError:
        raise GeoJSONError(f"{where}: geometry nested too deeply") from None
    except Exception as exc:  # shapely raises several types for bad coordinates
        raise GeoJSONError(f"{where}: unreadable {value.get('type')} geometry ({exc})") from None
    if geom.is_empty:
        raise GeoJSONError(f"{where}: the geometry is empty")
    coords = shapely.get_coordinates(geom)
    if not np.all(np.isfinite(coords)):
        raise GeoJSONError(f"{where}: the geometry has non-finite coordinates")
    if np.abs(coords).max() > MAX_COORDINATE:
        raise GeoJSONError(
            f"{where}: coordinates up to {np.abs(coords).max():.3g} are far beyond any slide (limit {MAX_COORDINATE:.0e} "
            "level-0 pixels); the file is damaged or not in pixels"
        )
    if shapely.has_z(geom):
        geom = shapely.force_2d(geom)  # QuPath is 2-D: a z (or m) value is dropped
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
            far = 10 * max(w, h) + margin
            if x0 < -far or y0 < -far or x1 > w + far or y1 > h + far:
                raise GeoJSONError(
                    f"{where}: the object reaches x {x0:.3g}..{x1:.3g}, y {y0:.3g}..{y1:.3g}, far beyond the slide "
                    f"({w:.0f} x {h:.0f} level-0 pixels); is this GeoJSON in µm instead of pixels, or damaged?"
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

