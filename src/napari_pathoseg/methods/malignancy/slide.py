"""M1 malignancy on whole slides and plain images: tile heat map, region mask, slide call.

:func:`iter_malignancy` reads the source at the model's µm per pixel in tiles of the side C was
trained on (``model.input_size``; overlap a quarter tile) on the platform engine
(:func:`~napari_pathoseg.inference.engine.iter_predict`). Per tile it runs

* classifier **C**: the tile's malignant probability, collected by a
  :class:`~napari_pathoseg.inference.tile_scores.TileScores` sink into the *heat map* (one cell
  per tile step, NaN where no tile ran) and the tile table (level-0 boxes);
* segmenter **B**: the malignant-region probability per pixel, stitched by a
  :class:`~napari_pathoseg.inference.sinks.ProbabilityMap` (feathered overlaps, uint8) into the
  *region mask* ``probability >= mask_threshold``.

On a slide only tissue tiles run (the slide's tissue mask) and the region mask is cut to the
tissue: both outputs are cropped to tissue. On a plain image (an array, or a single-level file
the caller marks ``whole_image=True``) every tile runs and the image's probability is **C on the
whole image** (:meth:`MalignancyModel.classify_image`), not a pooling of tiles.

Slide probability (pooling)
---------------------------
A slide's probability is the **top-k mean** of its tile probabilities: the mean of the highest
``k = ceil(top_fraction * n)`` of the ``n`` tissue tiles (``top_fraction`` 0.1 by default, at
least one tile). The maximum (``k = 1``) lets one false-positive tile among thousands make the
call; the plain mean dilutes a small tumour in a large slide; the top-k mean needs a tumour of
about a tenth of the tissue to reach C's tile probability and is stable against a few stray
tiles. The maximum, the top-k mean and the share of tiles at or above the call threshold are
all reported (``MalignancyResult.pooled``); ``pooling="max"`` or ``"mean"`` makes another one
the probability. The call is ``probability >= threshold`` (default ``model.threshold``).

Examples
--------
>>> pool_tile_probabilities(np.array([0.1, 0.2, 0.9, 0.95, 0.3]), pooling="topk", top_fraction=0.4)
0.925
>>> pool_tile_probabilities(np.array([0.1, 0.9]), pooling="max")
0.9
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathoseg._atomic import atomic_path
from napari_pathoseg.errors import PathosegError
from napari_pathoseg.events import Cancellable, Progress
from napari_pathoseg.inference.engine import InferenceResult, iter_predict
from napari_pathoseg.inference.sinks import ProbabilityMap, TileScores
from napari_pathoseg.methods.malignancy.predictor import MalignancyPredictor
from napari_pathoseg.wsi.slide import Slide

__all__ = [
    "POOLINGS",
    "TOP_FRACTION",
    "MalignancyResult",
    "check_fraction",
    "iter_malignancy",
    "pool_tile_probabilities",
    "run_malignancy",
    "write_heatmap_tiff",
    "write_mask_tiff",
]

logger = logging.getLogger(__name__)

#: Ways to pool tile probabilities into the slide's probability.
POOLINGS = ("topk", "max", "mean")
#: Share of the tissue tiles the top-k mean averages.
TOP_FRACTION = 0.1
#: How each pooling is named in results (``{f}``: the top fraction).
POOLING_WORDS = {"topk": "mean of the top {f:.0%} of the tissue tiles' probabilities",
                 "max": "maximum of the tissue tiles' probabilities", "mean": "mean of the tissue tiles' probabilities"}
#: Rows of the model's grid handled at once when counting or writing the mask.
STRIP_ROWS = 1024
TASK = "malignancy"


def check_fraction(value: Any, *, what: str = "the threshold") -> float:
    """``value`` as a float in [0, 1] (a :class:`PathosegError` otherwise)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise PathosegError(f"{what} must be a number between 0 and 1, got {value!r}") from None
    if not 0.0 <= v <= 1.0:
        raise PathosegError(f"{what} must be between 0 and 1, got {v}")
    return v


def pool_tile_probabilities(probs: np.ndarray, *, pooling: str = "topk", top_fraction: float = TOP_FRACTION) -> float:
    """A slide's probability from its tile probabilities (see the module docstring).

    Parameters
    ----------
    probs : (n,) array
        C's probability of each tissue tile.
    pooling : {"topk", "max", "mean"}
    top_fraction : float
        Share of the tiles the top-k mean averages (``k = ceil(top_fraction * n)``, at least 1).

    Returns
    -------
    float
        NaN when there is no tile.
    """
    if pooling not in POOLINGS:
        raise PathosegError(f"the pooling must be one of {POOLINGS}, got {pooling!r}")
    p = np.asarray(probs, np.float64).ravel()
    if p.size == 0:
        return float("nan")
    if pooling == "max":
        return float(p.max())
    if pooling == "mean":
        return float(p.mean())
    k = max(1, math.ceil(check_fraction(top_fraction, what="the top fraction") * p.size))
    return float(np.sort(p)[-k:].mean())


@dataclass
class MalignancyResult:
    """A malignancy run over a slide region or a plain image.

    Attributes
    ----------
    probability : float
        Malignant probability of the image (C on the whole image) or the slide (pooled tiles);
        NaN when no tile ran.
    label : str
        ``"malignant"`` when ``probability >= threshold``, else ``"benign"`` (``"unknown"``: no tile).
    tile_probs : (n,) float32
        C's probability of every tile that ran.
    boxes : (n, 4) float
        Level-0 (x, y, w, h) of those tiles.
    heatmap : (grid rows, grid cols) float32
        Tile probabilities on the tile grid, NaN where no tile ran; cell (i, j) covers level-0
        ``origin + (j, i) * cell`` to ``+ cell``.
    cell : float
        Level-0 pixels per heat-map cell.
    origin : (x, y)
        Level-0 corner of the heat map.
    region_prob : (rows, cols) uint8 array or memory map
        B's probability x 255 on the model's grid over ``region`` (a memory map in the run's
        work folder when it had one: the caller keeps the folder while it uses the result).
    tissue_lowres : (mask, downsample) or None
        The slide's low-resolution tissue mask and its level-0 pixels per pixel (the mask
        is cut to it); ``None``: everything counts as tissue (plain images).
    mask_threshold : float
        The region mask is ``region_prob >= mask_threshold``, cut to the tissue.
    gate : bool
        The mask is also cut to the heat-map squares C calls malignant (``heatmap >= threshold``).
    region : (x, y, w, h)
        Level-0 rectangle covered. ``scale``: level-0 pixels per model pixel; ``mpp``: µm per
        model pixel.
    whole_image : bool
        The probability is C on the whole image (plain image), not a pooling.
    pooled : dict
        ``max``, ``topk`` and ``mean`` of the tile probabilities and ``share`` (of tiles at
        or above ``threshold``).
    """

    probability: float
    label: str
    threshold: float
    tile_probs: np.ndarray
    boxes: np.ndarray
    heatmap: np.ndarray
    cell: float
    origin: tuple[float, float]
    region_prob: Any
    tissue_lowres: tuple[np.ndarray, float] | None
    mask_threshold: float
    region: tuple[int, int, int, int]
    scale: float
    mpp: float
    whole_image: bool
    pooling: str
    pooled: dict[str, float] = field(default_factory=dict)
    top_fraction: float = TOP_FRACTION
    gate: bool = False
    model: str = ""
    tiles: int = 0
    tiles_total: int = 0
    cancelled: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the model's grid over ``region``."""
        return tuple(self.region_prob.shape[:2])

    def tissue_rows(self, r0: int, r1: int) -> np.ndarray:
        """Tissue (bool) of grid rows ``r0 .. r1`` (the slide's tissue mask, nearest)."""
        cols = self.shape[1]
        if self.tissue_lowres is None:
            return np.ones((r1 - r0, cols), bool)
        tm, down = self.tissue_lowres
        x, y = self.region[:2]
        rr = ((y + (np.arange(r0, r1) + 0.5) * self.scale) / down).astype(np.int64).clip(0, tm.shape[0] - 1)
        cc = ((x + (np.arange(cols) + 0.5) * self.scale) / down).astype(np.int64).clip(0, tm.shape[1] - 1)
        return tm[rr[:, None], cc[None, :]]

    def called_rows(self, r0: int, r1: int) -> np.ndarray:
        """Grid rows ``r0 .. r1``: True inside a heat-map square whose tile C calls malignant."""
        x, y = self.region[:2]
        ox, oy = self.origin
        hm = np.nan_to_num(self.heatmap, nan=0.0) >= self.threshold
        rr = np.floor((y + (np.arange(r0, r1) + 0.5) * self.scale - oy) / self.cell).astype(np.int64).clip(0, hm.shape[0] - 1)
        cc = np.floor((x + (np.arange(self.shape[1]) + 0.5) * self.scale - ox) / self.cell).astype(np.int64)
        return hm[rr[:, None], cc.clip(0, hm.shape[1] - 1)[None, :]]

    def mask_rows(self, r0: int, r1: int) -> np.ndarray:
        """The malignant-region mask (bool) of grid rows ``r0 .. r1``, cut to the tissue (and gated)."""
        m = np.asarray(self.region_prob[r0:r1]) >= np.uint8(min(255, round(self.mask_threshold * 255)))
        if self.tissue_lowres is not None:
            m &= self.tissue_rows(r0, r1)
        if self.gate:
            m &= self.called_rows(r0, r1)
        return m

    @property
    def tissue(self) -> np.ndarray:
        """(rows, cols) bool tissue on the model's grid (whole array: small results, the dock)."""
        return self.tissue_rows(0, self.shape[0])

    @property
    def mask(self) -> np.ndarray:
        """(rows, cols) bool malignant-region mask on the model's grid (whole array)."""
        return self.mask_rows(0, self.shape[0])

    def areas_px(self, *, strip: int = STRIP_ROWS) -> tuple[int, int]:
        """Malignant and tissue pixels, counted a strip of rows at a time (bounded memory)."""
        mal = tis = 0
        for r0 in range(0, self.shape[0], strip):
            r1 = min(self.shape[0], r0 + strip)
            mal += int(np.count_nonzero(self.mask_rows(r0, r1)))
            tis += int(np.count_nonzero(self.tissue_rows(r0, r1))) if self.tissue_lowres is not None else (r1 - r0) * self.shape[1]
        return mal, tis

    def with_mask_threshold(self, threshold: float, *, gate: bool | None = None) -> MalignancyResult:
        """The same run with another region threshold (and gating, when given); no network."""
        from dataclasses import replace

        return replace(self, mask_threshold=check_fraction(threshold, what="the mask threshold"),
                       gate=self.gate if gate is None else bool(gate))

    def tile_table(self) -> list[dict[str, Any]]:
        """One row per tile: level-0 ``x``, ``y``, ``w``, ``h`` and its ``probability``."""
        return [{"x": round(float(x), 2), "y": round(float(y), 2), "w": round(float(w), 2), "h": round(float(h), 2),
                 "probability": round(float(p), 5)} for (x, y, w, h), p in zip(self.boxes, self.tile_probs)]

    def summary(self) -> dict[str, Any]:
        """JSON summary: probability, call, malignant area and fraction of the tissue, tiles."""
        mal_px, tissue_px = self.areas_px()
        px_um2 = self.mpp * self.mpp
        prob = None if math.isnan(self.probability) else round(float(self.probability), 5)
        return {
            "probability": prob,
            "label": self.label,
            "threshold": self.threshold,
            "probability_from": "C on the whole image" if self.whole_image else
                                POOLING_WORDS[self.pooling].format(f=self.top_fraction),
            "pooled": {k: (None if math.isnan(v) else round(v, 5)) for k, v in self.pooled.items()},
            "model": self.model,
            "region_xywh": list(self.region),
            "mpp": self.mpp,
            "scale": self.scale,
            "mask_threshold": self.mask_threshold,
            "mask_gated_by_c": self.gate,
            "malignant_area_um2": round(mal_px * px_um2, 1),
            "tissue_area_um2": round(tissue_px * px_um2, 1),
            "malignant_fraction": round(mal_px / max(1, tissue_px), 4),
            "tiles_run": self.tiles,
            "tiles_total": self.tiles_total,
            "cancelled": self.cancelled,
            "timings": self.timings,
        }


def _check_model(model: Any) -> None:
    task = getattr(model, "task", None) or getattr(getattr(model, "card", None), "task", None)
    if (task is not None and task != TASK) or not (hasattr(model, "classify") and hasattr(model, "segment")):
        raise PathosegError(f"{getattr(model, 'name', type(model).__name__)!r} is not a malignancy model; "
                            "pick a model of the malignancy task (pathoseg models --task malignancy).")


def _too_small(side: float, model: Any) -> PathosegError:
    from napari_pathoseg.methods.malignancy import model as mm

    cls = getattr(mm, "MalignancyInputError", PathosegError)
    need = int(getattr(model, "min_size", 64))
    return cls(f"the input is {side:.0f} px at the model's {model.mpp:g} µm/px; malignancy needs at least {need} px "
               f"({need * model.mpp:.0f} µm) on each side: give a larger region or image")


def iter_malignancy(
    source: Slide | np.ndarray,
    *,
    model: Any,
    region: tuple[int, int, int, int] | None = None,
    mpp: float | None = None,
    whole_image: bool | None = None,
    threshold: float | None = None,
    mask_threshold: float | None = None,
    gate: bool = False,
    pooling: str = "topk",
    top_fraction: float = TOP_FRACTION,
    tissue_only: bool | None = None,
    with_mask: bool = True,
    overlap: int | None = None,
    batch_size: int = 4,
    work_dir: str | os.PathLike | None = None,
    cancel: Cancellable | None = None,
) -> Iterator[Progress | MalignancyResult]:
    """Malignancy of a slide or image; yields ``Progress``, finally a :class:`MalignancyResult`.

    Parameters
    ----------
    source : Slide or (rows, cols, 3) uint8 array
    model : MalignancyModel
    region : (x, y, w, h), optional
        Level-0 rectangle (default: the whole source).
    mpp : float, optional
        Declared µm per level-0 pixel when the source has none.
    whole_image : bool, optional
        The probability is C on the whole (region of the) image instead of a pooling of tiles;
        default True for an array, False for a slide. Use it only for images that fit in memory.
    threshold, mask_threshold : float, optional
        Call threshold on the probability and region threshold on B's map (default the
        model's, 0.5).
    gate : bool
        Keep B's region only inside tiles C calls malignant (heat map >= ``threshold``). Off by
        default (M1 as described: B's region alone); B trained on malignant images only also
        outlines benign glands, and the gate removes those outside C's malignant tiles.
    pooling, top_fraction
        See :func:`pool_tile_probabilities`.
    tissue_only : bool, optional
        Run tissue tiles only and cut the mask to the tissue (default: True for a slide,
        False for a whole image).
    with_mask : bool
        Run B as well (False: the heat map and the call only).
    overlap, batch_size, work_dir, cancel
        See :func:`~napari_pathoseg.inference.engine.iter_predict`; the overlap defaults to a
        quarter tile.

    Raises
    ------
    PathosegError
        A model of another task, an unknown µm/px without ``mpp``, a region outside the
        source, an input smaller than ``model.min_size`` px at the model's scale, thresholds
        outside 0-1, an unknown pooling.
    """
    _check_model(model)
    threshold = check_fraction(getattr(model, "threshold", 0.5) if threshold is None else threshold)
    mask_threshold = check_fraction(getattr(model, "mask_threshold", 0.5) if mask_threshold is None else mask_threshold,
                                    what="the mask threshold")
    pool_tile_probabilities(np.zeros(1), pooling=pooling, top_fraction=top_fraction)  # checks both
    is_array = not isinstance(source, Slide)
    slide = Slide.from_array(np.asarray(source), mpp=mpp, name="image") if is_array else source
    whole_image = is_array if whole_image is None else bool(whole_image)
    tissue_only = not whole_image if tissue_only is None else bool(tissue_only)
    slide_mpp = mpp if mpp is not None else slide.mpp
    if slide_mpp is None:
        raise PathosegError(
            f"{slide.metadata.path}: the image's µm per pixel is unknown; declare it (--mpp on the command line, "
            f"'µm/px' in the dock); the model works at {model.mpp:g} µm/px"
        )
    scale = float(model.mpp) / float(slide_mpp)
    w0, h0 = slide.metadata.level_dimensions[0]
    if region is not None:  # clip as the engine does, to size-check what will really run
        x, y, w, h = (int(v) for v in region)
        w, h = min(x + w, w0) - max(x, 0), min(y + h, h0) - max(y, 0)
        if w <= 0 or h <= 0:
            raise PathosegError(f"region {tuple(region)} (x, y, width, height in level-0 pixels) lies outside "
                                f"the slide ({w0} x {h0})")
    else:
        w, h = w0, h0
    if min(w, h) / scale < int(getattr(model, "min_size", 64)) - 0.5:
        raise _too_small(min(w, h) / scale, model)
    tile = int(model.input_size)
    big = math.ceil(max(w, h) / scale)
    if big < tile:  # a small image: one tile just covering it (reflected at the edge)
        tile = max(int(getattr(model, "min_size", 64)), math.ceil(big / 16) * 16)
    overlap = tile // 4 if overlap is None else min(int(overlap), tile // 2 - 1)
    predictor = MalignancyPredictor(model, tile_size=tile, with_mask=with_mask)
    sinks: list[Any] = [TileScores("prob", classes=("malignant",))]
    if with_mask:
        sinks.append(ProbabilityMap("mask", dtype=np.uint8))
    res: InferenceResult | None = None
    for ev in iter_predict(slide, predictor, sinks, mpp=mpp, region=region, tile=tile, overlap=overlap,
                           batch_size=batch_size, tissue_only=tissue_only, edge="reflect" if whole_image else "white",
                           work_dir=work_dir, cancel=cancel):
        if isinstance(ev, InferenceResult):
            res = ev
        else:
            yield ev
    assert res is not None
    scores = res.outputs["prob"]
    probs = scores.scores[:, 0] if scores.scores.size else np.zeros(0, np.float32)
    if with_mask:
        region_prob = res.outputs["mask"].array  # a memory map when the run has a work folder
        if region_prob.ndim == 3:
            region_prob = region_prob[..., 0]
    else:
        region_prob = np.zeros(res.plan.shape, np.uint8)
    if tissue_only:
        from napari_pathoseg.inference.engine import _tissue

        tissue_lowres = _tissue(slide)
    else:
        tissue_lowres = None
    pooled = {k: pool_tile_probabilities(probs, pooling=k, top_fraction=top_fraction) for k in POOLINGS}
    pooled["share"] = float(np.mean(probs >= threshold)) if probs.size else float("nan")
    probability = pooled[pooling]
    if whole_image and not res.cancelled:
        yield Progress(0, 1, "classifying the whole image", stage="classify")
        x, y, rw, rh = res.region
        image = slide.read_region(level=0, row=y, col=x, height=rh, width=rw)
        probability = float(model.classify_image(image, mpp=float(slide_mpp)))
    label = "unknown" if math.isnan(probability) else ("malignant" if probability >= threshold else "benign")
    yield MalignancyResult(
        probability=float(probability), label=label, threshold=threshold, tile_probs=probs.astype(np.float32),
        boxes=scores.boxes, heatmap=scores.heatmap[..., 0], cell=float(scores.cell), origin=scores.origin,
        region_prob=region_prob, tissue_lowres=tissue_lowres, mask_threshold=mask_threshold, gate=bool(gate),
        region=res.region, scale=res.scale,
        mpp=res.mpp, whole_image=whole_image, pooling=pooling, pooled=pooled, top_fraction=float(top_fraction), model=res.name, tiles=res.tiles,
        tiles_total=res.tiles_total, cancelled=res.cancelled, timings=res.timings,
    )


def run_malignancy(source: Slide | np.ndarray, **kwargs: Any) -> MalignancyResult:
    """Run :func:`iter_malignancy` to the end."""
    from napari_pathoseg.events import run_to_end

    return run_to_end(iter_malignancy(source, **kwargs), MalignancyResult)


# ----------------------------------------------------------------------------- files


def _resample_nearest(arr: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``arr`` on a (rows, cols) grid covering the same area (nearest cell centre)."""
    if tuple(arr.shape[:2]) == tuple(shape):
        return arr
    rows = ((np.arange(shape[0]) + 0.5) * arr.shape[0] / shape[0]).astype(np.int64).clip(0, arr.shape[0] - 1)
    cols = ((np.arange(shape[1]) + 0.5) * arr.shape[1] / shape[1]).astype(np.int64).clip(0, arr.shape[1] - 1)
    return arr[rows[:, None], cols[None, :]]


def _write_tiff(path: str | os.PathLike, data: np.ndarray, *, mpp: float, metadata: dict[str, Any]) -> Path:
    import tifffile

    path = Path(path)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, data, compression="zlib", resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER",
                         metadata=metadata)
    return path


def _mask_tiles(result: MalignancyResult, tile: int) -> Iterator[np.ndarray]:
    """The model-grid mask as ``tile``² uint8 tiles, row-major, made a strip of rows at a time."""
    rows, cols = result.shape
    for r0 in range(0, rows, tile):
        strip = result.mask_rows(r0, min(rows, r0 + tile)).astype(np.uint8)
        for c0 in range(0, cols, tile):
            out = np.zeros((tile, tile), np.uint8)
            part = strip[:, c0:c0 + tile]
            out[: part.shape[0], : part.shape[1]] = part
            yield out


def write_mask_tiff(result: MalignancyResult, path: str | os.PathLike, *, grid: tuple[int, int] | None = None,
                    tile: int = 256) -> Path:
    """Write B's region mask as uint8 0/1 (atomic).

    Default: on the model's grid (the inference level), written as a tiled TIFF a strip of
    ``tile`` rows at a time (memory stays a strip whatever the slide). ``grid``: (rows, cols)
    of a plain image's own pixels over the region (the mask is resampled from B's
    probability, bilinear, then thresholded). The metadata records ``mpp``, ``region_xywh``,
    ``scale``, the threshold and the model.
    """
    import tifffile

    meta = {"region_xywh": list(result.region), "model": result.model, "mask_threshold": result.mask_threshold,
            "gated_by_classifier": result.gate,
            "encoding": "1 = malignant region (segmenter B), 0 = not"}
    if grid is not None:
        from skimage.transform import resize

        prob = resize(np.asarray(result.region_prob, np.float32), grid, order=1, preserve_range=True, anti_aliasing=False)
        mask = (prob >= result.mask_threshold * 255 - 1e-3).astype(np.uint8)
        if result.tissue_lowres is not None:
            mask &= _resample_nearest(result.tissue, grid).astype(np.uint8)
        if result.gate:
            mask &= _resample_nearest(result.called_rows(0, result.shape[0]), grid).astype(np.uint8)
        mpp = result.mpp * result.shape[1] / max(1, grid[1])
        return _write_tiff(path, mask, mpp=mpp, metadata={**meta, "mpp": mpp, "scale": result.region[2] / max(1, grid[1])})
    path = Path(path)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, _mask_tiles(result, tile), shape=result.shape, dtype=np.uint8, tile=(tile, tile),
                         compression="zlib", resolution=(1e4 / result.mpp, 1e4 / result.mpp), resolutionunit="CENTIMETER",
                         metadata={**meta, "mpp": result.mpp, "scale": result.scale})
    return path


def write_heatmap_tiff(result: MalignancyResult, path: str | os.PathLike, *, grid: tuple[int, int] | None = None) -> Path:
    """Write the tile heat map as float32 probability 0-1, NaN where no tile ran (atomic).

    Default: one pixel per heat-map cell. The metadata places it: ``region_xywh`` is the
    level-0 rectangle the TIFF covers and ``level0_pixels_per_pixel`` its pixel size (the
    cell). ``grid``: (rows, cols) of a plain image's own pixels over the region; each
    pixel gets the probability of the tile cell it lies in.
    """
    slide_mpp = result.mpp / result.scale
    if grid is None:
        data, mpp, ds = result.heatmap.astype(np.float32), result.cell * slide_mpp, result.cell
        footprint = [round(v) for v in (*result.origin, data.shape[1] * ds, data.shape[0] * ds)]
    else:
        x, y, w, h = result.region
        ox, oy = result.origin
        f_r, f_c = h / max(1, grid[0]), w / max(1, grid[1])  # level-0 pixels per output pixel
        hm = result.heatmap
        rows = np.floor((y + (np.arange(grid[0]) + 0.5) * f_r - oy) / result.cell).astype(np.int64).clip(0, hm.shape[0] - 1)
        cols = np.floor((x + (np.arange(grid[1]) + 0.5) * f_c - ox) / result.cell).astype(np.int64).clip(0, hm.shape[1] - 1)
        data, mpp, ds, footprint = hm[rows[:, None], cols[None, :]].astype(np.float32), f_c * slide_mpp, f_c, list(result.region)
    return _write_tiff(path, data, mpp=mpp, metadata={
        "region_xywh": footprint, "level0_pixels_per_pixel": ds, "mpp": mpp, "run_region_xywh": list(result.region),
        "model": result.model,
        "encoding": "classifier C's malignant probability per tile, 0-1; NaN where no tile ran"})
