"""M3 lesion detection on whole slides and images, on the inference engine.

:func:`iter_detect_lesions` reads the slide (or image) at the model's µm per pixel in tiles
(512 px by default, batched), normalises every tile to the model's stored stain reference with
the source stain measured **once** for the whole slide (32 tissue tiles) or image, runs the FPN
and stitches the lesion probability map at that level (feathered overlaps). The mask is
``probability >= threshold`` (0.5), holes filled and regions smaller than ``min_area_um2``
removed (both options); :func:`lesion_mask` re-thresholds without re-running the network, which
is what the dock's live slider does.

Examples
--------
>>> import numpy as np
>>> prob = np.zeros((40, 40), np.float32); prob[5:20, 5:20] = 0.9; prob[10, 10] = 0.1
>>> m = lesion_mask(prob, threshold=0.5, fill_holes=True, min_area_px=4)
>>> int(m.sum()), bool(m[10, 10])
(225, True)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from napari_pathoseg._atomic import atomic_path
from napari_pathoseg.errors import PathosegError, StainError
from napari_pathoseg.events import Cancellable, Progress
from napari_pathoseg.inference.engine import InferenceResult, iter_predict
from napari_pathoseg.inference.sinks import ProbabilityMap
from napari_pathoseg.wsi.slide import Slide

__all__ = [
    "LesionPredictor",
    "LesionResult",
    "iter_detect_lesions",
    "run_detect_lesions",
    "lesion_mask",
    "region_table",
    "check_threshold",
    "write_probability_tiff",
    "write_mask_tiff",
    "MIN_INPUT",
    "export_regions_geojson",
]

logger = logging.getLogger(__name__)

#: Smallest image side (pixels at the model's scale) the detector accepts.
MIN_INPUT = 64


def check_threshold(threshold: float) -> float:
    """``threshold`` as a float in [0, 1] (a :class:`PathosegError` otherwise)."""
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise PathosegError(f"the threshold must be a number between 0 and 1, got {threshold!r}") from None
    if not 0.0 <= t <= 1.0:
        raise PathosegError(f"the threshold must be between 0 and 1, got {t}")
    return t


class LesionPredictor:
    """A :class:`~napari_pathoseg.methods.lesion.model.LesionModel` seen by the inference engine.

    Parameters
    ----------
    model : LesionModel
    source : StainParams or None
        The slide's / image's stain (``None``: tiles are not normalised).
    tile_size : int, optional
        Tile side (default the model's, 512).
    """

    classes = ("lesion",)

    def __init__(self, model: Any, *, source: Any = None, tile_size: int | None = None) -> None:
        self.model = model
        self.source = source
        self.tile_size = int(tile_size or model.tile_size)
        self.mpp = float(model.mpp)
        self.name = str(getattr(model, "name", "lesion"))

    def predict(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """(B, H, W, 3) uint8 -> ``prob`` (B, H, W) float32 lesion probability."""
        return {"prob": self.model.predict(batch, source=self.source)}


def lesion_mask(prob: np.ndarray, *, threshold: float = 0.5, fill_holes: bool = True, min_area_px: int = 0) -> np.ndarray:
    """Binary lesion mask of a probability map: threshold, fill holes, drop small regions.

    Parameters
    ----------
    prob : (rows, cols) float array
        Probabilities in [0, 1] (or uint8 0-255: pass the threshold in the same units / 255).
    threshold : float
        ``prob >= threshold`` is lesion.
    fill_holes : bool
        Fill holes inside lesion regions.
    min_area_px : int
        Remove regions with fewer pixels.
    """
    from scipy import ndimage as ndi

    check_threshold(threshold)
    p = np.asarray(prob)
    mask = p >= (threshold * 255 if p.dtype == np.uint8 else threshold)
    if fill_holes:
        mask = ndi.binary_fill_holes(mask)
    if min_area_px > 1 and mask.any():
        lab, n = ndi.label(mask)
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        keep = sizes >= min_area_px
        keep[0] = False
        mask = keep[lab]
    return mask


def region_table(mask: np.ndarray, *, mpp: float) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Connected lesion regions: labels (int32) and one row per region (id, area µm², centroid, bbox px)."""
    from scipy import ndimage as ndi

    lab, n = ndi.label(mask)
    rows: list[dict[str, Any]] = []
    if n:
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        for i, sl in enumerate(ndi.find_objects(lab), start=1):
            if sl is None:
                continue
            rr, cc = np.nonzero(lab[sl] == i)
            rows.append({
                "id": i,
                "area_um2": float(sizes[i] * mpp * mpp),
                "centroid_row": float(rr.mean() + sl[0].start),
                "centroid_col": float(cc.mean() + sl[1].start),
                "bbox": [sl[0].start, sl[1].start, sl[0].stop, sl[1].stop],
            })
    return lab.astype(np.int32), rows


@dataclass
class LesionResult:
    """A lesion detection run.

    Attributes
    ----------
    prob : (rows, cols) float32 array
        Lesion probability on the model's grid over ``region`` (NaN-free, 0 where no tile ran).
    mask : (rows, cols) bool array
        The thresholded, cleaned mask.
    tissue : (rows, cols) bool array
        Tissue on the same grid (the slide's tissue mask), for the lesion fraction.
    regions : list of dict
        :func:`region_table` rows.
    region : (x, y, w, h)
        Level-0 rectangle.
    scale : float
        Level-0 pixels per output pixel.
    mpp : float
        µm per output pixel.
    threshold, fill_holes, min_area_um2
        The mask options.
    stain_normalized : bool
        Whether the source stain could be measured (else tiles ran unnormalised).
    """

    prob: np.ndarray
    mask: np.ndarray
    tissue: np.ndarray
    regions: list[dict[str, Any]]
    region: tuple[int, int, int, int]
    scale: float
    mpp: float
    threshold: float
    fill_holes: bool
    min_area_um2: float
    stain_normalized: bool
    model: str = ""
    tiles: int = 0
    tiles_total: int = 0
    cancelled: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def lesion_area_um2(self) -> float:
        return float(self.mask.sum() * self.mpp * self.mpp)

    @property
    def tissue_area_um2(self) -> float:
        return float(self.tissue.sum() * self.mpp * self.mpp)

    def rethreshold(self, threshold: float) -> "LesionResult":
        """The same run with another threshold (no network)."""
        from dataclasses import replace

        mask = lesion_mask(self.prob, threshold=threshold, fill_holes=self.fill_holes,
                           min_area_px=int(np.ceil(self.min_area_um2 / self.mpp**2)))
        _, rows = region_table(mask, mpp=self.mpp)
        return replace(self, mask=mask, regions=rows, threshold=float(threshold))

    def summary(self) -> dict[str, Any]:
        """JSON summary: lesion area, fraction of tissue, regions."""
        tissue = self.tissue_area_um2
        return {
            "model": self.model,
            "region_xywh": list(self.region),
            "mpp": self.mpp,
            "scale": self.scale,
            "shape": list(self.prob.shape),
            "threshold": self.threshold,
            "fill_holes": self.fill_holes,
            "min_area_um2": self.min_area_um2,
            "lesion_area_um2": round(self.lesion_area_um2, 1),
            "tissue_area_um2": round(tissue, 1),
            "lesion_fraction_of_tissue": round(float(np.sum(self.mask & self.tissue)) / max(1, int(self.tissue.sum())), 4),
            "n_regions": len(self.regions),
            "stain_normalized": self.stain_normalized,
            "tiles": self.tiles,
            "tiles_total": self.tiles_total,
            "cancelled": self.cancelled,
            "timings": self.timings,
        }


def _tissue_on_grid(slide: Slide, plan: Any, shape: tuple[int, int]) -> np.ndarray:
    """The slide's tissue mask (:func:`~napari_pathoseg.tiling.tissue_mask`) resampled (nearest) to the output grid."""
    from napari_pathoseg.tiling import tissue_mask

    tm, down = tissue_mask(slide)
    x, y = plan.region[:2]
    rows = ((y + (np.arange(shape[0]) + 0.5) * plan.scale) / down).astype(np.int64).clip(0, tm.shape[0] - 1)
    cols = ((x + (np.arange(shape[1]) + 0.5) * plan.scale) / down).astype(np.int64).clip(0, tm.shape[1] - 1)
    return tm[rows[:, None], cols[None, :]]


def _source_stain(model: Any, slide: Slide, image: np.ndarray | None) -> Any:
    if getattr(model, "normalizer", None) is None:
        return None
    if image is not None:
        return model.estimate_stain(image, what="image")
    from napari_pathoseg.stain.slide import estimate_slide_stain

    try:
        return estimate_slide_stain(slide, model.normalizer)
    except (StainError, PathosegError) as exc:
        logger.warning("%s: stain not normalised (%s)", slide.metadata.path, exc)
        return None


def iter_detect_lesions(
    source: Slide | np.ndarray,
    model: Any,
    *,
    mpp: float | None = None,
    region: tuple[int, int, int, int] | None = None,
    threshold: float = 0.5,
    fill_holes: bool = True,
    min_area_um2: float = 0.0,
    tile: int | None = None,
    overlap: int = 32,
    batch_size: int = 4,
    tissue_only: bool | None = None,
    work_dir: str | os.PathLike | None = None,
    cancel: Cancellable | None = None,
) -> Iterator[Progress | LesionResult]:
    """Detect lesions; yields :class:`~napari_pathoseg.events.Progress`, finally a :class:`LesionResult`.

    Parameters
    ----------
    source : Slide or (rows, cols, 3) uint8 array
    model : LesionModel
    mpp : float, optional
        Declared µm per pixel of the source when it has none.
    region : (x, y, w, h), optional
        Level-0 rectangle (default: the whole source).
    threshold : float
        Probability threshold in [0, 1].
    fill_holes : bool
        Fill holes of lesion regions.
    min_area_um2 : float
        Remove lesion regions smaller than this (µm²).
    tile, overlap, batch_size, tissue_only, work_dir, cancel
        See :func:`~napari_pathoseg.inference.engine.iter_predict`; the tile defaults to the
        model's (512 px), smaller for a small input.

    Raises
    ------
    PathosegError
        Unknown resolution without ``mpp``, a region outside the source, a threshold outside
        0-1, an input smaller than 64 px at the model's scale, a model of another task.
    """
    check_threshold(threshold)
    if getattr(model, "task", None) != "lesion":
        raise PathosegError(f"{getattr(model, 'name', model)!r} is not a lesion model; pick a model of the lesion task.")
    if not min_area_um2 >= 0:
        raise PathosegError(f"the minimum lesion area must be >= 0 µm², got {min_area_um2}")
    is_array = not isinstance(source, Slide)
    image = np.asarray(source) if is_array else None
    slide = Slide.from_array(image, mpp=mpp, name="image") if is_array else source
    slide_mpp = mpp if mpp is not None else slide.mpp
    if slide_mpp is None:
        raise PathosegError(
            f"{slide.metadata.path}: the image's µm per pixel is unknown; declare it "
            f"(--mpp on the command line, 'µm/px' in the dock); the model works at {model.mpp} µm/px"
        )
    scale = float(model.mpp) / float(slide_mpp)
    w0, h0 = (region[2], region[3]) if region is not None else slide.metadata.level_dimensions[0]
    out_side = min(w0, h0) / scale
    if out_side < MIN_INPUT - 0.5:
        raise PathosegError(
            f"the input is {out_side:.0f} px at the model's {model.mpp} µm/px; lesion detection needs at least "
            f"{MIN_INPUT} px ({MIN_INPUT * model.mpp:.0f} µm): give a larger region or image"
        )
    if tile is None:
        big = int(np.ceil(max(w0, h0) / scale))
        tile = int(min(int(model.tile_size), max(MIN_INPUT, int(np.ceil(big / 32)) * 32)))
    overlap = min(int(overlap), tile // 2 - 1) if tile < 4 * overlap else int(overlap)
    yield Progress(0, 1, "measuring the stain", stage="stain")
    stain = _source_stain(model, slide, image)
    predictor = LesionPredictor(model, source=stain, tile_size=tile)
    res: InferenceResult | None = None
    for ev in iter_predict(slide, predictor, [ProbabilityMap("prob", dtype=np.float32)], mpp=mpp, region=region,
                           tile=tile, overlap=overlap, batch_size=batch_size, tissue_only=tissue_only,
                           edge="reflect", work_dir=work_dir, cancel=cancel):
        if isinstance(ev, InferenceResult):
            res = ev
        else:
            yield ev
    assert res is not None
    prob = np.asarray(res.outputs["prob"].values(), np.float32)
    if prob.ndim == 3:
        prob = prob[..., 0]
    yield Progress(0, 1, "lesion mask", stage="mask")
    mask = lesion_mask(prob, threshold=threshold, fill_holes=fill_holes,
                       min_area_px=int(np.ceil(min_area_um2 / res.mpp**2)))
    tissue = _tissue_on_grid(slide, res.plan, prob.shape)
    _, rows = region_table(mask, mpp=res.mpp)
    yield LesionResult(
        prob=prob, mask=mask, tissue=tissue, regions=rows, region=res.region, scale=res.scale, mpp=res.mpp,
        threshold=float(threshold), fill_holes=bool(fill_holes), min_area_um2=float(min_area_um2),
        stain_normalized=stain is not None, model=res.name, tiles=res.tiles, tiles_total=res.tiles_total,
        cancelled=res.cancelled, timings=res.timings,
    )


def run_detect_lesions(source: Slide | np.ndarray, model: Any, **kwargs: Any) -> LesionResult:
    """Run :func:`iter_detect_lesions` to the end."""
    from napari_pathoseg.events import run_to_end

    return run_to_end(iter_detect_lesions(source, model, **kwargs), LesionResult)


def _resample_to(arr: np.ndarray, shape: tuple[int, int], *, order: int) -> np.ndarray:
    from skimage.transform import resize

    if tuple(arr.shape[:2]) == tuple(shape):
        return arr
    return resize(arr, shape, order=order, anti_aliasing=False, preserve_range=True).astype(arr.dtype)


def write_probability_tiff(result: LesionResult, path: str | os.PathLike, *, dtype: str = "uint8",
                           grid: tuple[int, int] | None = None) -> Path:
    """Write the probability map as a TIFF (atomic).

    ``dtype``: ``"uint8"`` (0-255 = probability x 255) or ``"float32"`` (0-1). ``grid``: a
    (rows, cols) grid to resample to (bilinear; a plain image's own pixel grid), else the
    model's grid; the metadata records ``mpp``, ``region_xywh``, ``scale`` and the encoding.
    """
    import tifffile

    prob = result.prob
    if grid is not None:
        prob = _resample_to(prob, grid, order=1)
    if dtype == "uint8":
        data = np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8)
    elif dtype == "float32":
        data = np.clip(prob, 0.0, 1.0).astype(np.float32)
    else:
        raise PathosegError(f"the probability type must be uint8 or float32, got {dtype!r}")
    mpp = result.mpp if grid is None else result.mpp * result.prob.shape[1] / max(1, grid[1])
    path = Path(path)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, data, compression="zlib", resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER",
                         metadata={"region_xywh": list(result.region), "mpp": mpp, "model": result.model,
                                   "encoding": "probability x 255" if dtype == "uint8" else "probability 0-1",
                                   "scale": result.scale if grid is None else 1.0})
    return path


def write_mask_tiff(result: LesionResult, path: str | os.PathLike, *, grid: tuple[int, int] | None = None) -> Path:
    """Write the lesion mask (uint8 0/1; region labels are ``scipy.ndimage.label`` of it), atomic."""
    import tifffile

    mask = result.mask.astype(np.uint8)
    if grid is not None:
        mask = _resample_to(mask, grid, order=0)
    mpp = result.mpp if grid is None else result.mpp * result.prob.shape[1] / max(1, grid[1])
    path = Path(path)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, mask, compression="zlib", resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER",
                         metadata={"region_xywh": list(result.region), "mpp": mpp, "model": result.model,
                                   "threshold": result.threshold})
    return path


def export_regions_geojson(result: Any, slide: Any, path: str | Path) -> int:
    """Write the lesion regions of ``result`` as QuPath GeoJSON annotations (class ``Tumor``); returns their number."""
    from napari_pathoseg.export.labels_export import run_export_labels

    labels, _ = region_table(result.mask, mpp=result.mpp)
    x, y = result.region[:2]
    res = run_export_labels(
        path, labels, slide_metadata=slide.metadata, downsample=result.scale,
        origin=(y / result.scale, x / result.scale), object_type="annotation", classification="Tumor",
        measure=[], probability=result.prob, measurements_path=False,
        metadata={"model": result.model, "threshold": f"{result.threshold:g}"},
    )
    return int(res.n_objects)
