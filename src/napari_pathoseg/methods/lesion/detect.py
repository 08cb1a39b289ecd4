"""M3 lesion detection on whole slides and images, on the inference engine.

:func:`iter_detect_lesions` reads the slide (or image) at the model's µm per pixel in tiles
(512 px by default, batched), normalises every tile to the model's stored stain reference with
the source stain measured **once** for the whole slide (32 tissue tiles) or image, runs the FPN
and stitches the lesion probability map at that level (feathered overlaps). The mask is
``probability >= threshold`` (0.5), holes filled and regions smaller than ``min_area_um2``
removed (both options); :func:`lesion_mask` re-thresholds without re-running the network, which
is what the dock's live slider does.

With a work folder (the CLI, cohorts, benchmarks) nothing slide-sized is held in memory: the
engine streams the probability map to the folder, and the mask steps (threshold, fill holes,
minimum area, region labels, areas, tissue fraction) run a band of rows at a time
(:func:`napari_pathoseg.inference.bands.clean_mask`, identical to the in-memory steps); the
result's ``prob``, ``mask`` and ``tissue`` are then read-only memory maps of files in the folder
and the writers read them in strips. Without a work folder (the dock) they are arrays.

Examples
--------
>>> import numpy as np
>>> prob = np.zeros((40, 40), np.float32); prob[5:20, 5:20] = 0.9; prob[10, 10] = 0.1
>>> m = lesion_mask(prob, threshold=0.5, fill_holes=True, min_area_px=4)
>>> int(m.sum()), bool(m[10, 10])
(225, True)
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathoseg._atomic import atomic_path
from napari_pathoseg.errors import PathosegError, StainError
from napari_pathoseg.events import Cancellable, Progress
from napari_pathoseg.inference._rows import RowStore
from napari_pathoseg.inference.bands import clean_mask, write_rows_tiff
from napari_pathoseg.inference.engine import InferenceResult, iter_predict
from napari_pathoseg.inference.sinks import ProbabilityMap
from napari_pathoseg.wsi.slide import Slide

__all__ = [
    "MIN_INPUT",
    "LesionPredictor",
    "LesionResult",
    "check_threshold",
    "export_regions_geojson",
    "iter_detect_lesions",
    "lesion_mask",
    "region_table",
    "run_detect_lesions",
    "write_mask_tiff",
    "write_probability_tiff",
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
        Lesion probability on the model's grid over ``region`` (NaN-free, 0 where no tile ran);
        a read-only memory map of the work folder's file when the run was streamed.
    mask : (rows, cols) bool array
        The thresholded, cleaned mask (a memory map when streamed).
    tissue : (rows, cols) bool array
        Tissue on the same grid (the slide's tissue mask), for the lesion fraction (a memory
        map when streamed).
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
    counts : dict, optional
        ``lesion``, ``tissue`` and ``lesion_in_tissue`` pixels of ``mask`` / ``tissue``, counted
        while streaming (``None``: counted from the arrays).
    stores : dict, optional
        The streamed run's row stores (``prob``, ``mask``, ``tissue``, ``labels``) in the work
        folder, which the writers read in strips (``None``: arrays in memory).
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
    counts: dict[str, int] | None = None
    stores: dict[str, Any] | None = None

    def _streamed(self) -> bool:
        """The run was streamed and ``mask`` is still its own (not replaced, e.g. by an edited one)."""
        if self.stores is None or not isinstance(self.mask, np.memmap):
            return False
        return Path(str(self.mask.filename)).resolve() == Path(self.stores["mask"].path).resolve()

    def _count(self, what: str) -> int:
        if self.counts is not None and self._streamed():
            return int(self.counts[what])
        if what == "lesion":
            return int(np.count_nonzero(self.mask))
        if what == "tissue":
            return int(np.count_nonzero(self.tissue))
        return int(np.count_nonzero(self.mask & self.tissue))

    @property
    def lesion_area_um2(self) -> float:
        return float(self._count("lesion") * self.mpp * self.mpp)

    @property
    def tissue_area_um2(self) -> float:
        return float(self._count("tissue") * self.mpp * self.mpp)

    def rows(self, what: str, row0: int, row1: int) -> np.ndarray:
        """Rows ``row0 .. row1`` of ``prob``, ``mask``, ``tissue`` or ``labels`` (from the work folder when streamed)."""
        if self._streamed():
            return self.stores[what].read(row0, row1)
        if what == "labels":
            return region_table(self.mask, mpp=self.mpp)[0][row0:row1]
        return np.asarray(getattr(self, what)[row0:row1])

    def labels(self) -> np.ndarray:
        """Region labels (int32, ids of :attr:`regions`): a read-only memory map when streamed."""
        if self._streamed():
            return np.load(self.stores["labels"].path, mmap_mode="r")
        return region_table(self.mask, mpp=self.mpp)[0]

    def rethreshold(self, threshold: float) -> LesionResult:
        """The same run with another threshold (no network; streamed again when the run was)."""
        from dataclasses import replace

        min_px = int(np.ceil(self.min_area_um2 / self.mpp**2))
        if self._streamed():
            tissue = self.stores["tissue"]
            done = _stream_mask(self.stores["prob"], tissue_read=tissue.read, threshold=threshold,
                                fill_holes=self.fill_holes, min_area_px=min_px, mpp=self.mpp,
                                folder=Path(tissue.path).parent)
            done["stores"]["prob"], done["stores"]["tissue"] = self.stores["prob"], tissue
            return replace(self, threshold=float(threshold), **done)
        mask = lesion_mask(self.prob, threshold=threshold, fill_holes=self.fill_holes, min_area_px=min_px)
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
            "lesion_fraction_of_tissue": round(self._count("lesion_in_tissue") / max(1, self._count("tissue")), 4),
            "n_regions": len(self.regions),
            "stain_normalized": self.stain_normalized,
            "tiles": self.tiles,
            "tiles_total": self.tiles_total,
            "cancelled": self.cancelled,
            "timings": self.timings,
        }


def _tissue_reader(slide: Slide, plan: Any, shape: tuple[int, int]) -> Any:
    """``read(row0, row1)``: rows of the slide's tissue mask (:func:`~napari_pathoseg.tiling.tissue_mask`) on the output grid (nearest)."""
    from napari_pathoseg.tiling import tissue_mask

    tm, down = tissue_mask(slide)
    x, y = plan.region[:2]
    cols = ((x + (np.arange(shape[1]) + 0.5) * plan.scale) / down).astype(np.int64).clip(0, tm.shape[1] - 1)

    def read(row0: int, row1: int) -> np.ndarray:
        rows = ((y + (np.arange(row0, row1) + 0.5) * plan.scale) / down).astype(np.int64).clip(0, tm.shape[0] - 1)
        return tm[rows[:, None], cols[None, :]]

    return read


_RUNS = itertools.count()


def _stream_mask(prob: RowStore, *, tissue_read: Any, threshold: float, fill_holes: bool, min_area_px: int,
                 mpp: float, folder: Path, write_tissue: bool = False) -> dict[str, Any]:
    """Mask, labels, tissue counts and regions of a probability map on disk, a band of rows at a time.

    Returns the :class:`LesionResult` fields ``mask``, ``regions``, ``counts``, ``stores``
    (``tissue`` too when ``write_tissue``); the mask and labels go to new files in ``folder``.
    """
    shape = prob.shape[:2]
    tag = f"{os.getpid()}-{next(_RUNS)}"
    stores = {"mask": RowStore(shape, bool, path=folder / f"lesion_mask-{tag}.npy"),
              "labels": RowStore(shape, np.int32, path=folder / f"lesion_labels-{tag}.npy")}
    if write_tissue:
        stores["tissue"] = RowStore(shape, bool, path=folder / f"lesion_tissue-{tag}.npy")
    counts = {"lesion": 0, "tissue": 0, "lesion_in_tissue": 0}

    def raw(row0: int, row1: int) -> np.ndarray:
        p = prob.read(row0, row1)
        return (p[..., 0] if p.ndim == 3 else p) >= threshold

    def on_band(row0: int, row1: int, lab: np.ndarray) -> None:
        m = lab > 0
        t = np.asarray(tissue_read(row0, row1), bool)
        stores["mask"].write(row0, m)
        stores["labels"].write(row0, lab)
        if write_tissue:
            stores["tissue"].write(row0, t)
        counts["lesion"] += int(np.count_nonzero(m))
        counts["tissue"] += int(np.count_nonzero(t))
        counts["lesion_in_tissue"] += int(np.count_nonzero(m & t))

    cm = clean_mask(raw, shape, fill_holes=fill_holes, min_area_px=min_area_px, on_band=on_band)
    for st in stores.values():
        st.close()
    regions = [{"id": i + 1, "area_um2": float(cm.counts[i] * mpp * mpp),
                "centroid_row": float(cm.centroids[i, 0]), "centroid_col": float(cm.centroids[i, 1]),
                "bbox": [int(v) for v in cm.bboxes[i]]} for i in range(cm.n)]
    out: dict[str, Any] = {"mask": np.load(stores["mask"].path, mmap_mode="r"), "regions": regions,
                           "counts": counts, "stores": stores}
    if write_tissue:
        out["tissue"] = np.load(stores["tissue"].path, mmap_mode="r")
    return out


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
    pmap = res.outputs["prob"]
    min_px = int(np.ceil(min_area_um2 / res.mpp**2))
    common = {"region": res.region, "scale": res.scale, "mpp": res.mpp, "threshold": float(threshold),
                  "fill_holes": bool(fill_holes), "min_area_um2": float(min_area_um2), "stain_normalized": stain is not None,
                  "model": res.name, "tiles": res.tiles, "tiles_total": res.tiles_total, "cancelled": res.cancelled,
                  "timings": res.timings}
    shape = tuple(pmap.shape[:2])
    tissue_read = _tissue_reader(slide, res.plan, shape)
    yield Progress(0, 1, "lesion mask", stage="mask")
    if pmap.store.path is not None:  # streamed: nothing slide-sized in memory
        done = _stream_mask(pmap.store, tissue_read=tissue_read, threshold=threshold, fill_holes=fill_holes,
                            min_area_px=min_px, mpp=res.mpp, folder=Path(pmap.store.path).parent, write_tissue=True)
        done["stores"]["prob"] = pmap.store
        yield LesionResult(prob=np.load(pmap.store.path, mmap_mode="r"), **done, **common)
        return
    prob = np.asarray(pmap.values(), np.float32)
    if prob.ndim == 3:
        prob = prob[..., 0]
    mask = lesion_mask(prob, threshold=threshold, fill_holes=fill_holes, min_area_px=min_px)
    tissue = tissue_read(0, shape[0])
    _, rows = region_table(mask, mpp=res.mpp)
    yield LesionResult(prob=prob, mask=mask, tissue=tissue, regions=rows, **common)


def run_detect_lesions(source: Slide | np.ndarray, model: Any, **kwargs: Any) -> LesionResult:
    """Run :func:`iter_detect_lesions` to the end."""
    from napari_pathoseg.events import run_to_end

    return run_to_end(iter_detect_lesions(source, model, **kwargs), LesionResult)


def _resample_to(arr: np.ndarray, shape: tuple[int, int], *, order: int) -> np.ndarray:
    from skimage.transform import resize

    if tuple(arr.shape[:2]) == tuple(shape):
        return arr
    return resize(arr, shape, order=order, anti_aliasing=False, preserve_range=True).astype(arr.dtype)


def _encode(prob: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "uint8":
        return np.clip(np.rint(np.asarray(prob, np.float32) * 255.0), 0, 255).astype(np.uint8)
    return np.clip(np.asarray(prob, np.float32), 0.0, 1.0).astype(np.float32)


def _write_map(result: LesionResult, path: Path, what: str, dtype: Any, encode: Any,
               grid: tuple[int, int] | None, order: int, metadata: dict[str, Any]) -> Path:
    """Write ``prob`` or ``mask`` (encoded), streamed in strips on the model grid or resampled to ``grid``."""
    import tifffile

    shape = tuple(result.prob.shape[:2])
    mpp = result.mpp if grid is None else result.mpp * shape[1] / max(1, grid[1])
    kw = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER", "metadata": {**metadata, "mpp": mpp}}
    with atomic_path(path) as tmp:
        if grid is None:  # the model grid: strip by strip (bounded memory on whole slides)
            write_rows_tiff(tmp, lambda r0, r1: encode(result.rows(what, r0, r1)), shape, dtype, **kw)
        else:  # a plain image's own pixel grid (at most 8192 px a side)
            data = _resample_to(np.asarray(result.rows(what, 0, shape[0])), grid, order=order)
            tifffile.imwrite(tmp, encode(data), compression="zlib", **kw)
    return path


def write_probability_tiff(result: LesionResult, path: str | os.PathLike, *, dtype: str = "uint8",
                           grid: tuple[int, int] | None = None) -> Path:
    """Write the probability map as a TIFF (atomic).

    ``dtype``: ``"uint8"`` (0-255 = probability x 255) or ``"float32"`` (0-1). ``grid``: a
    (rows, cols) grid to resample to (bilinear; a plain image's own pixel grid), else the
    model's grid, written tiled strip by strip; the metadata records ``mpp``, ``region_xywh``,
    ``scale`` and the encoding.
    """
    if dtype not in ("uint8", "float32"):
        raise PathosegError(f"the probability type must be uint8 or float32, got {dtype!r}")
    meta = {"region_xywh": list(result.region), "model": result.model,
            "encoding": "probability x 255" if dtype == "uint8" else "probability 0-1",
            "scale": result.scale if grid is None else 1.0}
    return _write_map(result, Path(path), "prob", np.dtype(dtype), lambda p: _encode(p, dtype), grid, 1, meta)


def write_mask_tiff(result: LesionResult, path: str | os.PathLike, *, grid: tuple[int, int] | None = None) -> Path:
    """Write the lesion mask (uint8 0/1; region labels are ``scipy.ndimage.label`` of it), atomic."""
    meta = {"region_xywh": list(result.region), "model": result.model, "threshold": result.threshold}
    return _write_map(result, Path(path), "mask", np.uint8, lambda m: np.asarray(m, np.uint8), grid, 0, meta)


def export_regions_geojson(result: Any, slide: Any, path: str | Path) -> int:
    """Write the lesion regions of ``result`` as QuPath GeoJSON annotations (class ``Tumor``); returns their number."""
    from napari_pathoseg.export.labels_export import run_export_labels

    labels = result.labels() if isinstance(result, LesionResult) else region_table(result.mask, mpp=result.mpp)[0]
    x, y = result.region[:2]
    res = run_export_labels(
        path, labels, slide_metadata=slide.metadata, downsample=result.scale,
        origin=(y / result.scale, x / result.scale), object_type="annotation", classification="Tumor",
        measure=[], probability=result.prob, measurements_path=False,
        metadata={"model": result.model, "threshold": f"{result.threshold:g}"},
    )
    return int(res.n_objects)
