"""A pathologist's review of M5's pseudo masks: export stage 1's masks, train stage 2 on the reviewed ones.

:func:`iter_export_review` writes the Grad-CAM++ pseudo masks a run made for its training
patches (``RUN/pseudo``, stage 1's best checkpoint) into a review project of kind ``"tissue"``
(:class:`~napari_pathoseg.review.store.ReviewProject`): per patch the image, the class-id mask
and the classifier's confidence in it (:func:`~.cam.pseudo_confidence`), the class names in
``project.json``. The Review dock lists the patches least confident first; the reviewer accepts,
rejects or corrects each mask with napari's label tools (an edited mask is saved as
``"corrected"``). :func:`reviewed_training` gives stage 2 the accepted and corrected masks only
(``pathoseg tissue-train --reviewed PROJECT``); rejected and still-pending ones are left out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.methods.tissue.data import TissueData, TissueImage

__all__ = ["ExportDone", "ExportEvent", "check_run", "iter_export_review", "open_reviewed", "review_summary",
           "reviewed_training"]

logger = logging.getLogger(__name__)


@dataclass
class ExportEvent:
    """One patch exported (``done`` of ``total``), with the classifier's confidence in its mask."""

    done: int
    total: int
    name: str
    confidence: float


@dataclass
class ExportDone:
    """The end of an export: the project folder and its tile count (``cancelled``: a partial project)."""

    project: Path
    tiles: int
    cancelled: bool = False
    confidence: dict[str, float] = field(default_factory=dict)
    message: str = ""


def check_run(run: str | os.PathLike) -> Path:
    """Stage 1's best checkpoint of run ``run``; raises :class:`PathosegError` when there is none."""
    ckpt = Path(run) / "stage1" / "best.safetensors"
    if not ckpt.is_file():
        raise PathosegError(f"{run} has no stage-1 best checkpoint (stage1/best.safetensors); give an M5 run folder "
                            "whose stage 1 finished (pathoseg tissue-train ... --out RUN).")
    return ckpt


def open_reviewed(project: str | os.PathLike) -> Any:
    """Open a tissue review project; raises :class:`PathosegError` (one line) for anything else."""
    from napari_pathoseg.review.store import ReviewProject

    proj = ReviewProject.open(project)
    if proj.info.kind != "tissue":
        raise PathosegError(f"{project} is a {proj.info.kind} review project; give the tissue project that "
                            "pathoseg tissue-review-export wrote.")
    return proj


def iter_export_review(run: str | os.PathLike, data: TissueData, out: str | os.PathLike, *,
                       overwrite: bool = False, cancel: Any = None, device: Any = None) -> Iterator[Any]:
    """Export run ``run``'s stage-1 pseudo masks of ``data.train`` into a tissue review project ``out``.

    Parameters
    ----------
    run : path
        An M5 run folder with ``stage1/best.safetensors`` and finished ``pseudo/`` masks.
    data : TissueData
        The data the run trained on (same patches; with ``tiles`` the confidence is per tile).
    out : path
        A new or empty folder for the project (``overwrite`` replaces a project there).
    cancel : threading.Event, optional
        Set to stop; the tiles exported so far stay in a valid project.

    Yields
    ------
    ExportEvent
        Per patch; the generator ends with one :class:`ExportDone`.
    """
    from napari_pathoseg.methods.tissue.cam import pseudo_confidence
    from napari_pathoseg.methods.tissue.network import TissueClassifier
    from napari_pathoseg.methods.tissue.pipeline import _load_net, read_pseudo_masks
    from napari_pathoseg.review.store import ReviewProject
    from napari_pathoseg.training.engine import select_device

    run = Path(run)
    ckpt = check_run(run)
    masks = read_pseudo_masks(run, data.train)
    dev = select_device(device)
    clf, cfg = _load_net(TissueClassifier, ckpt, "m5-cls", dev)
    if list(cfg.classes) != list(data.classes):
        raise PathosegError(f"{run} was trained for classes {list(cfg.classes)}, the data have {list(data.classes)}; "
                            "pass the data the run trained on.")
    out = Path(out)
    if out.resolve() == run.resolve() or run.resolve() in out.resolve().parents:
        raise PathosegError(f"--out {out} is inside the run folder {run}; choose a folder outside it.")
    side = max(max(t.image.shape[:2]) for t in data.train)
    proj = ReviewProject.create(out, source=run, source_kind="folder", model=str(ckpt), tile_size=side, mpp=cfg.mpp,
                                overwrite=overwrite, kind="tissue", classes=cfg.classes)
    by_parent: dict[str, list[tuple[int, int, tuple[int, ...]]]] = {}
    for t in data.tiles:
        by_parent.setdefault(t.parent, []).append((t.origin[0], t.origin[1], t.labels))
    conf: dict[str, float] = {}
    for i, (item, mask) in enumerate(zip(data.train, masks)):
        if cancel is not None and cancel.is_set():
            proj.save()
            yield ExportDone(out, len(proj), cancelled=True, confidence=conf,
                             message=f"stopped after {len(proj)} of {len(data.train)} patches; {out} holds those")
            return
        if data.tiles:
            tiles, size = by_parent.get(item.name, []), data.tile
        else:
            tiles, size = [(0, 0, item.labels)], max(item.image.shape[:2])
        c = pseudo_confidence(clf, item.image, tiles, size, threshold=cfg.background_grey, device=dev)
        conf[item.name] = round(float(c), 4)
        proj.add_class_tile(item.image, mask, score=c, name=item.name, save=False)
        yield ExportEvent(i + 1, len(data.train), item.name, float(c))
    proj.save()
    logger.info("exported %d pseudo masks of %s to %s", len(proj), run, out)
    yield ExportDone(out, len(proj), confidence=conf, message=f"{len(proj)} pseudo masks to review in {out}")


def review_summary(project: Any) -> dict[str, int]:
    """Tiles per status of a tissue project: pending, accepted (as exported), corrected, rejected, total."""
    out = {"pending": 0, "accepted": 0, "corrected": 0, "rejected": 0}
    for rec in project.tiles(sort_by="tile_id", descending=False):
        out[rec.status] += 1
    out["total"] = sum(out.values())
    return out


def reviewed_training(project: str | os.PathLike, classes: Sequence[str]) -> tuple[list[TissueImage], dict[str, Any]]:
    """Stage 2's training patches from a reviewed tissue project: the accepted and corrected masks only.

    Parameters
    ----------
    project : path
        A review project of kind ``"tissue"`` (:func:`iter_export_review`).
    classes : sequence of str
        The model's classes; the project's must be the same.

    Returns
    -------
    items : list of TissueImage
        Image, class-id mask (0 = no label) and the multi-hot label of the mask's classes.
    summary : dict
        The project, its tiles per status, and the patch names used.

    Raises
    ------
    PathosegError
        Not a tissue review project, other classes, or nothing accepted or corrected yet.
    """
    proj = open_reviewed(project)
    if list(proj.info.classes) != list(classes):
        raise PathosegError(f"{project} holds masks of classes {proj.info.classes}, the model has {list(classes)}; "
                            "train with the classes the project was exported for.")
    n = len(classes)
    items = []
    for rec in proj.tiles(sort_by="tile_id", descending=False, states=["accepted"]):
        mask = proj.read_mask(rec.tile_id).astype(np.uint8)
        present = np.bincount(mask.ravel(), minlength=n + 1)[1:n + 1] > 0
        items.append(TissueImage(rec.source_name or rec.tile_id, proj.read_image(rec.tile_id),
                                 tuple(int(v) for v in present), mask))
    counts = review_summary(proj)
    if not items:
        raise PathosegError(f"{project}: no accepted or corrected pseudo masks ({counts['pending']} pending, "
                            f"{counts['rejected']} rejected); review them in the Review dock first.")
    return items, {"reviewed": str(proj.root), **counts, "used": [t.name for t in items]}
