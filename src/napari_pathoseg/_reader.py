"""npe2 reader: open slides as multiscale RGB image layers (no napari import needed)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from napari_pathoseg.wsi.slide import Slide, is_slide_path, open_slide

__all__ = ["get_reader", "slide_layer_data", "layer_scale"]

logger = logging.getLogger(__name__)

LayerData = tuple[Any, dict[str, Any], str]


def layer_scale(slide: Slide) -> tuple[float, float]:
    """napari (row, col) scale of level 0 in µm (1 when the resolution is unknown)."""
    m = slide.metadata
    sy = m.mpp_y or m.mpp_x or 1.0
    sx = m.mpp_x or m.mpp_y or 1.0
    return (float(sy), float(sx))


def slide_layer_data(slide: Slide, *, name: str | None = None) -> LayerData:
    """The layer-data tuple of a multiscale RGB image layer for ``slide``.

    The layer's metadata holds the slide (``metadata["pathoseg_slide"]``) so the docks
    can read tiles from it, and its JSON-ready description (``metadata["slide"]``).
    """
    data: Any = slide.pyramid if slide.level_count > 1 else slide.pyramid[0]
    kwargs = {
        "name": name or Path(slide.metadata.path).name,
        "rgb": True,
        "multiscale": slide.level_count > 1,
        "contrast_limits": (0, 255),
        "scale": layer_scale(slide),
        "units": ("µm", "µm") if slide.mpp else ("pixel", "pixel"),
        "metadata": {"slide": slide.metadata.to_dict(), "pathoseg_slide": slide},
    }
    return (data, kwargs, "image")


def _read(path: str | list[str]) -> list[LayerData]:
    paths = [path] if isinstance(path, str) else list(path)
    out = []
    for p in paths:
        slide = open_slide(p)
        out.append(slide_layer_data(slide))
    return out


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """npe2 reader hook: a reader function for slide files, None for anything else."""
    paths = [path] if isinstance(path, str) else list(path)
    if not paths or not all(isinstance(p, str) and is_slide_path(p) for p in paths):
        return None
    if any(p.lower().endswith(".geojson") for p in paths):
        return None
    return _read
