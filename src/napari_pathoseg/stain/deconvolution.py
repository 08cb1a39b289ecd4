"""Colour deconvolution: haematoxylin, eosin and DAB channels (Ruifrok & Johnston, 2001).

A thin layer over :func:`skimage.color.separate_stains` / :func:`combine_stains`:
inputs are checked like every stain function (uint8/uint16/float RGB, alpha dropped),
concentrations come out in optical-density units (scikit-image's values times
``-ln(1e-6)``, so that a pixel's OD is ``concentration * stain vector``), and the stain
vectors can be the fixed Ruifrok & Johnston ones or those a normaliser measured on a
slide (:attr:`StainParams.stain_matrix`), which fit that slide better.

Examples
--------
>>> import numpy as np
>>> img = np.full((2, 2, 3), 255, np.uint8)
>>> deconvolve(img).shape, float(deconvolve(img).max())
((2, 2, 3), 0.0)
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from napari_pathoseg.errors import StainError
from napari_pathoseg.stain._image import as_rgb_uint8

__all__ = ["STAINS", "stain_basis", "deconvolve", "stain_channel", "stain_index", "render_stain"]

logger = logging.getLogger(__name__)

#: Channel names of :func:`deconvolve` (with a measured H&E basis the third channel is
#: the residual orthogonal to both stains rather than DAB).
STAINS = ("hematoxylin", "eosin", "dab")

_LOG_ADJUST = -np.log(1e-6)  # scikit-image's scale of stain concentrations


def stain_basis(stain_matrix: np.ndarray | None = None) -> np.ndarray:
    """The ``(3, 3)`` stain-to-RGB OD matrix (rows: H, E, third stain).

    Parameters
    ----------
    stain_matrix : (3, 2) array, optional
        Measured H and E OD vectors as columns (e.g. ``StainParams.stain_matrix``);
        the third row is then their normalised cross product (the residual channel).
        None gives scikit-image's ``rgb_from_hed`` (Ruifrok & Johnston H, E, DAB).

    Returns
    -------
    (3, 3) float64
    """
    from skimage.color import rgb_from_hed

    if stain_matrix is None:
        return np.asarray(rgb_from_hed, np.float64)
    m = np.asarray(stain_matrix, np.float64)
    if m.shape != (3, 2) or not np.all(np.isfinite(m)):
        raise StainError(f"stain_matrix must be a finite (3, 2) array of H and E OD vectors, got shape {m.shape}")
    h, e = m[:, 0], m[:, 1]
    third = np.cross(h, e)
    norm = float(np.linalg.norm(third))
    if norm < 1e-6:
        raise StainError("the H and E stain vectors are parallel; they cannot separate two stains")
    third = third / norm
    if third.sum() < 0:
        third = -third
    basis = np.stack([h / np.linalg.norm(h), e / np.linalg.norm(e), third])
    return basis


def deconvolve(image: Any, *, stain_matrix: np.ndarray | None = None) -> np.ndarray:
    """Separate an RGB image into stain concentrations.

    Parameters
    ----------
    image : (..., 3) or (..., 4) array
        uint8, uint16 or float in [0, 1] RGB(A); alpha is ignored.
    stain_matrix : (3, 2) array, optional
        Measured H and E vectors; default the Ruifrok & Johnston H, E, DAB vectors.

    Returns
    -------
    (..., 3) float32
        Non-negative concentrations (OD units) of haematoxylin, eosin and DAB (or the
        residual with a measured basis).
    """
    from skimage.color import separate_stains

    rgb, _ = as_rgb_uint8(image, what="image")
    conv = np.linalg.inv(stain_basis(stain_matrix))
    stains = separate_stains(rgb, conv) * _LOG_ADJUST
    return stains.astype(np.float32)


def stain_channel(image: Any, stain: str = "hematoxylin", *, stain_matrix: np.ndarray | None = None) -> np.ndarray:
    """One stain's concentration map.

    Parameters
    ----------
    image : (rows, cols, 3) array
    stain : {"hematoxylin", "eosin", "dab"}
        (``"residual"`` is accepted as the third channel's name too.)

    Returns
    -------
    (rows, cols) float32
    """
    return deconvolve(image, stain_matrix=stain_matrix)[..., stain_index(stain)]


def stain_index(stain: str) -> int:
    """Channel index of a stain name (case-insensitive; ``h``/``e``/``d`` accepted)."""
    key = str(stain).strip().lower()
    aliases = {"h": 0, "haematoxylin": 0, "hematoxylin": 0, "e": 1, "eosin": 1, "d": 2, "dab": 2, "residual": 2}
    if key not in aliases:
        raise StainError(f"unknown stain {stain!r}; valid: {', '.join(STAINS)}")
    return aliases[key]


def render_stain(
    concentration: np.ndarray,
    stain: str = "hematoxylin",
    *,
    stain_matrix: np.ndarray | None = None,
) -> np.ndarray:
    """Show one stain's concentrations as the RGB image that stain alone would give.

    Parameters
    ----------
    concentration : (...) float
        OD-unit concentrations of ``stain`` (e.g. from :func:`stain_channel`).

    Returns
    -------
    (..., 3) uint8
    """
    from skimage.color import combine_stains

    c = np.asarray(concentration, np.float64)
    stains = np.zeros(c.shape + (3,), np.float64)
    stains[..., stain_index(stain)] = np.maximum(c, 0.0) / _LOG_ADJUST
    rgb = combine_stains(stains, stain_basis(stain_matrix))
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)
