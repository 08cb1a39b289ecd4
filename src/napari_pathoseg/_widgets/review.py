"""The "Review" dock: generate, filter, accept / reject and correct teacher pseudo-labels.

The dock drives :mod:`napari_pathoseg.review.project` (no computation here):

* open a review project folder, or generate one from a slide or an image folder with a
  teacher model (in a background worker with a progress bar and Stop);
* a table of the candidate tiles sorted by score (:class:`~.review_table.TileTable`); a
  threshold slider keeps only tiles scoring at least the threshold (M2's filter, saved in the
  project);
* clicking a row shows the tile: for a slide project the camera jumps to the tile on the
  slide layer (opened from the project's source when needed), otherwise the tile image is
  shown; the tile's mask is an editable Labels layer (paint, erase, fill, and Split / Merge;
  :class:`~.review_mask.MaskEditor`);
* A / R accept / reject the current tile and move to the next pending one;
* every edit is saved as it is made (debounced, atomic writes).

A tissue project (M5's pseudo masks, :mod:`napari_pathoseg.methods.tissue.review`) lists every
patch, the classifier's least confident masks first (no threshold); its mask is a Labels layer of
class ids with the class names and colours; paint / fill with a class id to correct it (the tile
becomes "corrected"); Split / Merge (nucleus tools) are disabled.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from napari.utils.notifications import show_error
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QLabel, QLineEdit, QPushButton, QSlider, QWidget

from napari_pathoseg._widgets._common import ask_directory, camera, grid_placement, hbox, status_label, vbox
from napari_pathoseg._widgets.review_generate import GenerateBox
from napari_pathoseg._widgets.review_mask import MASK_LAYER, MaskEditor
from napari_pathoseg._widgets.review_table import (
    COLUMNS,
    SLIDER_STEPS,
    TileTable,
    slider_to_threshold,
    threshold_to_slider,
)
from napari_pathoseg.errors import PathosegError
from napari_pathoseg.review.project import ReviewProject

if TYPE_CHECKING:
    import napari

__all__ = ["ReviewWidget"]

logger = logging.getLogger(__name__)

IMAGE_LAYER = "review tile"
#: Keys bound on the viewer while the dock is open.
ACCEPT_KEY = "a"
REJECT_KEY = "r"


def _restore_keys(viewer: Any, previous: dict[str, Any], bound: dict[str, bool], *args: Any) -> None:
    if not bound.get("bound"):
        return
    bound["bound"] = False
    for key, func in previous.items():
        try:
            viewer.bind_key(key, func, overwrite=True)  # func None unbinds
        except (RuntimeError, ValueError, TypeError):
            pass


class ReviewWidget(QWidget):
    """Review teacher pseudo-labels: filter by score, accept / reject, correct masks.

    Parameters
    ----------
    napari_viewer : napari.Viewer

    Attributes
    ----------
    project : ReviewProject or None
        The open project.
    current_tile : str or None
        Id of the tile shown.
    model_loader : callable
        ``loader(name) -> model`` with ``predict``/``to_instances`` (default: the model
        registry's ``load_model``); replaceable, e.g. in tests.
    mask : MaskEditor
        The editable mask of the shown tile.
    """

    def __init__(self, napari_viewer: "napari.Viewer") -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.project: ReviewProject | None = None
        self.current_tile: str | None = None
        self.mask = MaskEditor(napari_viewer, self._save_mask, parent=self)
        self._slide_layer = None

        # --- project ---
        self.project_edit = QLineEdit()
        self.project_edit.setPlaceholderText("review project folder")
        self.browse_project_btn = QPushButton("Browse…")
        self.open_btn = QPushButton("Open project")
        self.status = status_label()

        # --- generation ---
        self.generator = GenerateBox(napari_viewer, status=self.status, out_dir=lambda: self.project_edit.text().strip(),
                                     on_busy=lambda running: self.open_btn.setEnabled(not running))
        # the box's controls, by their old names
        self.generate_btn = self.generator.generate_btn
        self.stop_btn = self.generator.stop_btn
        self.progress = self.generator.progress
        self.model_combo = self.generator.model_combo
        self.source_edit = self.generator.source_edit
        self.max_tiles_spin = self.generator.max_tiles_spin

        # --- filter + table ---
        self.threshold_slider = QSlider(Qt.Orientation.Horizontal)
        self.threshold_slider.setRange(0, SLIDER_STEPS)
        self.threshold_label = QLabel("score ≥ 0.500")
        self.table = TileTable()
        self.counts_label = QLabel("no project")

        # --- review actions ---
        self.accept_btn = QPushButton("Accept (A)")
        self.reject_btn = QPushButton("Reject (R)")
        self.pending_btn = QPushButton("Reset")
        self.split_btn = QPushButton("Split selected")
        self.split_btn.setToolTip("split the selected label (watershed of its distance transform)")
        self.merge_edit = QLineEdit()
        self.merge_edit.setPlaceholderText("ids, e.g. 3, 7 (default: last two selected)")
        self.merge_btn = QPushButton("Merge")

        vbox(
            self,
            hbox(self.project_edit, self.browse_project_btn),
            self.open_btn,
            self.generator,
            hbox(QLabel("Keep:"), (self.threshold_slider, 1), self.threshold_label),
            (self.table, 1),
            self.counts_label,
            hbox(self.accept_btn, self.reject_btn, self.pending_btn),
            hbox(self.split_btn, (self.merge_edit, 1), self.merge_btn),
            self.status,
        )

        self._threshold_timer = QTimer(self)
        self._threshold_timer.setSingleShot(True)
        self._threshold_timer.timeout.connect(self._save_threshold)

        self.browse_project_btn.clicked.connect(self._on_browse_project)
        self.open_btn.clicked.connect(self._on_open_clicked)
        self.project_edit.returnPressed.connect(self._on_open_clicked)
        self.project_edit.textChanged.connect(lambda *_: self.generator.refresh())
        self.generator.project_ready.connect(self.open_project)
        self.threshold_slider.valueChanged.connect(self._on_threshold_changed)
        self.table.itemSelectionChanged.connect(self._on_row_selected)
        self.table.state_key.connect(self.set_current_state)
        self.accept_btn.clicked.connect(lambda: self.set_current_state("accepted"))
        self.reject_btn.clicked.connect(lambda: self.set_current_state("rejected"))
        self.pending_btn.clicked.connect(lambda: self.set_current_state("pending", advance=False))
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self.split_btn.clicked.connect(self._on_split)
        self.merge_btn.clicked.connect(self._on_merge)
        self.mask.saved.connect(self._on_mask_saved)

        # A / R on the viewer (canvas focus); the table has its own (TileTable.state_key)
        self._previous_keys: dict[str, Any] = {}
        for key, state in ((ACCEPT_KEY, "accepted"), (REJECT_KEY, "rejected")):
            self._previous_keys[key] = self.viewer.bind_key(key, self._key_callback(state), overwrite=True)
        self._keys_bound = {"bound": True}
        # Release the keys even if the dock is deleted without a close event.
        self.destroyed.connect(
            functools.partial(_restore_keys, self.viewer, dict(self._previous_keys), self._keys_bound)
        )
        self._update_enabled()

    # ================================================================== project
    def open_project(self, path: str | Path) -> ReviewProject | None:
        """Open a review project folder and fill the table; errors are shown, not raised."""
        self.flush()
        try:
            project = ReviewProject.open(path)
        except PathosegError as exc:
            show_error(str(exc))
            self.status.setText(str(exc))
            return None
        self._clear_tile_layers()
        self.project = project
        self.current_tile = None
        self.project_edit.setText(str(project.root))
        self.threshold_slider.blockSignals(True)
        self.threshold_slider.setValue(threshold_to_slider(project.threshold))
        self.threshold_slider.blockSignals(False)
        self._update_threshold_label()
        self._slide_layer = None
        if project.info.source_kind == "slide":
            self._slide_layer = self._find_or_open_slide_layer()
        tissue = self.is_tissue
        self.threshold_slider.setEnabled(not tissue)
        order = Qt.SortOrder.AscendingOrder if tissue else Qt.SortOrder.DescendingOrder
        self.table.sortByColumn(COLUMNS.index("score"), order)
        # the "nuclei" column counts the classes in a tissue mask
        self.table.setHorizontalHeaderLabels([("classes" if tissue and c == "nuclei" else c) for c in COLUMNS])
        self.refresh_table()
        what = f"pseudo masks ({', '.join(project.info.classes)}), least confident first" if tissue else "tiles"
        self.status.setText(f"{project.root.name}: {len(project)} {what} from {project.info.model}")
        self._update_enabled()
        return project

    @property
    def is_tissue(self) -> bool:
        """The open project holds tissue class masks (not nucleus instances)."""
        return self.project is not None and self.project.info.kind == "tissue"

    def _clear_tile_layers(self) -> None:
        """Remove the tile / mask layers of the previous project."""
        self.mask.remove()
        if MASK_LAYER in self.viewer.layers:
            self.viewer.layers.remove(MASK_LAYER)
        if IMAGE_LAYER in self.viewer.layers:
            self.viewer.layers.remove(IMAGE_LAYER)

    def _on_layer_removed(self, event: Any) -> None:
        self.mask.on_layer_removed(event.value)

    def _on_browse_project(self) -> None:
        path = ask_directory(self, "Review project folder", into=self.project_edit)
        if path:
            self.open_project(path)

    def _on_open_clicked(self) -> None:
        path = self.project_edit.text().strip()
        if not path:
            show_error("Choose a review project folder first.")
            return
        self.open_project(path)

    # ================================================================== generation
    @property
    def model_loader(self) -> Callable[[str], Any]:
        """``loader(name) -> model`` of the teacher (default: the registry); replaceable in tests."""
        return self.generator.model_loader

    @model_loader.setter
    def model_loader(self, loader: Callable[[str], Any]) -> None:
        self.generator.model_loader = loader

    def generate(self, source: str | Path, out: str | Path, *, model_name: str | None = None,
                 max_tiles: int | None = None):
        """Generate a project from ``source`` into ``out`` in the background (then open it);
        returns the :class:`~napari_pathoseg._widgets._jobs.Job`, None while another runs."""
        self.flush()
        self.project_edit.setText(str(out))  # the project it writes is the one opened
        return self.generator.generate(source, out, model_name=model_name, max_tiles=max_tiles)

    # ================================================================== table
    _threshold_to_slider = staticmethod(threshold_to_slider)

    @property
    def threshold(self) -> float:
        """Threshold set by the slider (0.5 keeps every tile)."""
        return slider_to_threshold(self.threshold_slider.value())

    def _update_threshold_label(self) -> None:
        self.threshold_label.setText(f"score ≥ {self.threshold:.3f}")

    def _on_threshold_changed(self, value: int) -> None:
        self._update_threshold_label()
        self.refresh_table()
        self._threshold_timer.start(300)

    def _save_threshold(self) -> None:
        if self.project is None:
            return
        t = self.threshold if self.threshold_slider.value() > 0 else 0.0
        try:
            self.project.threshold = t
        except PathosegError as exc:
            show_error(str(exc))

    def visible_tiles(self) -> list[str]:
        """Ids of the rows in the table, in order."""
        return self.table.tile_ids()

    def refresh_table(self) -> None:
        """Refill the table with the kept tiles, in the order of the sorted column (default: score, highest first)."""
        proj = self.project
        tissue = self.is_tissue  # tissue: every patch, least confident first
        recs = [] if proj is None else proj.tiles(sort_by="score", descending=not tissue,
                                                  min_score=None if tissue else self.threshold)
        self.table.fill(recs, select=self.current_tile)
        self._update_counts()

    def _update_counts(self) -> None:
        if self.project is None:
            self.counts_label.setText("no project")
            return
        if self.is_tissue:
            from napari_pathoseg.methods.tissue.review import review_summary

            c = review_summary(self.project)
            self.counts_label.setText(f"accepted {c['accepted']} · corrected {c['corrected']} · rejected "
                                      f"{c['rejected']} · pending {c['pending']}  ({c['total']} pseudo masks)")
            return
        kept = self.project.counts(min_score=self.threshold)
        self.counts_label.setText(
            f"accepted {kept['accepted']} · rejected {kept['rejected']} · pending "
            f"{kept['pending']}  ({kept['total']} of {len(self.project)} tiles kept)"
        )

    def _on_row_selected(self) -> None:
        tile_id = self.table.selected_tile()
        if tile_id is not None and tile_id != self.current_tile:
            self.show_tile(tile_id)

    def select_tile(self, tile_id: str) -> None:
        """Select a tile's row (and show the tile)."""
        row = self.table.row_of(tile_id)
        if row is None:
            self.show_tile(tile_id)
        else:
            self.table.selectRow(row)

    # ================================================================== showing a tile
    def _find_or_open_slide_layer(self):
        from napari_pathoseg._reader import slide_layer_data
        from napari_pathoseg._widgets.slide import slide_layers
        from napari_pathoseg.wsi.slide import open_slide

        assert self.project is not None
        src = self.project.source_path
        for layer in slide_layers(self.viewer):
            slide = layer.metadata["pathoseg_slide"]
            try:
                if Path(slide.metadata.path).resolve() == src:
                    return layer
            except OSError:
                continue
        if not src.is_file():
            self.status.setText(f"source slide {src} not found: showing the stored tiles")
            return None
        try:
            slide = open_slide(src)
        except PathosegError as exc:
            show_error(str(exc))
            return None
        data, kwargs, _ = slide_layer_data(slide)
        return self.viewer.add_image(data, **kwargs)

    def show_tile(self, tile_id: str) -> None:
        """Show a tile's mask as an editable Labels layer and move the camera to it."""
        if self.project is None:
            return
        self.flush()
        try:
            rec = self.project.record(tile_id)
            mask = self.project.read_mask(tile_id).astype(np.int32)
            image = None
            if self._slide_layer is None or self._slide_layer not in self.viewer.layers:
                self._slide_layer = None
                image = self.project.read_image(tile_id)
        except PathosegError as exc:
            show_error(str(exc))
            return
        self.current_tile = tile_id
        if self._slide_layer is not None:
            sy, sx = (float(v) for v in self._slide_layer.scale[-2:])
            ty, tx = (float(v) for v in self._slide_layer.translate[-2:])
            # a mask pixel covers ds level-0 pixels: centred on them, in the slide's units
            place = grid_placement(self._slide_layer, row=rec.y, col=rec.x,
                                   downsample=(rec.height / mask.shape[0], rec.width / mask.shape[1]))
            scale, translate, units = place["scale"], place["translate"], place.get("units")
            if IMAGE_LAYER in self.viewer.layers:
                self.viewer.layers.remove(IMAGE_LAYER)
            extent = (rec.height * sy, rec.width * sx)
            corner = (ty + rec.y * sy, tx + rec.x * sx)
        else:
            scale, translate, units = (1.0, 1.0), (0.0, 0.0), None
            if IMAGE_LAYER in self.viewer.layers:
                self.viewer.layers[IMAGE_LAYER].data = image
            else:
                self.viewer.add_image(image, name=IMAGE_LAYER, rgb=True)
            extent = (float(mask.shape[0]), float(mask.shape[1]))
            corner = (0.0, 0.0)
        self.mask.show(mask, tile_id, scale=scale, translate=translate, units=units, layer_kwargs=self._class_style())
        self._jump(corner, extent)
        if self.is_tissue:
            self.status.setText(f"tile {tile_id} ({rec.source_name}): confidence {rec.score:.4f}, {rec.status}")
        else:
            self.status.setText(f"tile {tile_id}: score {rec.score:.4f}, {rec.n_nuclei} nuclei, {rec.state}")
        self._update_enabled()

    def _class_style(self) -> dict[str, Any] | None:
        """Colours and class names of a tissue project's mask layer (None for nuclei)."""
        if not self.is_tissue:
            return None
        from napari.utils.colormaps import DirectLabelColormap

        from napari_pathoseg._widgets.tissue import class_colormap

        classes = list(self.project.info.classes)
        return {"colormap": DirectLabelColormap(color_dict=class_colormap(len(classes))),
                "features": {"index": np.arange(len(classes) + 1), "class": ["no label", *classes]}}

    def _jump(self, corner: tuple[float, float], extent: tuple[float, float]) -> None:
        cam = camera(self.viewer)
        cam.center = (corner[0] + extent[0] / 2, corner[1] + extent[1] / 2)
        size = getattr(self.viewer.canvas, "size", None) if hasattr(self.viewer, "canvas") else None
        side = float(min(size)) if size else 600.0
        cam.zoom = 0.9 * side / max(extent[0], extent[1], 1e-9)

    # ================================================================== editing
    @property
    def save_delay_ms(self) -> int:
        """Debounce of mask saving after an edit."""
        return self.mask.save_delay_ms

    @save_delay_ms.setter
    def save_delay_ms(self, value: int) -> None:
        self.mask.save_delay_ms = int(value)

    def _save_mask(self, tile_id: str, mask: np.ndarray) -> None:
        if self.project is not None and tile_id in self.project:
            self.project.save_mask(tile_id, mask)

    def _on_mask_saved(self, tile_id: str) -> None:
        if self.project is not None and tile_id in self.project:
            self.table.update_record(self.project.record(tile_id))
            self._update_counts()
            self.status.setText(f"tile {tile_id}: edit saved" + (" (corrected)" if self.is_tissue else ""))

    def flush(self) -> None:
        """Save a pending mask edit now (called by the debounce timer and before switching)."""
        self.mask.flush()

    def split_selected(self, label: int | None = None) -> list[int]:
        """Split ``label`` (default: the mask layer's selected label) into nuclei."""
        if self.is_tissue:
            show_error("Split is for nucleus masks; correct a tissue mask by painting class ids.")
            return []
        return self.mask.split(label)

    def merge_selected(self, labels: list[int] | None = None) -> int | None:
        """Merge ``labels`` (default: the merge field, else the last two selected labels)."""
        if self.is_tissue:
            show_error("Merge is for nucleus masks; correct a tissue mask by painting class ids.")
            return None
        if labels is None:
            text = self.merge_edit.text().replace(",", " ").split()
            try:
                labels = [int(t) for t in text] if text else None
            except ValueError:
                show_error(f"Merge: {self.merge_edit.text()!r} is not a list of label ids (e.g. 3, 7).")
                return None
        return self.mask.merge(labels)

    def _on_split(self) -> None:
        self.split_selected()

    def _on_merge(self) -> None:
        self.merge_selected()

    # ================================================================== accept / reject
    def _key_callback(self, state: str) -> Callable[[Any], None]:
        # napari key bindings need a real function (it reads ``__name__``)
        def review_set_state(viewer: Any) -> None:
            self.set_current_state(state)

        review_set_state.__name__ = f"review_{state}"
        return review_set_state

    def set_current_state(self, state: str, *, advance: bool = True) -> None:
        """Set the shown tile's state (saved at once), then show the next pending tile."""
        if self.project is None or self.current_tile is None:
            return
        self.flush()
        tile_id = self.current_tile
        try:
            self.project.set_state(tile_id, state)
        except PathosegError as exc:
            show_error(str(exc))
            return
        self.table.update_record(self.project.record(tile_id))
        self._update_counts()
        if advance:
            nxt = self._next_pending(tile_id)
            if nxt is not None:
                self.select_tile(nxt)

    def _next_pending(self, tile_id: str) -> str | None:
        ids = self.visible_tiles()
        if not ids or self.project is None:
            return None
        start = ids.index(tile_id) + 1 if tile_id in ids else 0
        for tid in ids[start:] + ids[:start]:
            if self.project.record(tid).state == "pending":
                return tid
        return None

    # ================================================================== state / close
    def _update_enabled(self) -> None:
        has_tile = self.project is not None and self.current_tile is not None
        for b in (self.accept_btn, self.reject_btn, self.pending_btn):
            b.setEnabled(has_tile)
        for b in (self.split_btn, self.merge_btn):  # nucleus tools: not for tissue class masks
            b.setEnabled(has_tile and not self.is_tissue)
        self.merge_edit.setEnabled(not self.is_tissue)

    def release_keys(self) -> None:
        """Give the A / R keys back to the viewer (done on close)."""
        _restore_keys(self.viewer, self._previous_keys, self._keys_bound)

    def _flush_all(self) -> None:
        self.flush()
        if self._threshold_timer.isActive():
            self._threshold_timer.stop()
            self._save_threshold()

    def hideEvent(self, event: Any) -> None:  # noqa: N802 (Qt name)
        self._flush_all()
        super().hideEvent(event)

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt name)
        self._flush_all()
        try:
            self.viewer.layers.events.removed.disconnect(self._on_layer_removed)
        except (TypeError, ValueError, RuntimeError):
            pass
        self.generator.stop()
        self.release_keys()
        super().closeEvent(event)
