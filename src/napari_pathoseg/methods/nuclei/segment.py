"""Whole-slide nucleus segmentation (M2): tiles in, seamless instance labels out.

:func:`iter_segment_nuclei` runs a nucleus model (:class:`~napari_pathoseg.models.registry.NucleusModel`)
over a region of a slide, or the tissue of the whole slide, on the inference engine
(:func:`napari_pathoseg.inference.iter_predict`) and yields progress events, then a
:class:`NucleiResult`. :func:`segment_nuclei` drives it headless; the Nuclei dock drives it in a
worker thread.

How it works
------------
* The engine reads the region at the model's resolution (``model.mpp``; the finest pyramid
  level at least that fine, then down-sampled), in tiles of ``tile`` pixels overlapping by
  ``overlap``, run in batches; tiles without tissue are skipped (whole slide or region).
  For plain images without a known resolution, ``mpp`` must be declared.
* Instances are made per tile (the model's own post-processing) and stitched by ownership
  (:class:`~napari_pathoseg.inference.sinks.Instances`): a nucleus belongs to the tile whose
  *core* (the tile minus half the overlap on each inner side) holds its centroid. With the
  overlap larger than a nucleus, every nucleus lies whole in the tile that owns it, so nuclei
  on seams are neither split nor duplicated.
* The stain-normalised image is stitched with feathered overlap averaging.
* Labels (uint32) and the normalised image stay at the model's resolution, streamed out of
  memory row by row (into ``work_dir`` when given), so memory is bounded by the tiles in
  flight. :func:`write_labels_tiff` writes the labels on the slide's level-0 grid.
* A cancelled run yields its result with ``cancelled=True``: the nuclei of the finished tiles.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from napari_pathoseg._atomic import atomic_open, atomic_path
from napari_pathoseg.events import Cancellable, Progress, run_to_end
from napari_pathoseg.inference.engine import InferenceResult, iter_predict
from napari_pathoseg.methods.nuclei.predictor import NucleusPredictor
from napari_pathoseg.wsi.slide import Slide

__all__ = [
    "Progress",
    "NucleiResult",
    "iter_segment_nuclei",
    "segment_nuclei",
    "write_labels_tiff",
    "write_table_csv",
    "write_normalized_tiff",
    "overlay_picture",
    "demo_nuclei",
    "TABLE_COLUMNS",
]

logger = logging.getLogger(__name__)

#: Columns of the per-nucleus table.
TABLE_COLUMNS = ("id", "x", "y", "area_um2", "confidence")


@dataclass
class NucleiResult:
    """Nuclei of a region, at the model's resolution.

    Attributes
    ----------
    labels : (rows, cols) uint32
        Instance labels at the model's resolution (0 = background).
    normalized : (rows, cols, 3) uint8 or None
        The stain-normalised image (the model's second output); white where no tile ran.
    region : (x, y, width, height)
        Level-0 rectangle covered.
    scale : float
        Level-0 pixels per output pixel (``model.mpp / slide.mpp``; 1 when equal).
    mpp : float or None
        µm per output pixel.
    table : list of dict
        One row per nucleus: ``id``, ``x``, ``y`` (centroid, level-0 pixels),
        ``area_um2``, ``confidence`` (mean nucleus probability).
    timings : dict
        Seconds spent reading, in the network, in post-processing, in total.
    model : str
    tiles : int
        Tiles run.
    cancelled : bool
        The run was stopped: labels and table hold the finished tiles only.
    tiles_total : int
        Tiles planned.
    """

    labels: np.ndarray
    normalized: np.ndarray | None
    region: tuple[int, int, int, int]
    scale: float
    mpp: float | None
    table: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    model: str = ""
    tiles: int = 0
    cancelled: bool = False
    tiles_total: int = 0

    @property
    def n_nuclei(self) -> int:
        return len(self.table)


def iter_segment_nuclei(
    slide: Slide | np.ndarray,
    model: Any,
    *,
    region: tuple[int, int, int, int] | None = None,
    mpp: float | None = None,
    tile: int | None = None,
    overlap: int = 64,
    batch_size: int = 4,
    tissue_only: bool | None = None,
    with_normalized: bool = True,
    work_dir: str | os.PathLike | None = None,
    prefetch: bool = True,
    cancel: Cancellable | None = None,
) -> Iterator[Progress | NucleiResult]:
    """Segment the nuclei of a slide region; yield :class:`~napari_pathoseg.events.Progress`,
    finally a :class:`NucleiResult`.

    Parameters
    ----------
    slide : Slide or (rows, cols, 3) uint8 array
    model : NucleusModel
        Anything with ``mpp``, ``tile_size``, ``name``, ``predict(batch)`` and
        ``to_instances(prob, extra, mpp=...)``.
    region : (x, y, width, height), optional
        Level-0 rectangle; default the whole slide.
    mpp : float, optional
        Declared µm per level-0 pixel, for images whose resolution is unknown
        (overrides the slide's own).
    tile, overlap : int
        Tile side (default: the larger of 256 and the model's training tile) and overlap
        in model pixels (overlap must exceed a nucleus).
    batch_size : int
        Tiles per network call.
    tissue_only : bool, optional
        Skip tiles without tissue (default: True for a slide, whole or region; False for
        an image array).
    with_normalized : bool
        Also stitch the stain-normalised image.
    work_dir : path, optional
        Folder for the labels and normalised image as files (bounded memory for whole
        slides); the caller owns it and must keep it while the result is used.
    prefetch : bool
        Read the next batch of tiles while the network runs.
    cancel : object with ``is_set()``, optional
        Checked between batches; a set token ends the run early with a result whose
        ``cancelled`` is True (the nuclei of the finished tiles).

    Raises
    ------
    PathosegError
        Region outside the slide, unknown resolution without ``mpp``, bad sizes.
    """
    predictor = NucleusPredictor(model)
    sinks = predictor.sinks(with_normalized=with_normalized)
    instances = sinks[0]
    result: InferenceResult | None = None
    for ev in iter_predict(
        slide,
        predictor,
        sinks,
        mpp=mpp,
        region=region,
        tile=tile,
        overlap=overlap,
        batch_size=batch_size,
        tissue_only=tissue_only,
        work_dir=work_dir,
        prefetch=prefetch,
        cancel=cancel,
    ):
        if isinstance(ev, Progress):
            msg = ev.message if ev.done == 0 else f"{instances.count} nuclei"
            yield Progress(ev.done, ev.total, msg, stage="nuclei")
        else:
            result = ev
    assert result is not None  # iter_predict always ends with its result
    inst = result.outputs["labels"]
    norm = result.outputs.get("normalized")
    t = result.timings
    yield NucleiResult(
        labels=inst.labels,
        normalized=norm.array if norm is not None else None,
        region=result.region,
        scale=result.scale,
        mpp=result.mpp,
        table=inst.table,
        timings={
            "read_s": t["read_s"],
            "network_s": t["network_s"],
            "postprocess_s": t["postprocess_s"],
            "total_s": t["total_s"],
        },
        model=predictor.name,
        tiles=result.tiles,
        cancelled=result.cancelled,
        tiles_total=result.tiles_total,
    )


def segment_nuclei(slide: Slide | np.ndarray, model: Any, **kwargs: Any) -> NucleiResult:
    """Run :func:`iter_segment_nuclei` to the end and return its result."""

    def log(ev: Any) -> None:
        if isinstance(ev, Progress):
            logger.info("nuclei: %d/%d tiles, %s", ev.done, ev.total, ev.message)

    return run_to_end(iter_segment_nuclei(slide, model, **kwargs), NucleiResult, progress=log)


def write_labels_tiff(result: NucleiResult, path: str | os.PathLike, *, level0: bool = True, tile: int = 256) -> Path:
    """Write the labels as a tiled uint32 TIFF (atomic).

    ``level0=True`` writes them on the slide's level-0 pixel grid of the region
    (nearest-neighbour up-sampling, streamed in strips); otherwise at the model's grid.
    The TIFF metadata holds ``region_xywh``, ``model`` and ``level0``.
    """
    import tifffile

    path = Path(path)
    x, y, w, h = result.region
    labels = result.labels
    same_grid = not level0 or result.scale == 1.0
    shape = tuple(labels.shape[:2]) if same_grid else (h, w)

    def tiles() -> Iterator[np.ndarray]:
        if same_grid:
            cols_idx = np.arange(shape[1])
        else:
            cols_idx = np.minimum((np.arange(w) / result.scale).astype(np.int64), labels.shape[1] - 1)
        for r in range(0, shape[0], tile):
            if same_grid:
                strip = np.asarray(labels[r : r + tile])
            else:
                rr = np.minimum((np.arange(r, min(h, r + tile)) / result.scale).astype(np.int64), labels.shape[0] - 1)
                strip = np.asarray(labels[rr[0] : rr[-1] + 1])[rr - rr[0]]
            for c in range(0, shape[1], tile):
                t = np.zeros((tile, tile), np.uint32)
                blk = strip[:, cols_idx[c : c + tile]]
                t[: blk.shape[0], : blk.shape[1]] = blk
                yield t

    with atomic_path(path) as tmp:
        tifffile.imwrite(
            tmp,
            tiles(),
            shape=shape,
            dtype=np.uint32,
            tile=(tile, tile),
            compression="zlib",
            metadata={"region_xywh": list(result.region), "model": result.model, "level0": bool(level0),
                      "cancelled": bool(result.cancelled)},
        )
    return path


def write_table_csv(result: NucleiResult, path: str | os.PathLike) -> Path:
    """Write the per-nucleus table (id, x, y, area_um2, confidence) as CSV (atomic)."""
    with atomic_open(path, "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=list(TABLE_COLUMNS))
        wr.writeheader()
        wr.writerows(result.table)
    return Path(path)


def write_normalized_tiff(result: NucleiResult, path: str | os.PathLike) -> Path:
    """Write the stain-normalised image (model grid) as a tiled RGB TIFF (atomic)."""
    import tifffile

    from napari_pathoseg.errors import PathosegError

    if result.normalized is None:
        raise PathosegError("this result has no stain-normalised image; run with with_normalized=True")
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, np.asarray(result.normalized), photometric="rgb", tile=(256, 256), compression="zlib",
                         metadata={"region_xywh": list(result.region), "model": result.model, "mpp": result.mpp})
    return Path(path)


def overlay_picture(slide: Slide, result: NucleiResult, *, max_size: int = 2048) -> np.ndarray:
    """(r, c, 3) uint8: the region at the model's resolution with nucleus outlines (≤ ``max_size``)."""
    from skimage.segmentation import find_boundaries
    from skimage.transform import resize

    x, y, w, h = result.region
    lab = np.asarray(result.labels)
    k = max(1, int(math.ceil(max(lab.shape) / max_size)))
    lab = lab[::k, ::k]
    f = result.scale * k
    lv = slide.best_level_for_downsample(f)
    ds = slide.level_downsample(lv)
    img = slide.read_region(level=lv, row=int(y / ds), col=int(x / ds), height=int(round(h / ds)), width=int(round(w / ds)))
    img = np.clip(resize(img, lab.shape, order=1, preserve_range=True) + 0.5, 0, 255).astype(np.uint8)
    img[find_boundaries(lab, mode="inner")] = (0, 255, 0)
    return img


def demo_nuclei(slide: Slide, *, out_dir: str | os.PathLike, model_name: str = "nuclei-lite") -> dict[str, Any]:
    """The demo's nucleus step: the whole slide's tissue, labels + overlay + table."""
    from napari_pathoseg.demo import save_png
    from napari_pathoseg.models.registry import load_model

    out = Path(out_dir)
    model = load_model(model_name)
    with tempfile.TemporaryDirectory(prefix=".nuclei-", dir=out) as wd:
        result = segment_nuclei(slide, model, work_dir=wd)
        info = {
            "model": result.model,
            "n_nuclei": result.n_nuclei,
            "labels": str(write_labels_tiff(result, out / "nuclei_labels.tif")),
            "table": str(write_table_csv(result, out / "nuclei.csv")),
            "overlay": str(save_png(out / "nuclei_overlay.png", overlay_picture(slide, result))),
            "timings": result.timings,
        }
        del result  # the labels map a file in wd: release it before the folder goes
        return info
