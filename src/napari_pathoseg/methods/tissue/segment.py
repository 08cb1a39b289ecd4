"""Tissue maps of slides and images: :func:`iter_tissue`, class areas and the output files.

:func:`iter_tissue` runs a :class:`~.predictor.TissuePredictor` on the platform engine over a
slide, a region or an image array and ends in a :class:`TissueResult`: uint8 class ids on the
model's grid (0 background, 1..n the model's classes), the stitched probabilities, per-class
areas in µm² and fractions of the tissue. :func:`write_labels_tiff` writes the ids on the
model grid or on the region's level-0 grid (plain images: their own pixel grid), recording
the scale; :func:`summary` is the JSON the CLI prints.

With a work folder (the CLI, cohorts, the dock's whole-slide runs) nothing slide-sized is held
in memory: the engine streams the probabilities to the folder, the class ids are made and the
per-class areas counted a band of rows at a time into a second file there (``ids`` is then a
read-only memory map of it), and the writers read both in strips.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathoseg._atomic import atomic_path
from napari_pathoseg.events import Cancellable, Progress
from napari_pathoseg.inference._rows import RowStore
from napari_pathoseg.inference.bands import band_rows
from napari_pathoseg.methods.tissue.predictor import TissuePredictor

__all__ = [
    "CLASS_COLOURS",
    "TissueResult",
    "class_areas",
    "ids_from_probs",
    "iter_tissue",
    "summary",
    "write_labels_tiff",
    "write_probs_tiff",
]

#: Display colours (RGB) of class ids: background transparent, then WSSS4LUAD's palette
#: (tumour (0, 64, 128), stroma (64, 128, 0), normal (243, 152, 0)), then further colours.
CLASS_COLOURS = [(0, 0, 0), (0, 64, 128), (64, 128, 0), (243, 152, 0), (200, 30, 60), (120, 60, 180),
                 (0, 170, 170), (150, 150, 150), (255, 105, 180)]


@dataclass
class TissueResult:
    """A tissue map: ``ids`` (rows, cols) uint8 on the model grid and what produced it.

    ``ids_store``: the streamed run's row store of ``ids`` in the work folder (``None``: ``ids``
    is an array in memory); :meth:`rows` reads either.
    """

    ids: np.ndarray
    classes: tuple[str, ...]
    mpp: float
    region: tuple[int, int, int, int]
    scale: float
    model: str
    mode: str
    probs: Any = None
    areas: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    tiles: int = 0
    tiles_total: int = 0
    cancelled: bool = False
    ids_store: Any = None

    def rows(self, row0: int, row1: int) -> np.ndarray:
        """Class ids of rows ``row0 .. row1`` (read from the work folder when streamed)."""
        if self.ids_store is not None and isinstance(self.ids, np.memmap):
            return self.ids_store.read(row0, row1)
        return np.asarray(self.ids[row0:row1])


def _ids(p: np.ndarray, n: int) -> np.ndarray:
    ids = (np.argmax(p[..., :n], axis=-1) + 1).astype(np.uint8)
    ids[p[..., n] >= 128] = 0
    return ids


def ids_from_probs(probs: np.ndarray, n: int, *, rows: int = 512) -> np.ndarray:
    """Class ids (rows, cols) uint8 from stored ``probs`` (rows, cols, n + 1): argmax + 1, 0 where background."""
    out = np.zeros(probs.shape[:2], np.uint8)
    for r in range(0, probs.shape[0], rows):
        out[r:r + rows] = _ids(np.asarray(probs[r:r + rows]), n)
    return out


_RUNS = itertools.count()


def _stream_ids(probs: Any, n: int, folder: Any) -> tuple[RowStore, np.ndarray]:
    """Class ids of the stored ``probs`` written band by band to a new file in ``folder``; pixel counts per id."""
    shape = tuple(probs.shape[:2])
    store = RowStore(shape, np.uint8, path=Path(folder) / f"tissue_ids-{os.getpid()}-{next(_RUNS)}.npy")
    counts = np.zeros(n + 1, np.int64)
    step = band_rows(shape[1] * (n + 1))
    for r in range(0, shape[0], step):
        ids = _ids(probs.store.read(r, r + step), n)
        store.write(r, ids)
        counts += np.bincount(ids.ravel(), minlength=n + 1)[: n + 1]
    store.close()
    return store, counts


def class_areas(ids: np.ndarray, classes: tuple[str, ...] | list[str], mpp: float) -> dict[str, Any]:
    """Per-class pixel counts, areas in µm² and fractions of the tissue (all non-background pixels)."""
    return _areas(np.bincount(np.asarray(ids).ravel(), minlength=len(classes) + 1), classes, mpp)


def _areas(counts: np.ndarray, classes: tuple[str, ...] | list[str], mpp: float) -> dict[str, Any]:
    tissue = int(counts[1:].sum())
    px_area = float(mpp) ** 2
    out: dict[str, Any] = {}
    for i, name in enumerate(classes, start=1):
        c = int(counts[i]) if i < counts.size else 0
        out[name] = {"id": i, "pixels": c, "area_um2": c * px_area, "fraction": c / tissue if tissue else 0.0}
    out["background"] = {"id": 0, "pixels": int(counts[0]), "area_um2": int(counts[0]) * px_area}
    return out


def iter_tissue(source: Any, model: Any, *, mode: str = "literal", region: tuple[int, int, int, int] | None = None,
                mpp: float | None = None, batch_size: int = 2, tissue_only: bool | None = None, weights: str = "hann",
                edge: str = "reflect",
                work_dir: str | os.PathLike | None = None, cancel: Cancellable | None = None,
                ) -> Iterator[Progress | TissueResult]:
    """Segment the tissue of a slide region or image; yields progress, finally a :class:`TissueResult`.

    Parameters
    ----------
    source : Slide or (rows, cols, 3) uint8 array
    model : TissueModel
    mode : {"literal", "fast"}
        M5's 224 px windows with 50 % overlap, or one fully convolutional pass per 512 px tile.
    region : (x, y, w, h), optional
        Level-0 rectangle (default: everything).
    mpp : float, optional
        µm per level-0 pixel of a source that does not record it.
    batch_size : int
        Engine tiles per call.
    weights : {"hann", "box"}
        Literal mode's window average: raised-cosine weighted (default; no straight edges on
        the 112 px window grid) or M5's plain mean (see :mod:`.predictor`).
    edge : {"reflect", "white"}
        What windows that hang over the slide's (or image's) edge see beyond it: the mirror image
        (default) or white glass. With white, every window past the edge of a patch or slide sees
        glass and pulls its pixels towards the classes of sparse tissue (held-out WSSS4LUAD
        patches through the engine: mIoU 0.42 instead of 0.74, see ``docs/inference.md``).
    tissue_only : bool, optional
        Skip tiles without tissue (default: slides yes, arrays no).
    work_dir : path, optional
        Folder for the stitched probabilities (bounded memory on whole slides).
    cancel : object with ``is_set()``, optional
        A stopped run ends with the tiles finished so far (``cancelled=True``).
    """
    from napari_pathoseg.inference import InferenceResult, iter_predict

    pred = TissuePredictor(model, mode=mode, weights=weights)
    res = None
    for ev in iter_predict(source, pred, pred.sinks(), mpp=mpp, region=region, tile=pred.tile_size,
                           overlap=pred.overlap, batch_size=batch_size, tissue_only=tissue_only, edge=edge,
                           work_dir=work_dir, cancel=cancel):
        if isinstance(ev, InferenceResult):
            res = ev
        else:
            yield ev
    assert res is not None
    probs = res.outputs["probs"]
    n = len(pred.classes)
    store = None
    if probs.store.path is not None:  # streamed: ids and areas a band at a time, nothing slide-sized in memory
        store, counts = _stream_ids(probs, n, Path(probs.store.path).parent)
        ids = np.load(store.path, mmap_mode="r")
        areas = _areas(counts, pred.classes, res.mpp)
    else:
        ids = ids_from_probs(probs.array, n)
        areas = class_areas(ids, pred.classes, res.mpp)
    yield TissueResult(
        ids=ids, classes=pred.classes, mpp=float(res.mpp), region=tuple(res.region), scale=float(res.scale),
        model=pred.name, mode=mode, probs=probs, areas=areas,
        timings=dict(res.timings), tiles=int(res.tiles), tiles_total=int(res.tiles_total),
        cancelled=bool(res.cancelled), ids_store=store,
    )


def _tiff_meta(result: TissueResult, level0: bool) -> dict[str, Any]:
    return {"region_xywh": list(result.region), "model": result.model, "level0": bool(level0),
            "mpp": result.mpp / result.scale if level0 else result.mpp, "classes": list(result.classes),
            "level0_pixels_per_pixel": 1.0 if level0 else result.scale, "mode": result.mode}


def write_labels_tiff(result: TissueResult, path: str | os.PathLike, *, level0: bool = False, tile: int = 256) -> Path:
    """Write the class ids as a tiled uint8 TIFF (atomic), on the model grid or the region's level-0 grid.

    The metadata holds ``region_xywh``, ``mpp`` of the written grid, ``level0_pixels_per_pixel``,
    ``classes`` (ids 1..n) and ``model``.
    """
    import tifffile

    path = Path(path)
    ids = result.ids
    _, _, w, h = result.region
    same = not level0 or abs(result.scale - 1.0) < 1e-9
    shape = tuple(ids.shape) if same else (h, w)
    cols = None if same else np.minimum((np.arange(w) / result.scale).astype(np.int64), ids.shape[1] - 1)

    def tiles() -> Iterator[np.ndarray]:
        for r in range(0, shape[0], tile):
            if same:
                strip = result.rows(r, r + tile)
            else:
                rr = np.minimum((np.arange(r, min(h, r + tile)) / result.scale).astype(np.int64), ids.shape[0] - 1)
                strip = result.rows(int(rr[0]), int(rr[-1]) + 1)[rr - rr[0]][:, cols]
            for c in range(0, shape[1], tile):
                t = np.zeros((tile, tile), np.uint8)
                blk = strip[:, c:c + tile]
                t[:blk.shape[0], :blk.shape[1]] = blk
                yield t

    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, tiles(), shape=shape, dtype=np.uint8, tile=(tile, tile), compression="zlib",
                         metadata=_tiff_meta(result, level0))
    return path


def write_probs_tiff(result: TissueResult, path: str | os.PathLike, *, tile: int = 256) -> Path:
    """Write the class probabilities (uint8, 255 = 1; last channel background) on the model grid (atomic).

    One tiled page of ``n + 1`` planes (``tifffile.imread`` gives ``(n + 1, rows, cols)``),
    written strip by strip from the stored probabilities.
    """
    import tifffile

    path = Path(path)
    store = result.probs.store
    rows, cols, chans = (*store.shape[:2], store.shape[2] if len(store.shape) == 3 else 1)

    def tiles() -> Iterator[np.ndarray]:
        for ch in range(chans):
            for r in range(0, rows, tile):
                strip = np.asarray(store.read(r, r + tile))
                strip = strip[..., ch] if strip.ndim == 3 else strip
                for c in range(0, cols, tile):
                    t = np.zeros((tile, tile), np.uint8)
                    blk = strip[:, c:c + tile]
                    t[:blk.shape[0], :blk.shape[1]] = blk
                    yield t

    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, tiles(), shape=(chans, rows, cols), dtype=np.uint8, tile=(tile, tile), compression="zlib",
                         photometric="minisblack", planarconfig="separate",
                         metadata={**_tiff_meta(result, False), "channels": [*result.classes, "background"]})
    return path


def summary(result: TissueResult) -> dict[str, Any]:
    """The JSON summary: model, classes, grid, per-class areas (µm²) and fractions, timings."""
    return {"model": result.model, "mode": result.mode, "classes": {str(i): c for i, c in enumerate(result.classes, 1)},
            "region_xywh": list(result.region), "model_mpp": result.mpp, "shape": list(result.ids.shape),
            "areas": result.areas, "tiles": result.tiles, "tiles_total": result.tiles_total,
            "cancelled": result.cancelled, "timings": {k: round(v, 3) for k, v in result.timings.items()}}
