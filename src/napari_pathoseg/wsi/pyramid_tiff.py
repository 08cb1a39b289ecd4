"""Stream a pyramidal tiled RGB TIFF to disk, one tile at a time.

The one writer behind :func:`napari_pathoseg.wsi.synth.write_pyramid_tiff` (test and benchmark
slides) and :func:`napari_pathoseg.stain.write_normalized_tiff` (stain-normalised slides).
The output is one top-level page per level, ``SubfileType=reduced`` for levels > 0, with
resolution tags (pixels/cm) when µm per pixel is known: OpenSlide reads it as
``generic-tiff``, tifffile as a multiscale series.

Coarser levels are either asked of the caller (``read(level, ...)``, for sources that can
render any level directly) or built from the level above it: each written tile's 2x2 mean
goes to a scratch file beside the output (fixed-size records, ``os.pwrite``/``os.pread``,
no memory map), from which the next level is written the same way. Either way memory
stays a few tiles, whatever the image size. The file appears only when complete
(:func:`napari_pathoseg._atomic.atomic_path`: written to a temporary name, then renamed); a
cancelled or failed write leaves nothing behind. Scratch files are named like the atomic
helper's temporary files (``.NAME.levelK.<random>.tmp-pathoseg``), so those a killed run
leaves are removed by the next write of the same output.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from napari_pathoseg._atomic import TMP_SUFFIX, atomic_path
from napari_pathoseg.errors import CancelledError, PathosegError
from napari_pathoseg.wsi.levels import downsample2

__all__ = ["PyramidProgress", "check_options", "level_shapes", "write_tiled_pyramid"]

logger = logging.getLogger(__name__)

#: ``read(level, row, col, height, width) -> (height, width, 3) uint8`` in that level's pixels.
TileReader = Callable[[int, int, int, int, int], np.ndarray]


@dataclass(frozen=True)
class PyramidProgress:
    """``done`` of ``total`` tiles written; the last was at (``row``, ``col``) of ``level``."""

    done: int
    total: int
    level: int
    row: int
    col: int


def level_shapes(shape: tuple[int, int], *, n_levels: int | None = None, coarsest: int = 1024) -> list[tuple[int, int]]:
    """(rows, cols) of every level: level 0 is ``shape``, each next one half (rounded up).

    Without ``n_levels``, levels are added until the longest side is at most ``coarsest``.
    """
    shapes = [(int(shape[0]), int(shape[1]))]
    while (n_levels is None and max(shapes[-1]) > coarsest) or (n_levels is not None and len(shapes) < n_levels):
        r, c = shapes[-1]
        if r < 2 and c < 2:
            break
        shapes.append(((r + 1) // 2, (c + 1) // 2))
    return shapes


class _QuarterStore:
    """A level being built from 2x2-averaged tiles of the level above it, on disk.

    Each tile ``(a, b)`` of the finer level, once averaged, is a quarter (``tile/2``
    square) of a tile of this level; quarters are fixed-size records at
    ``(a * n_cols + b) * record`` in a scratch file beside ``out`` (removed by :meth:`close`).
    """

    def __init__(self, out: Path, *, level: int, fine_tiles: tuple[int, int], tile: int) -> None:
        self.half = tile // 2
        self.tile = tile
        self.n_rows, self.n_cols = fine_tiles
        self.record = self.half * self.half * 3
        self.fd, name = tempfile.mkstemp(prefix=f".{out.name}.level{level}.", suffix=TMP_SUFFIX, dir=out.parent)
        self.path = Path(name)

    def put(self, a: int, b: int, quarter: np.ndarray) -> None:
        """Store the averaged fine tile ``(a, b)`` (at most ``tile/2`` square)."""
        buf = np.full((self.half, self.half, 3), 255, np.uint8)
        buf[: quarter.shape[0], : quarter.shape[1]] = quarter
        os.pwrite(self.fd, buf.tobytes(), (a * self.n_cols + b) * self.record)

    def get(self, row: int, col: int, height: int, width: int) -> np.ndarray:
        """The ``(height, width, 3)`` tile of this level whose corner is ``(row, col)``."""
        out = np.full((self.tile, self.tile, 3), 255, np.uint8)
        h = self.half
        for qr in (0, 1):
            for qc in (0, 1):
                a, b = 2 * (row // self.tile) + qr, 2 * (col // self.tile) + qc
                if a < self.n_rows and b < self.n_cols:
                    raw = os.pread(self.fd, self.record, (a * self.n_cols + b) * self.record)
                    out[qr * h : (qr + 1) * h, qc * h : (qc + 1) * h] = np.frombuffer(raw, np.uint8).reshape(h, h, 3)
        return out[:height, :width]

    def close(self) -> None:
        """Close and remove the scratch file."""
        try:
            os.close(self.fd)
        finally:
            self.path.unlink(missing_ok=True)


def check_options(*, tile: int, compression: str | None) -> str | None:
    """Check the tile side and compression of a pyramid to write; returns the compression
    (``"none"`` read as None). Callers with slow work before writing call it first, to fail fast.

    Raises
    ------
    PathosegError
        ``tile`` is not a positive multiple of 16, or ``compression`` is not known.
    """
    if tile % 16 or tile < 16:
        raise PathosegError(f"tile must be a positive multiple of 16, got {tile}")
    if compression == "none":
        compression = None
    if compression not in ("jpeg", "zlib", None):
        raise PathosegError(f"compression must be 'jpeg', 'zlib' or None, got {compression!r}")
    return compression


def _is_cancelled(cancel: Callable[[], bool] | threading.Event | None) -> bool:
    """``cancel`` is anything with ``is_set()`` (CancelToken, threading.Event) or a callable."""
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


def write_tiled_pyramid(
    path: str | os.PathLike,
    read: TileReader,
    *,
    shape: tuple[int, int],
    derive_levels: bool = True,
    n_levels: int | None = None,
    tile: int = 256,
    mpp: float | None = None,
    compression: str | None = "jpeg",
    quality: int = 90,
    software: str | None = None,
    progress: Callable[[PyramidProgress], None] | None = None,
    cancel: Callable[[], bool] | threading.Event | None = None,
) -> list[tuple[int, int]]:
    """Write a pyramidal tiled RGB TIFF tile by tile; return the (rows, cols) of its levels.

    Parameters
    ----------
    path : path-like
        The ``.tif`` to write (its folder must exist).
    read : callable
        ``read(level, row, col, height, width) -> (height, width, 3) uint8``. With
        ``derive_levels`` it is only called for level 0.
    shape : (rows, cols)
        Level-0 size.
    derive_levels : bool
        Build each coarser level as the 2x2 mean of the one above it (through a scratch
        file beside ``path``) instead of calling ``read`` for it.
    n_levels : int, optional
        Number of levels (default: until the longest side is at most 1024).
    tile : int
        Tile side (a positive multiple of 16). Edge tiles are padded with white.
    mpp : float, optional
        µm per level-0 pixel, written to the resolution tags.
    compression : {"jpeg", "zlib", None}
    quality : int
        JPEG quality.
    software : str, optional
        The TIFF ``Software`` tag.
    progress : callable, optional
        Called with a :class:`PyramidProgress` after every tile.
    cancel : callable or threading.Event, optional
        Checked before every tile; when set, writing stops, nothing is left behind and
        :class:`~napari_pathoseg.errors.CancelledError` is raised.

    Returns
    -------
    list of (rows, cols)

    Raises
    ------
    PathosegError
        Bad options; :class:`~napari_pathoseg._atomic.OutputError` when the folder is missing
        or the file system fails (disk full, read-only). Nothing is left behind.
    """
    import tifffile

    path = Path(path)
    compression = check_options(tile=tile, compression=compression)
    rows, cols = int(shape[0]), int(shape[1])
    if rows < 1 or cols < 1:
        raise PathosegError(f"{path}: cannot write an empty image of {rows} x {cols} px")
    shapes = level_shapes((rows, cols), n_levels=n_levels)
    total = sum(math.ceil(r / tile) * math.ceil(c / tile) for r, c in shapes)
    comp: dict[str, Any] = {}
    if compression == "jpeg":
        comp = {"compression": "jpeg", "compressionargs": {"level": int(quality)}}
    elif compression == "zlib":
        comp = {"compression": "zlib"}

    stores: list[_QuarterStore] = []
    done = 0
    try:
        with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=rows * cols * 3 > 2**31) as tw:
            for k, (lr, lc) in enumerate(shapes):
                current = stores[-1] if (derive_levels and k > 0) else None
                nxt = None
                if derive_levels and k + 1 < len(shapes):
                    grid = (math.ceil(lr / tile), math.ceil(lc / tile))
                    nxt = _QuarterStore(path, level=k + 1, fine_tiles=grid, tile=tile)
                    stores.append(nxt)

                def tiles(
                    k: int = k, lr: int = lr, lc: int = lc, current: _QuarterStore | None = current, nxt: _QuarterStore | None = nxt
                ) -> Iterator[np.ndarray]:
                    nonlocal done
                    for r in range(0, lr, tile):
                        for c in range(0, lc, tile):
                            if _is_cancelled(cancel):
                                raise CancelledError(f"writing {path} was cancelled; no file was written")
                            h, w = min(tile, lr - r), min(tile, lc - c)
                            if current is not None:
                                block = current.get(r, c, h, w)
                            else:
                                block = np.asarray(read(k, r, c, h, w), dtype=np.uint8)
                                if block.shape != (h, w, 3):
                                    raise PathosegError(
                                        f"{path}: the tile source gave {block.shape} for level {k} at ({r}, {c}), expected {(h, w, 3)}"
                                    )
                            if nxt is not None:
                                nxt.put(r // tile, c // tile, downsample2(block))
                            if block.shape[:2] != (tile, tile):
                                pad = np.full((tile, tile, 3), 255, np.uint8)
                                pad[:h, :w] = block
                                block = pad
                            done += 1
                            if progress is not None:
                                progress(PyramidProgress(done=done, total=total, level=k, row=r, col=c))
                            yield block

                res: dict[str, Any] = {}
                if mpp:
                    px_per_cm = 1e4 / (mpp * 2**k)
                    res = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
                tw.write(
                    tiles(),
                    shape=(lr, lc, 3),
                    dtype=np.uint8,
                    tile=(tile, tile),
                    photometric="rgb",
                    subfiletype=0 if k == 0 else 1,
                    metadata=None,
                    software=software,
                    **res,
                    **comp,
                )
    finally:
        for store in stores:
            store.close()
    logger.info("wrote %s: %d levels, %d tiles", path, len(shapes), done)
    return shapes
