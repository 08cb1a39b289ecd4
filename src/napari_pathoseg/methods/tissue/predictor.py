"""M5 on the inference engine: a loaded tissue model as a :class:`~napari_pathoseg.inference.Predictor`.

Two modes, both on the platform engine (:func:`~napari_pathoseg.inference.iter_predict`):

* ``"literal"`` (M5 as described): 224 px windows with 50 % overlap, class probabilities
  averaged where windows overlap. The engine reads 560 px tiles overlapping by 224 px (tile
  origins on the 112 px window grid) and keeps each output pixel from the one tile owning it
  (``blend="core"``); inside a tile the 16 windows of 224 px at a 112 px stride are averaged.
  Every owned pixel is thus the mean over exactly the windows of the global 112 px grid that
  cover it, as in the method; 16 windows per 336² owned pixels cost 1.8x the literal 9.
* ``"fast"``: the network is fully convolutional: one pass over 512 px tiles overlapping by
  64 px, feathered (its agreement with the literal mode is measured in ``docs/tissue.md``).

Output ``probs`` (B, n + 1, H, W): the n class probabilities and, last, the grey > 210
background (0 / 1); :func:`~napari_pathoseg.methods.tissue.segment.ids_from_probs` makes class
ids from it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.inference.sinks import ProbabilityMap
from napari_pathoseg.methods.tissue.data import background_mask

__all__ = ["MODES", "TissuePredictor"]

#: (engine tile, engine overlap, blend) per mode, in multiples of the window for "literal".
MODES = ("literal", "fast")


class TissuePredictor:
    """A :class:`~napari_pathoseg.methods.tissue.model.TissueModel` seen by the inference engine.

    Parameters
    ----------
    model : TissueModel
        Anything with ``mpp``, ``tile_size``, ``classes``, ``background_grey``, ``name`` and
        ``predict(batch) -> (B, n, H, W)``.
    mode : {"literal", "fast"}
    batch : int
        Windows per network call in the literal mode.
    """

    def __init__(self, model: Any, *, mode: str = "literal", batch: int = 8) -> None:
        if mode not in MODES:
            raise PathosegError(f"Unknown tissue inference mode {mode!r}; use one of {MODES}.")
        self.model = model
        self.mode = mode
        self.batch = int(batch)
        self.window = int(model.tile_size)
        self.stride = self.window // 2

    @property
    def mpp(self) -> float:
        return float(self.model.mpp)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.model.classes)

    @property
    def name(self) -> str:
        return str(getattr(self.model, "name", ""))

    @property
    def tile_size(self) -> int:
        """Engine tile: 2.5 windows (literal: 4 x 4 windows on the half-window grid) or 512 px (fast)."""
        return self.window * 5 // 2 if self.mode == "literal" else max(512, self.window)

    @property
    def overlap(self) -> int:
        """Engine overlap: one window (literal) or 64 px (fast)."""
        return self.window if self.mode == "literal" else 64

    @property
    def blend(self) -> str:
        return "core" if self.mode == "literal" else "feather"

    def _windows(self, batch: np.ndarray) -> np.ndarray:
        b, h, w = batch.shape[:3]
        win, st = self.window, self.stride
        ys = list(range(0, max(1, h - win + 1), st))
        xs = list(range(0, max(1, w - win + 1), st))
        crops, where = [], []
        for i in range(b):
            for y in ys:
                for x in xs:
                    crops.append(batch[i, y:y + win, x:x + win])
                    where.append((i, y, x))
        acc = np.zeros((b, len(self.classes), h, w), np.float32)
        cnt = np.zeros((b, 1, h, w), np.float32)
        for k in range(0, len(crops), self.batch):
            p = self.model.predict(np.stack(crops[k:k + self.batch]))
            for (i, y, x), pk in zip(where[k:k + self.batch], p):
                acc[i, :, y:y + win, x:x + win] += pk
                cnt[i, :, y:y + win, x:x + win] += 1
        return acc / np.maximum(cnt, 1)

    def predict(self, batch: np.ndarray) -> dict[str, Any]:
        """``probs`` (B, n + 1, H, W) float32 of a (B, H, W, 3) uint8 batch (last channel: background)."""
        batch = np.asarray(batch, np.uint8)
        if self.mode == "literal" and min(batch.shape[1:3]) >= self.window:
            probs = self._windows(batch)
        else:
            probs = np.asarray(self.model.predict(batch), np.float32)
        bg = background_mask(batch, threshold=float(self.model.background_grey)).astype(np.float32)[:, None]
        return {"probs": np.concatenate([probs, bg], axis=1)}

    def sinks(self) -> list[Any]:
        """One uint8-quantised :class:`ProbabilityMap` ``probs`` (255 = background where no tile ran)."""
        return [ProbabilityMap("probs", dtype=np.uint8, fill=255, blend=self.blend,
                               classes=(*self.classes, "background"))]
