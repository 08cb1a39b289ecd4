"""The editable mask of the tile shown in the Review dock.

:class:`MaskEditor` owns one napari Labels layer (``"review mask"``): it shows a tile's
instance mask over the slide (or the tile image), saves every edit of it (napari's paint,
erase, fill, and :meth:`MaskEditor.split` / :meth:`MaskEditor.merge`) after a short debounce,
and saves a pending edit at once when the tile changes or the layer is removed. Saving goes
through a callback (the review project's atomic ``save_mask``); the editor itself holds no
project.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from napari.utils.notifications import show_error
from qtpy.QtCore import QObject, QTimer, Signal

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.review.project import merge_nuclei, split_nucleus

if TYPE_CHECKING:
    import napari

__all__ = ["MASK_LAYER", "MaskEditor"]

logger = logging.getLogger(__name__)

MASK_LAYER = "review mask"
#: Layer metadata key naming the tile a mask layer shows.
TILE_KEY = "pathoseg_review_tile"


class MaskEditor(QObject):
    """The Labels layer of the shown tile's mask, saved as it is edited.

    Parameters
    ----------
    viewer : napari.Viewer
    save : callable
        ``save(tile_id, mask)`` writes a mask (raises :class:`PathosegError` on failure).

    Attributes
    ----------
    save_delay_ms : int
        Debounce between an edit and its saving.

    Signals
    -------
    saved : str
        The id of a tile whose mask was just saved.
    """

    saved = Signal(str)

    def __init__(self, viewer: "napari.Viewer", save: Callable[[str, np.ndarray], None],
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self._save = save
        self.save_delay_ms = 400
        self._layer: Any = None
        self._dirty = False
        self._selected: list[int] = []
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self.flush)

    # ------------------------------------------------------------------ the layer
    @property
    def layer(self) -> Any:
        """The mask layer while it is in the viewer, else None."""
        if self._layer is not None and self._layer not in self.viewer.layers:
            self._layer = None
        return self._layer

    @property
    def tile_id(self) -> str | None:
        """Id of the tile the layer shows."""
        layer = self.layer
        return None if layer is None else layer.metadata.get(TILE_KEY)

    @property
    def selected_history(self) -> list[int]:
        """The last two labels selected (oldest first): the default pair to merge."""
        return list(self._selected)

    def show(self, mask: np.ndarray, tile_id: str, *, scale: Sequence[float], translate: Sequence[float],
             units: Sequence[str] | None = None, layer_kwargs: dict[str, Any] | None = None) -> Any:
        """Show ``mask`` (a pending edit of the previous tile is saved first); returns the layer.

        ``units`` are the slide layer's (µm), so napari's scale bar stays in physical units;
        ``layer_kwargs`` (e.g. ``colormap``, ``features`` of class masks) style the layer.
        """
        self.flush()
        layer = self.layer
        extra = {"units": tuple(units)} if units is not None else {}
        if layer is None:
            layer = self.viewer.add_labels(mask, name=MASK_LAYER, scale=tuple(scale), translate=tuple(translate),
                                           opacity=0.5, **extra, **(layer_kwargs or {}))
            layer.events.paint.connect(self._on_edited)
            layer.events.data.connect(self._on_edited)
            layer.events.selected_label.connect(self._on_selected_label)
            self._layer = layer
        else:
            layer.events.data.disconnect(self._on_edited)
            try:
                if units is not None:
                    layer.units = tuple(units)
                layer.scale = tuple(scale)
                layer.translate = tuple(translate)
                layer.data = mask
            finally:
                layer.events.data.connect(self._on_edited)
        layer.metadata[TILE_KEY] = tile_id
        self._dirty = False
        self._selected.clear()
        self.viewer.layers.selection.active = layer
        return layer

    def remove(self) -> None:
        """Take the layer out of the viewer, dropping any unsaved edit."""
        self._timer.stop()
        self._dirty = False
        layer, self._layer = self.layer, None
        if layer is not None:
            self.viewer.layers.remove(layer)

    def on_layer_removed(self, layer: Any) -> None:
        """Call when ``layer`` left the viewer: a pending edit of the mask is saved."""
        if layer is not None and layer is self._layer:
            self._flush_layer(layer)  # the layer object still holds the data
            self._layer = None

    # ------------------------------------------------------------------ saving
    def _on_edited(self, event: Any = None) -> None:
        if self.layer is None:
            return
        self._dirty = True
        self._timer.start(self.save_delay_ms)

    def _on_selected_label(self, event: Any = None) -> None:
        layer = self.layer
        if layer is None:
            return
        label = int(layer.selected_label)
        if label > 0 and (not self._selected or self._selected[-1] != label):
            self._selected.append(label)
            del self._selected[:-2]

    def flush(self) -> None:
        """Save a pending edit now (the debounce timer and tile changes call this)."""
        self._timer.stop()
        if self._layer is not None:
            self._flush_layer(self._layer)

    def _flush_layer(self, layer: Any) -> None:
        if not self._dirty:
            return
        self._dirty = False
        tile_id = layer.metadata.get(TILE_KEY)
        if tile_id is None:
            return
        try:
            self._save(tile_id, np.asarray(layer.data))
        except PathosegError as exc:
            show_error(str(exc))
            return
        self.saved.emit(tile_id)

    # ------------------------------------------------------------------ split / merge
    def _require_layer(self) -> Any:
        layer = self.layer
        if layer is None or self.tile_id is None:
            show_error("Show a tile first (click a row of the table).")
        return layer

    def split(self, label: int | None = None) -> list[int]:
        """Split ``label`` (default: the selected label) into nuclei; returns the new ids (saved)."""
        layer = self._require_layer()
        if layer is None:
            return []
        lab = int(layer.selected_label if label is None else label)
        try:
            new, ids = split_nucleus(np.asarray(layer.data), lab)
        except PathosegError as exc:
            show_error(str(exc))
            return []
        layer.data = new  # data event -> marked for saving
        self.flush()
        return ids

    def merge(self, labels: Sequence[int] | None = None) -> int | None:
        """Merge ``labels`` (default: the last two selected) into one nucleus; returns its id (saved)."""
        layer = self._require_layer()
        if layer is None:
            return None
        try:
            new, target = merge_nuclei(np.asarray(layer.data), list(self._selected if labels is None else labels))
        except PathosegError as exc:
            show_error(str(exc))
            return None
        layer.data = new
        layer.selected_label = target
        self.flush()
        return target
