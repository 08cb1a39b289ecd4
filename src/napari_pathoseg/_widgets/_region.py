"""The region a dock runs on: the current view, a drawn rectangle or the whole slide.

Every analysis dock (Nuclei, Lesions, Tissue, Malignancy, Slide classification) offers the same
three choices (:data:`REGIONS`) in a region combo, with a Shapes-layer combo for the rectangle.
:func:`chosen_region` turns the choice into the level-0 ``(x, y, w, h)`` the core takes
(``None``: the whole slide's tissue); :func:`add_region_rectangle` adds the rectangle layer the
*Draw…* button starts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_pathoseg._widgets._common import adopt_units, layer_named, view_rect
from napari_pathoseg.errors import PathosegError

__all__ = ["REGIONS", "view_region", "shape_region", "chosen_region", "add_region_rectangle"]

REGIONS = ("Current view", "Drawn rectangle", "Whole slide")


def view_region(layer: Any, viewer: Any) -> tuple[int, int, int, int]:
    """Level-0 (x, y, w, h) of the part of ``layer`` (a slide image layer) on screen, clipped to it."""
    r, c, h, w = view_rect(viewer, layer)
    rows, cols = layer.level_shapes[0][:2] if getattr(layer, "multiscale", False) else layer.data.shape[:2]
    r0, c0 = max(0, int(np.floor(r))), max(0, int(np.floor(c)))
    r1, c1 = min(int(rows), int(np.ceil(r + h))), min(int(cols), int(np.ceil(c + w)))
    if r1 <= r0 or c1 <= c0:
        raise PathosegError("The slide is not in view: pan or zoom to it, or choose another region.")
    return (c0, r0, c1 - c0, r1 - r0)


def shape_region(shapes_layer: Any, slide_layer: Any) -> tuple[int, int, int, int]:
    """Level-0 (x, y, w, h) of the last shape drawn in ``shapes_layer`` (its bounding box)."""
    if shapes_layer is None or len(shapes_layer.data) == 0:
        raise PathosegError("Draw a rectangle in a Shapes layer first (or choose another region).")
    verts = np.asarray(shapes_layer.data[-1], dtype=float)[:, -2:]
    world = np.array([shapes_layer.data_to_world(v) for v in verts])
    data = np.array([slide_layer.world_to_data(w) for w in world])[:, -2:]
    r0, c0 = np.round(data.min(axis=0)).astype(int)
    r1, c1 = np.round(data.max(axis=0)).astype(int)
    return (int(c0), int(r0), max(1, int(c1 - c0)), max(1, int(r1 - r0)))


def chosen_region(viewer: Any, slide_layer: Any, choice: str, shapes_name: str) -> tuple[int, int, int, int] | None:
    """The level-0 ``(x, y, w, h)`` of a region choice, or ``None`` for the whole slide.

    ``choice`` is one of :data:`REGIONS`; ``shapes_name`` names the Shapes layer of a drawn
    rectangle (its units follow the slide's first). Raises :class:`PathosegError` when the
    slide is out of view or no rectangle is drawn.
    """
    if choice == "Whole slide":
        return None
    if choice == "Drawn rectangle":
        shapes = layer_named(viewer, shapes_name)
        if shapes is not None:
            adopt_units(shapes, slide_layer)
        return shape_region(shapes, slide_layer)
    return view_region(slide_layer, viewer)


def add_region_rectangle(viewer: Any, slide_layer: Any, name: str) -> Any:
    """A Shapes layer for one rectangle, in the slide's units, in draw mode."""
    shapes = viewer.add_shapes(
        name=name, shape_type="rectangle", edge_color="yellow", face_color="transparent",
        edge_width=4 * float(slide_layer.scale[-1]) if slide_layer is not None else 4,
        units=tuple(slide_layer.units) if slide_layer is not None else None,
    )
    shapes.mode = "add_rectangle"
    return shapes
