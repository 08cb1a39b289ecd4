"""The plain-image back end: PNG and JPEG files as one-level slides (Pillow).

The image is decoded once into memory; coarser levels are computed lazily by 2x averaging.
A DPI above the 72/96 writer defaults is taken as a scan resolution.
"""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np

from napari_pathoseg.errors import SlideError
from napari_pathoseg.wsi.levels import DEFAULT_CHUNK, lazy_levels, to_rgb_uint8
from napari_pathoseg.wsi.metadata import SlideMetadata, SlideParts, check_dimensions

__all__ = ["MAX_IMAGE_PIXELS", "array_parts", "open_image"]

#: Plain PNG/JPEG images are decoded whole: larger ones are refused with their size (~1.2 GB RGB).
MAX_IMAGE_PIXELS = 400_000_000


def array_parts(
    array: np.ndarray | da.Array,
    *,
    mpp: float | None = None,
    name: str = "array",
    fmt: str = "array",
    chunk: int = DEFAULT_CHUNK,
) -> SlideParts:
    """An in-memory or dask ``(rows, cols, 3)`` uint8 image as slide parts (lazy 2x levels).

    Raises
    ------
    SlideError
        The array is not an RGB(A) uint8 image.
    """
    arr = array
    shape = tuple(getattr(arr, "shape", ()))
    if len(shape) < 2 or shape[0] < 1 or shape[1] < 1:
        raise SlideError(f"{name}: an image needs at least 1 x 1 pixels, got shape {shape}")
    check_dimensions(name, [(int(shape[1]), int(shape[0]))])
    if not isinstance(arr, da.Array):
        arr = to_rgb_uint8(np.asarray(arr), source=name)
        arr = da.from_array(arr, chunks=(chunk, chunk, 3))
    elif arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise SlideError(f"{name}: expected a (rows, cols, 3) uint8 array, got {arr.shape} {arr.dtype}")
    levels = lazy_levels(arr)
    meta = SlideMetadata(
        path=name,
        format=fmt,
        vendor=None,
        level_dimensions=tuple((int(lv.shape[1]), int(lv.shape[0])) for lv in levels),
        level_downsamples=tuple(float(arr.shape[0]) / float(lv.shape[0]) for lv in levels),
        mpp_x=mpp,
        mpp_y=mpp,
    )
    return SlideParts(metadata=meta, pyramid=levels)


def open_image(path: Path) -> SlideParts:
    """Decode a PNG or JPEG file into slide parts.

    Raises
    ------
    SlideError
        The file is not a readable image, is not 8-bit, or claims absurd dimensions.
    """
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # sizes are checked here, before decoding (MAX_IMAGE_PIXELS)
    try:
        with Image.open(path) as im:
            w, h = im.size
            check_dimensions(path, [(w, h)])
            if w * h > MAX_IMAGE_PIXELS:
                raise SlideError(
                    f"{path}: a plain {path.suffix.lstrip('.').upper()} image of {w} x {h} pixels is too large to open "
                    f"(it would be decoded whole; limit {MAX_IMAGE_PIXELS // 10**6} megapixels); "
                    "convert it to a tiled pyramidal TIFF (e.g. `pathoseg normalize` or vips tiffsave --tile --pyramid)"
                )
            dpi = im.info.get("dpi")
            im.load()
            if im.mode in ("I;16", "I;16B", "I", "F"):
                raise SlideError(f"{path}: {im.mode} images are not supported (8-bit RGB only)")
            rgb = np.asarray(im.convert("RGBA") if im.mode in ("RGBA", "LA", "P") else im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError, MemoryError) as exc:
        raise SlideError(f"{path}: not a readable image ({exc}); the file is corrupt, truncated or not an image") from exc
    rgb = to_rgb_uint8(rgb, source=str(path))
    mpp = None
    if dpi and dpi[0] and dpi[0] > 72.5:  # 72/96 dpi are writer defaults, not scans
        mpp = 25400.0 / float(dpi[0]) if dpi[0] not in (96, 96.0) else None
    return array_parts(rgb, mpp=mpp, name=str(path), fmt="image")
