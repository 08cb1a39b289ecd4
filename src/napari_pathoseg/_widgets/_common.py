"""What every dock shares.

* how an error from the core reaches the user (:func:`report_error`);
* building the layout (:func:`hbox`, :func:`vbox`, :func:`form`, :func:`status_label`,
  :func:`stop_button`);
* the layer choices (:func:`layer_named`, :func:`watch_layer_list`, :func:`refill_combo`,
  :func:`docked_widgets`);
* file dialogs that fill a line edit (:func:`ask_open_file`, :func:`ask_directory`);
* where the user looks: the camera (:func:`camera`), the part of a slide layer on screen
  (:func:`view_rect`) and a drawn box over it (:func:`shape_rect`), in level-0 pixels; and
  where a coarser result goes over the slide (:func:`grid_placement`);
* one world unit for every layer (:func:`adopt_units`, :func:`follow_slide_units`): napari
  turns the scale bar's unit off ("Inconsistent units") as soon as one layer is in pixels
  while the slide is in µm;
* layer data prepared off the GUI thread (:func:`display_levels`): a large result becomes a
  multiscale pyramid so napari only draws what is on screen.

Background jobs (worker thread, progress bar, Stop, errors) run through
:mod:`napari_pathoseg._widgets._jobs` (``JobController``).
"""

from __future__ import annotations

import logging

import numpy as np
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar, Union

from napari.utils.notifications import show_error
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLayout,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_pathoseg.errors import PathosegError

if TYPE_CHECKING:
    import napari

__all__ = [
    "adopt_units",
    "ask_directory",
    "ask_open_file",
    "camera",
    "display_levels",
    "load_small_levels",
    "docked_widgets",
    "follow_slide_units",
    "form",
    "grid_placement",
    "hbox",
    "layer_named",
    "refill_combo",
    "report_error",
    "shape_rect",
    "status_label",
    "stop_button",
    "vbox",
    "view_rect",
    "watch_layer_list",
]

logger = logging.getLogger(__name__)

#: A widget or a layout, optionally with its stretch factor: ``(item, stretch)``.
LayoutItem = Union[QWidget, QLayout, tuple[Union[QWidget, QLayout], int]]
W = TypeVar("W")


# ---------------------------------------------------------------------- errors


def report_error(exc: BaseException, *, action: str) -> str:
    """Show ``exc`` as a napari notification and return the text shown.

    A :class:`PathosegError` is bad input the user can fix: its message is shown as is.
    Anything else is a bug: it is logged with its traceback and shown as
    ``"<action> failed: <type>: <message>"``.
    """
    if isinstance(exc, PathosegError):
        text = str(exc)
    else:
        logger.error("%s failed", action, exc_info=exc)
        text = f"{action} failed: {type(exc).__name__}: {exc}"
    show_error(text)
    return text


# ---------------------------------------------------------------------- layout


def _add(layout: QHBoxLayout | QVBoxLayout, item: LayoutItem) -> None:
    target, stretch = item if isinstance(item, tuple) else (item, 0)
    if isinstance(target, QLayout):
        layout.addLayout(target, stretch)
    else:
        layout.addWidget(target, stretch)


def hbox(*items: LayoutItem) -> QHBoxLayout:
    """A row of widgets / layouts, left to right; ``(item, stretch)`` gives an item a stretch."""
    row = QHBoxLayout()
    for item in items:
        _add(row, item)
    return row


def vbox(parent: QWidget, *items: LayoutItem, stretch_end: bool = False) -> QVBoxLayout:
    """The top-level column of ``parent``; ``stretch_end`` pushes the items to the top."""
    column = QVBoxLayout(parent)
    for item in items:
        _add(column, item)
    if stretch_end:
        column.addStretch(1)
    return column


def form(*rows: tuple[str, QWidget | QLayout]) -> QFormLayout:
    """A two-column form of ``(label, field)`` rows (a field may be a layout, e.g. :func:`hbox`)."""
    layout = QFormLayout()
    for label, field in rows:
        layout.addRow(label, field)
    return layout


def status_label(text: str = "") -> QLabel:
    """The word-wrapped status line under a dock's controls."""
    label = QLabel(text)
    label.setWordWrap(True)
    return label


def stop_button() -> QPushButton:
    """A "Stop" button, disabled until a worker runs."""
    button = QPushButton("Stop")
    button.setEnabled(False)
    return button


# ---------------------------------------------------------------------- layers


def layer_named(viewer: "napari.Viewer", name: str) -> Any | None:
    """The layer of ``viewer`` called ``name``, or None (also for an empty name)."""
    return viewer.layers[name] if name and name in viewer.layers else None


def watch_layer_list(viewer: "napari.Viewer", callback: Callable[..., Any]) -> None:
    """Call ``callback(event)`` whenever a layer is added to or removed from ``viewer``."""
    viewer.layers.events.inserted.connect(callback)
    viewer.layers.events.removed.connect(callback)


def refill_combo(combo: QComboBox, items: Sequence[str], *, current: str | None = None, fallback: int = 0) -> None:
    """Replace the items of ``combo`` without emitting its signals.

    ``current`` (default: the text chosen now) stays chosen when it is still offered;
    otherwise item ``fallback`` is chosen.
    """
    if current is None:
        current = combo.currentText()
    was_blocked = combo.blockSignals(True)
    try:
        combo.clear()
        combo.addItems(list(items))
        index = combo.findText(current) if current else -1
        combo.setCurrentIndex(index if index >= 0 else fallback)
    finally:
        combo.blockSignals(was_blocked)


def docked_widgets(viewer: "napari.Viewer", cls: type[W]) -> list[W]:
    """The dock widgets of ``viewer``'s window that are instances of ``cls``."""
    window = getattr(viewer, "window", None)
    docks = getattr(window, "dock_widgets", None) or getattr(window, "_dock_widgets", {}) or {}
    found = []
    for dock in list(docks.values()):
        widget = dock.widget() if hasattr(dock, "widget") and not isinstance(dock, cls) else dock
        if isinstance(widget, cls):
            found.append(widget)
    return found


# ---------------------------------------------------------------------- file dialogs


def ask_open_file(parent: QWidget, caption: str, pattern: str = "", *, into: QLineEdit | None = None) -> str:
    """Ask for an existing file; the path chosen ("" when cancelled) also fills ``into``."""
    path, _ = QFileDialog.getOpenFileName(parent, caption, "", pattern)
    if path and into is not None:
        into.setText(path)
    return path


def ask_directory(parent: QWidget, caption: str, *, into: QLineEdit | None = None) -> str:
    """Ask for a folder; the path chosen ("" when cancelled) also fills ``into``."""
    path = QFileDialog.getExistingDirectory(parent, caption)
    if path and into is not None:
        into.setText(path)
    return path


# ---------------------------------------------------------------------- where the user looks


def camera(viewer: "napari.Viewer") -> Any:
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def _level0_box(layer: Any, world_corners: np.ndarray) -> tuple[float, float, float, float]:
    """(row, col, height, width) in level-0 pixels of a world-space box over ``layer``."""
    pts = np.array([layer.world_to_data(p) for p in world_corners], dtype=float)[:, -2:]
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    # data coordinates are pixel centres: the box spans half a pixel further each side
    return float(lo[0] + 0.5), float(lo[1] + 0.5), float(hi[0] - lo[0]), float(hi[1] - lo[1])


def view_rect(viewer: "napari.Viewer", layer: Any) -> tuple[float, float, float, float]:
    """The part of ``layer`` the canvas shows: (row, col, height, width) in level-0 pixels.

    Computed from the camera (centre, zoom) and the canvas size, so it is the area on
    screen, not the tiles napari loaded around it; not clipped to the layer.
    """
    cam = camera(viewer)
    center = np.asarray(cam.center, float)[-2:]
    half = np.asarray(viewer.canvas.size, float) / (2.0 * float(cam.zoom))
    ndim = viewer.dims.ndim
    corners = []
    for dr in (-1, 1):
        for dc in (-1, 1):
            p = np.array(viewer.dims.point, float)[:ndim]
            p[-2:] = center + np.array([dr, dc]) * half
            corners.append(p)
    return _level0_box(layer, np.array(corners))


def shape_rect(shapes: Any, layer: Any) -> tuple[float, float, float, float]:
    """Bounding box of the selected (else the last) shape, in ``layer``'s level-0 pixels."""
    if len(shapes.data) == 0:
        raise PathosegError(f"Shapes layer {shapes.name!r} is empty: draw a rectangle on the tissue first")
    idx = sorted(shapes.selected_data)[-1] if shapes.selected_data else len(shapes.data) - 1
    verts = np.asarray(shapes.data[idx], float)
    world = np.array([shapes.data_to_world(v) for v in verts])
    r, c, h, w = _level0_box(layer, world)
    # shape vertices lie on pixel edges, not centres
    return r - 0.5, c - 0.5, h, w


def grid_placement(
    slide_layer: Any, *, row: float = 0.0, col: float = 0.0, downsample: float | tuple[float, float] = 1.0
) -> dict[str, Any]:
    """``scale``, ``translate`` (and ``units``) that put an array exactly over ``slide_layer``.

    The array's pixel (0, 0) covers level-0 pixels ``row .. row + ds`` x ``col .. col + ds``:
    napari places a pixel's centre at ``translate``, so it goes to the centre of that block.
    Pass the result to ``viewer.add_labels(..., **placement)``.
    """
    ds_r, ds_c = (float(downsample), float(downsample)) if np.isscalar(downsample) else map(float, downsample)
    sy, sx = (float(v) for v in slide_layer.scale[-2:])
    ty, tx = (float(v) for v in slide_layer.translate[-2:])
    out: dict[str, Any] = {
        "scale": (sy * ds_r, sx * ds_c),
        "translate": (ty + (row + (ds_r - 1) / 2) * sy, tx + (col + (ds_c - 1) / 2) * sx),
    }
    units = getattr(slide_layer, "units", None)
    if units is not None:
        out["units"] = tuple(str(u) for u in units[-2:])
    return out


# ---------------------------------------------------------------------- units


def _is_pixels(units: Any) -> bool:
    return units is None or all(str(u) in ("pixel", "px", "") for u in units)


def adopt_units(layer: Any, reference: Any) -> bool:
    """Give ``layer`` the world units of ``reference`` (a slide layer) when it is still in pixels.

    A layer the user adds (a Shapes layer to draw a rectangle, Points to mark cells) comes in
    napari's default ``pixel`` units; next to a slide in µm napari then drops units altogether
    and the scale bar shows none. Layers with physical units of their own are left alone.
    Returns True when the units were changed.
    """
    ref = getattr(reference, "units", None)
    units = getattr(layer, "units", None)
    if ref is None or _is_pixels(ref) or not _is_pixels(units) or layer is reference:
        return False
    ndim = len(units) if units is not None else layer.ndim
    ref = tuple(ref)
    layer.units = (ref[:1] * (ndim - len(ref)) + ref)[-ndim:]
    return True


def follow_slide_units(viewer: "napari.Viewer", slide_layers: Callable[["napari.Viewer"], Sequence[Any]]) -> None:
    """Give every Shapes or Points layer added to ``viewer`` in pixels the slides' units.

    These are the layers a user adds to draw on the slide (a rectangle for the Nuclei or Stain
    dock, marks); the plugin's own result layers get their units where they are made
    (:func:`grid_placement`). ``slide_layers(viewer)`` lists the slide layers; nothing changes
    while there is none or while they disagree among themselves.
    """
    from napari.layers import Points, Shapes

    def on_inserted(event: Any) -> None:
        layer = getattr(event, "value", None)
        if not isinstance(layer, (Shapes, Points)):
            return
        slides = list(slide_layers(viewer))
        if slides and len({tuple(str(u) for u in s.units) for s in slides}) == 1:
            adopt_units(layer, slides[0])

    viewer.layers.events.inserted.connect(on_inserted)


# ---------------------------------------------------------------------- layer data


def display_levels(array: Any, *, max_side: int = 2048, min_side: int = 512) -> list[Any]:
    """The levels napari should get for a large 2-D result (labels, image): built off the GUI thread.

    An array whose sides are all at most ``max_side`` stays one level. A larger one gets a
    nearest-neighbour pyramid (every second pixel) down to ``min_side``, each coarser level
    an in-memory copy made here (call this in the job, not on the GUI thread), so napari
    draws only the part on screen at a fitting level instead of colouring and uploading the
    whole array at once. The full-resolution level stays as given (an array or memmap).
    """
    levels = [array]
    if max(array.shape[:2]) <= max_side:
        return levels
    while max(levels[-1].shape[:2]) > min_side:
        levels.append(np.ascontiguousarray(levels[-1][::2, ::2]))
    return levels


def load_small_levels(levels: Sequence[Any], *, max_pixels: int = 4 << 20) -> list[Any]:
    """Compute the lazy levels of a pyramid that hold at most ``max_pixels`` pixels (call in a job).

    napari reads a lazy (dask) layer on the GUI thread when it draws it; the coarse levels it
    shows first (the whole slide in view) are computed here instead, once, off the GUI thread.
    The large levels stay lazy. Arrays without ``compute`` are returned as they are.
    """
    out = []
    for level in levels:
        if hasattr(level, "compute") and int(np.prod(level.shape[:2])) <= max_pixels:
            level = np.asarray(level.compute())
        out.append(level)
    return out
