"""Whole-slide stain normalisation: estimate once, apply lazily, stream to TIFF.

Normalising tile by tile with each tile's own stain estimate gives visible seams (each
tile is pulled towards the target differently). Here the source stain parameters are
estimated **once per slide**, from tissue tiles spread across it
(:func:`estimate_slide_stain`), and the same colour mapping is then applied to every
pixel of every pyramid level:

* :func:`normalized_pyramid` wraps each level of :attr:`Slide.pyramid` with
  ``dask.array.map_blocks``: napari computes only the chunks it shows, through the
  normaliser's 256³ colour table (a look-up per pixel);
* :func:`deconvolution_pyramid` does the same for one stain's concentration map;
* :func:`write_normalized_tiff` streams the normalised slide into a tiled pyramidal TIFF
  one tile at a time; coarser levels are built from the finer one through a scratch
  file, so memory stays bounded by the tile size whatever the slide size.

Examples
--------
>>> from napari_pathoseg.wsi.slide import open_slide, sample_slide_path
>>> from napari_pathoseg.stain import get_normalizer
>>> with open_slide(sample_slide_path()) as slide:
...     ref = slide.read_region(level=0, row=1920, col=768, height=512, width=512)
...     norm = get_normalizer("macenko").fit(ref)
...     levels = normalized_pyramid(slide, norm)
...     levels[0][:256, :256].compute().shape
(256, 256, 3)
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import dask.array as da
import numpy as np

from napari_pathoseg._atomic import check_output
from napari_pathoseg.errors import PathosegError, StainError
from napari_pathoseg.wsi.pyramid_tiff import PyramidProgress, check_options, write_tiled_pyramid
from napari_pathoseg.wsi.slide import Slide
from napari_pathoseg.stain.deconvolution import deconvolve, stain_basis, stain_index
from napari_pathoseg.stain.base import StainNormalizer
from napari_pathoseg.stain.params import StainParams

__all__ = [
    "default_sample_level",
    "sample_tissue",
    "estimate_slide_stain",
    "fit_to_slide",
    "read_rect",
    "normalized_pyramid",
    "deconvolution_pyramid",
    "WriteProgress",
    "WriteResult",
    "write_normalized_tiff",
]

logger = logging.getLogger(__name__)

#: Resolution at which tissue is sampled for stain estimation (µm per pixel).
SAMPLE_MPP = 1.0
#: Reference images up to this many pixels are used whole by :func:`fit_to_slide`.
WHOLE_IMAGE_PIXELS = 4096 * 4096


def default_sample_level(slide: Slide, *, mpp: float = SAMPLE_MPP) -> int:
    """The finest level not finer than needed: about ``mpp`` µm/px (level 0 if unknown)."""
    if slide.mpp is None:
        return 0
    return slide.best_level_for_downsample(mpp / slide.mpp)


def sample_tissue(
    slide: Slide,
    *,
    n_tiles: int = 32,
    tile_size: int = 256,
    level: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Read tissue tiles spread at random over a slide's tissue (seeded).

    Tile centres are drawn from the pixels of :func:`napari_pathoseg.tiling.tissue_mask`,
    so the sample covers the whole slide in proportion to its tissue.

    Parameters
    ----------
    slide : Slide
    n_tiles : int
        Number of tiles.
    tile_size : int
        Side of each tile in the sampled level's pixels.
    level : int, optional
        Level to read (default: :func:`default_sample_level`).
    seed : int

    Returns
    -------
    (n * tile_size, tile_size, 3) uint8
        The tiles stacked vertically.

    Raises
    ------
    StainError
        When the slide has no tissue.
    """
    from napari_pathoseg.tiling import tissue_mask

    if n_tiles < 1 or tile_size < 16:
        raise StainError(f"n_tiles must be >= 1 and tile_size >= 16, got {n_tiles} and {tile_size}")
    lvl = default_sample_level(slide) if level is None else int(level)
    if not 0 <= lvl < slide.level_count:
        raise StainError(f"{slide.metadata.path}: level {lvl} does not exist (0..{slide.level_count - 1})")
    mask, mask_ds = tissue_mask(slide, max_size=1024)  # coarse is enough to place tiles
    coords = np.argwhere(mask)
    if coords.size == 0:
        raise StainError(
            f"{slide.metadata.path}: no tissue found on the slide, so its stains cannot be "
            "estimated; check that it is a brightfield H&E slide with tissue"
        )
    rng = np.random.default_rng(seed)
    pick = coords[rng.choice(len(coords), size=min(n_tiles, len(coords)), replace=False)]
    ds = slide.level_downsample(lvl)
    rows, cols = slide.pyramid[lvl].shape[:2]
    tiles = []
    for r, c in pick:
        cr, cc = (r + 0.5) * mask_ds / ds, (c + 0.5) * mask_ds / ds
        row = int(min(max(cr - tile_size / 2, 0), max(rows - tile_size, 0)))
        col = int(min(max(cc - tile_size / 2, 0), max(cols - tile_size, 0)))
        tiles.append(slide.read_region(level=lvl, row=row, col=col, height=tile_size, width=tile_size))
    return np.concatenate(tiles, axis=0)


def estimate_slide_stain(
    slide: Slide,
    normalizer: StainNormalizer,
    *,
    n_tiles: int = 32,
    tile_size: int = 256,
    level: int | None = None,
    seed: int = 0,
) -> StainParams:
    """Estimate a slide's stain parameters once, from tissue tiles across the slide.

    Parameters
    ----------
    slide : Slide
    normalizer : StainNormalizer
        Decides the method (its target is not needed).
    n_tiles, tile_size, level, seed
        See :func:`sample_tissue`.

    Returns
    -------
    StainParams
    """
    sample = sample_tissue(slide, n_tiles=n_tiles, tile_size=tile_size, level=level, seed=seed)
    params = normalizer.estimate(sample, what=f"{slide.metadata.path} (tissue sample)")
    logger.info("%s: source stain %r", slide.metadata.path, params)
    return params


def read_rect(
    slide: Slide,
    *,
    row: float,
    col: float,
    height: float,
    width: float,
    max_side: int = 2048,
) -> np.ndarray:
    """Read a level-0 rectangle at the finest level that keeps it within ``max_side``.

    Parameters
    ----------
    slide : Slide
    row, col, height, width : float
        The rectangle in level-0 pixels (clipped to the slide).
    max_side : int
        Longest side of the returned image.

    Returns
    -------
    (h, w, 3) uint8
    """
    rows0, cols0 = slide.shape
    r0, c0 = max(0.0, float(row)), max(0.0, float(col))
    r1, c1 = min(float(rows0), float(row) + float(height)), min(float(cols0), float(col) + float(width))
    if r1 - r0 < 1 or c1 - c0 < 1:
        raise StainError(
            f"{slide.metadata.path}: the rectangle (row {row:.0f}, col {col:.0f}, {height:.0f} x {width:.0f} "
            "level-0 pixels) lies outside the slide"
        )
    need = max(r1 - r0, c1 - c0) / max_side
    lvl = slide.best_level_for_downsample(max(need, 1.0))
    ds = slide.level_downsample(lvl)
    img = slide.read_region(
        level=lvl,
        row=int(r0 / ds),
        col=int(c0 / ds),
        height=max(1, int(math.ceil((r1 - r0) / ds))),
        width=max(1, int(math.ceil((c1 - c0) / ds))),
    )
    if max(img.shape[:2]) > max_side:
        from skimage.transform import resize

        f = max_side / max(img.shape[:2])
        shape = (max(1, round(img.shape[0] * f)), max(1, round(img.shape[1] * f)))
        img = np.clip(resize(img, shape, order=1, anti_aliasing=True, preserve_range=True) + 0.5, 0, 255).astype(np.uint8)
    return img


def fit_to_slide(
    normalizer: StainNormalizer,
    slide: Slide,
    *,
    n_tiles: int = 32,
    tile_size: int = 256,
    seed: int = 0,
) -> StainNormalizer:
    """Fit a normaliser's target to a reference image or slide.

    A reference of at most 4096 x 4096 pixels is used whole (all of its tissue);
    a larger one is sampled like :func:`estimate_slide_stain`.

    Returns
    -------
    StainNormalizer
        ``normalizer``, fitted.
    """
    rows, cols = slide.shape
    name = Path(slide.metadata.path).name
    if rows * cols <= WHOLE_IMAGE_PIXELS:
        image = slide.read_region(level=0, row=0, col=0, height=rows, width=cols)
        normalizer.fit(image, what=f"reference {slide.metadata.path}", reference=name)
    else:
        params = estimate_slide_stain(slide, normalizer, n_tiles=n_tiles, tile_size=tile_size, seed=seed)
        normalizer.set_target(params, reference=f"{name} ({n_tiles} tissue tiles)")
    return normalizer


# ---------------------------------------------------------------------- lazy pyramids


def _three_channel_chunks(level: da.Array) -> da.Array:
    if level.ndim != 3 or level.shape[2] != 3:
        raise StainError(f"expected pyramid levels of shape (rows, cols, 3), got {level.shape}")
    if len(level.chunks[2]) != 1:
        level = level.rechunk({2: 3})
    return level


def normalized_pyramid(
    slide: Slide,
    normalizer: StainNormalizer,
    *,
    source: StainParams | None = None,
    build_lut: bool = True,
) -> list[da.Array]:
    """The slide's pyramid, stain-normalised lazily chunk by chunk.

    Parameters
    ----------
    slide : Slide
    normalizer : StainNormalizer
        A fitted normaliser.
    source : StainParams, optional
        The slide's stain parameters; estimated with :func:`estimate_slide_stain` when
        omitted (reads a few tissue tiles).
    build_lut : bool
        Build the 256³ colour table now (0.3-3 s) so that every chunk is a table
        look-up; otherwise the first large chunk builds it.

    Returns
    -------
    list of dask.array.Array
        Same shapes and chunks as ``slide.pyramid``, ``(rows, cols, 3)`` uint8.
    """
    if source is None:
        source = estimate_slide_stain(slide, normalizer)
    cmap = normalizer.colour_map(source)
    if build_lut:
        cmap.build_lut()
    token = uuid.uuid4().hex[:12]
    out = []
    for i, level in enumerate(slide.pyramid):
        level = _three_channel_chunks(level)
        out.append(
            level.map_blocks(
                cmap,
                dtype=np.uint8,
                name=f"stain-{normalizer.name}-{token}-{i}",
                meta=np.empty((0, 0, 3), np.uint8),
            )
        )
    return out


def deconvolution_pyramid(
    slide: Slide,
    *,
    stain: str = "hematoxylin",
    stain_matrix: np.ndarray | None = None,
) -> list[da.Array]:
    """One stain's concentration map for every level of the slide, lazily.

    Parameters
    ----------
    slide : Slide
    stain : {"hematoxylin", "eosin", "dab"}
    stain_matrix : (3, 2) array, optional
        Measured H and E vectors (e.g. from :func:`estimate_slide_stain`); default
        Ruifrok & Johnston.

    Returns
    -------
    list of dask.array.Array
        ``(rows, cols)`` float32 concentrations (OD units) per level.
    """
    k = stain_index(stain)
    stain_basis(stain_matrix)  # validate once, not per chunk

    def one(block: np.ndarray) -> np.ndarray:
        return deconvolve(block, stain_matrix=stain_matrix)[..., k]

    token = uuid.uuid4().hex[:12]
    return [
        _three_channel_chunks(level).map_blocks(
            one,
            drop_axis=2,
            dtype=np.float32,
            name=f"deconv-{k}-{token}-{i}",
            meta=np.empty((0, 0), np.float32),
        )
        for i, level in enumerate(slide.pyramid)
    ]


# ---------------------------------------------------------------------- TIFF writing


@dataclass(frozen=True)
class WriteProgress:
    """Progress of :func:`write_normalized_tiff`: ``done`` of ``total`` tiles written."""

    done: int
    total: int
    level: int
    message: str = ""


@dataclass(frozen=True)
class WriteResult:
    """What :func:`write_normalized_tiff` wrote.

    Attributes
    ----------
    path : Path
    levels : list of (rows, cols)
    tiles : int
        Tiles written over all levels.
    seconds : float
    source : StainParams
        The slide's stain parameters used.
    mpp : float or None
        µm per pixel of the first level.
    """

    path: Path
    levels: list[tuple[int, int]]
    tiles: int
    seconds: float
    source: StainParams
    mpp: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "path": str(self.path),
            "levels": [list(x) for x in self.levels],
            "tiles": self.tiles,
            "seconds": round(self.seconds, 3),
            "mpp": self.mpp,
            "source": self.source.to_dict(),
            **self.extra,
        }


def write_normalized_tiff(
    slide: Slide,
    normalizer: StainNormalizer,
    out_path: str | os.PathLike,
    *,
    source: StainParams | None = None,
    level: int = 0,
    tile_size: int = 512,
    n_levels: int | None = None,
    compression: str | None = "jpeg",
    quality: int = 90,
    progress: Callable[[WriteProgress], None] | None = None,
    cancel: Callable[[], bool] | threading.Event | None = None,
) -> WriteResult:
    """Write the stain-normalised slide as a tiled pyramidal TIFF, tile by tile.

    Level 0 of the output is ``level`` of the slide. Each output tile is read, mapped
    through the normaliser's colour table and handed to :mod:`tifffile`; its 2x2 mean
    goes to a temporary scratch file next to the output, from which the next level is
    written the same way. Peak memory is a few tiles plus the 64 MiB colour table,
    whatever the slide size; the scratch files are removed afterwards. The output is one
    top-level page per level, ``SubfileType=reduced`` for levels > 0, with resolution
    tags (pixels/cm) when the slide's µm per pixel is known: OpenSlide reads it as
    ``generic-tiff``. It is written to a temporary file and renamed when complete.

    Parameters
    ----------
    slide : Slide
    normalizer : StainNormalizer
        A fitted normaliser.
    out_path : path-like
        The ``.tif`` to write.
    source : StainParams, optional
        The slide's stain parameters (default: :func:`estimate_slide_stain`).
    level : int
        Slide level written as the output's full resolution.
    tile_size : int
        TIFF tile side (multiple of 16).
    n_levels : int, optional
        Output levels (default: until the longest side is at most 1024).
    compression : {"jpeg", "zlib", None}
    quality : int
        JPEG quality.
    progress : callable, optional
        Called with a :class:`WriteProgress` after every tile.
    cancel : callable or threading.Event, optional
        Checked before every tile; when set, writing stops, nothing is left behind and
        :class:`~napari_pathoseg.errors.CancelledError` is raised.

    Returns
    -------
    WriteResult

    Raises
    ------
    StainError
        Bad options, a missing folder or a failed write.
    napari_pathoseg._atomic.OutputError
        ``out_path`` is the slide's own file.
    """
    t_start = time.perf_counter()
    out_path = Path(out_path)
    try:  # fail before the slow stain estimate
        compression = check_options(tile=tile_size, compression=compression)
    except PathosegError as exc:
        raise StainError(f"{out_path}: {exc}") from exc
    if not 0 <= level < slide.level_count:
        raise StainError(f"{slide.metadata.path}: level {level} does not exist (0..{slide.level_count - 1})")
    if not out_path.parent.is_dir():
        raise StainError(f"{out_path}: the folder {out_path.parent} does not exist")
    check_output(out_path, inputs=[slide.metadata.path], what="the normalised TIFF")
    if source is None:
        source = estimate_slide_stain(slide, normalizer)
    cmap = normalizer.colour_map(source)
    cmap.build_lut()
    mpp = slide.level_mpp(level)

    def read(_k: int, row: int, col: int, height: int, width: int) -> np.ndarray:
        return cmap(slide.read_region(level=level, row=row, col=col, height=height, width=width))

    def report(p: PyramidProgress) -> None:
        if progress is not None:
            progress(WriteProgress(done=p.done, total=p.total, level=p.level, message=f"level {p.level}: tile {p.row},{p.col}"))

    try:
        shapes = write_tiled_pyramid(
            out_path,
            read,
            shape=slide.pyramid[level].shape[:2],
            n_levels=n_levels,
            tile=tile_size,
            mpp=mpp,
            compression=compression,
            quality=quality,
            software="napari-pathoseg stain normalisation",
            progress=report,
            cancel=cancel,
        )
    except PathosegError:
        raise
    except OSError as exc:
        raise StainError(f"{out_path}: writing the TIFF failed ({exc})") from exc
    done = sum(math.ceil(r / tile_size) * math.ceil(c / tile_size) for r, c in shapes)
    seconds = time.perf_counter() - t_start
    logger.info("wrote %s: %d levels, %d tiles in %.1f s", out_path, len(shapes), done, seconds)
    return WriteResult(path=out_path, levels=shapes, tiles=done, seconds=seconds, source=source, mpp=mpp)
