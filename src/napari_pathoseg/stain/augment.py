"""Stain augmentation for training: random perturbation of stain concentrations.

Each image is split into stain concentrations (optical density = concentrations x stain
vectors), every stain's concentration is scaled by ``a ~ U(1 - sigma_scale, 1 + sigma_scale)``
and shifted by ``b ~ U(-sigma_shift, sigma_shift)`` (OD units), and the image is rebuilt
(Tellez et al., 2018, "H&E stain augmentation"). The default stain vectors are the
Ruifrok & Johnston H, E and DAB ones; a slide's measured H&E vectors
(``StainParams.stain_matrix``) perturb only those two stains.

Because the perturbation is linear in optical density, the whole operation is a
separable per-pixel map: 9 look-ups in 256-entry tables per pixel, no logarithms or
exponentials per pixel. NumPy only (no torch), seeded, for ``uint8`` tiles.

Examples
--------
>>> import numpy as np
>>> aug = StainAugmenter(seed=0)
>>> tile = np.full((8, 8, 3), (180, 90, 160), np.uint8)
>>> aug(tile).shape, aug(tile).dtype
((8, 8, 3), dtype('uint8'))
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from napari_pathoseg.errors import StainError
from napari_pathoseg.stain._image import as_rgb_uint8, od_table
from napari_pathoseg.stain._lut import ColourMap, separable_tables
from napari_pathoseg.stain.deconvolution import stain_basis

__all__ = ["StainAugmenter", "augment_stain"]

logger = logging.getLogger(__name__)

_IO = 256.0  # OD = -log((I + 1) / 256): white is exactly zero OD


class StainAugmenter:
    """Random stain-concentration perturbation (callable on tiles).

    Parameters
    ----------
    sigma_scale : float
        Half-width of the multiplicative factor range, ``[1 - s, 1 + s]`` (0 <= s < 1).
    sigma_shift : float
        Half-width of the additive shift range, in OD units.
    stain_matrix : (3, 2) array, optional
        Measured H and E OD vectors (columns); default Ruifrok & Johnston H, E, DAB.
    keep_background : bool
        Leave background pixels (largest OD below ``beta / 2``) unchanged, with a linear
        ramp to the full perturbation at ``1.5 * beta``; otherwise the shift tints the
        white background too.
    beta : float
        OD threshold of tissue.
    seed : int or numpy.random.Generator, optional
        Source of randomness; the same seed gives the same sequence of perturbations.
    """

    def __init__(
        self,
        *,
        sigma_scale: float = 0.2,
        sigma_shift: float = 0.05,
        stain_matrix: np.ndarray | None = None,
        keep_background: bool = True,
        beta: float = 0.15,
        seed: int | np.random.Generator | None = None,
    ) -> None:
        if not 0.0 <= float(sigma_scale) < 1.0:
            raise StainError(f"sigma_scale must be in [0, 1), got {sigma_scale}")
        if not 0.0 <= float(sigma_shift) <= 2.0:
            raise StainError(f"sigma_shift must be in [0, 2] (OD units), got {sigma_shift}")
        if not 0.0 < float(beta) < 3.0:
            raise StainError(f"beta must be in (0, 3), got {beta}")
        self.sigma_scale = float(sigma_scale)
        self.sigma_shift = float(sigma_shift)
        basis = stain_basis(stain_matrix)  # (3 stains, 3 RGB)
        self.n_stains = 3 if stain_matrix is None else 2
        self._w = basis[: self.n_stains].T  # (3 RGB, k stains)
        self._unmix = np.linalg.pinv(self._w).T  # (3 RGB, k): OD @ unmix = concentrations
        self.keep_background = bool(keep_background)
        self.beta = float(beta)
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        # blend weight of the perturbation for each darkest-channel level (0 on background)
        self._weight = np.clip(od_table(_IO, dtype=np.float32) / self.beta - 0.5, 0.0, 1.0)

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """Draw one perturbation: ``(scale (k,), shift (k,))`` for the k stains."""
        scale = self.rng.uniform(1.0 - self.sigma_scale, 1.0 + self.sigma_scale, size=self.n_stains)
        shift = self.rng.uniform(-self.sigma_shift, self.sigma_shift, size=self.n_stains)
        return scale, shift

    def colour_map(self, scale: np.ndarray, shift: np.ndarray) -> ColourMap:
        """The per-pixel map of one perturbation (OD -> OD @ M + b, separable)."""
        scale = np.asarray(scale, np.float64).reshape(self.n_stains)
        shift = np.asarray(shift, np.float64).reshape(self.n_stains)
        m = self._unmix @ np.diag(scale) @ self._w.T  # (3, 3)
        b = self._w @ shift  # (3,) OD added to every pixel
        tables = separable_tables(m, io_in=_IO, io_out=_IO)
        tables[0] *= np.exp(-b)[:, None].astype(np.float32)
        return ColourMap(tables=tables, offset=1.0, name="stain augmentation")

    def apply(self, image: Any, *, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
        """Apply a given perturbation to one ``(rows, cols, 3)`` image (deterministic).

        Returns
        -------
        (rows, cols, 3) uint8
        """
        rgb, _ = as_rgb_uint8(image, what="tile")
        out = self.colour_map(scale, shift).map_pixels(rgb.reshape(-1, 3)).reshape(rgb.shape)
        if self.keep_background:
            darkest = np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])  # largest OD
            weight = self._weight[darkest][..., None]
            blend = out.astype(np.float32)
            blend -= rgb
            blend *= weight
            blend += rgb
            blend += 0.5
            out = blend.astype(np.uint8)  # a convex mix of two uint8 images: in range
        return out

    def __call__(self, image: Any) -> np.ndarray:
        """Perturb an image ``(rows, cols, 3)`` or a batch ``(N, rows, cols, 3)``.

        Each image of a batch gets its own random perturbation. Input as accepted by
        :func:`~napari_pathoseg.stain._image.as_rgb_uint8` (alpha is dropped).

        Returns
        -------
        uint8 array of the input's shape (3 channels)
        """
        rgb, _ = as_rgb_uint8(image, what="tile")
        if rgb.ndim == 4:
            return np.stack([self.apply(im, scale=s, shift=b) for im in rgb for s, b in [self.sample()]])
        if rgb.ndim != 3:
            raise StainError(f"stain augmentation needs (rows, cols, 3) or (N, rows, cols, 3), got {rgb.shape}")
        scale, shift = self.sample()
        return self.apply(rgb, scale=scale, shift=shift)


def augment_stain(
    image: Any,
    *,
    rng: int | np.random.Generator | None = None,
    sigma_scale: float = 0.2,
    sigma_shift: float = 0.05,
    stain_matrix: np.ndarray | None = None,
    keep_background: bool = True,
) -> np.ndarray:
    """Randomly perturb the stains of one image (or a batch); see :class:`StainAugmenter`.

    Parameters
    ----------
    image : (rows, cols, 3) or (N, rows, cols, 3) array
    rng : int or numpy.random.Generator, optional
        Seed or generator.

    Returns
    -------
    uint8 array of the input's shape

    Examples
    --------
    >>> img = np.full((4, 4, 3), (170, 80, 150), np.uint8)
    >>> a = augment_stain(img, rng=1); b = augment_stain(img, rng=1)
    >>> bool((a == b).all())
    True
    """
    aug = StainAugmenter(
        sigma_scale=sigma_scale,
        sigma_shift=sigma_shift,
        stain_matrix=stain_matrix,
        keep_background=keep_background,
        seed=rng,
    )
    return aug(image)
