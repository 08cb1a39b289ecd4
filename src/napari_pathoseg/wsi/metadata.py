"""What is known of a slide (:class:`SlideMetadata`) and what a back end hands to it.

Every back end (:mod:`.openslide_backend`, :mod:`.tifffile_backend`, :mod:`.image_backend`)
turns a file into :class:`SlideParts`: metadata, the lazy level arrays and the hooks that
read, close and fetch associated images; :func:`napari_pathoseg.wsi.slide.open_slide` wraps
them in a :class:`~napari_pathoseg.wsi.slide.Slide`. The helpers here check what back ends
read from files (:func:`check_dimensions`, :func:`float_or_none`).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import dask.array as da
import numpy as np

from napari_pathoseg.errors import SlideError

__all__ = ["MAX_SIDE", "SlideMetadata", "SlideParts", "check_dimensions", "float_or_none"]

#: Largest side length accepted, in pixels (about 4x the largest scanners' output).
MAX_SIDE = 2_000_000


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


@dataclass
class SlideParts:
    """What a back end found in a file: everything :class:`~napari_pathoseg.wsi.slide.Slide` needs.

    Attributes
    ----------
    metadata : SlideMetadata
    pyramid : list of dask.array.Array
        Level ``i`` is ``(rows, cols, 3)`` uint8, lazy.
    closer : callable or None
        Releases the file handles.
    associated : callable or None
        ``associated(name) -> (r, c, 3) uint8`` for the names in ``metadata.associated_images``.
    reader : callable or None
        ``reader(level, row, col, height, width) -> (height, width, 3) uint8``, a window inside
        the level read without dask (faster for single windows); None reads the dask level.
    """

    metadata: SlideMetadata
    pyramid: Sequence[da.Array]
    closer: Callable[[], None] | None = None
    associated: Callable[[str], np.ndarray] | None = None
    reader: Callable[[int, int, int, int, int], np.ndarray] | None = None


def float_or_none(value: Any) -> float | None:
    """``value`` as a finite positive float, or None (missing, unparsable, zero, negative)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def check_dimensions(path: str | os.PathLike, dims: Sequence[tuple[int, int]]) -> None:
    """Refuse a file with no levels or a level-0 ``(width, height)`` outside 1..MAX_SIDE."""
    if not dims:
        raise SlideError(f"{path}: the file has no image levels")
    w, h = dims[0]
    if w <= 0 or h <= 0 or w > MAX_SIDE or h > MAX_SIDE:
        raise SlideError(
            f"{path}: the file claims absurd dimensions {w} x {h} pixels "
            f"(accepted: 1..{MAX_SIDE} per side); it is corrupt or not a slide"
        )
