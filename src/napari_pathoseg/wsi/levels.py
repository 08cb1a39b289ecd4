"""Pixel blocks and lazy pyramid levels shared by every slide back end.

* :func:`to_rgb_uint8` / :func:`composite_white`: a decoded block as ``(rows, cols, 3)``
  uint8 RGB (alpha composited onto white), or a :class:`~napari_pathoseg.errors.SlideError`.
* :func:`grid_array`: a lazy dask level whose chunks are read on demand from a tile reader.
* :func:`lazy_levels`: coarser levels added lazily by 2x averaging (:func:`downsample2`).

Examples
--------
>>> import numpy as np, dask.array as da
>>> lvl = da.zeros((3000, 2000, 3), dtype=np.uint8, chunks=(512, 512, 3))
>>> [l.shape[:2] for l in lazy_levels(lvl)]
[(3000, 2000), (1500, 1000), (750, 500)]
"""

from __future__ import annotations

from typing import Callable

import dask.array as da
import numpy as np

from napari_pathoseg.errors import SlideError

__all__ = [
    "COARSEST_SIDE",
    "DEFAULT_CHUNK",
    "composite_white",
    "downsample2",
    "grid_array",
    "lazy_levels",
    "to_rgb_uint8",
]

#: Levels are added lazily by 2x down-sampling until the coarsest is at most this size.
COARSEST_SIDE = 1024
#: Chunk size for images without a tile grid.
DEFAULT_CHUNK = 512


def composite_white(rgba: np.ndarray) -> np.ndarray:
    """(r, c, 4) uint8 RGBA -> (r, c, 3) uint8 RGB over white."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.float32) / 255.0
    out = rgb.astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def to_rgb_uint8(arr: np.ndarray, *, source: str) -> np.ndarray:
    """Convert a decoded block to (r, c, 3) uint8 RGB; raise SlideError when impossible."""
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3:
        raise SlideError(f"{source}: expected an RGB image, got an array of shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise SlideError(
            f"{source}: pixel type {arr.dtype} is not supported (8-bit RGB brightfield "
            "slides only); convert it to 8-bit RGB first"
        )
    if arr.shape[2] == 4:
        return composite_white(arr)
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    if arr.shape[2] != 3:
        raise SlideError(f"{source}: expected 3 colour channels, got {arr.shape[2]}")
    return arr


def downsample2(block: np.ndarray) -> np.ndarray:
    """2x2 mean of a (r, c, 3) uint8 block (odd edge rows/cols are replicated)."""
    r, c = block.shape[:2]
    if r % 2 or c % 2:
        block = np.pad(block, ((0, r % 2), (0, c % 2), (0, 0)), mode="edge")
    b = block.astype(np.uint16)
    s = b[0::2, 0::2] + b[1::2, 0::2] + b[0::2, 1::2] + b[1::2, 1::2]
    return ((s + 2) // 4).astype(np.uint8)


def lazy_levels(level0: da.Array, *, coarsest: int = COARSEST_SIDE) -> list[da.Array]:
    """Add coarser levels, each a lazy 2x mean of the previous, until max side <= coarsest."""
    levels = [level0]
    cur = level0
    while max(cur.shape[:2]) > coarsest:
        # keep chunks even-sized so that each output chunk comes from one input chunk
        ch = [max(2, (c // 2) * 2) for c in (cur.chunksize[0], cur.chunksize[1])]
        cur = cur.rechunk((ch[0] * 2 if ch[0] < DEFAULT_CHUNK else ch[0], ch[1] * 2 if ch[1] < DEFAULT_CHUNK else ch[1], 3))
        nxt = cur.map_blocks(
            downsample2,
            dtype=np.uint8,
            chunks=tuple(tuple((c + 1) // 2 for c in dim) for dim in cur.chunks[:2]) + ((3,),),
        )
        levels.append(nxt)
        cur = nxt
    return levels


def grid_array(
    read: Callable[[int, int, int, int], np.ndarray],
    *,
    shape: tuple[int, int],
    chunk: tuple[int, int],
    name: str,
) -> da.Array:
    """A lazy (rows, cols, 3) uint8 dask array whose chunks come from ``read(row, col, h, w)``."""
    rows, cols = shape
    row_chunks = tuple(min(chunk[0], rows - r) for r in range(0, rows, chunk[0]))
    col_chunks = tuple(min(chunk[1], cols - c) for c in range(0, cols, chunk[1]))

    # ``block_id`` rather than ``block_info``: dask builds the block_info dicts of every chunk
    # eagerly (~1 KB each, 40 MB for a 50,000² slide of 256 px tiles); this costs nothing per chunk
    def _block(block_id=None):
        i, j = block_id[0], block_id[1]
        return read(i * chunk[0], j * chunk[1], row_chunks[i], col_chunks[j])

    return da.map_blocks(
        _block,
        dtype=np.uint8,
        chunks=(row_chunks, col_chunks, (3,)),
        name=name,
        meta=np.empty((0, 0, 3), dtype=np.uint8),
    )
