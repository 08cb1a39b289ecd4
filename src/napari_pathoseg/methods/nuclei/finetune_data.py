"""What a fine-tuning run trains on: strong labels and reviewed pseudo-labels.

:func:`build_finetune_data` is the one place that assembles it:

* strong labels: folders laid out like ``../shared/data`` datasets (``images/<id>.png`` +
  ``instance_masks/<id>.png``; ``monuseg_train`` and ``cpm15_nuclei`` are read through their
  ``index.csv``, the shared data root through both), resampled to the student's µm/px
  (:func:`load_strong_folder`);
* pseudo-labels: the accepted tiles of one or more review projects
  (:class:`~napari_pathoseg.review.project.ReviewProject`); each tile goes to the X side as read,
  and its teacher-normalised image (pseudo-Y) to the Y side, both with the reviewed mask and the
  teacher's confidence as weight (:func:`load_pseudo_items`).

Validation uses strong images only (the best epoch is chosen by AJI against expert masks).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathoseg.methods.nuclei.finetune_config import FinetuneConfig, FinetuneError

__all__ = [
    "FinetuneData",
    "load_strong_folder",
    "load_pseudo_items",
    "build_finetune_data",
    "IMAGE_SUFFIXES",
    "INDEXED_DATASETS",
]

logger = logging.getLogger(__name__)

#: File suffixes read as images / masks in a strong-label folder.
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
#: Folder names under ``../shared/data`` whose ``index.csv`` gives per-image µm/px and mask paths.
INDEXED_DATASETS = {"monuseg_train": "monuseg", "cpm15_nuclei": "cpm15"}


@dataclass
class FinetuneData:
    """Assembled training data: the :class:`M2Data` plus counts for the record."""

    m2: Any  # napari_pathoseg.methods.nuclei.datasets.M2Data
    n_strong: int
    n_pseudo: int
    description: str


def _files_by_stem(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}


def load_strong_folder(
    folder: str | os.PathLike, *, mpp: float, src_mpp: float | None = None
) -> list[Any]:
    """Load a strong-label folder as :class:`LabelledImage` records at ``mpp``.

    Parameters
    ----------
    folder : path
        One of: the shared data root (holding ``monuseg_train/`` and/or
        ``cpm15_nuclei/``); one of those dataset folders (read through its
        ``index.csv``: per-image µm/px and mask path); or any folder with
        ``images/`` and ``instance_masks/`` (masks matched by file stem).
    mpp : float
        µm/px the student works at; images are resampled to it.
    src_mpp : float or None
        µm/px of a plain ``images/`` folder (default: ``mpp``, no resampling).

    Returns
    -------
    list of LabelledImage
        Names ``"<source>/<id>"`` (the shared datasets use the names of the
        shipped split: ``monuseg/...``, ``cpm15/...``).

    Raises
    ------
    FinetuneError
        The folder is missing, holds no labelled image, or a mask does not fit.
    """
    from napari_pathoseg.methods.nuclei.datasets import (
        LabelledImage,
        iter_nuclei_files,
        read_image,
        read_labels,
        resample_pair,
    )

    folder = Path(folder)
    if not folder.is_dir():
        raise FinetuneError(f"Strong-label folder {folder} does not exist; choose a folder with images/ and instance_masks/.")
    entries: list[tuple[str, Path, Path, float, str]] = []
    if any((folder / d / "index.csv").is_file() for d in INDEXED_DATASETS):
        entries = iter_nuclei_files(folder)
    elif folder.name in INDEXED_DATASETS and (folder / "index.csv").is_file():
        prefix = INDEXED_DATASETS[folder.name] + "/"
        entries = [e for e in iter_nuclei_files(folder.parent) if e[0].startswith(prefix)]
    else:
        img_dir, mask_dir = folder / "images", folder / "instance_masks"
        if not img_dir.is_dir() or not mask_dir.is_dir():
            raise FinetuneError(
                f"{folder} has no images/ and instance_masks/ sub-folders; a strong-label folder holds "
                "RGB images in images/ and instance masks of the same file names in instance_masks/."
            )
        masks = _files_by_stem(mask_dir)
        src = float(src_mpp) if src_mpp is not None else float(mpp)
        for stem, ipath in _files_by_stem(img_dir).items():
            if stem in masks:
                entries.append((f"{folder.name}/{stem}", ipath, masks[stem], src, folder.name))
    items = []
    for name, ipath, mpath, src, source in entries:
        image, labels = read_image(ipath), read_labels(mpath)
        if labels.shape != image.shape[:2]:
            raise FinetuneError(f"Mask {mpath} is {labels.shape} but image {ipath} is {image.shape[:2]}; fix the mask.")
        img, lab = resample_pair(image, labels, src_mpp=src, dst_mpp=mpp)
        items.append(LabelledImage(name, img, lab, 1.0, source, mpp))
    if not items:
        raise FinetuneError(f"No labelled image in {folder}: no image in images/ has a mask of the same name.")
    logger.info("strong labels: %d images from %s", len(items), folder)
    return items


def load_pseudo_items(
    project: Any,
    *,
    mpp: float,
    include_pending: bool = False,
    min_score: float | None = None,
    weight: str = "confidence",
) -> tuple[list[Any], list[Any]]:
    """Accepted tiles of a review project as X items and pseudo-Y items.

    Parameters
    ----------
    project : ReviewProject or path
    mpp : float
        The student's µm/px; tiles of a project made at another resolution are
        resampled to it.
    include_pending, min_score, weight
        As in :meth:`ReviewProject.training_triples`.

    Returns
    -------
    x_items, y_items : list of LabelledImage
        ``x_items[i]`` is tile ``i`` as read; ``y_items[i]`` its
        teacher-normalised image (pseudo-Y); both with the tile's mask and
        weight (the teacher's per-pixel confidence, 1 for edited tiles).
    """
    from napari_pathoseg.review.project import ReviewProject
    from napari_pathoseg.review.scoring import confidence
    from napari_pathoseg.methods.nuclei.datasets import LabelledImage, resample_pair

    if not isinstance(project, ReviewProject):
        project = ReviewProject.open(project)
    src_mpp = project.info.mpp if project.info.mpp is not None else mpp
    x_items, y_items = [], []
    for item in project.accepted_training_items(include_pending=include_pending, min_score=min_score):
        w: float | np.ndarray = 1.0
        if weight == "confidence" and not project.record(item.tile_id).edited:
            w = confidence(project.read_prob(item.tile_id)).astype(np.float32)
        img, lab = resample_pair(item.image, item.mask.astype(np.int32), src_mpp=src_mpp, dst_mpp=mpp)
        norm, _ = resample_pair(item.normalized, None, src_mpp=src_mpp, dst_mpp=mpp)
        if not np.isscalar(w) and w.shape != lab.shape:
            w, _ = resample_pair(np.repeat(w[..., None], 3, -1), None, src_mpp=src_mpp, dst_mpp=mpp)
            w = np.asarray(w[..., 0], np.float32)
        name = f"pseudo:{project.root.name}/{item.tile_id}"
        x_items.append(LabelledImage(name, img, lab, w, "pseudo", mpp))
        y_items.append(LabelledImage(name + ":normalized", norm, lab, w, "pseudo", mpp))
    logger.info("pseudo-labels: %d tiles from %s", len(x_items), project.root)
    return x_items, y_items


def build_finetune_data(config: FinetuneConfig, *, mpp: float) -> FinetuneData:
    """Assemble strong and pseudo-labelled data into X / Y / validation sets.

    Strong images go to X or Y as the split says (or by stain style,
    :func:`~napari_pathoseg.methods.nuclei.datasets.split_styles`); pseudo tiles go
    to X, their normalised images to Y.  Validation uses strong images only.

    Raises
    ------
    FinetuneError
        No data, no strong image for validation, or a split naming missing images.
    """
    from napari_pathoseg.methods.nuclei.datasets import M2Data, load_split, split_styles

    if not config.strong and not config.projects:
        raise FinetuneError("No training data: choose strong-label folders and/or a review project.")
    strong: list[Any] = []
    for folder in config.strong:
        strong += load_strong_folder(folder, mpp=mpp, src_mpp=config.strong_mpp)
    names = [it.name for it in strong]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise FinetuneError(f"Strong-label folders hold the same images twice ({dup[:3]}); choose each once.")
    px, py = [], []
    for proj in config.projects:
        x, y = load_pseudo_items(
            proj, mpp=mpp, include_pending=config.include_pending, min_score=config.min_score,
            weight=config.pseudo_weight,
        )
        px += x
        py += y
    if config.projects and not px:
        logger.warning("the review project(s) hold no accepted tiles; training on strong labels only")
    if not strong:
        raise FinetuneError(
            "Validation needs strong labels (the best epoch is chosen by AJI against expert masks); "
            "add at least one strong-label folder."
        )
    by_name = {it.name: it for it in strong}
    split: dict[str, Any]
    if config.split:
        split = load_split(config.split)
        test = set(split["test"])
        val = [by_name[n] for n in split["val"] if n in by_name]
        train = [it for it in strong if it.name not in test and it.name not in set(split["val"])]
        xs, ys = set(split["x"]), set(split["y"])
        x_train = [it for it in train if it.name in xs]
        y_train = [it for it in train if it.name in ys]
        rest = [it for it in train if it.name not in xs and it.name not in ys]
        if rest and len(rest) >= 2:
            st = split_styles(rest)
            x_train += [by_name[n] for n in st["x"]]
            y_train += [by_name[n] for n in st["y"]]
        elif rest:
            x_train += rest
        if not val:
            raise FinetuneError(
                f"None of the validation images of {config.split} is among the strong labels; "
                "add their folder or drop the split."
            )
        logger.info("split %s: %d test images left out", config.split, len(test & set(by_name)))
    else:
        rng = np.random.default_rng(config.seed)
        order = [strong[i] for i in rng.permutation(len(strong))]
        n_val = max(1, int(round(config.val_fraction * len(strong))))
        if len(strong) == 1:
            logger.warning("only one strong image: it is used for both training and validation")
            val, train = list(strong), list(strong)
        else:
            val, train = order[:n_val], order[n_val:]
        if len(train) >= 2:
            st = split_styles(train)
            x_train = [by_name[n] for n in st["x"]]
            y_train = [by_name[n] for n in st["y"]]
        else:
            x_train, y_train = list(train), list(train)
        split = {
            "seed": config.seed, "val": sorted(it.name for it in val), "test": [],
            "train": sorted(it.name for it in train), "x": sorted(it.name for it in x_train),
            "y": sorted(it.name for it in y_train),
        }
    n_strong = len({it.name for it in list(x_train) + list(y_train)})
    x_train = list(x_train) + px
    y_train = list(y_train) + py
    if not x_train or not y_train:
        raise FinetuneError("Not enough training images for both the X and the Y side; add strong labels or accepted tiles.")
    desc = f"{n_strong} strong images ({', '.join(config.strong) or '-'})"
    if config.projects:
        desc += f" + {len(px)} pseudo-labelled tiles ({', '.join(config.projects)})"
    split = dict(split, pseudo=[it.name for it in px])
    return FinetuneData(
        m2=M2Data(x_train=x_train, y_train=y_train, val=list(val), split=split),
        n_strong=n_strong,
        n_pseudo=len(px),
        description=desc,
    )
