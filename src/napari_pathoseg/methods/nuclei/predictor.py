"""M2 nuclei on the inference engine: a loaded nucleus model as a :class:`~napari_pathoseg.inference.Predictor`.

:class:`NucleusPredictor` wraps a :class:`~napari_pathoseg.models.registry.NucleusModel` (or
anything with its ``mpp``, ``tile_size``, ``name``, ``predict`` and ``to_instances``) and
names the sinks M2 needs: seam-free nucleus instances from the nucleus probability (and the
boundary channel), and the stain-normalised image stitched like any other map.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_pathoseg.inference.sinks import Instances, ProbabilityMap

__all__ = ["NucleusPredictor", "MIN_TILE"]

#: The network is fully convolutional: whole slides run on tiles at least this large,
#: whatever the training crop size (fewer seams, less overlap overhead).
MIN_TILE = 256


class NucleusPredictor:
    """A nucleus model seen by the inference engine.

    Outputs of :meth:`predict`: ``prob`` (B, H, W) nucleus probability, ``extra``
    (B, C, H, W) extra segmentation channels or None (channel 0: nucleus boundary),
    ``normalized`` (B, H, W, 3) uint8 stain-normalised tiles.

    Parameters
    ----------
    model : NucleusModel
    """

    classes = ("nucleus",)

    def __init__(self, model: Any) -> None:
        self.model = model

    @property
    def mpp(self) -> float:
        return float(self.model.mpp)

    @property
    def tile_size(self) -> int:
        return max(MIN_TILE, int(self.model.tile_size))

    @property
    def name(self) -> str:
        return str(getattr(self.model, "name", ""))

    def predict(self, batch: np.ndarray) -> dict[str, Any]:
        """Run the model on a (B, H, W, 3) uint8 batch."""
        out = self.model.predict(batch)
        return {"prob": out["prob"], "extra": out.get("extra"), "normalized": out.get("normalized")}

    def to_instances(self, prob: np.ndarray, extra: np.ndarray | None = None) -> np.ndarray:
        """Nucleus labels of one tile, by the model's validated post-processing at its µm/px."""
        return self.model.to_instances(prob, extra, mpp=self.mpp)

    def sinks(self, *, with_normalized: bool = True) -> list[Any]:
        """The M2 outputs: ``labels`` (:class:`Instances`) and ``normalized`` (an RGB map, white where no tile ran)."""
        sinks: list[Any] = [Instances(self.to_instances, key="prob", extra_key="extra", name="labels")]
        if with_normalized:
            sinks.append(ProbabilityMap("normalized", dtype=np.uint8, scale=1.0, fill=255, channels_last=True))
        return sinks
