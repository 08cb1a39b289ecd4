"""Direct, thread-safe decoding of the tiles of a plain tiled TIFF (tifffile + imagecodecs).

The OpenSlide back end (:mod:`.openslide_backend`) uses it as a fast path for Aperio, generic
tiled TIFF and other files whose TIFF pages are OpenSlide's levels: each tile's bytes are read
with ``os.pread`` and decoded by tifffile's page decoder, with a small LRU cache of decoded
tiles. The back end checks the pixels against OpenSlide on every open before using it.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from napari_pathoseg.errors import SlideError
from napari_pathoseg.wsi.levels import composite_white

__all__ = ["TiffTiles", "direct_tiles_for"]


class TiffTiles:
    """Thread-safe direct decoding of a tiled TIFF level's tiles (tifffile + imagecodecs).

    Reads each tile's bytes with ``os.pread`` (no shared file position, so any number of
    dask threads may read at once) and decodes them with tifffile's page decoder. For
    JPEG-tiled scans this is several times faster than going through OpenSlide, and the
    pixels are identical (checked on every open against OpenSlide or tifffile itself).
    """

    #: Decoded tiles kept for re-use (OpenSlide keeps a cache of the same size).
    CACHE_BYTES = 32 * 1024 * 1024

    def __init__(self, path: Path, pages: Sequence[Any]) -> None:
        self.path = path
        self.pages = list(pages)
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()
        self.fd = os.open(str(path), os.O_RDONLY)
        self.tiles = [(int(p.tilelength), int(p.tilewidth)) for p in self.pages]
        self.across = [int(math.ceil(p.imagewidth / p.tilewidth)) for p in self.pages]

    @staticmethod
    def usable(pages: Sequence[Any]) -> bool:
        """Whether every page is a tiled, chunky, 8-bit RGB(A) page this class decodes (not NDPI)."""
        for p in pages:
            if not p.is_tiled or p.dtype != np.uint8 or p.samplesperpixel not in (3, 4):
                return False
            if p.planarconfig != 1 or getattr(p, "imagedepth", 1) != 1:
                return False
            if getattr(p, "is_ndpi", False):
                return False
        return True

    def tile(self, level: int, ti: int, tj: int) -> np.ndarray:
        """Decoded tile (ti, tj) of ``level`` as (th, tw, 3) uint8 (edge tiles uncropped, read-only)."""
        key = (level, ti, tj)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        seg = self._decode(level, ti, tj)
        seg.flags.writeable = False
        with self._lock:
            if key not in self._cache:
                self._cache[key] = seg
                self._cache_bytes += seg.nbytes
                while self._cache_bytes > self.CACHE_BYTES and self._cache:
                    _, old = self._cache.popitem(last=False)
                    self._cache_bytes -= old.nbytes
        return seg

    def _decode(self, level: int, ti: int, tj: int) -> np.ndarray:
        page = self.pages[level]
        idx = ti * self.across[level] + tj
        nbytes = int(page.databytecounts[idx])
        th, tw = self.tiles[level]
        if nbytes == 0:  # sparse tile: nothing scanned there
            return np.full((th, tw, 3), 255, np.uint8)
        data = os.pread(self.fd, nbytes, int(page.dataoffsets[idx]))
        if len(data) != nbytes:
            raise SlideError(f"{self.path}: tile {idx} of level {level} is cut short; the file is truncated")
        try:
            seg, _, _ = page.decode(data, idx, jpegtables=page.jpegtables)
        except Exception as exc:  # noqa: BLE001 - codecs raise many types
            raise SlideError(f"{self.path}: tile {idx} of level {level} cannot be decoded ({exc}); the file is corrupt") from exc
        if seg is None:
            raise SlideError(f"{self.path}: tile {idx} of level {level} cannot be decoded; the file is corrupt")
        seg = np.asarray(seg).reshape(seg.shape[-3:])
        if seg.shape[2] == 4:
            seg = composite_white(seg)
        return seg

    def read(self, level: int, row: int, col: int, height: int, width: int) -> np.ndarray:
        """A window of ``level`` (inside the level) assembled from its tiles."""
        th, tw = self.tiles[level]
        if row % th == 0 and col % tw == 0 and height <= th and width <= tw:
            t = self.tile(level, row // th, col // tw)
            return t[:height, :width].copy()
        out = np.empty((height, width, 3), np.uint8)
        for ti in range(row // th, (row + height - 1) // th + 1):
            for tj in range(col // tw, (col + width - 1) // tw + 1):
                t = self.tile(level, ti, tj)
                r0, c0 = max(row, ti * th), max(col, tj * tw)
                r1, c1 = min(row + height, (ti + 1) * th), min(col + width, (tj + 1) * tw)
                out[r0 - row : r1 - row, c0 - col : c1 - col] = t[r0 - ti * th : r1 - ti * th, c0 - tj * tw : c1 - tj * tw]
        return out

    def close(self) -> None:
        """Close the file descriptor; tiles cannot be decoded afterwards."""
        try:
            os.close(self.fd)
        except OSError:
            pass


def direct_tiles_for(path: Path, dims: Sequence[tuple[int, int]]) -> tuple[TiffTiles, Any] | None:
    """A :class:`TiffTiles` for the file levels of ``dims`` when the TIFF layout allows it."""
    import tifffile

    try:
        tif = tifffile.TiffFile(str(path))
    except Exception:  # noqa: BLE001 - not a TIFF (e.g. MIRAX): use OpenSlide
        return None
    try:
        levels = list(tif.series[0].levels) if tif.series else []
        pages = [lv.keyframe for lv in levels]
        if len(pages) < len(dims) or not TiffTiles.usable(pages[: len(dims)]):
            tif.close()
            return None
        for pg, (w, h) in zip(pages, dims):
            if (int(pg.imagewidth), int(pg.imagelength)) != (w, h):
                tif.close()
                return None
        return TiffTiles(path, pages[: len(dims)]), tif
    except Exception:  # noqa: BLE001
        tif.close()
        return None
