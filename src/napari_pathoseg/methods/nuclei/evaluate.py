"""Score a nucleus model against instance ground truth.

Images are resampled to the model's um/px, predicted in overlapping tiles,
the probability maps are resampled back (bilinear) to the image grid, split
into instances there, and compared with the ground truth on its own grid.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from skimage.transform import resize

from napari_pathoseg.metrics import instance_metrics
from napari_pathoseg.methods.nuclei.datasets import DataError, LabelledImage, read_image, read_labels, resample_pair

__all__ = ["predict_maps", "evaluate_items", "evaluate_folder", "IMAGE_SUFFIXES"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


def predict_maps(
    model,
    image: np.ndarray,
    *,
    tile: int = 512,
    overlap: int = 64,
    batch_size: int = 4,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Nucleus probability and extra maps of a whole image, tile by tile, on the inference engine.

    Tiles of ``tile`` pixels overlap by ``overlap``; each pixel comes from the one tile
    that owns it (half the overlap is cut on inner sides: ``blend="core"``), and tiles
    reaching past the image see its mirror image, as the network's own padding does.

    Parameters
    ----------
    model : NucleusModel
    image : (H, W, 3) uint8 ndarray
        At ``model.mpp``.

    Returns
    -------
    prob : (H, W) float32 ndarray
    extra : (C, H, W) float32 ndarray or None
    """
    from napari_pathoseg.inference import ProbabilityMap, run_predict
    from napari_pathoseg.methods.nuclei.predictor import NucleusPredictor

    image = np.asarray(image)
    if max(image.shape[:2]) <= tile:  # one tile, no larger than the image (the network pads to its multiple)
        tile, overlap = max(image.shape[:2]), 0
    sinks = [ProbabilityMap("prob", blend="core"), ProbabilityMap("extra", blend="core")]
    res = run_predict(
        image, NucleusPredictor(model), sinks, mpp=float(model.mpp), tile=tile, overlap=overlap,
        batch_size=batch_size, tissue_only=False, edge="reflect", prefetch=False,
    )
    prob = np.asarray(res.outputs["prob"].array, np.float32)
    extra = res.outputs["extra"]
    if extra is not None:
        e = np.asarray(extra.array, np.float32)
        extra = np.ascontiguousarray(np.moveaxis(e, -1, 0)) if e.ndim == 3 else e[None]
    return prob, extra


def _labels_at(model, image: np.ndarray, *, mpp: float, method: str) -> np.ndarray:
    small, _ = resample_pair(image, None, src_mpp=mpp, dst_mpp=model.mpp)
    prob, extra = predict_maps(model, small)
    if small.shape[:2] != image.shape[:2]:
        prob = resize(prob, image.shape[:2], order=1, preserve_range=True).astype(np.float32)
        if extra is not None:
            extra = np.stack([resize(e, image.shape[:2], order=1, preserve_range=True) for e in extra]).astype(np.float32)
    return model.to_instances(prob, extra, method=None if method == "auto" else method, mpp=mpp)


def evaluate_items(
    model,
    items: Sequence[LabelledImage],
    *,
    method: str = "auto",
    perturb: Callable[[np.ndarray], np.ndarray] | None = None,
    per_image: bool = False,
) -> dict[str, Any]:
    """Mean instance metrics of ``model`` over labelled images.

    Parameters
    ----------
    model : NucleusModel
    items : sequence of LabelledImage
        Each at its own ``mpp``.
    method : {"auto", "boundary", "distance"}
        Instance post-processing (``"auto"``: the model's validated choice).
    perturb : callable or None
        Applied to each image before prediction (robustness tests).
    per_image : bool
        Include each image's metrics.

    Returns
    -------
    dict
        ``{"n_images", "metrics": {aji, aji_plus, dice, miou, f1, pq, dq, sq}, ["per_image"]}``.
    """
    if not items:
        raise DataError("No images to evaluate.")
    rows = {}
    for it in items:
        img = perturb(it.image) if perturb is not None else it.image
        lab = _labels_at(model, img, mpp=it.mpp, method=method)
        rows[it.name] = instance_metrics(it.labels, lab)
        logger.info("%s: %s", it.name, rows[it.name])
    keys = next(iter(rows.values())).keys()
    res: dict[str, Any] = {
        "n_images": len(rows),
        "metrics": {k: float(np.mean([r[k] for r in rows.values()])) for k in keys},
    }
    if per_image:
        res["per_image"] = rows
    return res


def evaluate_folder(
    images: str | os.PathLike,
    masks: str | os.PathLike,
    *,
    model: Any = "nuclei-lite",
    mpp: float | None = None,
    method: str = "auto",
    per_image: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on a folder of images and a folder of instance masks.

    Masks are matched to images by file stem (``images/a.png`` <->
    ``masks/a.png``).  ``mpp`` declares the images' um/px (default: the
    model's).  Returns the dict of :func:`evaluate_items` plus ``model`` and
    ``mpp``.
    """
    from napari_pathoseg.models.registry import NucleusModel, load_model

    images, masks = Path(images), Path(masks)
    for d, what in ((images, "--images"), (masks, "--masks")):
        if not d.is_dir():
            raise DataError(f"{what} {d} is not a folder.")
    m = model if isinstance(model, NucleusModel) else load_model(model)
    if mpp is not None and mpp <= 0:
        raise DataError(f"--mpp must be > 0, got {mpp}.")
    img_mpp = float(mpp) if mpp is not None else m.mpp
    mask_files = {p.stem: p for p in masks.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    items = []
    missing = []
    for p in sorted(images.iterdir()):
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if p.stem not in mask_files:
            missing.append(p.name)
            continue
        img = read_image(p)
        lab = read_labels(mask_files[p.stem])
        if lab.shape != img.shape[:2]:
            raise DataError(f"Mask {mask_files[p.stem]} is {lab.shape}, image {p} is {img.shape[:2]}.")
        items.append(LabelledImage(p.stem, img, lab, 1.0, "folder", img_mpp))
    if missing:
        logger.warning("no mask for %d images: %s", len(missing), missing[:5])
    if not items:
        raise DataError(f"No image in {images} has a mask of the same name in {masks}.")
    res = evaluate_items(m, items, method=method, per_image=per_image)
    return {"model": m.name, "mpp": img_mpp, **res}
