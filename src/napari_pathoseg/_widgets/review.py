"""The "Review" dock: generate, filter, accept / reject and correct teacher pseudo-labels.

The dock drives :mod:`napari_pathoseg.review.project` (no computation here):

* open a review project folder, or generate one from a slide or an image folder with a
  teacher model (in a ``thread_worker`` with a progress bar and Stop);
* a table of the candidate tiles sorted by score; a threshold slider keeps only tiles
  scoring at least the threshold (M2's filter, saved in the project);
* clicking a row shows the tile: for a slide project the camera jumps to the tile on the
  slide layer (opened from the project's source when needed), otherwise the tile image is
  shown; the tile's mask is an editable Labels layer (paint, erase, fill, and Split / Merge);
* A / R accept / reject the current tile and move to the next pending one;
* every edit is saved as it is made (debounced, atomic writes).
"""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QEvent, QObject, Qt, QTimer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QGroupBox,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSlider,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from napari_pathoseg._widgets._common import (
    ask_directory,
    ask_open_file,
    camera,
    connect_worker,
    grid_placement,
    hbox,
    idle_progress,
    request_stop,
    show_progress,
    show_worker_error,
    status_label,
    stop_button,
    vbox,
)
from napari_pathoseg.errors import CancelledError, PathosegError
from napari_pathoseg.review.project import (
    GenerationDone,
    GenerationProgress,
    ReviewProject,
    generate_pseudolabels,
    merge_nuclei,
    split_nucleus,
)

if TYPE_CHECKING:
    import napari

__all__ = ["ReviewWidget"]

logger = logging.getLogger(__name__)

IMAGE_LAYER = "review tile"
MASK_LAYER = "review mask"
#: Keys bound on the viewer while the dock is open.
ACCEPT_KEY = "a"
REJECT_KEY = "r"
COLUMNS = ("tile", "score", "nuclei", "state", "edited", "x", "y")
_SLIDER_STEPS = 1000  # slider value v <-> threshold 0.5 + 0.5 * v / _SLIDER_STEPS


def _default_model_loader(name: str) -> Any:
    try:
        from napari_pathoseg.models.registry import load_model
    except ImportError as exc:
        raise PathosegError(
            f"The model registry is not available ({exc}); install napari-pathoseg completely."
        ) from exc
    return load_model(name)


def _model_names() -> list[str]:
    try:
        from napari_pathoseg.models.registry import list_models
    except ImportError:
        return ["nuclei-lite"]
    try:
        names = [str(m.get("name")) for m in list_models() if m.get("name")]
    except PathosegError as exc:
        logger.warning("cannot list models: %s", exc)
        names = []
    return names or ["nuclei-lite"]


@thread_worker(ignore_errors=True)
def _generate_worker(source: str, out: str, model_name: str, loader: Callable[[str], Any],
                     max_tiles: int | None, cancel: threading.Event):
    model = loader(model_name)
    try:
        yield from generate_pseudolabels(
            source, out, predict=model.predict, to_instances=model.to_instances,
            model_name=model_name, tile_size=int(getattr(model, "tile_size", 256)),
            mpp=getattr(model, "mpp", None), max_tiles=max_tiles, cancel=cancel,
        )
    except CancelledError as exc:  # Stop: a normal end, reported as the last event
        yield exc


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
    save_delay_ms : int
        Debounce of mask saving after an edit.
    """

    def __init__(self, napari_viewer: "napari.Viewer") -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.project: ReviewProject | None = None
        self.current_tile: str | None = None
        self.model_loader: Callable[[str], Any] = _default_model_loader
        self.save_delay_ms = 400
        self._worker = None
        self._cancel: threading.Event | None = None
        self._mask_layer = None
        self._mask_dirty = False
        self._selected_history: list[int] = []
        self._slide_layer = None
        self._generating_out = ""

        # --- project ---
        self.project_edit = QLineEdit()
        self.project_edit.setPlaceholderText("review project folder")
        self.browse_project_btn = QPushButton("Browse…")
        self.open_btn = QPushButton("Open project")

        # --- generation ---
        gen_box = QGroupBox("Generate pseudo-labels")
        self.source_edit = QLineEdit()
        self.source_edit.setPlaceholderText("slide file or folder of tiles (default: open slide)")
        self.browse_source_btn = QPushButton("Browse…")
        self.model_combo = QComboBox()
        self.model_combo.setEditable(True)
        self.model_combo.addItems(_model_names())
        self.max_tiles_spin = QSpinBox()
        self.max_tiles_spin.setRange(0, 1_000_000)
        self.max_tiles_spin.setSpecialValueText("all")
        self.max_tiles_spin.setToolTip("process at most this many tiles (0 = all)")
        self.generate_btn = QPushButton("Generate")
        self.generate_btn.setToolTip(
            "run the teacher over the source (default: the open slide) and write a new review "
            "project into the project folder above"
        )
        self.stop_btn = stop_button()
        self.progress = QProgressBar()
        self.progress.setValue(0)
        vbox(
            gen_box,
            hbox(self.source_edit, self.browse_source_btn),
            hbox(QLabel("Teacher:"), (self.model_combo, 1), QLabel("Max tiles:"), self.max_tiles_spin),
            hbox(self.generate_btn, self.stop_btn),
            self.progress,
        )

        # --- filter + table ---
        self.threshold_slider = QSlider(Qt.Horizontal)
        self.threshold_slider.setRange(0, _SLIDER_STEPS)
        self.threshold_label = QLabel("score ≥ 0.500")
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        # click a header to sort (e.g. by nuclei: the most confident tiles are often near-empty);
        # the default is by score, highest first; A / R / the next-tile step follow the table's order
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(COLUMNS.index("score"), Qt.DescendingOrder)
        self.table.setMinimumHeight(180)
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
        self.status = status_label()

        vbox(
            self,
            hbox(self.project_edit, self.browse_project_btn),
            self.open_btn,
            gen_box,
            hbox(QLabel("Keep:"), (self.threshold_slider, 1), self.threshold_label),
            (self.table, 1),
            self.counts_label,
            hbox(self.accept_btn, self.reject_btn, self.pending_btn),
            hbox(self.split_btn, (self.merge_edit, 1), self.merge_btn),
            self.status,
        )

        self._save_timer = QTimer(self)
        self._save_timer.setSingleShot(True)
        self._save_timer.timeout.connect(self.flush)
        self._threshold_timer = QTimer(self)
        self._threshold_timer.setSingleShot(True)
        self._threshold_timer.timeout.connect(self._save_threshold)

        self.browse_project_btn.clicked.connect(self._on_browse_project)
        self.open_btn.clicked.connect(self._on_open_clicked)
        self.project_edit.returnPressed.connect(self._on_open_clicked)
        self.browse_source_btn.clicked.connect(self._on_browse_source)
        self.generate_btn.clicked.connect(self._on_generate)
        self.stop_btn.clicked.connect(self._on_stop)
        self.threshold_slider.valueChanged.connect(self._on_threshold_changed)
        self.table.itemSelectionChanged.connect(self._on_row_selected)
        self.accept_btn.clicked.connect(lambda: self.set_current_state("accepted"))
        self.reject_btn.clicked.connect(lambda: self.set_current_state("rejected"))
        self.pending_btn.clicked.connect(lambda: self.set_current_state("pending", advance=False))
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self.split_btn.clicked.connect(self._on_split)
        self.merge_btn.clicked.connect(self._on_merge)

        # Shortcuts: on the viewer (canvas focus) and on the table (see eventFilter).
        self.table.installEventFilter(self)
        self._previous_keys: dict[str, Any] = {}
        for key, state in ((ACCEPT_KEY, "accepted"), (REJECT_KEY, "rejected")):
            self._previous_keys[key] = self.viewer.bind_key(
                key, self._key_callback(state), overwrite=True
            )
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
        self.threshold_slider.setValue(self._threshold_to_slider(project.threshold))
        self.threshold_slider.blockSignals(False)
        self._update_threshold_label()
        self._slide_layer = None
        if project.info.source_kind == "slide":
            self._slide_layer = self._find_or_open_slide_layer()
        self.refresh_table()
        self.status.setText(f"{project.root.name}: {len(project)} tiles from {project.info.model}")
        self._update_enabled()
        return project

    def _clear_tile_layers(self) -> None:
        """Remove the tile / mask layers of the previous project."""
        for name in (MASK_LAYER, IMAGE_LAYER):
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
        self._mask_layer = None
        self._mask_dirty = False

    def _on_layer_removed(self, event: Any) -> None:
        if event.value is self._mask_layer:
            self.flush()  # the layer object still holds the data
            self._mask_layer = None

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
    def _on_browse_source(self) -> None:
        if not ask_open_file(self, "Slide to pseudo-label", into=self.source_edit):
            ask_directory(self, "...or a folder of tiles", into=self.source_edit)

    def generate(self, source: str | Path, out: str | Path, *, model_name: str | None = None,
                 max_tiles: int | None = None):
        """Start generating a project in a background thread; returns the worker."""
        self.flush()
        name = model_name or self.model_combo.currentText().strip() or "nuclei-lite"
        self._cancel = threading.Event()
        self._generating_out = str(out)
        worker = connect_worker(
            _generate_worker(str(source), str(out), name, self.model_loader, max_tiles or None, self._cancel),
            yielded=self._on_gen_event,
            errored=self._on_gen_error,
            finished=self._on_gen_finished,
        )
        self._worker = worker
        self.progress.setRange(0, 0)
        self.status.setText(f"generating pseudo-labels with {name}…")
        self._update_enabled()
        worker.start()
        return worker

    def _on_generate(self) -> None:
        from napari_pathoseg._widgets.slide import slide_layers

        source = self.source_edit.text().strip()
        if not source:
            layers = slide_layers(self.viewer)
            if layers:  # default: the slide open in the viewer
                source = str(layers[0].metadata["pathoseg_slide"].metadata.path)
                self.source_edit.setText(source)
        out = self.project_edit.text().strip()
        if not source or not out:
            show_error("Choose a source (slide or folder of tiles) and a new project folder first.")
            return
        self.generate(source, out, max_tiles=self.max_tiles_spin.value() or None)

    def _on_stop(self) -> None:
        request_stop(self._cancel, status=self.status, message="stopping after the current batch…",
                     stop_button=self.stop_btn)

    def _on_gen_event(self, event: Any) -> None:
        if isinstance(event, GenerationProgress):
            show_progress(self.progress, event.done, event.total)
            self.status.setText(f"{event.done}/{event.total or '?'} tiles, {event.kept} kept")
        elif isinstance(event, CancelledError):
            idle_progress(self.progress)
            show_info(str(event))
            out = self.project_edit.text().strip() or self._generating_out
            self.open_project(out)
        elif isinstance(event, GenerationDone):
            idle_progress(self.progress, 1)
            self.open_project(event.project.root)
            show_info(f"Pseudo-labels: {event.kept} of {event.processed} tiles kept.")

    def _on_gen_error(self, exc: Exception) -> None:
        show_worker_error(exc, action="Pseudo-label generation", status=self.status, progress=self.progress)

    def _on_gen_finished(self) -> None:
        self._worker = None
        self._cancel = None
        self._update_enabled()

    # ================================================================== table
    @staticmethod
    def _threshold_to_slider(t: float) -> int:
        return int(round(min(max((t - 0.5) / 0.5, 0.0), 1.0) * _SLIDER_STEPS))

    @property
    def threshold(self) -> float:
        """Threshold set by the slider (0.5 keeps every tile)."""
        return round(0.5 + 0.5 * self.threshold_slider.value() / _SLIDER_STEPS, 4)

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
        return [self.table.item(r, 0).text() for r in range(self.table.rowCount())]

    def refresh_table(self) -> None:
        """Refill the table with the kept tiles, in the order of the sorted column (default: score, highest first)."""
        proj = self.project
        self.table.blockSignals(True)
        self.table.setSortingEnabled(False)  # rows must not move while they are filled
        self.table.setRowCount(0)
        if proj is not None:
            recs = proj.tiles(sort_by="score", descending=True, min_score=self.threshold)
            self.table.setRowCount(len(recs))
            for r, rec in enumerate(recs):
                self._fill_row(r, rec)
        self.table.setSortingEnabled(True)
        if proj is not None and self.current_tile is not None:
            row = self._row_of(self.current_tile)
            if row is not None:
                self.table.selectRow(row)
        self.table.blockSignals(False)
        self._update_counts()

    def _fill_row(self, row: int, rec: Any) -> None:
        # numbers are stored as numbers, so sorting by a column sorts them numerically
        values = (rec.tile_id, round(float(rec.score), 4), int(rec.n_nuclei), rec.state,
                  "yes" if rec.edited else "", int(rec.x), int(rec.y))
        for c, v in enumerate(values):
            item = QTableWidgetItem()
            item.setData(Qt.DisplayRole, v)
            if c in (1, 2, 5, 6):
                item.setTextAlignment(int(Qt.AlignRight | Qt.AlignVCenter))
            self.table.setItem(row, c, item)

    def _row_of(self, tile_id: str) -> int | None:
        for r in range(self.table.rowCount()):
            if self.table.item(r, 0).text() == tile_id:
                return r
        return None

    def _update_row(self, tile_id: str) -> None:
        row = self._row_of(tile_id)
        if row is not None and self.project is not None:
            self.table.blockSignals(True)
            sorting = self.table.isSortingEnabled()
            self.table.setSortingEnabled(False)  # keep the row in place while its cells change
            self._fill_row(row, self.project.record(tile_id))
            self.table.setSortingEnabled(sorting)
            self.table.blockSignals(False)

    def _update_counts(self) -> None:
        if self.project is None:
            self.counts_label.setText("no project")
            return
        kept = self.project.counts(min_score=self.threshold)
        total = len(self.project)
        self.counts_label.setText(
            f"accepted {kept['accepted']} · rejected {kept['rejected']} · pending "
            f"{kept['pending']}  ({kept['total']} of {total} tiles kept)"
        )

    def _on_row_selected(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return
        tile_id = self.table.item(rows[0].row(), 0).text()
        if tile_id != self.current_tile:
            self.show_tile(tile_id)

    def select_tile(self, tile_id: str) -> None:
        """Select a tile's row (and show the tile)."""
        row = self._row_of(tile_id)
        if row is None:
            self.show_tile(tile_id)
        else:
            self.table.selectRow(row)

    # ================================================================== showing a tile
    def _find_or_open_slide_layer(self):
        from napari_pathoseg._reader import slide_layer_data
        from napari_pathoseg.wsi.slide import open_slide
        from napari_pathoseg._widgets.slide import slide_layers

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
        self._set_mask_layer(mask, scale=scale, translate=translate, units=units)
        self._jump(corner, extent)
        self.status.setText(f"tile {tile_id}: score {rec.score:.4f}, {rec.n_nuclei} nuclei, {rec.state}")
        self._update_enabled()

    def _set_mask_layer(self, mask: np.ndarray, *, scale, translate, units=None) -> None:
        """Show ``mask`` in the editable Labels layer; ``units`` are the slide layer's (µm), so
        napari's scale bar stays in physical units."""
        layer = self._mask_layer
        extra = {"units": units} if units is not None else {}
        if layer is None or layer not in self.viewer.layers:
            layer = self.viewer.add_labels(mask, name=MASK_LAYER, scale=scale, translate=translate,
                                           opacity=0.5, **extra)
            layer.events.paint.connect(self._on_mask_edited)
            layer.events.data.connect(self._on_mask_edited)
            layer.events.selected_label.connect(self._on_selected_label)
            self._mask_layer = layer
        else:
            layer.events.data.disconnect(self._on_mask_edited)
            if units is not None:
                layer.units = units
            layer.scale = scale
            layer.translate = translate
            layer.data = mask
            layer.events.data.connect(self._on_mask_edited)
        layer.metadata["pathoseg_review_tile"] = self.current_tile
        self._mask_dirty = False
        self._selected_history.clear()
        self.viewer.layers.selection.active = layer

    def _jump(self, corner: tuple[float, float], extent: tuple[float, float]) -> None:
        cam = camera(self.viewer)
        cam.center = (corner[0] + extent[0] / 2, corner[1] + extent[1] / 2)
        size = getattr(self.viewer.canvas, "size", None) if hasattr(self.viewer, "canvas") else None
        side = float(min(size)) if size else 600.0
        cam.zoom = 0.9 * side / max(extent[0], extent[1], 1e-9)

    # ================================================================== editing
    def _on_mask_edited(self, event: Any = None) -> None:
        if self.current_tile is None or self._mask_layer is None:
            return
        self._mask_dirty = True
        self._save_timer.start(self.save_delay_ms)

    def _on_selected_label(self, event: Any = None) -> None:
        if self._mask_layer is None:
            return
        lab = int(self._mask_layer.selected_label)
        if lab > 0 and (not self._selected_history or self._selected_history[-1] != lab):
            self._selected_history.append(lab)
            del self._selected_history[:-2]

    def flush(self) -> None:
        """Save a pending mask edit now (called by the debounce timer and before switching)."""
        self._save_timer.stop()
        if not self._mask_dirty or self.project is None or self._mask_layer is None:
            return
        tile_id = self._mask_layer.metadata.get("pathoseg_review_tile")
        self._mask_dirty = False
        if tile_id is None or tile_id not in self.project:
            return
        try:
            self.project.save_mask(tile_id, np.asarray(self._mask_layer.data))
        except PathosegError as exc:
            show_error(str(exc))
            return
        self._update_row(tile_id)
        self.status.setText(f"tile {tile_id}: edit saved")

    def split_selected(self, label: int | None = None) -> list[int]:
        """Split ``label`` (default: the mask layer's selected label) into nuclei."""
        layer = self._mask_layer
        if layer is None or self.current_tile is None:
            show_error("Show a tile first (click a row of the table).")
            return []
        lab = int(layer.selected_label if label is None else label)
        try:
            new, ids = split_nucleus(np.asarray(layer.data), lab)
        except PathosegError as exc:
            show_error(str(exc))
            return []
        layer.data = new  # data event -> saved
        self.flush()
        return ids

    def merge_selected(self, labels: list[int] | None = None) -> int | None:
        """Merge ``labels`` (default: the merge field, else the last two selected labels)."""
        layer = self._mask_layer
        if layer is None or self.current_tile is None:
            show_error("Show a tile first (click a row of the table).")
            return None
        if labels is None:
            text = self.merge_edit.text().replace(",", " ").split()
            try:
                labels = [int(t) for t in text] if text else list(self._selected_history)
            except ValueError:
                show_error(f"Merge: {self.merge_edit.text()!r} is not a list of label ids (e.g. 3, 7).")
                return None
        try:
            new, target = merge_nuclei(np.asarray(layer.data), labels)
        except PathosegError as exc:
            show_error(str(exc))
            return None
        layer.data = new
        layer.selected_label = target
        self.flush()
        return target

    def _on_split(self) -> None:
        self.split_selected()

    def _on_merge(self) -> None:
        self.merge_selected()

    # ================================================================== accept / reject
    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt name)
        """A / R in the table accept / reject the current tile (before the table's search)."""
        if obj is self.table and event.type() == QEvent.KeyPress and not int(event.modifiers()):
            state = {Qt.Key_A: "accepted", Qt.Key_R: "rejected"}.get(event.key())
            if state is not None:
                self.set_current_state(state)
                return True
        return super().eventFilter(obj, event)

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
        self._update_row(tile_id)
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
        running = self._worker is not None
        has_tile = self.project is not None and self.current_tile is not None
        self.generate_btn.setEnabled(not running)
        self.stop_btn.setEnabled(running)
        self.open_btn.setEnabled(not running)
        for b in (self.accept_btn, self.reject_btn, self.pending_btn, self.split_btn, self.merge_btn):
            b.setEnabled(has_tile)

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
        if self._cancel is not None:
            self._cancel.set()
        self.release_keys()
        super().closeEvent(event)
