"""The OpenSlide back end: Aperio, Hamamatsu, MIRAX, Leica, Ventana, Philips, generic TIFF.

:func:`open_openslide` returns None for files OpenSlide does not recognise (the caller then
tries tifffile). For plain tiled TIFFs whose pages are OpenSlide's levels it decodes the tiles
directly (:mod:`.tiff_tiles`, several times faster for JPEG tiles), after checking on a tile of
the first and last level that the pixels match OpenSlide's; otherwise every read goes through
OpenSlide. Levels coarser than the file's are added lazily (2x means).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from napari_pathoseg.errors import SlideError
from napari_pathoseg.wsi.levels import DEFAULT_CHUNK, composite_white, grid_array, lazy_levels
from napari_pathoseg.wsi.metadata import SlideMetadata, SlideParts, check_dimensions, float_or_none
from napari_pathoseg.wsi.tiff_tiles import TiffTiles, direct_tiles_for

__all__ = ["open_openslide"]

logger = logging.getLogger(__name__)


def _same_pixels(tiles: TiffTiles, os_read: Callable[..., np.ndarray], dims: Sequence[tuple[int, int]]) -> bool:
    """Whether direct decoding matches OpenSlide on a central tile of the first and last level."""
    for level in {0, len(dims) - 1}:
        w, h = dims[level]
        th, tw = tiles.tiles[level]
        r = min((h // 2) // th * th, max(0, h - 1))
        c = min((w // 2) // tw * tw, max(0, w - 1))
        hh, ww = min(th, h - r), min(tw, w - c)
        a = tiles.read(level, r, c, hh, ww).astype(np.int16)
        b = os_read(level, r, c, hh, ww).astype(np.int16)
        if np.abs(a - b).max() > 2:
            return False
    return True


def open_openslide(path: Path) -> SlideParts | None:
    """Open ``path`` with OpenSlide; None when OpenSlide does not recognise the file.

    Raises
    ------
    SlideError
        OpenSlide recognises the format but cannot open the file, or its dimensions are absurd.
    """
    import openslide

    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except Exception:  # noqa: BLE001 - detect_format raises on unreadable files
        vendor = None
    if vendor is None:
        return None
    try:
        osr = openslide.OpenSlide(str(path))
    except openslide.OpenSlideError as exc:
        raise SlideError(f"{path}: OpenSlide cannot open this {vendor} file ({exc}); it may be truncated or corrupt") from exc
    props = dict(osr.properties)
    dims = [tuple(map(int, d)) for d in osr.level_dimensions]
    try:
        check_dimensions(path, dims)
    except SlideError:
        osr.close()
        raise
    downs = [float(d) for d in osr.level_downsamples]
    lock = threading.Lock()  # OpenSlide is thread safe; the lock only guards close()

    def tile_of(level: int) -> tuple[int, int]:
        tw = int(props.get(f"openslide.level[{level}].tile-width", 0) or 0)
        th = int(props.get(f"openslide.level[{level}].tile-height", 0) or 0)
        if tw < 64 or th < 64 or tw > 4096 or th > 4096:
            # no tile grid, or strips (NDPI): use square chunks
            return (DEFAULT_CHUNK, DEFAULT_CHUNK)
        # very small file tiles make napari issue too many requests: use a multiple
        k = max(1, DEFAULT_CHUNK // max(tw, th)) if max(tw, th) < 256 else 1
        return (th * k, tw * k)

    def os_read(level: int, row: int, col: int, height: int, width: int) -> np.ndarray:
        ds = downs[level]
        x0 = int(round(col * ds))
        y0 = int(round(row * ds))
        try:
            region = osr.read_region((x0, y0), level, (width, height))
        except openslide.OpenSlideError as exc:
            raise SlideError(f"{path}: reading level {level} at row {row}, col {col} failed: {exc}") from exc
        return composite_white(np.asarray(region))

    # Fast path: decode the TIFF tiles directly when the file is a plain tiled TIFF whose
    # levels are OpenSlide's levels (Aperio, generic TIFF...), verified pixel for pixel.
    direct = direct_tiles_for(path, dims)
    if direct is not None:
        tiles, tif = direct
        tif_close = tif.close
        try:
            ok = _same_pixels(tiles, os_read, dims)
        except SlideError:
            ok = False
        if not ok:
            logger.info("%s: direct tile decoding differs from OpenSlide; using OpenSlide", path)
            tiles.close()
            tif_close()
            direct = None
    read = tiles.read if direct is not None else os_read

    def chunk_of(level: int) -> tuple[int, int]:
        if direct is not None:
            return tiles.tiles[level]
        return tile_of(level)

    levels = []
    for lvl, (w, h) in enumerate(dims):
        levels.append(
            grid_array(
                lambda r, c, hh, ww, _l=lvl: read(_l, r, c, hh, ww),
                shape=(h, w),
                chunk=chunk_of(lvl),
                name=f"slide-{path.name}-{lvl}-{os.stat(path).st_mtime_ns}",
            )
        )
    # lazy extra levels below the file's coarsest one
    extra = lazy_levels(levels[-1])[1:]
    for e in extra:
        levels.append(e)
        downs.append(dims[0][1] / e.shape[0])
        dims.append((int(e.shape[1]), int(e.shape[0])))
    n_file_levels = len(osr.level_dimensions)

    def reader(level: int, row: int, col: int, height: int, width: int) -> np.ndarray:
        if level < n_file_levels:
            return read(level, row, col, height, width)
        return np.asarray(levels[level][row : row + height, col : col + width].compute(scheduler="sync"))

    def associated(name: str) -> np.ndarray:
        return composite_white(np.asarray(osr.associated_images[name]))

    def closer() -> None:
        with lock:
            osr.close()
            if direct is not None:
                tiles.close()
                tif_close()

    meta = SlideMetadata(
        path=str(path),
        format=vendor,
        vendor=props.get("openslide.vendor", vendor),
        level_dimensions=tuple(dims),
        level_downsamples=tuple(downs),
        mpp_x=float_or_none(props.get("openslide.mpp-x")),
        mpp_y=float_or_none(props.get("openslide.mpp-y")),
        objective_power=float_or_none(props.get("openslide.objective-power")),
        bounds_x=int(props.get("openslide.bounds-x", 0) or 0),
        bounds_y=int(props.get("openslide.bounds-y", 0) or 0),
        associated_images=tuple(sorted(osr.associated_images.keys())),
        tile_size=chunk_of(0) if "openslide.level[0].tile-width" in props else None,
        properties=props,
    )
    return SlideParts(metadata=meta, pyramid=levels, closer=closer, associated=associated, reader=reader)
