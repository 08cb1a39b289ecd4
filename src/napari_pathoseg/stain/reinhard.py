"""Reinhard et al. (2001) colour transfer in CIE-Lab.

The mean and standard deviation of each CIE-Lab channel over the tissue are matched to the
target's; the background can be left as it is (``keep_background``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_pathoseg.errors import StainError
from napari_pathoseg.stain._image import as_rgb_uint8, rgb_to_od, sample_pixels
from napari_pathoseg.stain._lut import ColourMap
from napari_pathoseg.stain.base import StainNormalizer
from napari_pathoseg.stain.params import METHOD_FIELDS, StainParams
from napari_pathoseg.stain.solvers import check_he_stains, macenko_stain_matrix, to_uint8

__all__ = ["ReinhardNormalizer"]


class ReinhardNormalizer(StainNormalizer):
    """Reinhard et al. (2001) colour transfer in CIE-Lab.

    Each Lab channel of the image is shifted and scaled so that its mean and standard
    deviation over the tissue match the target's tissue. Simple and fast, but it
    moves all colours together (stains are not separated), so it suits images whose
    stain *proportions* are similar to the target's.

    Parameters
    ----------
    keep_background : bool
        Leave the background as it is: a pixel is not moved when its largest OD is
        below ``beta / 2`` (white or light grey glass), fully moved from ``1.5 * beta``
        on, and linearly in between.
        Plain Reinhard (False) tints a white background with the tissue's colour shift.
    **kwargs
        See :class:`StainNormalizer`. A pixel is tissue when any channel's OD
        (``-log((I + 1) / 256)``) is at least ``beta``; with ``check_he`` the
        Macenko stain vectors of the tissue must look like H&E.
    """

    name = "reinhard"
    REQUIRED = METHOD_FIELDS["reinhard"]
    IO = 256.0

    def __init__(self, *, keep_background: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keep_background = bool(keep_background)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "keep_background": self.keep_background}

    def estimate(self, image: Any, *, what: str = "image") -> StainParams:
        from skimage.color import rgb2lab

        rgb, alpha = as_rgb_uint8(image, what=what)
        pixels = sample_pixels(rgb, max_samples=self.max_samples, alpha=alpha)
        if pixels.shape[0] == 0:
            raise StainError(f"{what}: every pixel is transparent (alpha = 0); there is no tissue to measure")
        od = rgb_to_od(pixels, io=self.IO)
        keep = (od >= self.beta).any(axis=1)
        n = int(keep.sum())
        frac = n / pixels.shape[0]
        if n < self.min_tissue_pixels:
            raise StainError(
                f"{what}: too little tissue to measure its colours: {n} of {pixels.shape[0]} pixels "
                f"({100 * frac:.1f}%) are stained (optical density >= {self.beta}), at least "
                f"{self.min_tissue_pixels} are needed. Choose a region with more tissue."
            )
        if self.check_he:
            check_he_stains(macenko_stain_matrix(od[keep]), what=what)
        lab = rgb2lab(pixels[keep][None]).reshape(-1, 3)
        mean, std = lab.mean(axis=0), lab.std(axis=0)
        if np.any(std < 0.1):
            raise StainError(
                f"{what}: the tissue colours hardly vary (Lab standard deviations "
                f"{np.round(std, 3).tolist()}); a greyscale or flat image cannot be normalised"
            )
        return StainParams(self.name, lab_mean=mean, lab_std=std, n_pixels=n, tissue_fraction=frac)

    def _make_colour_map(self, source: StainParams, target: StainParams) -> ColourMap:
        from skimage.color import lab2rgb, rgb2lab

        gain = np.asarray(target.lab_std) / np.asarray(source.lab_std)
        shift = np.asarray(target.lab_mean) - np.asarray(source.lab_mean) * gain
        keep_background, beta, io = self.keep_background, self.beta, self.IO

        def reinhard_map(pixels: np.ndarray) -> np.ndarray:
            lab = rgb2lab(pixels[None]).reshape(-1, 3)
            lab *= gain
            lab += shift
            np.clip(lab[:, 0], 0.0, 100.0, out=lab[:, 0])
            # keep Z >= 0 (the gamut edge scikit-image would clip, with a warning)
            np.minimum(lab[:, 2], 200.0 * (lab[:, 0] + 16.0) / 116.0, out=lab[:, 2])
            rgb = lab2rgb(lab[None]).reshape(-1, 3) * 255.0
            if keep_background:
                weight = np.clip(rgb_to_od(pixels, io=io).max(axis=1) / beta - 0.5, 0.0, 1.0)[:, None]
                rgb = pixels + weight * (rgb - pixels)
            return to_uint8(rgb)

        return ColourMap(reinhard_map, name="reinhard")
