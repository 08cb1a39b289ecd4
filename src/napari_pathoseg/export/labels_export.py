"""Streaming export of label images (numpy or dask, any pyramid level) to QuPath GeoJSON.

Label images are read in chunks: a first pass finds every object's bounding box
(:func:`scipy.ndimage.find_objects` per chunk), a second pass traces, validates and
measures the objects owned by each chunk inside a window extended by a halo, so memory
is bounded by the chunk size, not the slide size. Features go to a temporary file beside
the destination, chunk by chunk, moved into place at the end: a cancelled or failed
export never leaves a half-written file.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Generator, Mapping, Sequence

import numpy as np
import shapely
from scipy import ndimage as ndi

from napari_pathoseg.export._encode import (
    _CLOSE2,
    _POLY_OPEN,
    FeatureCollectionWriter,
    _dumps,
    _feature_text,
    _measurements_text,
    _properties_prefix,
    _uuid_strings,
)
from napari_pathoseg.export._output import ExportError, abort_outputs, commit_outputs, table_destination
from napari_pathoseg.export._trace import TracedRings, trace_labels
from napari_pathoseg.export.coords import LevelTransform, _world_mpp, metadata_as_dict
from napari_pathoseg.export.geometry import _geometry_text, _geometry_text_from_rings, _group_rings, _repair, _snap, check_labels_array
from napari_pathoseg.export.measurements import CsvTableWriter, measure_window, measurement_names
from napari_pathoseg.export.qupath import Classification, ExportProgress, ExportResult, check_object_type, drive, stop_if_cancelled
from napari_pathoseg.export.slide_record import collection_members

__all__ = ["MAX_OBJECT_PIXELS", "iter_export_labels", "run_export_labels"]

logger = logging.getLogger(__name__)

#: Default limit of one object's bounding box, in pixels of its level.
MAX_OBJECT_PIXELS = 64_000_000


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
    cancel: Any | None = None,
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
        writes ``OUT.csv`` beside ``OUT.geojson`` when something is measured, but refuses
        (:class:`~._output.ExportOutputError`) to replace an ``OUT.csv`` that is not a table
        an export wrote; a path is written as asked; False or None: no table.
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
    cancel : CancelToken, optional
        Checked after each chunk (:class:`~napari_pathoseg.events.CancelToken` or any object
        with ``is_set()``): when set, the temporary files are removed and
        :class:`~napari_pathoseg.errors.CancelledError` is raised (closing the generator
        does the same without raising).

    Yields
    ------
    ExportProgress
        After each chunk.
    ExportResult
        Last.
    """
    t0 = time.perf_counter()
    path = Path(path)
    labels = check_labels_array(labels, name="labels")
    object_type = check_object_type(object_type)
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

    csv_path = table_destination(path, measurements_path, bool(measure))

    yield ExportProgress(0, 0, "finding objects")
    gids, gbox = _global_boxes(labels, chunk_size)
    total = int(gids.size)
    logger.info("exporting %d objects to %s", total, path)
    writer = FeatureCollectionWriter(path, members=collection_members(meta))
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
                stop_if_cancelled(cancel)
        stop_if_cancelled(cancel)
        out_path, csv_out = commit_outputs(writer, table)
    except BaseException:
        abort_outputs(writer, table)
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
    writer: FeatureCollectionWriter,
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
    return drive(iter_export_labels(path, labels, **kwargs), progress, cancel)

