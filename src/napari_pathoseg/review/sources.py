"""Unlabelled tiles to pseudo-label: the tissue tiles of a slide, or the images of a folder.

:func:`slide_tiles` gives a slide's tissue grid at a working resolution and a reader per tile
(memory bounded by the tile size); :func:`folder_tiles` cuts every image of a folder into
non-overlapping tiles. Both give :class:`UnlabelledTile` with positions in source pixels.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from skimage.transform import resize

from napari_pathoseg.review.records import ReviewProjectError

__all__ = [
    "IMAGE_SUFFIXES",
    "UnlabelledTile",
    "count_folder_tiles",
    "fit_tile",
    "folder_images",
    "folder_tiles",
    "slide_tiles",
]

#: File suffixes read as images from a folder source.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass
class UnlabelledTile:
    """A tile to pseudo-label.

    Attributes
    ----------
    image : (H, W, 3) uint8
        Pixels at the working resolution (H = W = tile size).
    x, y : int
        Top-left corner in level-0 (source) pixels.
    height, width : int
        Extent in level-0 (source) pixels.
    source_name : str
        Image file name for a folder source, "" for a slide.
    """

    image: np.ndarray
    x: int
    y: int
    height: int
    width: int
    source_name: str = ""


def fit_tile(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an (h, w, 3) uint8 array to (size, size, 3) uint8."""
    if image.shape[:2] == (size, size):
        return image
    out = resize(image, (size, size), order=1, preserve_range=True, anti_aliasing=True)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def slide_tiles(
    slide: Any, *, tile_size: int = 256, mpp: float | None = None, min_tissue: float = 0.5
) -> tuple[list[Any], Callable[[Any], UnlabelledTile], int, float]:
    """Tissue tiles of a slide at ``mpp`` (see :func:`napari_pathoseg.tiling.tile_grid`).

    Parameters
    ----------
    slide : napari_pathoseg.wsi.slide.Slide
    tile_size : int
        Tile size in pixels at the working resolution.
    mpp : float, optional
        Working resolution in µm/px; the finest level at least this fine is read and each
        window resampled to ``tile_size``. None reads level 0 as is.
    min_tissue : float
        Minimum tissue fraction of a kept tile.

    Returns
    -------
    grid : list of Tile
    read : callable
        ``read(tile) -> UnlabelledTile`` reads one tile (memory bounded by the tile size).
    level : int
        Level read.
    downsample : float
        Level-0 pixels per working pixel.
    """
    from napari_pathoseg.tiling import choose_level, read_tile, tile_grid

    level, scale = choose_level(slide, mpp=mpp)
    downsample = float(slide.level_downsample(level)) / scale
    grid = tile_grid(slide, mpp=mpp, level=None if mpp is not None else 0, size=tile_size,
                     overlap=0, tissue_only=True, min_tissue=min_tissue)

    def read(tile: Any) -> UnlabelledTile:
        n = tile.read_size or max(tile.height, tile.width)
        extent = int(round(n * tile.downsample))  # level-0 pixels
        return UnlabelledTile(
            image=fit_tile(np.asarray(read_tile(slide, tile))[..., :3], tile_size),
            x=int(tile.x0), y=int(tile.y0), height=extent, width=extent,
        )

    return grid, read, level, downsample


def folder_tiles(
    folder: str | os.PathLike, *, tile_size: int = 256, scale: float = 1.0
) -> Iterator[UnlabelledTile]:
    """Cut every image of a folder into non-overlapping tiles.

    Parameters
    ----------
    folder : path
        Folder of RGB images (png, jpg, tif, ...), read in sorted order (not recursive).
    tile_size : int
        Tile size at the working resolution.
    scale : float
        Working pixels per source pixel (``source_mpp / working_mpp``); images are resized
        by it first. Partial tiles at the right/bottom edge are padded with white.

    Yields
    ------
    UnlabelledTile
        Positions in the source image's pixels.
    """
    for path in folder_images(Path(folder)):
        try:
            with Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise ReviewProjectError(f"Cannot read the image {path} ({exc}); remove it from the folder.") from exc
        if scale != 1.0:
            rgb = resize(rgb, (max(1, round(rgb.shape[0] * scale)), max(1, round(rgb.shape[1] * scale))),
                         order=1, preserve_range=True, anti_aliasing=scale < 1).round().astype(np.uint8)
        rows, cols = rgb.shape[:2]
        src = round(tile_size / scale)
        for r in range(0, rows, tile_size):
            for c in range(0, cols, tile_size):
                tile = np.full((tile_size, tile_size, 3), 255, dtype=np.uint8)
                part = rgb[r : r + tile_size, c : c + tile_size]
                tile[: part.shape[0], : part.shape[1]] = part
                yield UnlabelledTile(
                    image=tile, x=round(c / scale), y=round(r / scale), height=src, width=src,
                    source_name=path.name,
                )


def count_folder_tiles(files: Sequence[Path], *, tile_size: int, scale: float) -> int:
    """Number of tiles :func:`folder_tiles` yields (reads image headers only)."""
    total = 0
    for path in files:
        try:
            with Image.open(path) as im:
                cols, rows = im.size
        except (OSError, ValueError) as exc:
            raise ReviewProjectError(f"Cannot read the image {path} ({exc}); remove it from the folder.") from exc
        rows, cols = max(1, round(rows * scale)), max(1, round(cols * scale))
        total += -(-rows // tile_size) * -(-cols // tile_size)
    return total


def folder_images(folder: Path) -> list[Path]:
    """The images directly in ``folder`` (sorted); none, or no folder, raises ReviewProjectError."""
    if not folder.is_dir():
        raise ReviewProjectError(f"{folder} is not a folder of images.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ReviewProjectError(
            f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); choose a folder of tiles."
        )
    return files
