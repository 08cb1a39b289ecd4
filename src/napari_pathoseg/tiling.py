"""Tissue detection and tile grids over tissue.

The methods (M1-M5) all work tile by tile: this module finds the tissue on a
low-resolution level and lays a grid of tiles over it at a requested resolution.
Running a network over the tiles and stitching its outputs back (overlap averaging,
ownership of objects, bounded memory) is the inference engine's job
(:mod:`napari_pathoseg.inference`).

Examples
--------
>>> import numpy as np
>>> from napari_pathoseg.wsi.slide import Slide
>>> img = np.full((1024, 1024, 3), 240, np.uint8); img[256:768, 256:768] = (150, 80, 160)
>>> s = Slide.from_array(img, mpp=0.5)
>>> tiles = tile_grid(s, level=0, size=256, overlap=0)
>>> len(tiles)
4
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.wsi.slide import Slide

__all__ = [
    "Tile",
    "tissue_mask",
    "tile_entropy",
    "tile_grid",
    "choose_level",
    "read_tile",
    "write_tiles_csv",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tile:
    """One tile of a grid.

    Attributes
    ----------
    level : int
        Pyramid level the tile is read from.
    row, col : int
        Top-left corner in that level's pixels.
    height, width : int
        Size of the window read from the level (level pixels).
    downsample : float
        Down-sample of ``level`` relative to level 0.
    out_size : int
        Size of the tile after resampling to the requested resolution (pixels).
    read_size : int
        Nominal (un-clipped) side of the window in level pixels; ``height``/``width``
        are clipped at the slide edge.
    tissue : float
        Fraction of the tile covered by tissue (1.0 when not computed).
    index : int
        Position in the grid (row-major).
    """

    level: int
    row: int
    col: int
    height: int
    width: int
    downsample: float = 1.0
    out_size: int = 0
    tissue: float = 1.0
    index: int = 0
    read_size: int = 0

    @property
    def x0(self) -> int:
        """Level-0 x (column) of the top-left corner."""
        return int(round(self.col * self.downsample))

    @property
    def y0(self) -> int:
        """Level-0 y (row) of the top-left corner."""
        return int(round(self.row * self.downsample))


def _grey(rgb: np.ndarray) -> np.ndarray:
    """(r, c, 3) uint8 -> (r, c) float32 luminance in 0..255."""
    rgb = rgb.astype(np.float32)
    return rgb[..., 0] * 0.2125 + rgb[..., 1] * 0.7154 + rgb[..., 2] * 0.0721


def _low_res(slide: Slide, max_size: int) -> tuple[np.ndarray, float]:
    """The whole slide at a level whose longest side is about ``max_size`` or less."""
    level = slide.level_count - 1
    for i in range(slide.level_count):
        if max(slide.pyramid[i].shape[:2]) <= max_size:
            level = i
            break
    img = np.asarray(slide.pyramid[level].compute())
    return img, slide.level_downsample(level)


def tissue_mask(
    slide: Slide,
    *,
    method: str = "otsu",
    grey_threshold: float = 210.0,
    max_size: int = 2048,
    min_object_um2: float = 2000.0,
    min_hole_um2: float = 2000.0,
) -> tuple[np.ndarray, float]:
    """Find tissue on a low-resolution level.

    Parameters
    ----------
    slide : Slide
    method : {"otsu", "grey"}
        ``"otsu"``: Otsu threshold on luminance combined with a saturation test, then
        morphological clean-up. ``"grey"``: the methods' rule, pixels with grey value
        above ``grey_threshold`` are background.
    grey_threshold : float
        Background grey level for ``method="grey"`` (0..255).
    max_size : int
        Longest side of the level used (the finest level not larger than this).
    min_object_um2, min_hole_um2 : float
        Tissue specks and holes smaller than this are removed / filled (µm², taken
        as 0.5 µm/px when the slide's resolution is unknown).

    Returns
    -------
    mask : (r, c) bool
        True on tissue.
    downsample : float
        Level-0 pixels per mask pixel.
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_holes, remove_small_objects

    img, ds = _low_res(slide, max_size)
    grey = _grey(img)
    if method == "grey":
        mask = grey <= grey_threshold
    elif method == "otsu":
        mx = img.max(axis=2).astype(np.int16)
        mn = img.min(axis=2).astype(np.int16)
        sat = (mx - mn).astype(np.float32)
        if float(grey.max() - grey.min()) < 1.0:
            mask = np.zeros(grey.shape, bool)
        else:
            thr = threshold_otsu(grey)
            # a slide that is all tissue has an Otsu threshold inside the tissue: cap it
            thr = min(thr, grey_threshold + 20.0)
            mask = (grey < thr) | (sat > 25)
            mask &= grey < 250
    else:
        raise PathosegError(f"unknown tissue method {method!r}; valid: 'otsu', 'grey'")
    mpp = (slide.mpp or 0.5) * ds
    px_area = mpp * mpp
    mask = ndi.binary_opening(mask, iterations=1)
    mask = remove_small_objects(mask, max_size=max(1, int(min_object_um2 / px_area)))
    mask = remove_small_holes(mask, max_size=max(1, int(min_hole_um2 / px_area)))
    return mask, ds


def tile_entropy(tile: np.ndarray) -> float:
    """Shannon entropy (bits, 0..8) of a tile's grey-level histogram.

    Background tiles have low entropy; M4 drops tiles below a threshold.
    ``(r, c, 3)`` uint8 input.
    """
    hist = np.bincount(_grey(tile).astype(np.uint8).ravel(), minlength=256).astype(np.float64)
    p = hist[hist > 0] / hist.sum()
    return float(-(p * np.log2(p)).sum())


def choose_level(slide: Slide, *, mpp: float | None = None, level: int | None = None) -> tuple[int, float]:
    """Pick the level to read for a target resolution.

    Returns ``(level, scale)`` where ``scale`` = output pixels per level pixel (<= 1:
    the level is at least as fine as asked, and is down-sampled by ``scale``).
    """
    if mpp is None:
        lv = 0 if level is None else int(level)
        if not 0 <= lv < slide.level_count:
            raise PathosegError(f"level {lv} does not exist (0..{slide.level_count - 1})")
        return lv, 1.0
    if mpp <= 0:
        raise PathosegError(f"mpp must be positive, got {mpp}")
    if slide.mpp is None:
        raise PathosegError(
            f"{slide.metadata.path}: the slide's µm per pixel is unknown; declare it "
            "(e.g. --mpp on the command line) or tile by level"
        )
    want_ds = mpp / slide.mpp
    lv = slide.best_level_for_downsample(want_ds)
    scale = slide.level_downsample(lv) / want_ds
    if abs(scale - 1.0) < 0.02:
        scale = 1.0
    return lv, scale


#: Tiles may be read at most this many times finer than the slide's finest level.
MAX_UPSAMPLE = 8.0
#: Largest grid :func:`tile_grid` lays (before tissue filtering).
MAX_GRID_TILES = 5_000_000


def tile_grid(
    slide: Slide,
    *,
    level: int | None = None,
    mpp: float | None = None,
    size: int = 512,
    overlap: int = 0,
    tissue_only: bool = True,
    min_tissue: float = 0.05,
    mask: tuple[np.ndarray, float] | None = None,
    region: tuple[int, int, int, int] | None = None,
) -> list[Tile]:
    """Lay a grid of tiles over a slide.

    Parameters
    ----------
    slide : Slide
    level : int, optional
        Level to tile (default 0) when ``mpp`` is not given.
    mpp : float, optional
        Target resolution in µm per pixel; the finest level at least this fine is read
        and each tile is ``size * mpp / level_mpp`` level pixels.
    size : int
        Tile size in output pixels.
    overlap : int
        Overlap between neighbouring tiles in output pixels (``0 <= overlap < size``).
    tissue_only : bool
        Keep only tiles with at least ``min_tissue`` tissue fraction.
    mask : (mask, downsample), optional
        A precomputed :func:`tissue_mask` result.
    region : (x, y, width, height), optional
        Restrict the grid to a level-0 rectangle.

    Returns
    -------
    list of Tile
    """
    if size <= 0:
        raise PathosegError(f"tile size must be positive, got {size}")
    if not 0 <= overlap < size:
        raise PathosegError(f"overlap must be in [0, size), got {overlap} for size {size}")
    lv, scale = choose_level(slide, mpp=mpp, level=level)
    if scale > MAX_UPSAMPLE:
        raise PathosegError(
            f"{mpp} µm/px is {scale:.3g} times finer than the slide's finest level ({slide.mpp} µm/px); "
            f"tiles can be at most {MAX_UPSAMPLE}x finer: choose a coarser --mpp"
        )
    ds = slide.level_downsample(lv)
    read = max(1, int(round(size / scale)))
    stride = max(1, int(round((size - overlap) / scale)))
    rows, cols = slide.pyramid[lv].shape[:2]
    r_lo, c_lo, r_hi, c_hi = 0, 0, rows, cols
    if region is not None:
        x, y, w, h = region
        if w <= 0 or h <= 0:
            raise PathosegError(f"region {region}: width and height must be positive")
        c_lo, r_lo = int(math.floor(x / ds)), int(math.floor(y / ds))
        c_hi, r_hi = int(math.ceil((x + w) / ds)), int(math.ceil((y + h) / ds))
        c_lo, r_lo = max(0, c_lo), max(0, r_lo)
        c_hi, r_hi = min(cols, c_hi), min(rows, r_hi)
        if c_hi <= c_lo or r_hi <= r_lo:
            raise PathosegError(
                f"region {region} (x, y, width, height in level-0 pixels) lies outside the slide "
                f"({slide.metadata.level_dimensions[0][0]} x {slide.metadata.level_dimensions[0][1]})"
            )
    n_grid = math.ceil((r_hi - r_lo) / stride) * math.ceil((c_hi - c_lo) / stride)
    if n_grid > MAX_GRID_TILES:
        raise PathosegError(
            f"a grid of {n_grid:,} tiles of {size} px is too many (limit {MAX_GRID_TILES:,}); "
            "use larger tiles, a coarser µm/px or a smaller region"
        )
    if tissue_only and mask is None:
        mask = tissue_mask(slide)
    tiles: list[Tile] = []
    for r in range(r_lo, max(r_lo + 1, r_hi - overlap) if r_hi - r_lo > read else r_lo + 1, stride):
        for c in range(c_lo, max(c_lo + 1, c_hi - overlap) if c_hi - c_lo > read else c_lo + 1, stride):
            frac = 1.0
            if mask is not None:
                m, mds = mask
                f = ds / mds
                mr0, mc0 = int(r * f), int(c * f)
                mr1 = max(mr0 + 1, int(math.ceil(min(r + read, r_hi) * f)))
                mc1 = max(mc0 + 1, int(math.ceil(min(c + read, c_hi) * f)))
                win = m[mr0:mr1, mc0:mc1]
                frac = float(win.mean()) if win.size else 0.0
                if tissue_only and frac < min_tissue:
                    continue
            tiles.append(
                Tile(
                    level=lv,
                    row=r,
                    col=c,
                    height=min(read, r_hi - r),
                    width=min(read, c_hi - c),
                    downsample=ds,
                    out_size=size,
                    tissue=frac,
                    index=len(tiles),
                    read_size=read,
                )
            )
    return tiles


def read_tile(slide: Slide, tile: Tile) -> np.ndarray:
    """Read a grid tile and resample it to the grid's output resolution.

    Returns
    -------
    (out_size, out_size, 3) uint8
        The nominal window (``read_size`` level pixels square, white beyond the slide
        edge) resampled to ``out_size``.
    """
    from skimage.transform import resize

    n = tile.read_size or max(tile.height, tile.width)
    img = slide.read_region(level=tile.level, row=tile.row, col=tile.col, height=n, width=n)
    out = tile.out_size or n
    if out != n:
        img = resize(img, (out, out), order=1, anti_aliasing=n > out, preserve_range=True)
        img = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return img


def write_tiles_csv(tiles: list[Tile], path: str | os.PathLike) -> Path:
    """Write a tile grid as CSV (atomic): index, level, row, col, height, width, x0, y0, tissue."""
    import csv

    from napari_pathoseg._atomic import atomic_open

    path = Path(path)
    with atomic_open(path, "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["index", "level", "row", "col", "height", "width", "downsample", "x0", "y0", "tissue"])
        for t in tiles:
            wr.writerow([t.index, t.level, t.row, t.col, t.height, t.width, f"{t.downsample:.6g}", t.x0, t.y0, f"{t.tissue:.4f}"])
    return path
