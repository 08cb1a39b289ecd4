"""Rasterising GeoJSON objects into label images: in memory, tile by tile, or to a tiled TIFF.

A pixel is inside an object when its centre is (:func:`skimage.draw.polygon`); holes are
kept. Outlines traced from label pixels follow pixel edges, so rasterising them back
gives the same pixels.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import shapely

from napari_pathoseg._atomic import OutputError, atomic_path
from napari_pathoseg.errors import GeoJSONError
from napari_pathoseg.export._output import ExportError, ExportOutputError
from napari_pathoseg.export.coords import LevelTransform
from napari_pathoseg.export.qupath import ExportProgress, GeoJSONObject

__all__ = ["rasterize", "iter_label_tiles", "write_labels_tiff"]


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

    try:
        with atomic_path(path) as tmp:
            tifffile.imwrite(
                tmp, tiles(), shape=(rows, cols), dtype=dtype, tile=(tile, tile), compression="zlib",
                bigtiff=rows * cols * np.dtype(dtype).itemsize > 2**31, metadata=None,
            )
    except OutputError as exc:
        raise ExportOutputError(str(exc)) from None
    return path
