"""Object outlines as geometry: traced rings to shapely (Multi)Polygons and GeoJSON text,
napari shapes to valid geometries, repair and snapping to the written decimal grid.

Coordinates go through :class:`~napari_pathoseg.export.coords.LevelTransform` only.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import shapely
from shapely.geometry import mapping

from napari_pathoseg.export._encode import _CLOSE2, _MULTI_OPEN, _POLY_OPEN, _dumps
from napari_pathoseg.export._output import ExportError
from napari_pathoseg.export._trace import TracedRings, trace_labels
from napari_pathoseg.export.coords import LevelTransform

__all__ = ["rings_to_geometries", "labels_to_geometries", "shapes_to_geometries", "check_labels_array"]


def check_labels_array(labels: Any, *, name: str) -> Any:
    """``labels`` itself when it is a 2-D integer (or boolean) array, else :class:`ExportError`."""
    if labels.ndim != 2:
        raise ExportError(
            f"{name}: a label image must be 2-D (rows, cols), got shape {tuple(labels.shape)}; "
            "pass one plane (e.g. labels[0]) or the level-0 array of a multiscale layer"
        )
    if np.dtype(labels.dtype).kind not in "iub":
        raise ExportError(f"{name}: a label image must hold integers, got dtype {labels.dtype}; convert it with astype(np.int32)")
    return labels


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
    labels = check_labels_array(np.asarray(labels), name="labels")
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

