"""Export of napari shapes (hand-drawn regions, paths) to QuPath GeoJSON."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Generator, Mapping, Sequence

import numpy as np

from napari_pathoseg.export._encode import FeatureCollectionWriter, _feature_text, _measurements_text, _properties_prefix, _uuid_strings
from napari_pathoseg.export._output import ExportError, abort_outputs, commit_outputs, table_destination
from napari_pathoseg.export.coords import LevelTransform, metadata_as_dict
from napari_pathoseg.export.geometry import _geometry_text, _snap, shapes_to_geometries
from napari_pathoseg.export.measurements import CsvTableWriter, geometry_measurements
from napari_pathoseg.export.qupath import Classification, ExportProgress, ExportResult, check_object_type, drive, stop_if_cancelled
from napari_pathoseg.export.slide_record import collection_members

__all__ = ["iter_export_shapes", "run_export_shapes"]

logger = logging.getLogger(__name__)


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
    cancel: Any | None = None,
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
        CSV beside the GeoJSON by default (never over a file that is not an export's
        table); a path is written as asked; False or None: no table.
    decimals : int
        Coordinate decimals.
    cancel : CancelToken, optional
        Checked every 1000 shapes: when set, nothing is written and
        :class:`~napari_pathoseg.errors.CancelledError` is raised.
    """
    t0 = time.perf_counter()
    path = Path(path)
    object_type = check_object_type(object_type)
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
    csv_path = table_destination(path, measurements_path, measure)
    writer = FeatureCollectionWriter(path, members=collection_members(meta))
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
                stop_if_cancelled(cancel)
        stop_if_cancelled(cancel)
        writer.write(texts)
        if csv_path is not None:
            mcols = list(dict.fromkeys(name for *_, m in rows for name in m))
            table = CsvTableWriter(csv_path, ["id", "index", "class", "centroid_x", "centroid_y"] + mcols)
            table.write_rows([list(r[:5]) + [r[5].get(c, float("nan")) for c in mcols] for r in rows])
        out, csv_out = commit_outputs(writer, table)
    except BaseException:
        abort_outputs(writer, table)
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
    return drive(iter_export_shapes(path, data, **kwargs), progress, cancel)

