"""Open whole-slide images as lazy dask multiscale pyramids with their metadata.

One entry point, :func:`open_slide`, serves every other part of the plugin. It picks a
back end by what the file is:

* OpenSlide (openslide-python with the openslide-bin wheel) for Aperio .svs, Hamamatsu
  .ndpi/.vms, MIRAX .mrxs, Leica .scn, Ventana .bif, Philips and generic tiled TIFF
  (:mod:`.openslide_backend`, with direct tile decoding from :mod:`.tiff_tiles`);
* tifffile for OME-TIFF and the TIFFs OpenSlide refuses (:mod:`.tifffile_backend`);
* Pillow for plain PNG/JPEG images, with lazily computed coarser levels
  (:mod:`.image_backend`).

Every level of :attr:`Slide.pyramid` is a ``dask.array.Array`` of shape
``(rows, cols, 3)`` and dtype ``uint8`` (RGB, alpha composited onto white), chunked on
the file's own tile grid where it has one (:mod:`.levels`). Nothing reads a whole level
eagerly. :class:`SlideMetadata` lives in :mod:`.metadata`.

Examples
--------
>>> from napari_pathoseg.wsi.slide import open_slide, sample_slide_path
>>> with open_slide(sample_slide_path()) as slide:
...     slide.metadata.format, slide.pyramid[0].shape
('aperio', (2967, 2220, 3))
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import dask.array as da
import numpy as np

from napari_pathoseg.errors import SlideError
from napari_pathoseg.wsi.image_backend import array_parts, open_image
from napari_pathoseg.wsi.levels import COARSEST_SIDE, DEFAULT_CHUNK
from napari_pathoseg.wsi.metadata import MAX_SIDE, SlideMetadata, SlideParts
from napari_pathoseg.wsi.openslide_backend import open_openslide
from napari_pathoseg.wsi.tifffile_backend import open_tifffile

__all__ = [
    "SLIDE_EXTENSIONS",
    "OPENSLIDE_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "MAX_SIDE",
    "SlideMetadata",
    "Slide",
    "open_slide",
    "sample_slide_path",
    "is_slide_path",
]

logger = logging.getLogger(__name__)

OPENSLIDE_EXTENSIONS = (".svs", ".ndpi", ".vms", ".vmu", ".mrxs", ".scn", ".bif", ".svslide", ".tif", ".tiff")
TIFF_EXTENSIONS = (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".btf")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SLIDE_EXTENSIONS = tuple(sorted(set(OPENSLIDE_EXTENSIONS + TIFF_EXTENSIONS + IMAGE_EXTENSIONS)))
#: Largest window :meth:`Slide.read_region` returns at once (pixels; ~0.8 GB RGB).
MAX_READ_PIXELS = 1 << 28


def sample_slide_path() -> Path:
    """Path of the bundled sample slide ``CMU-1-Small-Region.svs`` (CC0, 20x, 0.499 µm/px)."""
    return Path(__file__).resolve().parents[1] / "data" / "CMU-1-Small-Region.svs"


def is_slide_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` has an extension :func:`open_slide` handles."""
    name = str(path).lower()
    return name.endswith(SLIDE_EXTENSIONS)


class Slide:
    """An opened slide: metadata plus a lazy multiscale pyramid.

    Do not construct directly; use :func:`open_slide` or :meth:`Slide.from_array`.

    Attributes
    ----------
    metadata : SlideMetadata
    pyramid : list of dask.array.Array
        Level ``i`` is ``(rows, cols, 3)`` uint8, lazy.
    """

    def __init__(
        self,
        *,
        metadata: SlideMetadata,
        pyramid: Sequence[da.Array],
        closer: Callable[[], None] | None = None,
        associated: Callable[[str], np.ndarray] | None = None,
        reader: Callable[[int, int, int, int, int], np.ndarray] | None = None,
    ) -> None:
        self.metadata = metadata
        self.pyramid = list(pyramid)
        self._closer = closer
        self._associated = associated
        self._reader = reader
        self._closed = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_array(
        cls,
        array: np.ndarray | da.Array,
        *,
        mpp: float | None = None,
        name: str = "array",
        chunk: int = DEFAULT_CHUNK,
    ) -> "Slide":
        """Wrap an in-memory or dask ``(rows, cols, 3)`` uint8 image as a slide.

        Coarser levels are computed lazily by 2x averaging.

        Examples
        --------
        >>> import numpy as np
        >>> s = Slide.from_array(np.zeros((3000, 2000, 3), np.uint8), mpp=0.5)
        >>> [lvl.shape[:2] for lvl in s.pyramid]
        [(3000, 2000), (1500, 1000), (750, 500)]
        """
        return cls.from_parts(array_parts(array, mpp=mpp, name=name, chunk=chunk))

    @classmethod
    def from_parts(cls, parts: SlideParts) -> "Slide":
        """Wrap what a back end found in a file (see :class:`~napari_pathoseg.wsi.metadata.SlideParts`)."""
        return cls(
            metadata=parts.metadata,
            pyramid=parts.pyramid,
            closer=parts.closer,
            associated=parts.associated,
            reader=parts.reader,
        )

    # ------------------------------------------------------------------ properties
    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.pyramid)

    @property
    def mpp(self) -> float | None:
        """Mean µm per level-0 pixel, or None."""
        return self.metadata.mpp

    @property
    def shape(self) -> tuple[int, int]:
        """Level-0 (rows, cols)."""
        return tuple(self.pyramid[0].shape[:2])  # type: ignore[return-value]

    def level_downsample(self, level: int) -> float:
        """Down-sample factor of ``level`` relative to level 0."""
        self._check_level(level)
        return float(self.metadata.level_downsamples[level])

    def level_mpp(self, level: int) -> float | None:
        """µm per pixel at ``level`` (None when the slide's resolution is unknown)."""
        mpp = self.mpp
        return None if mpp is None else mpp * self.level_downsample(level)

    def best_level_for_downsample(self, downsample: float) -> int:
        """The finest level whose down-sample is <= ``downsample`` (never coarser than asked)."""
        best = 0
        for i, ds in enumerate(self.metadata.level_downsamples):
            if ds <= downsample * 1.001:
                best = i
        return best

    def _check_level(self, level: int) -> None:
        if not 0 <= level < len(self.pyramid):
            raise SlideError(
                f"{self.metadata.path}: level {level} does not exist (levels 0..{len(self.pyramid) - 1})"
            )

    # ------------------------------------------------------------------ reading
    def read_region(self, *, level: int, row: int, col: int, height: int, width: int) -> np.ndarray:
        """Read a window of ``level`` in that level's pixel coordinates.

        Parameters
        ----------
        level : int
        row, col : int
            Top-left corner in level pixels (may be negative / beyond the edge).
        height, width : int
            Window size.

        Returns
        -------
        (height, width, 3) uint8
            The pixels; area outside the slide is white (255).
        """
        self._check_level(level)
        row, col = _coordinate(row, "row"), _coordinate(col, "col")
        height, width = _coordinate(height, "height"), _coordinate(width, "width")
        if height <= 0 or width <= 0:
            raise SlideError(f"read_region: height and width must be positive, got {height}x{width}")
        if height * width > MAX_READ_PIXELS:
            raise SlideError(
                f"read_region: a {height} x {width} window is too large to read at once "
                f"(limit {MAX_READ_PIXELS // 10**6} megapixels); read it in tiles or at a coarser level"
            )
        if self._closed:
            raise SlideError(f"{self.metadata.path}: the slide is closed")
        arr = self.pyramid[level]
        rows, cols = arr.shape[:2]
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        r0, c0 = max(row, 0), max(col, 0)
        r1, c1 = min(row + height, rows), min(col + width, cols)
        if r1 <= r0 or c1 <= c0:
            return out
        if self._reader is not None:
            block = self._reader(level, r0, c0, r1 - r0, c1 - c0)
        else:
            block = np.asarray(arr[r0:r1, c0:c1].compute(scheduler="sync"))
        out[r0 - row : r1 - row, c0 - col : c1 - col] = block
        return out

    def thumbnail(self, *, max_size: int = 1024) -> np.ndarray:
        """A ``(r, c, 3)`` uint8 thumbnail whose longest side is at most ``max_size``."""
        from skimage.transform import resize

        # coarsest level that is still >= max_size on its longest side, else the coarsest
        level = len(self.pyramid) - 1
        for i in range(len(self.pyramid) - 1, -1, -1):
            if max(self.pyramid[i].shape[:2]) >= max_size:
                level = i
                break
        arr = self.pyramid[level]
        if max(arr.shape[:2]) > 4 * max(max_size, COARSEST_SIDE):
            raise SlideError(
                f"{self.metadata.path}: no level small enough for a thumbnail (coarsest {arr.shape[:2]})"
            )
        img = np.asarray(arr.compute())
        scale = max_size / max(img.shape[:2])
        if scale < 1:
            shape = (max(1, round(img.shape[0] * scale)), max(1, round(img.shape[1] * scale)))
            img = resize(img, shape, order=1, anti_aliasing=True, preserve_range=True)
            img = np.clip(img + 0.5, 0, 255).astype(np.uint8)
        return img

    def associated_image(self, name: str) -> np.ndarray:
        """An associated image (``label``, ``macro``, ``thumbnail``...) as (r, c, 3) uint8."""
        if name not in self.metadata.associated_images or self._associated is None:
            raise SlideError(
                f"{self.metadata.path}: no associated image {name!r}; "
                f"available: {list(self.metadata.associated_images)}"
            )
        return self._associated(name)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Release the file handle (the pyramid cannot be read afterwards)."""
        if not self._closed and self._closer is not None:
            self._closer()
        self._closed = True

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        m = self.metadata
        return (
            f"Slide({Path(m.path).name!r}, format={m.format!r}, levels={len(self.pyramid)}, "
            f"size={m.level_dimensions[0]}, mpp={m.mpp})"
        )


# ---------------------------------------------------------------------- entry point


def _coordinate(value: object, what: str) -> int:
    """``value`` as a Python int (numpy integers too, so they cannot wrap); SlideError for anything else."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (float, np.floating)) and np.isfinite(value) and float(value).is_integer():
        return int(value)
    raise SlideError(f"read_region: {what} must be a whole number of pixels, got {value!r}")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise SlideError(f"{path}: no such file")
    if path.is_dir():
        raise SlideError(f"{path}: is a directory, not a slide file")
    size = path.stat().st_size
    if size == 0:
        raise SlideError(f"{path}: the file is empty (0 bytes)")


def _validated(slide: Slide) -> Slide:
    """``slide`` once a tile at each end of level 0 decodes (catches truncation); closed if not."""
    rows, cols = slide.shape
    try:
        slide.read_region(level=0, row=max(0, rows - 16), col=max(0, cols - 16), height=16, width=16)
        slide.read_region(level=0, row=0, col=0, height=16, width=16)
        # the coarsest level is often stored last in the file: a truncated file fails here
        last = slide.level_count - 1
        if last:
            r, c = slide.pyramid[last].shape[:2]
            slide.read_region(level=last, row=max(0, r - 16), col=max(0, c - 16), height=16, width=16)
    except SlideError:
        slide.close()
        raise
    except Exception as exc:  # noqa: BLE001 - decoder errors come in many types
        slide.close()
        raise SlideError(
            f"{slide.metadata.path}: the pixel data cannot be decoded ({type(exc).__name__}: {exc}); "
            "the file is truncated or corrupt"
        ) from exc
    return slide


def open_slide(path: str | os.PathLike) -> Slide:
    """Open a whole-slide image or plain image as a lazy pyramid.

    Parameters
    ----------
    path : str or PathLike
        An Aperio .svs, Hamamatsu .ndpi, MIRAX .mrxs, Leica .scn, Ventana .bif, generic
        tiled TIFF, OME-TIFF, PNG or JPEG file.

    Returns
    -------
    Slide

    Raises
    ------
    SlideError
        When the file is missing, empty, truncated, corrupt, not a slide, not 8-bit RGB,
        or claims absurd dimensions. The message names the file and the problem.
    """
    path = Path(path)
    _check_file(path)
    name = path.name.lower()
    if name.endswith(IMAGE_EXTENSIONS):
        return Slide.from_parts(open_image(path))
    if not name.endswith(SLIDE_EXTENSIONS):
        raise SlideError(
            f"{path}: unsupported file type; supported: {', '.join(SLIDE_EXTENSIONS)}"
        )
    is_ome = name.endswith((".ome.tif", ".ome.tiff"))
    if not is_ome:
        parts = open_openslide(path)
        if parts is not None:
            return _validated(Slide.from_parts(parts))
    if name.endswith(TIFF_EXTENSIONS) or name.endswith((".svs", ".scn", ".bif", ".ndpi")):
        return _validated(Slide.from_parts(open_tifffile(path)))
    raise SlideError(f"{path}: OpenSlide does not recognise this file as a {path.suffix} slide; it is corrupt or not a slide")
