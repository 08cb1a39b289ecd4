"""The one place where array (row, col) coordinates become QuPath (x, y) and back.

Three frames meet here:

* **array index** ``(row, col)`` of some pyramid level, pixel centres at integers (numpy,
  scikit-image, napari data coordinates);
* **level-0 continuous** ``(row, col)``: pixel ``(i, j)`` of level 0 covers
  ``[i, i + 1) x [j, j + 1)``, the full OpenSlide frame;
* **QuPath** ``(x, y)``: level-0 continuous coordinates minus the OpenSlide bounds
  offset (QuPath crops slides to ``openslide.bounds-x/-y``), x first.

A pixel ``(i, j)`` of a level with down-sample ``d`` whose array starts ``origin`` level
pixels into the level covers level-0 ``[(i + o_r) d, (i + 1 + o_r) d)`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from napari_pathoseg.errors import PathosegError

__all__ = [
    "LevelTransform",
    "transform_from_layer",
    "layer_placement",
    "slide_metadata_from_layer",
    "metadata_as_dict",
]


def _float_pair(value: Any) -> tuple[float, float]:
    """``(a, b)`` floats from a pair or one number (used for both)."""
    return tuple(float(v) for v in np.broadcast_to(np.asarray(value, float), (2,)))  # type: ignore[return-value]


@dataclass(frozen=True)
class LevelTransform:
    """Affine map between an array at some level and QuPath level-0 ``(x, y)``.

    Parameters
    ----------
    downsample : (float, float)
        Level-0 pixels per array pixel, ``(rows, cols)``.
    origin : (float, float)
        ``(row, col)`` of the array's first pixel in the level's pixels (a crop offset).
    bounds : (float, float)
        OpenSlide bounds offset ``(bounds_y, bounds_x)`` in level-0 pixels; subtracted
        on the way to QuPath, added on the way back.

    Examples
    --------
    >>> t = LevelTransform(downsample=(4.0, 4.0), origin=(10, 20), bounds=(0, 0))
    >>> t.index_to_xy(np.array([[0.0, 0.0]])).tolist()
    [[82.0, 42.0]]
    """

    downsample: tuple[float, float] = (1.0, 1.0)
    origin: tuple[float, float] = (0.0, 0.0)
    bounds: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        ds = _float_pair(self.downsample)
        if not all(np.isfinite(ds)) or min(ds) <= 0:
            raise PathosegError(
                f"downsample must be positive and finite, got {self.downsample!r}; "
                "pass the level's down-sample factor relative to level 0 (1 for level 0)"
            )
        object.__setattr__(self, "downsample", ds)
        object.__setattr__(self, "origin", _float_pair(self.origin))
        object.__setattr__(self, "bounds", _float_pair(self.bounds))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def for_slide(
        cls,
        metadata: Any | None,
        *,
        level: int = 0,
        downsample: float | tuple[float, float] | None = None,
        origin: tuple[float, float] = (0.0, 0.0),
    ) -> "LevelTransform":
        """The transform of an array at ``level`` of a slide described by ``metadata``.

        Parameters
        ----------
        metadata : SlideMetadata, dict or None
            Slide metadata (``level_downsamples``, ``bounds_x``, ``bounds_y``); None means a
            plain image (no bounds, down-sample 1 unless given).
        level : int
            Pyramid level of the array (ignored when ``downsample`` is given).
        downsample : float or (float, float), optional
            Explicit down-sample (for arrays at a scale that is not a pyramid level).
        origin : (float, float)
            Crop offset ``(row, col)`` in the level's pixels.
        """
        meta = metadata_as_dict(metadata)
        if downsample is None:
            levels = meta.get("level_downsamples") or [1.0]
            if not 0 <= level < len(levels):
                raise PathosegError(
                    f"level {level} does not exist in {meta.get('path', 'the slide')} "
                    f"(levels 0..{len(levels) - 1}); pass --level within that range"
                )
            downsample = float(levels[level])
        return cls(downsample=downsample, origin=origin, bounds=_bounds(meta))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ conversions
    def continuous_to_xy(self, rc: np.ndarray) -> np.ndarray:
        """Level continuous ``(row, col)`` (pixel corners at integers) -> QuPath ``(x, y)``.

        Parameters
        ----------
        rc : (N, 2) array
            Relative to the array's first pixel.

        Returns
        -------
        (N, 2) float64
        """
        rc = np.asarray(rc, dtype=np.float64)
        y = (rc[:, 0] + self.origin[0]) * self.downsample[0] - self.bounds[0]
        x = (rc[:, 1] + self.origin[1]) * self.downsample[1] - self.bounds[1]
        return np.stack([x, y], axis=1)

    def xy_to_continuous(self, xy: np.ndarray) -> np.ndarray:
        """QuPath ``(x, y)`` -> level continuous ``(row, col)`` (inverse of :meth:`continuous_to_xy`).

        Parameters
        ----------
        xy : (N, 2) array

        Returns
        -------
        (N, 2) float64
        """
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        r = (xy[:, 1] + self.bounds[0]) / self.downsample[0] - self.origin[0]
        c = (xy[:, 0] + self.bounds[1]) / self.downsample[1] - self.origin[1]
        return np.stack([r, c], axis=1)

    def index_to_xy(self, rc: np.ndarray) -> np.ndarray:
        """Array index ``(row, col)`` (pixel centres at integers, as napari shapes) -> QuPath ``(x, y)``.

        Parameters
        ----------
        rc : (N, 2) array

        Returns
        -------
        (N, 2) float64
        """
        return self.continuous_to_xy(np.asarray(rc, dtype=np.float64) + 0.5)

    def xy_to_index(self, xy: np.ndarray) -> np.ndarray:
        """QuPath ``(x, y)`` -> array index ``(row, col)`` (pixel centres at integers).

        Parameters
        ----------
        xy : (N, 2) array

        Returns
        -------
        (N, 2) float64
        """
        return self.xy_to_continuous(xy) - 0.5


def metadata_as_dict(metadata: Any | None) -> dict[str, Any]:
    """A plain dict view of :class:`~napari_pathoseg.wsi.slide.SlideMetadata`, its ``to_dict()``, or None."""
    if metadata is None:
        return {}
    if isinstance(metadata, Mapping):
        return dict(metadata)
    if hasattr(metadata, "to_dict"):
        d = metadata.to_dict(with_properties=True)
        return dict(d)
    raise PathosegError(
        f"slide metadata must be a SlideMetadata or a dict, got {type(metadata).__name__}"
    )


def _bounds(meta: Mapping[str, Any]) -> tuple[float, float]:
    """OpenSlide bounds offset ``(bounds_y, bounds_x)`` in level-0 pixels (0 when absent)."""
    return (float(meta.get("bounds_y") or 0), float(meta.get("bounds_x") or 0))


def _world_mpp(meta: Mapping[str, Any]) -> tuple[float, float]:
    """µm per level-0 pixel ``(rows, cols)`` of the slide layer (1 when unknown, as the reader does)."""
    my = meta.get("mpp_y") or meta.get("mpp_x") or 1.0
    mx = meta.get("mpp_x") or meta.get("mpp_y") or 1.0
    return float(my), float(mx)


def transform_from_layer(
    *,
    scale: tuple[float, ...] | None,
    translate: tuple[float, ...] | None,
    slide_metadata: Any | None = None,
) -> LevelTransform:
    """The transform of a napari layer drawn over a slide image layer.

    The slide layer (see :func:`napari_pathoseg._reader.slide_layer_data`) has scale
    ``(mpp_y, mpp_x)`` µm and no translation, so level-0 pixel ``j`` sits at world
    ``j * mpp``. A layer pixel ``i`` sits at world ``i * scale + translate``.

    Parameters
    ----------
    scale, translate : sequence of float, optional
        The layer's (last two) scale and translate; None means 1 and 0.
    slide_metadata : SlideMetadata or dict, optional
        The slide under the layer; None means world units are level-0 pixels.

    Returns
    -------
    LevelTransform
    """
    meta = metadata_as_dict(slide_metadata)
    mpp = np.asarray(_world_mpp(meta))
    s = np.asarray(scale if scale is not None else (1.0, 1.0), dtype=np.float64)[-2:]
    t = np.asarray(translate if translate is not None else (0.0, 0.0), dtype=np.float64)[-2:]
    d = s / mpp
    # level-0 continuous X = (i * s + t) / mpp + 0.5 = (i + 0.5 + o) * d
    o = (t / mpp + 0.5) / d - 0.5
    return LevelTransform(downsample=tuple(d), origin=tuple(o), bounds=_bounds(meta))  # type: ignore[arg-type]


def layer_placement(transform: LevelTransform, slide_metadata: Any | None = None) -> dict[str, tuple[float, float]]:
    """napari ``scale`` and ``translate`` that put an array with ``transform`` over the slide layer.

    Inverse of :func:`transform_from_layer`.

    Returns
    -------
    dict
        ``{"scale": (sy, sx), "translate": (ty, tx)}``.
    """
    mpp = np.asarray(_world_mpp(metadata_as_dict(slide_metadata)))
    d = np.asarray(transform.downsample)
    o = np.asarray(transform.origin)
    s = d * mpp
    t = ((0.5 + o) * d - 0.5) * mpp
    return {"scale": (float(s[0]), float(s[1])), "translate": (float(t[0]), float(t[1]))}


def slide_metadata_from_layer(layer_metadata: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Slide metadata found in a napari layer's ``metadata``, or None.

    Looks for ``"pathoseg_slide"`` (a :class:`~napari_pathoseg.wsi.slide.Slide`), ``"slide"``
    (``SlideMetadata.to_dict()``, as the slide reader stores it) and ``"slide_metadata"``.
    """
    if not layer_metadata:
        return None
    slide = layer_metadata.get("pathoseg_slide")
    if slide is not None and hasattr(slide, "metadata"):
        return metadata_as_dict(slide.metadata)
    for key in ("slide", "slide_metadata"):
        value = layer_metadata.get(key)
        if value is not None and (isinstance(value, Mapping) or hasattr(value, "to_dict")):
            d = metadata_as_dict(value)
            if "level_downsamples" in d or "level_dimensions" in d:
                return d
    return None
