"""The "Export" dock: labels and shapes layers -> QuPath GeoJSON (+ measurements CSV), and back.

The dock reads its choices and hands them to :mod:`._widgets.export_jobs`, whose job runs
:func:`~napari_pathoseg.export.geojson.iter_export_labels` /
:func:`~napari_pathoseg.export.geojson.iter_export_shapes` through the docks'
:class:`~napari_pathoseg._widgets._jobs.JobController` (background thread, progress bar, a
working Stop: a cancelled export leaves no file behind). The Confidence measurement is offered
only when there is a source for it: a probability layer, or the per-nucleus table the Nuclei
dock keeps with its labels.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari.layers import Image, Labels, Layer, Shapes
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
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

from napari_pathoseg._widgets._common import (
    adopt_units,
    ask_open_file,
    hbox,
    layer_named,
    refill_combo,
    status_label,
    stop_button,
    vbox,
    watch_layer_list,
)
from napari_pathoseg._widgets._jobs import JobController
from napari_pathoseg._widgets.export_jobs import ExportStep, confidence_source, export_job, plan_exports
from napari_pathoseg.export.coords import slide_metadata_from_layer
from napari_pathoseg.export.geojson import ExportResult, class_color
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
_NO_CONFIDENCE = (
    "No confidence to export: choose a Probability layer (the model's map), or check nuclei "
    "segmented by the Nuclei dock (their table holds each nucleus' confidence)."
)


class ExportWidget(QWidget):
    """Export labels/shapes layers to QuPath GeoJSON with classes, colours and measurements."""

    def __init__(self, napari_viewer: "napari.Viewer") -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._results: list[ExportResult] = []
        self._colors: dict[str, tuple[int, int, int]] = {}

        # layers table: layer (checkable) | class | colour
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["Layer", "Class", "Colour"])
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
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

        self.jobs = JobController(
            self, progress=self.progress, status=self.status, stop_button=self.stop_btn,
            run_buttons=[self.export_btn], why_not=self._why_not, on_busy=self._on_busy, action="Export",
        )
        self.browse_btn.clicked.connect(self._on_browse)
        self.export_btn.clicked.connect(self._on_export)
        self.import_btn.clicked.connect(self._on_import_clicked)
        self.table.itemChanged.connect(lambda *_: self._update_enabled())
        self.out_edit.textChanged.connect(lambda *_: self._update_enabled())
        self.prob_combo.currentIndexChanged.connect(lambda *_: self._update_enabled())
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
            item.setFlags(Qt.ItemFlag.ItemIsUserCheckable | Qt.ItemFlag.ItemIsEnabled)
            item.setCheckState(Qt.CheckState.Checked if ly.name in checked or not checked else Qt.CheckState.Unchecked)
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
        probs = [ly.name for ly in self.viewer.layers if isinstance(ly, Image) and ly.ndim == 2 and not ly.rgb]
        # the first slide is chosen by default; "(none)" is the default probability map
        refill_combo(self.slide_combo, [_NO_LAYER, *slides], fallback=1 if slides else 0)
        refill_combo(self.prob_combo, [_NO_LAYER, *probs])
        self._update_enabled()

    def _table_state(self) -> list[tuple[str, bool]]:
        out = []
        for row in range(self.table.rowCount()):
            item = self.table.item(row, 0)
            if item is not None:
                out.append((item.text(), item.checkState() == Qt.CheckState.Checked))
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
            item.setCheckState(Qt.CheckState.Checked if item.text() in layer_names else Qt.CheckState.Unchecked)

    def _why_not(self) -> str:
        if not any(on for _, on in self._table_state()):
            return "Check at least one labels or shapes layer."
        if not self.out_edit.text().strip():
            return "Choose an output .geojson file."
        return ""

    def _on_busy(self, running: bool) -> None:
        self.import_btn.setEnabled(not running)

    def _checked_layers(self) -> list[Layer]:
        return [ly for name, on in self._table_state() if on and (ly := self._layer(name)) is not None]

    def confidence_sources(self) -> dict[str, str]:
        """Checked labels layer -> where its Confidence comes from ("" when it has none)."""
        prob = self._layer(self.prob_combo.currentText())
        return {ly.name: confidence_source(ly, prob).description
                for ly in self._checked_layers() if isinstance(ly, Labels)}

    def _update_enabled(self) -> None:
        """Follow the inputs: the Export button, and the Confidence box (enabled only with a source)."""
        self.jobs.refresh()
        box = self.measure_boxes["confidence"]
        sources = self.confidence_sources()
        found = sorted({d for d in sources.values() if d})
        box.setEnabled(bool(found))
        if not found:
            box.setChecked(False)
            box.setToolTip(_NO_CONFIDENCE)
        else:
            without = [name for name, d in sources.items() if not d]
            tip = "Confidence: " + "; ".join(found)
            if without:
                tip += f". Not measured for {', '.join(without)} (no probability map or nucleus table)."
            box.setToolTip(tip)

    # ------------------------------------------------------------------ export
    def _on_browse(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export to GeoJSON", "", "GeoJSON (*.geojson)")
        if path:
            if not path.lower().endswith(".geojson"):
                path += ".geojson"
            self.out_edit.setText(path)

    def _layer(self, name: str) -> Layer | None:
        return layer_named(self.viewer, name)

    def plan(self) -> list:
        """The :class:`~._widgets.export_jobs.ExportTask` s the checked layers and choices describe."""
        chosen = [(n, c) for (n, on), (_, c) in zip(self._table_state(), self._table_classes()) if on]
        layers = [(ly, cls, self._colors.get(name)) for name, cls in chosen if (ly := self._layer(name)) is not None]
        return plan_exports(
            self.out_edit.text().strip(), layers,
            slide_layer=self._layer(self.slide_combo.currentText()),
            prob_layer=self._layer(self.prob_combo.currentText()),
            measure=[m for m, box in self.measure_boxes.items() if box.isChecked() and box.isEnabled()],
            object_type=self.type_combo.currentText(), model=self.model_edit.text().strip(),
        )

    def export(self):
        """Export the checked layers in the background; returns the :class:`~._jobs.Job` (None when
        nothing is checked or another export runs)."""
        tasks = self.plan() if self.out_edit.text().strip() else []
        if not tasks:
            show_error("Check at least one labels or shapes layer and choose an output file.")
            return None
        self._results = []
        skipped = [t.layer_name for t in tasks if t.kind == "labels" and self.measure_boxes["confidence"].isChecked()
                   and not t.confidence]
        note = f" (no confidence for {', '.join(skipped)}: no probability map or nucleus table)" if skipped else ""
        return self.jobs.start(export_job(tasks), on_event=self._on_event, on_done=self._on_done,
                               message=f"exporting {len(tasks)} layer(s)…{note}")

    def _on_export(self) -> None:
        self.export()

    def _on_event(self, event: Any) -> None:
        if isinstance(event, ExportResult):
            self._results.append(event)
            text = f"{event.n_objects} objects -> {event.path.name}"
            if event.measurements_path:
                text += f" (+ {event.measurements_path.name})"
            self.status.setText(text)
            show_info(f"Exported {text}")
        elif isinstance(event, ExportStep) and not event.total:
            self.status.setText(event.message)

    def _on_done(self, results: list) -> None:
        names = ", ".join(r.path.name for r in results)
        self.status.setText(f"exported {sum(r.n_objects for r in results)} objects -> {names}")

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
        """Read a GeoJSON file in the background and add its layers over the chosen slide;
        returns the :class:`~._jobs.Job` (None while an export runs)."""
        slide_layer = self._layer(self.slide_combo.currentText())
        meta = slide_metadata_from_layer(slide_layer.metadata) if slide_layer is not None else None
        path = str(path)
        return self.jobs.start(
            lambda token: geojson_layer_data(path, slide_metadata=meta),
            on_done=lambda layer_data: self._on_imported(layer_data, slide_layer if meta else None),
            message=f"reading {Path(path).name}…", action="GeoJSON import", abandon_on_stop=True,
        )

    def _on_imported(self, layer_data: list, slide_layer: Any = None) -> None:
        """Add the layers read; placed over ``slide_layer`` they take its units (µm), so the
        scale bar keeps reading physical units."""
        for data, kwargs, layer_type in layer_data:
            layer = self.viewer.add_layer(Layer.create(data, kwargs, layer_type))
            if slide_layer is not None:
                adopt_units(layer, slide_layer)
        self.status.setText(f"opened {len(layer_data)} layer(s)")
