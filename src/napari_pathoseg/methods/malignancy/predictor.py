"""A malignancy model (M1: classifier C + segmenter B) seen by the whole-slide inference engine.

:class:`MalignancyPredictor` runs both networks of a
:class:`~napari_pathoseg.methods.malignancy.model.MalignancyModel` on every tile the engine
reads at the model's µm per pixel: C's malignant probability per tile (``"prob"``, for a
:class:`~napari_pathoseg.inference.tile_scores.TileScores` sink: the heat map and the tile
table) and B's malignant-region probability per pixel (``"mask"``, for a
:class:`~napari_pathoseg.inference.sinks.ProbabilityMap`: the region mask).

Examples
--------
>>> import numpy as np
>>> class Fake:
...     mpp, input_size, name = 1.0, 64, "fake"
...     def classify(self, b): return b.mean(axis=(1, 2, 3)).astype(np.float32) / 255
...     def segment(self, b): return b.mean(axis=-1).astype(np.float32) / 255
>>> out = MalignancyPredictor(Fake()).predict(np.full((2, 64, 64, 3), 255, np.uint8))
>>> out["prob"].shape, out["mask"].shape, float(out["prob"][0, 0])
((2, 1), (2, 64, 64), 1.0)
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["MalignancyPredictor"]


class MalignancyPredictor:
    """Tiles of a slide through C (tile probability) and B (region probability).

    Parameters
    ----------
    model : MalignancyModel
        Has ``mpp``, ``input_size``, ``classify(batch) -> (N,)`` and ``segment(batch) -> (N, H, W)``.
    tile_size : int, optional
        Tile side in pixels at ``model.mpp`` (default ``model.input_size``, the side C was
        trained on).
    with_mask : bool
        Also run B (``False``: the heat map only, half the work).
    """

    classes = ("malignant",)

    def __init__(self, model: Any, *, tile_size: int | None = None, with_mask: bool = True) -> None:
        self.model = model
        self.mpp = float(model.mpp)
        self.tile_size = int(tile_size or model.input_size)
        self.with_mask = bool(with_mask)
        self.name = str(getattr(model, "name", "malignancy"))

    def predict(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """(B, H, W, 3) uint8 -> ``prob`` (B, 1) C probability, ``mask`` (B, H, W) B probability."""
        out = {"prob": np.asarray(self.model.classify(batch), np.float32).reshape(len(batch), 1)}
        if self.with_mask:
            out["mask"] = np.asarray(self.model.segment(batch), np.float32)
        return out
