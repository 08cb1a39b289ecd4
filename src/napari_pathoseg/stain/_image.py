"""Input checking and optical-density helpers shared by the stain modules.

Every public stain function accepts what users actually have: ``uint8``, ``uint16`` or
float RGB, with or without an alpha channel. :func:`as_rgb_uint8` turns that into one
``(..., 3)`` uint8 array (plus the alpha, if any) or raises a :class:`StainError`
that says what is wrong and what to do.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from napari_pathoseg.errors import StainError

__all__ = ["as_rgb_uint8", "od_table", "rgb_to_od", "sample_pixels"]

logger = logging.getLogger(__name__)


def _describe(image: Any) -> str:
    shape = getattr(image, "shape", None)
    dtype = getattr(image, "dtype", None)
    return f"shape {shape}, dtype {dtype}"


def as_rgb_uint8(image: Any, *, what: str = "image") -> tuple[np.ndarray, np.ndarray | None]:
    """Convert an RGB(A) image of any common pixel type to uint8 RGB.

    Parameters
    ----------
    image : (..., 3) or (..., 4) array-like
        ``uint8``; ``uint16`` (full 0..65535 range, scaled by 1/257); float in
        ``[0, 1]``; a trailing alpha channel is split off.
    what : str
        How to name the input in error messages (e.g. a file name).

    Returns
    -------
    rgb : (..., 3) uint8 ndarray
        C-contiguous.
    alpha : (...) uint8 ndarray or None
        The alpha channel scaled to 0..255, None when the input has none.

    Raises
    ------
    StainError
        For greyscale or multi-channel input, booleans, signed/other integer types,
        floats outside ``[0, 1]``, NaN, or an empty image.

    Examples
    --------
    >>> rgb, alpha = as_rgb_uint8(np.ones((2, 2, 4), np.float32))
    >>> rgb.dtype, rgb[0, 0].tolist(), alpha[0, 0]
    (dtype('uint8'), [255, 255, 255], np.uint8(255))
    """
    arr = np.asarray(image)
    if arr.ndim < 2 or arr.shape[-1] not in (3, 4):
        if arr.ndim == 2 or (arr.ndim >= 2 and arr.shape[-1] == 1):
            raise StainError(
                f"{what}: stain methods need an RGB H&E image, got a single-channel "
                f"(greyscale) array ({_describe(arr)}); open the colour image instead"
            )
        raise StainError(
            f"{what}: expected an RGB image with the colour channels last, (..., 3) or "
            f"(..., 4) with alpha; got {_describe(arr)}"
        )
    if arr.size == 0:
        raise StainError(f"{what}: the image is empty ({_describe(arr)})")
    dt = arr.dtype
    if dt == np.uint8:
        out = arr
    elif dt == np.uint16:
        out = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif np.issubdtype(dt, np.floating):
        if not np.all(np.isfinite(arr)):
            raise StainError(f"{what}: the image contains NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise StainError(
                f"{what}: float images must hold values in [0, 1], got [{lo:.4g}, {hi:.4g}]; "
                "divide by 255 (or convert to uint8) first"
            )
        out = np.round(arr * 255.0).astype(np.uint8)
    else:
        raise StainError(
            f"{what}: unsupported pixel type {dt}; use uint8, uint16 or float in [0, 1]"
        )
    alpha = None
    if out.shape[-1] == 4:
        alpha = np.ascontiguousarray(out[..., 3])
        out = out[..., :3]
    return np.ascontiguousarray(out), alpha


def od_table(io: float, *, dtype: type = np.float64) -> np.ndarray:
    """Optical density of every uint8 level: ``-log((v + 1) / io)``.

    Returns
    -------
    (256,) ndarray
    """
    return (-np.log((np.arange(256, dtype=np.float64) + 1.0) / float(io))).astype(dtype)


def rgb_to_od(pixels: np.ndarray, *, io: float, dtype: type = np.float64) -> np.ndarray:
    """Beer-Lambert optical density of uint8 RGB pixels.

    Parameters
    ----------
    pixels : (..., 3) uint8
    io : float
        Intensity of the illuminant (background white).

    Returns
    -------
    (..., 3) ndarray of ``dtype``
        ``-log((I + 1) / io)``; the +1 keeps black finite.
    """
    return od_table(io, dtype=dtype)[pixels]


def sample_pixels(
    rgb: np.ndarray,
    *,
    max_samples: int | None,
    alpha: np.ndarray | None = None,
) -> np.ndarray:
    """Up to ``max_samples`` pixels of an image, spread evenly over it.

    Every k-th pixel in row-major order is kept (k = ceil(N / max_samples)); as k is
    not tied to the row length, the kept pixels form a sheared lattice covering the
    whole image. Deterministic and copy-free (a strided view).

    Parameters
    ----------
    rgb : (..., 3) uint8
    max_samples : int or None
        None keeps every pixel.
    alpha : (...) uint8, optional
        Pixels with alpha below 128 are dropped (transparent = not tissue).

    Returns
    -------
    (N, 3) uint8
    """
    flat = rgb.reshape(-1, 3)
    if alpha is not None:
        flat = flat[alpha.reshape(-1) >= 128]
    n = flat.shape[0]
    if max_samples is not None and n > max_samples:
        flat = flat[:: -(-n // int(max_samples))]
    return flat
