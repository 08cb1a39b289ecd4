"""Write pyramidal tiled TIFFs, streamed tile by tile: test slides of any size.

:func:`write_pyramid_tiff` writes a generic pyramidal TIFF (one top-level page per
level, ``SubfileType=reduced`` for levels > 0, resolution tags in pixels/cm) that both
OpenSlide (``generic-tiff``) and tifffile read, through
:func:`napari_pathoseg.wsi.pyramid_tiff.write_tiled_pyramid`. :func:`make_large_slide` fills a slide of
any size (say 50,000 x 50,000) with real H&E pixels from the bundled sample, mirrored
so that neighbouring tiles join, for memory and speed benchmarks.

Examples
--------
>>> import numpy as np, tempfile, os
>>> from napari_pathoseg.wsi.slide import open_slide
>>> d = tempfile.mkdtemp()
>>> p = write_pyramid_tiff(os.path.join(d, "t.tif"), np.full((600, 700, 3), 200, np.uint8), levels=2, tile=256)
>>> open_slide(p).metadata.level_dimensions
((700, 600), (350, 300))
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.wsi.pyramid_tiff import write_tiled_pyramid

__all__ = ["write_pyramid_tiff", "make_large_slide"]

logger = logging.getLogger(__name__)

TileSource = Callable[[int, int, int, int, int], np.ndarray]


def write_pyramid_tiff(
    path: str | os.PathLike,
    image: np.ndarray | None = None,
    *,
    shape: tuple[int, int] | None = None,
    source: TileSource | None = None,
    levels: int | None = None,
    tile: int = 256,
    mpp: float | None = 0.5,
    compression: str | None = "jpeg",
    quality: int = 90,
) -> Path:
    """Write a pyramidal tiled RGB TIFF, streaming one tile at a time.

    Parameters
    ----------
    path : path-like
        Output file (written to a temp file, then renamed).
    image : (rows, cols, 3) uint8, optional
        The level-0 image; coarser levels are successive 2x means of it.
    shape : (rows, cols), optional
        Level-0 size when ``source`` gives the pixels.
    source : callable, optional
        ``source(level, row, col, h, w) -> (h, w, 3) uint8`` in that level's pixels, for
        every level (level k is ``ceil(rows / 2**k)`` x ``ceil(cols / 2**k)``).
    levels : int, optional
        Number of levels (default: until the longest side is <= 1024).
    tile : int
        Tile side (multiple of 16).
    mpp : float or None
        µm per level-0 pixel written to the resolution tags.
    compression : str or None
        ``"jpeg"`` (default, like scanners), ``"zlib"`` or None.

    Returns
    -------
    Path
    """
    if image is not None:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise PathosegError(f"expected a (rows, cols, 3) uint8 image, got {image.shape} {image.dtype}")
        shape = image.shape[:2]

        def source(level: int, row: int, col: int, h: int, w: int) -> np.ndarray:
            return image[row : row + h, col : col + w]

    if source is None or shape is None:
        raise PathosegError("give either image, or shape and source")
    write_tiled_pyramid(
        path,
        source,
        shape=(int(shape[0]), int(shape[1])),
        derive_levels=image is not None,
        n_levels=levels,
        tile=tile,
        mpp=mpp,
        compression=compression,
        quality=quality,
    )
    return Path(path)


def make_large_slide(
    path: str | os.PathLike,
    *,
    size: int = 50_000,
    tile: int = 256,
    mpp: float = 0.5,
    source_slide: str | os.PathLike | None = None,
) -> Path:
    """Write a ``size`` x ``size`` pyramidal TIFF tiled with real H&E pixels.

    The bundled CMU-1-Small-Region sample (or ``source_slide``) is mirrored
    periodically, so the result looks like tissue at every zoom and compresses like a
    real scan. Memory stays bounded by a few tiles plus the source image.
    """
    from napari_pathoseg.wsi.slide import open_slide, sample_slide_path

    with open_slide(source_slide or sample_slide_path()) as s:
        src = np.asarray(s.pyramid[0].compute())
    # mirror-extend so the pattern is seamless: period 2 * source size
    period = np.concatenate([src, src[::-1]], axis=0)
    period = np.concatenate([period, period[:, ::-1]], axis=1)
    pr, pc = period.shape[:2]
    pyramids = [period]

    def source(level: int, row: int, col: int, h: int, w: int) -> np.ndarray:
        while len(pyramids) <= level:
            prev = pyramids[-1]
            r2, c2 = prev.shape[0] // 2 * 2, prev.shape[1] // 2 * 2
            p = prev[:r2, :c2].astype(np.uint16)
            pyramids.append(((p[0::2, 0::2] + p[1::2, 0::2] + p[0::2, 1::2] + p[1::2, 1::2] + 2) // 4).astype(np.uint8))
        pat = pyramids[level]
        rr = (np.arange(row, row + h) % pat.shape[0])
        cc = (np.arange(col, col + w) % pat.shape[1])
        return pat[rr[:, None], cc[None, :]]

    logger.info("writing %d x %d synthetic slide (period %d x %d) to %s", size, size, pr, pc, path)
    return write_pyramid_tiff(path, shape=(size, size), source=source, tile=tile, mpp=mpp)
