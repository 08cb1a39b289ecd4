"""The "Export" dock: labels and shapes layers -> QuPath GeoJSON (+ measurements CSV), and back.

The export runs :func:`~napari_pathoseg.export.geojson.iter_export_labels` /
:func:`~napari_pathoseg.export.geojson.iter_export_shapes` in a ``thread_worker`` with a
progress bar and a working Stop (a cancelled export leaves no file behind).
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
from napari.layers import Labels, Layer, Shapes
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QCheckBox,
    QColorDialog,
    QComboBox,
    QFileDialog,
    QGridLayout,
    QGroupBox,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)
from qtpy.QtCore import Qt

from napari_pathoseg._widgets._common import (
    ask_open_file,
    connect_worker,
    hbox,
    idle_progress,
    layer_named,
    refill_combo,
    request_stop,
    show_progress,
    show_worker_error,
    status_label,
    stop_button,
    vbox,
    watch_layer_list,
)
from napari_pathoseg.errors import CancelledError
from napari_pathoseg.export.coords import slide_metadata_from_layer, transform_from_layer
from napari_pathoseg.export.geojson import (
    Classification,
    ExportProgress,
    ExportResult,
    class_color,
    iter_export_labels,
    iter_export_shapes,
)
from napari_pathoseg.export.measurements import MEASUREMENTS
from napari_pathoseg.export.napari_io import geojson_layer_data

if TYPE_CHECKING:
    import napari

__all__ = ["ExportWidget"]

logger = logging.getLogger(__name__)

_NO_LAYER = "(none)"
_MEASURE_LABELS = {
    "area": "Area",
    "perimeter": "Perimeter",
    "eccentricity": "Eccentricity",
    "solidity": "Solidity",
    "hematoxylin": "Haematoxylin OD",
    "eosin": "Eosin OD",
    "confidence": "Confidence",
}


@thread_worker(ignore_errors=True)  # errors go to ExportWidget._on_error
def _export_worker(jobs: list[tuple[str, str, Any, dict]], cancel: threading.Event) -> Iterator[Any]:
    """Run the export jobs one after the other, yielding their progress and results."""
    for index, (kind, path, data, kwargs) in enumerate(jobs):
        gen = iter_export_labels(path, data, **kwargs) if kind == "labels" else iter_export_shapes(path, data, **kwargs)
        try:
            for event in gen:
                if cancel.is_set():
                    gen.close()  # removes the temporary file
                    yield CancelledError(f"export cancelled; {path} was not written")
                    return
                yield (index, event)
        finally:
            gen.close()


@thread_worker(ignore_errors=True)  # errors go to ExportWidget._on_error
def _import_worker(path: str, slide_metadata: Any) -> list:
    return geojson_layer_data(path, slide_metadata=slide_metadata)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "layer"


class ExportWidget(QWidget):
    """Export labels/shapes layers to QuPath GeoJSON with classes, colours and measurements."""

    def __init__(self, napari_viewer: "napari.Viewer") -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._worker = None
        self._cancel: threading.Event | None = None
        self._results: list[ExportResult] = []
        self._colors: dict[str, tuple[int, int, int]] = {}

        # layers table: layer (checkable) | class | colour
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["Layer", "Class", "Colour"])
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.Stretch)
        self.table.verticalHeader().setVisible(False)
        self.table.setMinimumHeight(110)

        self.slide_combo = QComboBox()
        self.slide_combo.setToolTip("The slide under the layers: placement on level 0 and pixels for stain measurements")
        self.prob_combo = QComboBox()
        self.prob_combo.setToolTip("The model's probability map (same shape as the labels), for the Confidence measurement")
        self.type_combo = QComboBox()
        self.type_combo.addItems(["auto", "detection", "annotation", "cell"])
        self.type_combo.setToolTip("auto: labels -> detection (nuclei), shapes -> annotation (editable regions)")

        self.measure_boxes: dict[str, QCheckBox] = {}
        grid = QGridLayout()
        for k, m in enumerate(MEASUREMENTS):
            box = QCheckBox(_MEASURE_LABELS[m])
            box.setChecked(m in ("area", "perimeter", "eccentricity", "solidity", "hematoxylin", "eosin"))
            self.measure_boxes[m] = box
            grid.addWidget(box, k // 2, k % 2)
        measure_group = QGroupBox("Measure (labels)")
        measure_group.setLayout(grid)

        self.model_edit = QLineEdit()
        self.model_edit.setPlaceholderText("model name (optional, written in each object's metadata)")
        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText("output .geojson (one file per layer when several are checked)")
        self.browse_btn = QPushButton("Browse…")

        self.export_btn = QPushButton("Export")
        self.stop_btn = stop_button()
        self.import_btn = QPushButton("Open GeoJSON over slide…")
        self.progress = QProgressBar()
        idle_progress(self.progress)
        self.status = status_label()

        choices = QGridLayout()
        for row, (label, combo) in enumerate(
            (("Slide", self.slide_combo), ("Probability", self.prob_combo), ("Object type", self.type_combo))
        ):
            choices.addWidget(QLabel(label), row, 0)
            choices.addWidget(combo, row, 1)

        vbox(
            self,
            QLabel("Layers to export (class and colour per layer)"),
            self.table,
            choices,
            measure_group,
            self.model_edit,
            hbox(self.out_edit, self.browse_btn),
            hbox(self.export_btn, self.stop_btn),
            self.progress,
            self.status,
            self.import_btn,
            stretch_end=True,
        )

        self.browse_btn.clicked.connect(self._on_browse)
        self.export_btn.clicked.connect(self._on_export)
        self.stop_btn.clicked.connect(self._on_stop)
        self.import_btn.clicked.connect(self._on_import_clicked)
        self.table.itemChanged.connect(lambda *_: self._update_enabled())
        self.out_edit.textChanged.connect(lambda *_: self._update_enabled())
        watch_layer_list(self.viewer, self._on_layers_changed)
        self.refresh_layers()

    # ------------------------------------------------------------------ layers
    def _export_layers(self) -> list[Layer]:
        return [ly for ly in self.viewer.layers if isinstance(ly, (Labels, Shapes))]

    def _slide_layers(self) -> list[Layer]:
        return [ly for ly in self.viewer.layers if slide_metadata_from_layer(ly.metadata) and not isinstance(ly, (Labels, Shapes))]

    def _on_layers_changed(self, event: Any = None) -> None:
        self.refresh_layers()

    def refresh_layers(self) -> None:
        """Rebuild the layer table and the slide/probability choices from the viewer."""
        checked = {name for name, on in self._table_state() if on}
        classes = dict(self._table_classes())
        self.table.blockSignals(True)
        self.table.setRowCount(0)
        for ly in self._export_layers():
            row = self.table.rowCount()
            self.table.insertRow(row)
            item = QTableWidgetItem(ly.name)
            item.setFlags(Qt.ItemIsUserCheckable | Qt.ItemIsEnabled)
            item.setCheckState(Qt.Checked if ly.name in checked or not checked else Qt.Unchecked)
            self.table.setItem(row, 0, item)
            default_cls = "Nucleus" if isinstance(ly, Labels) else "Region*"
            name = classes.get(ly.name) or ly.metadata.get("class_name") or default_cls
            self.table.setItem(row, 1, QTableWidgetItem(name))
            btn = QPushButton()
            btn.clicked.connect(lambda _=False, n=ly.name: self._on_pick_color(n))
            self.table.setCellWidget(row, 2, btn)
            self._paint_color(ly.name, name)
        self.table.blockSignals(False)
        slides = [ly.name for ly in self._slide_layers()]
        probs = [ly.name for ly in self.viewer.layers if ly._type_string == "image" and ly.ndim == 2 and not ly.rgb]
        # the first slide is chosen by default; "(none)" is the default probability map
        refill_combo(self.slide_combo, [_NO_LAYER, *slides], fallback=1 if slides else 0)
        refill_combo(self.prob_combo, [_NO_LAYER, *probs])
        self._update_enabled()

    def _table_state(self) -> list[tuple[str, bool]]:
        out = []
        for row in range(self.table.rowCount()):
            item = self.table.item(row, 0)
            if item is not None:
                out.append((item.text(), item.checkState() == Qt.Checked))
        return out

    def _table_classes(self) -> list[tuple[str, str]]:
        out = []
        for row in range(self.table.rowCount()):
            a, b = self.table.item(row, 0), self.table.item(row, 1)
            if a is not None and b is not None:
                out.append((a.text(), b.text().strip()))
        return out

    def _row_of(self, layer_name: str) -> int:
        for row in range(self.table.rowCount()):
            item = self.table.item(row, 0)
            if item is not None and item.text() == layer_name:
                return row
        return -1

    def _paint_color(self, layer_name: str, class_name: str) -> None:
        row = self._row_of(layer_name)
        if row < 0:
            return
        color = self._colors.get(layer_name) or class_color(class_name or "Unclassified")
        btn = self.table.cellWidget(row, 2)
        if btn is not None:
            btn.setStyleSheet(f"background-color: rgb({color[0]}, {color[1]}, {color[2]});")
            btn.setToolTip(f"class colour {color}; click to change")

    def _on_pick_color(self, layer_name: str) -> None:
        row = self._row_of(layer_name)
        cls = self.table.item(row, 1).text() if row >= 0 else ""
        start = self._colors.get(layer_name) or class_color(cls or "Unclassified")
        color = QColorDialog.getColor(QColor(*start), self, f"Colour of {cls or layer_name}")
        if color.isValid():
            self.set_layer_class(layer_name, cls, (color.red(), color.green(), color.blue()))

    def set_layer_class(self, layer_name: str, class_name: str, color: tuple[int, int, int] | None = None) -> None:
        """Set the class name (and colour) that ``layer_name`` is exported with."""
        row = self._row_of(layer_name)
        if row < 0:
            raise KeyError(f"no labels or shapes layer named {layer_name!r}")
        self.table.item(row, 1).setText(class_name)
        if color is not None:
            self._colors[layer_name] = tuple(int(c) for c in color)  # type: ignore[assignment]
        self._paint_color(layer_name, class_name)

    def set_checked(self, layer_names: list[str]) -> None:
        """Check exactly these layers for export."""
        for row in range(self.table.rowCount()):
            item = self.table.item(row, 0)
            item.setCheckState(Qt.Checked if item.text() in layer_names else Qt.Unchecked)

    def _update_enabled(self) -> None:
        running = self._worker is not None
        has_layers = any(on for _, on in self._table_state())
        has_out = bool(self.out_edit.text().strip())
        self.export_btn.setEnabled(not running and has_layers and has_out)
        if running:
            tip = "an export is running"
        elif not has_layers:
            tip = "check at least one labels or shapes layer"
        elif not has_out:
            tip = "choose an output .geojson file"
        else:
            tip = "export the checked layers"
        self.export_btn.setToolTip(tip)
        self.stop_btn.setEnabled(running)

    # ------------------------------------------------------------------ export
    def _on_browse(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export to GeoJSON", "", "GeoJSON (*.geojson)")
        if path:
            if not path.lower().endswith(".geojson"):
                path += ".geojson"
            self.out_edit.setText(path)

    def _layer(self, name: str) -> Layer | None:
        return layer_named(self.viewer, name)

    def _jobs(self) -> list[tuple[str, str, Any, dict]]:
        out = Path(self.out_edit.text().strip())
        if out.suffix.lower() != ".geojson":
            out = out.with_suffix(".geojson")
        chosen = [(n, c) for (n, on), (_, c) in zip(self._table_state(), self._table_classes()) if on]
        slide_layer = self._layer(self.slide_combo.currentText())
        slide = slide_layer.metadata.get("pathoseg_slide") if slide_layer is not None else None
        prob_layer = self._layer(self.prob_combo.currentText())
        measure = [m for m, box in self.measure_boxes.items() if box.isChecked()]
        if slide is None:
            measure = [m for m in measure if m not in ("hematoxylin", "eosin")]
        if prob_layer is None:
            measure = [m for m in measure if m != "confidence"]
        otype = self.type_combo.currentText()
        metadata = {"model": self.model_edit.text().strip()} if self.model_edit.text().strip() else None
        jobs = []
        for name, cls_name in chosen:
            layer = self._layer(name)
            if layer is None:
                continue
            meta = slide_metadata_from_layer(slide_layer.metadata) if slide_layer is not None else None
            meta = meta or slide_metadata_from_layer(layer.metadata)
            transform = transform_from_layer(scale=layer.scale, translate=layer.translate, slide_metadata=meta)
            cls = Classification.of(cls_name, self._colors.get(name)) if cls_name else None
            path = out if len(chosen) == 1 else out.with_name(f"{out.stem}_{_safe_name(name)}.geojson")
            if isinstance(layer, Labels):
                data = layer.data[0] if layer.multiscale else layer.data
                prob = None
                if prob_layer is not None and "confidence" in measure:
                    prob = prob_layer.data[0] if prob_layer.multiscale else prob_layer.data
                kwargs = dict(
                    slide=slide, slide_metadata=meta, transform=transform,
                    object_type="detection" if otype == "auto" else otype, classification=cls,
                    measure=measure, probability=prob, metadata=metadata,
                )
                jobs.append(("labels", str(path), data, kwargs))
            else:
                kwargs = dict(
                    shape_types=list(layer.shape_type), slide_metadata=meta, transform=transform,
                    object_type="annotation" if otype == "auto" else otype, classification=cls,
                    measure=bool(measure), metadata=metadata,
                )
                jobs.append(("shapes", str(path), [np.asarray(d) for d in layer.data], kwargs))
        return jobs

    def export(self):
        """Start exporting the checked layers in a background thread; returns the worker."""
        jobs = self._jobs()
        if not jobs:
            show_error("Check at least one labels or shapes layer and choose an output file.")
            return None
        self._results = []
        self._n_jobs = len(jobs)
        self._cancel = threading.Event()
        worker = connect_worker(
            _export_worker(jobs, self._cancel),
            errored=self._on_error,
            yielded=self._on_event,
            finished=self._on_finished,
        )
        self._worker = worker
        self.progress.setRange(0, 0)
        self.status.setText("exporting…")
        self._update_enabled()
        worker.start()
        return worker

    def _on_export(self) -> None:
        self.export()

    def _on_stop(self) -> None:
        request_stop(self._cancel, status=self.status, stop_button=self.stop_btn)

    def _on_event(self, event: Any) -> None:
        if isinstance(event, CancelledError):
            idle_progress(self.progress)
            self.status.setText(str(event))
            show_info(str(event))
            return
        index, ev = event
        if isinstance(ev, ExportProgress):
            show_progress(self.progress, ev.done, ev.total)
            self.status.setText(f"layer {index + 1}/{self._n_jobs}: {ev.message}")
        elif isinstance(ev, ExportResult):
            self._results.append(ev)
            idle_progress(self.progress, 1)
            text = f"{ev.n_objects} objects -> {ev.path.name}"
            if ev.measurements_path:
                text += f" (+ {ev.measurements_path.name})"
            self.status.setText(text)
            show_info(f"Exported {text}")

    def _on_error(self, exc: Exception) -> None:
        show_worker_error(exc, action="Export", status=self.status, progress=self.progress)

    def _on_finished(self) -> None:
        self._worker = None
        self._cancel = None
        self._update_enabled()

    @property
    def results(self) -> list[ExportResult]:
        """Results of the last export."""
        return list(self._results)

    # ------------------------------------------------------------------ import
    def _on_import_clicked(self) -> None:
        path = ask_open_file(self, "Open QuPath GeoJSON", "GeoJSON (*.geojson *.json)")
        if path:
            self.open_geojson(path)

    def open_geojson(self, path: str | Path):
        """Read a GeoJSON file in the background and add its layers over the chosen slide."""
        slide_layer = self._layer(self.slide_combo.currentText())
        meta = slide_metadata_from_layer(slide_layer.metadata) if slide_layer is not None else None
        worker = connect_worker(
            _import_worker(str(path), meta), errored=self._on_error, returned=self._on_imported
        )
        self.status.setText(f"reading {Path(path).name}…")
        worker.start()
        return worker

    def _on_imported(self, layer_data: list) -> None:
        for data, kwargs, layer_type in layer_data:
            self.viewer.add_layer(Layer.create(data, kwargs, layer_type))
        self.status.setText(f"opened {len(layer_data)} layer(s)")
