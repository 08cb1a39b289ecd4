"""Tissue class regions as QuPath GeoJSON annotations.

A tissue map (uint8 class ids, 0 background) is split into connected regions of one class
(4-connectivity); each region becomes one QuPath *annotation* whose classification is its class
name, placed on the slide by the map's level-0 origin and scale. Regions smaller than
``min_pixels`` (specks of the argmax) are left out. Written by the streaming label exporter
(:func:`napari_pathoseg.export.labels_export.run_export_labels`): atomic, nothing half-written.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathoseg.errors import PathosegError

__all__ = ["class_regions", "export_tissue_geojson"]


def class_regions(ids: np.ndarray, n_classes: int, *, min_pixels: int = 16) -> tuple[np.ndarray, dict[int, int]]:
    """Connected one-class regions of a class-id map.

    Returns
    -------
    labels : (rows, cols) int32
        0 = background or a dropped small region, 1..m one id per region.
    region_class : dict
        Region id -> class id (1..``n_classes``).
    """
    from skimage.measure import label

    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise PathosegError(f"A tissue map is a 2-D array of class ids (got shape {ids.shape}).")
    ids = np.where(ids <= n_classes, ids, 0).astype(np.uint8)
    lab = label(ids, background=0, connectivity=1).astype(np.int32)
    if lab.max() == 0:
        return lab, {}
    sizes = np.bincount(lab.ravel())
    cls = np.zeros(sizes.size, np.int64)
    cls[lab.ravel()] = ids.ravel()
    keep = sizes >= max(1, int(min_pixels))
    keep[0] = False
    remap = np.zeros(sizes.size, np.int32)
    remap[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    out = remap[lab]
    return out, {int(remap[i]): int(cls[i]) for i in np.flatnonzero(keep)}


def export_tissue_geojson(ids: np.ndarray, classes: Sequence[str], path: str | os.PathLike, *,
                          region_xy: tuple[float, float] = (0.0, 0.0), scale: float = 1.0,
                          slide_metadata: Any = None, min_pixels: int = 16,
                          metadata: dict[str, str] | None = None, cancel: Any = None) -> dict[str, int]:
    """Write the class regions of ``ids`` to ``path`` as QuPath annotations; returns regions per class.

    Parameters
    ----------
    ids : (rows, cols) uint8
        The tissue map (0 background, 1..n ``classes``), e.g. the Labels layer of the Tissue dock.
    classes : sequence of str
        Class names of ids 1..n (each region's QuPath classification).
    region_xy : (x, y)
        Level-0 pixel of the map's top-left corner.
    scale : float
        Level-0 pixels per map pixel.
    slide_metadata : SlideMetadata or dict, optional
        The slide's, so QuPath places the annotations (µm per pixel, size).
    """
    from napari_pathoseg.export.labels_export import run_export_labels

    if scale <= 0:
        raise PathosegError(f"The map's scale must be positive (got {scale}).")
    labels, region_class = class_regions(ids, len(classes), min_pixels=min_pixels)
    if not region_class:
        raise PathosegError("The tissue map has no class region to export; segment tissue first.")
    x, y = region_xy
    res = run_export_labels(
        Path(path), labels, slide_metadata=slide_metadata, downsample=float(scale),
        origin=(y / scale, x / scale), object_type="annotation", classification=None,
        classes={r: classes[c - 1] for r, c in region_class.items()}, measure=[], measurements_path=False,
        metadata=dict(metadata or {}), cancel=(lambda: cancel.is_set()) if cancel is not None else None,
    )
    counts: dict[str, int] = {}
    for c in region_class.values():
        counts[classes[c - 1]] = counts.get(classes[c - 1], 0) + 1
    counts["total"] = int(res.n_objects)
    return counts
