"""Open a finished slide of a cohort: its record and its result files as lazy arrays (for the dock).

:func:`slide_results` reads ``DIR/<stem>/summary.json`` and, for every output the task declares as
a layer (:attr:`~napari_pathoseg.cohort.tasks.BatchTask.layers`), opens the TIFF lazily (a dask
array over its tiles) with a coarse-to-fine list of levels, so a viewer reads only what it shows.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathoseg.cohort.outputs import read_record
from napari_pathoseg.errors import PathosegError

__all__ = ["ResultLayer", "SlideResults", "slide_results", "lazy_levels"]

logger = logging.getLogger(__name__)


@dataclass
class ResultLayer:
    """One output as a layer: ``levels`` (finest first), ``kind`` (``labels``/``image``), its region."""

    name: str
    kind: str
    levels: list[Any]
    region: tuple[int, int, int, int]
    downsample: float = 1.0
    metadata: dict = field(default_factory=dict)


@dataclass
class SlideResults:
    """A finished slide: its file, record and result layers."""

    slide: Path
    record: dict
    layers: list[ResultLayer]


def lazy_levels(path: str | os.PathLike, *, min_side: int = 512) -> tuple[list[Any], dict]:
    """The TIFF at ``path`` as a lazy dask array plus every-second-pixel levels down to ``min_side``."""
    import dask.array as da
    import tifffile
    import zarr

    with tifffile.TiffFile(path) as tif:
        meta = tif.shaped_metadata[0] if tif.shaped_metadata else {}
    store = tifffile.imread(path, aszarr=True)
    base = da.from_zarr(zarr.open(store, mode="r"))
    levels = [base]
    while max(levels[-1].shape[:2]) > 2 * min_side:
        levels.append(levels[-1][::2, ::2])
    return levels, dict(meta)


def slide_results(out_dir: str | os.PathLike, stem: str) -> SlideResults:
    """The finished slide ``stem`` of the cohort in ``out_dir``.

    Raises
    ------
    PathosegError
        The slide has no finished result (it failed, did not run yet, or its folder is gone).
    """
    from napari_pathoseg.cohort.tasks import BATCH_TASKS

    folder = Path(out_dir) / stem
    rec = read_record(folder)
    if rec is None or rec.get("status") != "ok":
        raise PathosegError(f"{stem} has no finished result in {out_dir}; run the cohort (again) first")
    task = BATCH_TASKS.get(rec.get("task", ""))
    files = rec.get("files") or {}
    layers = []
    for key, kind in (task.layers if task else ()):
        if key not in files:
            continue
        path = folder / files[key]
        levels, meta = lazy_levels(path)
        region = tuple(int(v) for v in meta.get("region_xywh", (0, 0, levels[0].shape[1], levels[0].shape[0])))
        if kind == "labels" and not np.issubdtype(levels[0].dtype, np.integer):
            raise PathosegError(f"{path} does not hold labels")
        # level-0 pixels per pixel: 1 for a level-0 grid, the model grid's scale otherwise
        ds = meta.get("level0_pixels_per_pixel", meta.get("scale"))
        ds = float(ds) if ds else region[2] / max(1, levels[0].shape[1])
        layers.append(ResultLayer(f"{stem} {key}", kind, levels, region, ds, {"path": str(path), **meta}))
    return SlideResults(Path(rec.get("slide", "")), rec, layers)
