"""Predictors that need no training: whole-slide maps from stain physics.

:class:`StainDensityPredictor` turns tiles into haematoxylin and eosin density maps by colour
deconvolution (:func:`napari_pathoseg.stain.deconvolution.deconvolve`). It is a real, cheap
map for quality control (where is the nuclear stain, how strong) and the smallest complete
example of a :class:`~napari_pathoseg.inference.engine.Predictor`: copy its shape for a new
method's network.

Examples
--------
>>> import numpy as np
>>> from napari_pathoseg.inference import ProbabilityMap, TileScores, run_predict
>>> img = np.full((300, 300, 3), 245, np.uint8); img[100:200, 100:200] = (60, 40, 120)
>>> res = run_predict(img, StainDensityPredictor(mpp=0.5, tile_size=128), [ProbabilityMap("density"), TileScores("scores")],
...                   mpp=0.5, overlap=32)
>>> d = res.outputs["density"].array
>>> d.shape, bool(d[150, 150, 0] > 0.5 > d[20, 20, 0])
((300, 300, 2), True)
"""

from __future__ import annotations

import numpy as np

from napari_pathoseg.errors import PathosegError

__all__ = ["StainDensityPredictor"]


class StainDensityPredictor:
    """Haematoxylin and eosin densities of tiles by colour deconvolution.

    Parameters
    ----------
    mpp : float
        µm per pixel to work at (coarse is cheap: 2.0 reads a 40x slide's 1/8 level).
    tile_size : int
        Default tile side.
    max_od : float
        Optical density mapped to 1.0 (densities are clipped to [0, 1]).
    stain_matrix : (3, 2) array, optional
        Measured H and E vectors (a normaliser's); default Ruifrok & Johnston.

    Outputs of :meth:`predict`: ``density`` (B, 2, H, W) float32 in [0, 1] (channels
    ``classes``), ``scores`` (B, 2) each tile's mean density.
    """

    classes = ("hematoxylin", "eosin")

    def __init__(self, *, mpp: float = 2.0, tile_size: int = 512, max_od: float = 3.0, stain_matrix: np.ndarray | None = None) -> None:
        if not mpp > 0 or not max_od > 0:
            raise PathosegError(f"mpp and max_od must be positive, got {mpp} and {max_od}")
        self.mpp = float(mpp)
        self.tile_size = int(tile_size)
        self.max_od = float(max_od)
        self.stain_matrix = stain_matrix
        self.name = "stain-density"

    def predict(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """``batch`` (B, H, W, 3) uint8 -> ``density`` (B, 2, H, W), ``scores`` (B, 2)."""
        from napari_pathoseg.stain.deconvolution import deconvolve

        od = deconvolve(np.asarray(batch), stain_matrix=self.stain_matrix)[..., :2]  # (B, H, W, 2)
        dens = np.clip(od / np.float32(self.max_od), 0.0, 1.0).astype(np.float32)
        dens = np.ascontiguousarray(dens.transpose(0, 3, 1, 2))  # (B, 2, H, W)
        return {"density": dens, "scores": dens.mean(axis=(2, 3))}
