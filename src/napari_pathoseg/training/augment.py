"""Torch-free augmentations for nucleus training crops.

:func:`hed_perturb` is the HED colour augmentation of Tellez et al. (2018):
the image is split into haematoxylin, eosin and DAB optical densities with
:func:`skimage.color.rgb2hed`, each channel is scaled by ``alpha ~ U(1-s, 1+s)``
and shifted by ``beta ~ U(-b, b)``, and the result goes back to RGB.
:func:`geometric` applies the same random flip / 90-degree rotation to an
image and any number of label maps.
"""

from __future__ import annotations

import numpy as np
from skimage.color import hed2rgb, rgb2hed

from napari_pathoseg.errors import StainError

__all__ = ["hed_perturb", "geometric"]


def hed_perturb(
    image: np.ndarray,
    *,
    rng: np.random.Generator,
    alpha: float = 0.2,
    beta: float = 0.02,
) -> np.ndarray:
    """Randomly perturb the stain of an RGB image in HED space.

    Parameters
    ----------
    image : (H, W, 3) uint8 ndarray
        RGB image.
    rng : numpy.random.Generator
        Source of the random factors.
    alpha : float
        Half-width of the multiplicative factor range ``[1 - alpha, 1 + alpha]``.
    beta : float
        Half-width of the additive shift range (optical-density units).

    Returns
    -------
    (H, W, 3) uint8 ndarray
        The perturbed image.

    Examples
    --------
    >>> img = np.full((4, 4, 3), 200, np.uint8)
    >>> hed_perturb(img, rng=np.random.default_rng(0)).shape
    (4, 4, 3)
    """
    if image.ndim != 3 or image.shape[-1] != 3:
        raise StainError(
            f"hed_perturb needs an (H, W, 3) RGB image, got shape {image.shape}; "
            "drop the alpha channel or convert greyscale to RGB first."
        )
    hed = rgb2hed(image)  # (H, W, 3) float
    a = rng.uniform(1.0 - alpha, 1.0 + alpha, size=3)
    b = rng.uniform(-beta, beta, size=3)
    out = hed2rgb(hed * a + b)  # (H, W, 3) float in [0, 1]
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


def geometric(
    image: np.ndarray, *labels: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, ...]:
    """Apply one random flip / rot90 (the 8 dihedral symmetries) to all arrays.

    Parameters
    ----------
    image : (H, W, ...) ndarray
    *labels : (H, W, ...) ndarrays
        Transformed identically to ``image``.
    rng : numpy.random.Generator

    Returns
    -------
    tuple of ndarrays
        ``(image, *labels)`` transformed, contiguous.
    """
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    out = []
    for arr in (image, *labels):
        arr = np.rot90(arr, k, axes=(0, 1))
        if flip:
            arr = arr[:, ::-1]
        out.append(np.ascontiguousarray(arr))
    return tuple(out)
