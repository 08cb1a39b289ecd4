"""Training an M5 tissue model from tiles tagged on a slide (the Tissue dock's training panel).

The user draws rectangles on a slide and tags each with the classes it contains ("tumour;
stroma"): patch-level labels, no outlines. :func:`read_tagged_patches` reads each rectangle at
the model's µm per pixel; :func:`iter_train_tags` holds out a seeded share of them for
validation, runs both M5 stages (:func:`~.pipeline.iter_m5`, resumable run folder) and registers
stage 2's best checkpoint in the user registry under the name given, ending in
:class:`TagTrainDone`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.methods.tissue.data import TissueData, TissueImage
from napari_pathoseg.methods.tissue.labels import PatchLabelError

__all__ = ["MAX_TAG_SIDE", "TagTrainDone", "iter_train_tags", "read_tagged_patches"]

logger = logging.getLogger(__name__)

#: Largest side of one tagged rectangle, in pixels at the model's µm per pixel.
MAX_TAG_SIDE = 2048


@dataclass
class TagTrainDone:
    """The end of a training from tags: the registered model (``None`` when stopped) and the M5 result."""

    model_name: str | None
    checkpoint: Path | None
    result: Any
    cancelled: bool = False
    message: str = ""


def read_tagged_patches(slide: Any, rects: Sequence[tuple[int, int, int, int]], labels: Sequence[Sequence[int]], *,
                        mpp: float, slide_mpp: float | None = None) -> list[TissueImage]:
    """The (x, y, w, h) level-0 rectangles of ``slide`` as RGB patches at ``mpp`` µm/px with their labels."""
    from skimage.transform import resize

    if len(rects) != len(labels):
        raise PathosegError(f"{len(rects)} rectangles but {len(labels)} labels.")
    base = slide_mpp if slide_mpp is not None else slide.mpp
    if base is None:
        raise PathosegError("The slide does not record its µm per pixel; set µm/px in the dock first.")
    scale = float(mpp) / float(base)  # level-0 pixels per model pixel
    H, W = slide.shape
    out = []
    for i, ((x, y, w, h), lab) in enumerate(zip(rects, labels)):
        x0, y0 = max(0, int(x)), max(0, int(y))
        x1, y1 = min(W, int(x + w)), min(H, int(y + h))
        if x1 - x0 < 2 or y1 - y0 < 2:
            raise PathosegError(f"Tagged rectangle {i + 1} lies outside the slide; redraw it on the tissue.")
        oh, ow = max(1, round((y1 - y0) / scale)), max(1, round((x1 - x0) / scale))
        if max(oh, ow) > MAX_TAG_SIDE:
            raise PathosegError(f"Tagged rectangle {i + 1} is {ow} x {oh} px at {mpp:g} µm/px; draw tiles up to "
                                f"{MAX_TAG_SIDE} px a side.")
        level = slide.best_level_for_downsample(scale)
        ds = slide.level_downsample(level)
        r0, c0 = int(y0 / ds), int(x0 / ds)
        rh, cw = max(1, round((y1 - y0) / ds)), max(1, round((x1 - x0) / ds))
        rgb = np.asarray(slide.read_region(level=level, row=r0, col=c0, height=rh, width=cw))[..., :3]
        if rgb.shape[:2] != (oh, ow):
            rgb = (resize(rgb, (oh, ow), order=1, anti_aliasing=True, preserve_range=True) + 0.5).astype(np.uint8)
        vec = tuple(int(v) for v in lab)
        if not any(vec) or any(v not in (0, 1) for v in vec):
            raise PatchLabelError(f"Tagged rectangle {i + 1}: label {list(lab)} must hold 0/1 with at least one class.")
        out.append(TissueImage(f"tag_{i + 1:04d}", np.ascontiguousarray(rgb), vec, origin=(y0, x0)))
    return out


def iter_train_tags(patches: Sequence[TissueImage], classes: Sequence[str], *, out_dir: str | os.PathLike,
                    register_as: str, mpp: float, preset: str = "tissue-lite", epochs1: int = 10, steps1: int = 10,
                    epochs2: int = 10, steps2: int = 10, val_fraction: float = 0.2, seed: int = 0,
                    resume: bool = False, force: bool = False, threads: Any = None, cancel: Any = None,
                    data_note: str = "") -> Iterator[Any]:
    """Train both M5 stages on tagged ``patches`` and register the model; events, then :class:`TagTrainDone`."""
    from napari_pathoseg.methods.tissue.network import get_preset
    from napari_pathoseg.methods.tissue.pipeline import M5Done, iter_m5
    from napari_pathoseg.models.registry import register_model

    classes = list(classes)
    if len(patches) < 2:
        raise PathosegError("Tag at least 2 tiles (one is held out to validate).")
    if any(len(p.labels) != len(classes) for p in patches):
        raise PatchLabelError(f"Every tag needs one 0/1 per class of {classes}.")
    order = np.random.default_rng(seed).permutation(len(patches))
    n_val = max(1, round(val_fraction * len(patches)))
    val = [patches[i] for i in order[:n_val]]
    train = [patches[i] for i in order[n_val:]]
    data = TissueData(classes, train, val, [], source=data_note or "tiles tagged on a slide")
    cfg = get_preset(preset, classes=classes, mpp=float(mpp))
    out = Path(out_dir)
    result = None
    for ev in iter_m5(cfg, data, out_dir=out, epochs1=epochs1, steps1=steps1, epochs2=epochs2, steps2=steps2,
                      resume=resume, force=force, cancel=cancel, threads=threads, seed=seed,
                      meta={"command": f"Tissue dock: train from {len(patches)} tagged tiles"}):
        if isinstance(ev, M5Done):
            result = ev
        else:
            yield ev
    if result is None or result.cancelled or result.best_checkpoint is None:
        msg = result.message if result is not None else "stopped"
        yield TagTrainDone(None, None, result, cancelled=True, message=msg)
        return
    card = register_model(result.best_checkpoint, name=register_as, task="tissue", classes=classes,
                          data=f"{data.source}: {len(train)} train / {len(val)} val tiles (patch-level tags)",
                          description=f"M5 ({preset}) trained in the Tissue dock from tagged tiles",
                          command=f"Tissue dock, run folder {out}")
    yield TagTrainDone(card.name, Path(result.best_checkpoint), result,
                       message=f"registered {card.name} ({len(train)} train / {len(val)} val tiles)")
