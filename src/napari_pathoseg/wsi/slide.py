"""Open whole-slide images as lazy dask multiscale pyramids with their metadata.

One entry point, :func:`open_slide`, serves every other part of the plugin. It picks a
back end by what the file is:

* OpenSlide (openslide-python with the openslide-bin wheel) for Aperio .svs, Hamamatsu
  .ndpi/.vms, MIRAX .mrxs, Leica .scn, Ventana .bif, Philips and generic tiled TIFF;
* tifffile for OME-TIFF and the TIFFs OpenSlide refuses;
* Pillow for plain PNG/JPEG images (with lazily computed coarser levels).

Every level of :attr:`Slide.pyramid` is a ``dask.array.Array`` of shape
``(rows, cols, 3)`` and dtype ``uint8`` (RGB, alpha composited onto white), chunked on
the file's own tile grid where it has one. Nothing reads a whole level eagerly.

Examples
--------
>>> from napari_pathoseg.wsi.slide import open_slide, sample_slide_path
>>> with open_slide(sample_slide_path()) as slide:
...     slide.metadata.format, slide.pyramid[0].shape
('aperio', (2967, 2220, 3))
"""

from __future__ import annotations

import logging
import math
import os
import struct
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import dask.array as da
import numpy as np

from napari_pathoseg.errors import SlideError

__all__ = [
    "SLIDE_EXTENSIONS",
    "OPENSLIDE_EXTENSIONS",
    "IMAGE_EXTENSIONS",
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

#: Largest side length accepted, in pixels (about 4x the largest scanners' output).
MAX_SIDE = 2_000_000
#: Levels are added lazily by 2x down-sampling until the coarsest is at most this size.
COARSEST_SIDE = 1024
#: Chunk size for images without a tile grid.
DEFAULT_CHUNK = 512


def sample_slide_path() -> Path:
    """Path of the bundled sample slide ``CMU-1-Small-Region.svs`` (CC0, 20x, 0.499 µm/px)."""
    return Path(__file__).resolve().parents[1] / "data" / "CMU-1-Small-Region.svs"


def is_slide_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` has an extension :func:`open_slide` handles."""
    name = str(path).lower()
    return name.endswith(SLIDE_EXTENSIONS)


@dataclass(frozen=True)
class SlideMetadata:
    """What is known of a slide.

    Attributes
    ----------
    path : str
        The file.
    format : str
        ``openslide`` vendor name (``aperio``, ``hamamatsu``, ``generic-tiff``...),
        ``ome-tiff``, ``tiff``, ``image`` or ``array``.
    vendor : str or None
        Scanner vendor when known.
    level_dimensions : tuple of (width, height)
        Size of each level, level 0 first.
    level_downsamples : tuple of float
        Down-sample factor of each level relative to level 0.
    mpp_x, mpp_y : float or None
        Micrometres per level-0 pixel, None when unknown.
    objective_power : float or None
        Scanning objective magnification.
    bounds_x, bounds_y : int
        OpenSlide bounds offset of the non-empty region (QuPath crops to it), 0 if none.
    associated_images : tuple of str
        Names of label/macro/thumbnail images.
    tile_size : tuple of (rows, cols) or None
        The file's own tile grid at level 0.
    properties : dict
        Raw vendor properties (strings).
    """

    path: str
    format: str
    vendor: str | None
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp_x: float | None = None
    mpp_y: float | None = None
    objective_power: float | None = None
    bounds_x: int = 0
    bounds_y: int = 0
    associated_images: tuple[str, ...] = ()
    tile_size: tuple[int, int] | None = None
    properties: dict[str, str] = field(default_factory=dict)

    @property
    def mpp(self) -> float | None:
        """Mean µm per level-0 pixel, None when unknown."""
        if self.mpp_x and self.mpp_y:
            return (self.mpp_x + self.mpp_y) / 2.0
        return self.mpp_x or self.mpp_y or None

    def to_dict(self, *, with_properties: bool = False) -> dict[str, Any]:
        """JSON-ready dictionary (``levels`` as ``{"width", "height", "downsample"}``)."""
        d = asdict(self)
        d["levels"] = [
            {"width": int(w), "height": int(h), "downsample": float(ds)}
            for (w, h), ds in zip(self.level_dimensions, self.level_downsamples)
        ]
        d["level_dimensions"] = [list(x) for x in self.level_dimensions]
        d["level_downsamples"] = list(self.level_downsamples)
        d["associated_images"] = list(self.associated_images)
        d["tile_size"] = list(self.tile_size) if self.tile_size else None
        if not with_properties:
            d.pop("properties")
        return d


def _composite_white(rgba: np.ndarray) -> np.ndarray:
    """(r, c, 4) uint8 RGBA -> (r, c, 3) uint8 RGB over white."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.float32) / 255.0
    out = rgb.astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _to_rgb_uint8(arr: np.ndarray, *, source: str) -> np.ndarray:
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
        return _composite_white(arr)
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    if arr.shape[2] != 3:
        raise SlideError(f"{source}: expected 3 colour channels, got {arr.shape[2]}")
    return arr


def _downsample2(block: np.ndarray) -> np.ndarray:
    """2x2 mean of a (r, c, 3) uint8 block (odd edge rows/cols are replicated)."""
    r, c = block.shape[:2]
    if r % 2 or c % 2:
        block = np.pad(block, ((0, r % 2), (0, c % 2), (0, 0)), mode="edge")
    b = block.astype(np.uint16)
    s = b[0::2, 0::2] + b[1::2, 0::2] + b[0::2, 1::2] + b[1::2, 1::2]
    return ((s + 2) // 4).astype(np.uint8)


def _lazy_levels(level0: da.Array, *, coarsest: int = COARSEST_SIDE) -> list[da.Array]:
    """Add coarser levels, each a lazy 2x mean of the previous, until max side <= coarsest."""
    levels = [level0]
    cur = level0
    while max(cur.shape[:2]) > coarsest:
        # keep chunks even-sized so that each output chunk comes from one input chunk
        ch = [max(2, (c // 2) * 2) for c in (cur.chunksize[0], cur.chunksize[1])]
        cur = cur.rechunk((ch[0] * 2 if ch[0] < DEFAULT_CHUNK else ch[0], ch[1] * 2 if ch[1] < DEFAULT_CHUNK else ch[1], 3))
        nxt = cur.map_blocks(
            _downsample2,
            dtype=np.uint8,
            chunks=tuple(tuple((c + 1) // 2 for c in dim) for dim in cur.chunks[:2]) + ((3,),),
        )
        levels.append(nxt)
        cur = nxt
    return levels


def _grid_array(
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
        arr = array
        if not isinstance(arr, da.Array):
            arr = _to_rgb_uint8(np.asarray(arr), source=name)
            arr = da.from_array(arr, chunks=(chunk, chunk, 3))
        elif arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise SlideError(f"{name}: expected a (rows, cols, 3) uint8 array, got {arr.shape} {arr.dtype}")
        levels = _lazy_levels(arr)
        meta = SlideMetadata(
            path=name,
            format="array",
            vendor=None,
            level_dimensions=tuple((int(l.shape[1]), int(l.shape[0])) for l in levels),
            level_downsamples=tuple(float(arr.shape[0]) / float(l.shape[0]) for l in levels),
            mpp_x=mpp,
            mpp_y=mpp,
        )
        return cls(metadata=meta, pyramid=levels)

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
        if height <= 0 or width <= 0:
            raise SlideError(f"read_region: height and width must be positive, got {height}x{width}")
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


# ---------------------------------------------------------------------- helpers


def _float_or_none(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _check_dimensions(path: Path, dims: Sequence[tuple[int, int]]) -> None:
    if not dims:
        raise SlideError(f"{path}: the file has no image levels")
    w, h = dims[0]
    if w <= 0 or h <= 0 or w > MAX_SIDE or h > MAX_SIDE:
        raise SlideError(
            f"{path}: the file claims absurd dimensions {w} x {h} pixels "
            f"(accepted: 1..{MAX_SIDE} per side); it is corrupt or not a slide"
        )


def _check_file(path: Path) -> None:
    if not path.exists():
        raise SlideError(f"{path}: no such file")
    if path.is_dir():
        raise SlideError(f"{path}: is a directory, not a slide file")
    size = path.stat().st_size
    if size == 0:
        raise SlideError(f"{path}: the file is empty (0 bytes)")


# ---------------------------------------------------------------------- direct TIFF tiles


class _TiffTiles:
    """Thread-safe direct decoding of a tiled TIFF level's tiles (tifffile + imagecodecs).

    Reads each tile's bytes with ``os.pread`` (no shared file position, so any number of
    dask threads may read at once) and decodes them with tifffile's page decoder. For
    JPEG-tiled scans this is several times faster than going through OpenSlide, and the
    pixels are identical (checked on every open against OpenSlide or tifffile itself).
    """

    #: Decoded tiles kept for re-use (OpenSlide keeps a cache of the same size).
    CACHE_BYTES = 32 * 1024 * 1024

    def __init__(self, path: Path, pages: Sequence[Any]) -> None:
        from collections import OrderedDict

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
            seg = _composite_white(seg)
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
        try:
            os.close(self.fd)
        except OSError:
            pass


def _direct_tiles_for(path: Path, dims: Sequence[tuple[int, int]]) -> tuple[_TiffTiles, Any] | None:
    """A :class:`_TiffTiles` for the file levels of ``dims`` when the TIFF layout allows it."""
    import tifffile

    try:
        tif = tifffile.TiffFile(str(path))
    except Exception:  # noqa: BLE001 - not a TIFF (e.g. MIRAX): use OpenSlide
        return None
    try:
        levels = list(tif.series[0].levels) if tif.series else []
        pages = [lv.keyframe for lv in levels]
        if len(pages) < len(dims) or not _TiffTiles.usable(pages[: len(dims)]):
            tif.close()
            return None
        for pg, (w, h) in zip(pages, dims):
            if (int(pg.imagewidth), int(pg.imagelength)) != (w, h):
                tif.close()
                return None
        return _TiffTiles(path, pages[: len(dims)]), tif
    except Exception:  # noqa: BLE001
        tif.close()
        return None


# ---------------------------------------------------------------------- OpenSlide


def _same_pixels(tiles: _TiffTiles, os_read: Callable[..., np.ndarray], dims: Sequence[tuple[int, int]]) -> bool:
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


def _open_openslide(path: Path) -> Slide | None:
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
        _check_dimensions(path, dims)
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
        return _composite_white(np.asarray(region))

    # Fast path: decode the TIFF tiles directly when the file is a plain tiled TIFF whose
    # levels are OpenSlide's levels (Aperio, generic TIFF...), verified pixel for pixel.
    direct = _direct_tiles_for(path, dims)
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
            _grid_array(
                lambda r, c, hh, ww, _l=lvl: read(_l, r, c, hh, ww),
                shape=(h, w),
                chunk=chunk_of(lvl),
                name=f"slide-{path.name}-{lvl}-{os.stat(path).st_mtime_ns}",
            )
        )
    # lazy extra levels below the file's coarsest one
    extra = _lazy_levels(levels[-1])[1:]
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
        return _composite_white(np.asarray(osr.associated_images[name]))

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
        mpp_x=_float_or_none(props.get("openslide.mpp-x")),
        mpp_y=_float_or_none(props.get("openslide.mpp-y")),
        objective_power=_float_or_none(props.get("openslide.objective-power")),
        bounds_x=int(props.get("openslide.bounds-x", 0) or 0),
        bounds_y=int(props.get("openslide.bounds-y", 0) or 0),
        associated_images=tuple(sorted(osr.associated_images.keys())),
        tile_size=chunk_of(0) if "openslide.level[0].tile-width" in props else None,
        properties=props,
    )
    slide = Slide(metadata=meta, pyramid=levels, closer=closer, associated=associated, reader=reader)
    _validate_readable(slide)
    return slide


# ---------------------------------------------------------------------- tifffile


def _tiff_mpp(tif: Any, page: Any) -> tuple[float | None, float | None]:
    """µm/px from OME PhysicalSize or TIFF resolution tags."""
    if tif.is_ome and tif.ome_metadata:
        import xml.etree.ElementTree as ET

        try:
            root = ET.fromstring(tif.ome_metadata)
            for el in root.iter():
                if el.tag.endswith("Pixels"):
                    unit_x = el.get("PhysicalSizeXUnit", "µm")
                    fx = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit_x, 1.0)
                    unit_y = el.get("PhysicalSizeYUnit", "µm")
                    fy = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit_y, 1.0)
                    x = _float_or_none(el.get("PhysicalSizeX"))
                    y = _float_or_none(el.get("PhysicalSizeY"))
                    return (x * fx if x else None, y * fy if y else None)
        except ET.ParseError:
            logger.warning("%s: unreadable OME-XML; resolution unknown", tif.filehandle.path)
    tags = page.tags
    unit = tags.get("ResolutionUnit")
    unit_v = int(unit.value) if unit is not None else 2
    per_um = {2: 25400.0, 3: 10000.0}.get(unit_v)  # inch, cm
    if per_um is None:
        return (None, None)
    out = []
    for name in ("XResolution", "YResolution"):
        tag = tags.get(name)
        if tag is None:
            out.append(None)
            continue
        num, den = tag.value if isinstance(tag.value, tuple) else (tag.value, 1)
        res = _float_or_none(num / den if den else None)
        # 1 px/unit (or 72 dpi) is a writer default, not a physical resolution
        if res is None or res <= 1.0 or (unit_v == 2 and abs(res - 72) < 1e-6):
            out.append(None)
        else:
            out.append(per_um / res)
    return (out[0], out[1])


def _open_tifffile(path: Path) -> Slide:
    import tifffile
    import zarr

    try:
        tif = tifffile.TiffFile(str(path))
    except (tifffile.TiffFileError, ValueError, OSError, struct.error) as exc:
        raise SlideError(f"{path}: not a readable TIFF ({exc}); the file is corrupt, truncated or not a slide") from exc
    try:
        if not tif.series:
            raise SlideError(f"{path}: the TIFF holds no image")
        series = tif.series[0]
        levels_src = list(series.levels)
        page0 = levels_src[0].keyframe
        shape0 = levels_src[0].shape
        axes = levels_src[0].axes
        if "S" not in axes and len(shape0) != 2:
            raise SlideError(f"{path}: unsupported TIFF layout (axes {axes!r}); expected an RGB image")
        dims = []
        for lv in levels_src:
            ax = lv.axes
            h = lv.shape[ax.index("Y")]
            w = lv.shape[ax.index("X")]
            dims.append((int(w), int(h)))
        _check_dimensions(path, dims)
        if page0.dtype != np.uint8:
            raise SlideError(
                f"{path}: pixel type {page0.dtype} is not supported (8-bit RGB brightfield slides only)"
            )
        arrays = []
        for i, lv in enumerate(levels_src):
            store = tif.aszarr(series=0, level=i)
            z = zarr.open(store, mode="r")
            a = da.from_zarr(z)
            ax = lv.axes
            # squeeze to Y X S
            for name in [c for c in ax if c not in "YXS"]:
                idx = ax.index(name)
                if a.shape[idx] != 1:
                    a = da.take(a, 0, axis=idx)
                else:
                    a = a.squeeze(axis=idx)
                ax = ax.replace(name, "")
            if "S" not in ax:
                a = da.stack([a, a, a], axis=-1)
            elif ax.index("S") == 0:
                a = da.moveaxis(a, 0, -1)
            if a.shape[-1] == 4:
                a = a.map_blocks(_composite_white, dtype=np.uint8, chunks=a.chunks[:2] + ((3,),))
            elif a.shape[-1] != 3:
                raise SlideError(f"{path}: expected RGB, got {a.shape[-1]} samples per pixel")
            arrays.append(a)
        base_levels = len(arrays)
        extra = _lazy_levels(arrays[-1])[1:]
        arrays.extend(extra)
        for e in extra:
            dims.append((int(e.shape[1]), int(e.shape[0])))
        mpp_x, mpp_y = _tiff_mpp(tif, page0)
        tile = (int(page0.tilelength), int(page0.tilewidth)) if page0.is_tiled else None
        assoc: dict[str, int] = {}
        for k, s in enumerate(tif.series[1:], start=1):
            if s.name and s.name.lower() in ("label", "macro", "thumbnail"):
                assoc[s.name.lower()] = k
        fmt = "ome-tiff" if tif.is_ome else ("svs" if tif.is_svs else "tiff")
        props = {}
        desc = page0.description
        if desc:
            props["tiff.ImageDescription"] = desc[:2000]
    except SlideError:
        tif.close()
        raise
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types on corrupt files
        tif.close()
        raise SlideError(f"{path}: cannot read this TIFF ({type(exc).__name__}: {exc})") from exc

    def associated(name: str) -> np.ndarray:
        return _to_rgb_uint8(tif.series[assoc[name]].asarray(), source=f"{path}:{name}")

    downs = tuple(dims[0][1] / float(h) for (_, h) in dims)
    meta = SlideMetadata(
        path=str(path),
        format=fmt,
        vendor="ome" if tif.is_ome else None,
        level_dimensions=tuple(dims),
        level_downsamples=downs,
        mpp_x=mpp_x,
        mpp_y=mpp_y,
        objective_power=None,
        associated_images=tuple(sorted(assoc)),
        tile_size=tile,
        properties=props,
    )
    logger.debug("%s: %d file levels, %d computed", path, base_levels, len(extra))
    slide = Slide(metadata=meta, pyramid=arrays, closer=tif.close, associated=associated)
    _validate_readable(slide)
    return slide


# ---------------------------------------------------------------------- plain images


def _open_image(path: Path) -> Slide:
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = 4 * 10**9  # we check dimensions ourselves
    try:
        with Image.open(path) as im:
            w, h = im.size
            _check_dimensions(path, [(w, h)])
            dpi = im.info.get("dpi")
            im.load()
            if im.mode in ("I;16", "I;16B", "I", "F"):
                raise SlideError(f"{path}: {im.mode} images are not supported (8-bit RGB only)")
            rgb = np.asarray(im.convert("RGBA") if im.mode in ("RGBA", "LA", "P") else im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise SlideError(f"{path}: not a readable image ({exc}); the file is corrupt, truncated or not an image") from exc
    rgb = _to_rgb_uint8(rgb, source=str(path))
    mpp = None
    if dpi and dpi[0] and dpi[0] > 72.5:  # 72/96 dpi are writer defaults, not scans
        mpp = 25400.0 / float(dpi[0]) if dpi[0] not in (96, 96.0) else None
    slide = Slide.from_array(rgb, mpp=mpp, name=str(path))
    meta = SlideMetadata(
        **{**asdict(slide.metadata), "path": str(path), "format": "image"}  # type: ignore[arg-type]
    )
    return Slide(metadata=meta, pyramid=slide.pyramid)


# ---------------------------------------------------------------------- entry point


def _validate_readable(slide: Slide) -> None:
    """Decode one tile at the end of level 0 and the coarsest file level (catches truncation)."""
    rows, cols = slide.shape
    try:
        slide.read_region(level=0, row=max(0, rows - 16), col=max(0, cols - 16), height=16, width=16)
        slide.read_region(level=0, row=0, col=0, height=16, width=16)
    except SlideError:
        slide.close()
        raise
    except Exception as exc:  # noqa: BLE001 - decoder errors come in many types
        slide.close()
        raise SlideError(
            f"{slide.metadata.path}: the pixel data cannot be decoded ({type(exc).__name__}: {exc}); "
            "the file is truncated or corrupt"
        ) from exc


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
        return _open_image(path)
    if not name.endswith(SLIDE_EXTENSIONS):
        raise SlideError(
            f"{path}: unsupported file type; supported: {', '.join(SLIDE_EXTENSIONS)}"
        )
    is_ome = name.endswith((".ome.tif", ".ome.tiff"))
    if not is_ome:
        slide = _open_openslide(path)
        if slide is not None:
            return slide
    if name.endswith(TIFF_EXTENSIONS) or name.endswith((".svs", ".scn", ".bif", ".ndpi")):
        return _open_tifffile(path)
    raise SlideError(f"{path}: OpenSlide does not recognise this file as a {path.suffix} slide; it is corrupt or not a slide")
