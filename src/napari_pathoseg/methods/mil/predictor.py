"""M4 on the inference engine: a slide classifier's tiles with the entropy filter.

:class:`SlideTilePredictor` makes a loaded
:class:`~napari_pathoseg.methods.mil.model.SlideClassifier` an engine
:class:`~napari_pathoseg.inference.Predictor`. The engine reads non-overlapping tiles of
``model.tile_size`` pixels at ``model.mpp`` µm/px (over the slide's tissue mask); here every
tile first gets its information entropy (:func:`~napari_pathoseg.methods.mil.entropy.tile_entropy`,
bits of the grey histogram) and only tiles at or above the model's ``entropy_threshold`` reach
the network, as in M4's pre-processing. The output ``scores`` is ``(B, 2)``: the positive
probability (NaN for a tile the filter dropped) and the entropy, for a
:class:`~napari_pathoseg.inference.TileScores` sink.

Examples
--------
>>> import numpy as np
>>> class Model:   # anything with mpp, tile_size, entropy_threshold and predict_tiles
...     mpp, tile_size, entropy_threshold, name = 1.0, 32, 1.0, "demo"
...     def predict_tiles(self, batch):
...         return 1.0 - batch.mean(axis=(1, 2, 3)).astype(np.float32) / 255.0
>>> tiles = np.full((2, 32, 32, 3), 255, np.uint8)
>>> tiles[1] = np.random.default_rng(0).integers(0, 255, (32, 32, 3))
>>> out = SlideTilePredictor(Model()).predict(tiles)["scores"]
>>> bool(np.isnan(out[0, 0])), bool(0.0 < out[1, 0] < 1.0), round(float(out[0, 1]), 1)
(True, True, 0.0)
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from napari_pathoseg.errors import PathosegError

__all__ = ["SCORE_COLUMNS", "SlideTilePredictor"]

logger = logging.getLogger(__name__)

#: Columns of the ``scores`` output (and of the TileScores sink).
SCORE_COLUMNS = ("positive", "entropy")


def _entropy_fn() -> Any:
    from napari_pathoseg.methods.mil.entropy import tile_entropy

    return tile_entropy


class SlideTilePredictor:
    """A slide classifier seen by the inference engine (see the module docstring).

    Parameters
    ----------
    model : SlideClassifier
        Anything with ``mpp``, ``tile_size``, ``entropy_threshold``, ``name`` and
        ``predict_tiles(uint8 (N, t, t, 3)) -> float32 (N,)``.
    entropy_threshold : float, optional
        Override the model's threshold (bits; 0 keeps every tile).
    """

    classes = SCORE_COLUMNS

    def __init__(self, model: Any, *, entropy_threshold: float | None = None) -> None:
        self.model = model
        self.mpp = float(model.mpp)
        self.tile_size = int(model.tile_size)
        thr = model.entropy_threshold if entropy_threshold is None else entropy_threshold
        try:
            self.entropy_threshold = float(thr)
        except (TypeError, ValueError):
            raise PathosegError(f"the entropy threshold must be a number of bits (0-8), got {thr!r}") from None
        if not 0.0 <= self.entropy_threshold <= 8.0:
            raise PathosegError(f"the entropy threshold must be between 0 and 8 bits, got {self.entropy_threshold}")
        self.name = str(getattr(model, "name", "slide classifier"))
        self._entropy = _entropy_fn()
        self.dropped = 0

    def predict(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """(B, t, t, 3) uint8 -> ``scores`` (B, 2): positive probability (NaN = dropped), entropy."""
        batch = np.asarray(batch)
        ent = np.array([self._entropy(t) for t in batch], np.float32)  # (B,)
        keep = ent >= self.entropy_threshold
        prob = np.full(len(batch), np.nan, np.float32)
        if keep.any():
            p = np.asarray(self.model.predict_tiles(np.ascontiguousarray(batch[keep])), np.float32).reshape(-1)
            if p.shape[0] != int(keep.sum()):
                raise PathosegError(f"{self.name}: predict_tiles gave {p.shape[0]} probabilities for {int(keep.sum())} tiles")
            prob[keep] = p
        self.dropped += int((~keep).sum())
        return {"scores": np.stack([prob, ent], axis=1)}
