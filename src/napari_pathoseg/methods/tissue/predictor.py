"""M5 on the inference engine: a loaded tissue model as a :class:`~napari_pathoseg.inference.Predictor`.

Two modes, both on the platform engine (:func:`~napari_pathoseg.inference.iter_predict`):

* ``"literal"`` (M5 as described): 224 px windows with 50 % overlap, class probabilities
  averaged where windows overlap. The engine reads 560 px tiles overlapping by 224 px (tile
  origins on the 112 px window grid) and keeps each output pixel from the one tile owning it
  (``blend="core"``); inside a tile the 16 windows of 224 px at a 112 px stride are averaged.
  Every owned pixel is thus the mean over exactly the windows of the global 112 px grid that
  cover it, as in the method; 16 windows per 336² owned pixels cost 1.8x the literal 9.
  ``weights="hann"`` (the default) weighs each window's pixels by a raised cosine that falls
  to ~0 at the window's edges; ``weights="box"`` is M5's plain mean. With the plain mean the
  set of windows averaged changes abruptly on every 112 px grid line, and since the network
  sees each 224 px window as a whole (PSPNet's pyramid pooling gives every pixel the window's
  context) neighbouring windows disagree, so the argmax flips along those lines: the straight
  edges of the whole-slide map. The weighted mean is continuous across window edges (at 50 %
  overlap the weights of the windows covering a pixel sum to one), which removes them.
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

__all__ = ["MODES", "WINDOW_WEIGHTS", "TissuePredictor", "window_weight"]

#: (engine tile, engine overlap, blend) per mode, in multiples of the window for "literal".
MODES = ("literal", "fast")

#: How the literal mode averages overlapping windows: raised-cosine weighted, or M5's plain mean.
WINDOW_WEIGHTS = ("hann", "box")


def window_weight(size: int, kind: str = "hann") -> np.ndarray:
    """(size, size) float32 weights of one window's pixels: ``sin²`` ramps to ~0 at the edges, or ones (``"box"``)."""
    if kind == "box":
        return np.ones((size, size), np.float32)
    ramp = np.sin(np.pi * (np.arange(size, dtype=np.float64) + 0.5) / size) ** 2
    return np.outer(ramp, ramp).astype(np.float32)


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
    weights : {"hann", "box"}
        Literal mode: raised-cosine weighted mean of the overlapping windows (no straight
        edges on the window grid) or M5's plain mean.
    """

    def __init__(self, model: Any, *, mode: str = "literal", batch: int = 8, weights: str = "hann") -> None:
        if mode not in MODES:
            raise PathosegError(f"Unknown tissue inference mode {mode!r}; use one of {MODES}.")
        if weights not in WINDOW_WEIGHTS:
            raise PathosegError(f"Unknown window weighting {weights!r}; use one of {WINDOW_WEIGHTS}.")
        self.model = model
        self.mode = mode
        self.weights = weights
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
        wt = window_weight(win, self.weights)
        for k in range(0, len(crops), self.batch):
            p = self.model.predict(np.stack(crops[k:k + self.batch]))
            for (i, y, x), pk in zip(where[k:k + self.batch], p):
                acc[i, :, y:y + win, x:x + win] += pk * wt
                cnt[i, :, y:y + win, x:x + win] += wt
        return acc / np.where(cnt > 0, cnt, 1)

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
