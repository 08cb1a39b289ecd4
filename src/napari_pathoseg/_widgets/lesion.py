"""The "Lesions" dock: lesion heat map and outline (M3) on the view, a drawn rectangle or the whole slide.

The model runs through the dock job controller (background thread, progress, Stop keeps the
finished tiles). The probability map becomes an image layer with a colormap, the mask a Labels
layer (one id per region, editable with napari's label tools). The threshold slider, the
minimum area and "fill holes" re-make the mask from the stored probability map without running
the network again (in the background for large maps). The table lists the area of every
region; "Export GeoJSON…" writes the regions of the (possibly corrected) Labels layer as QuPath
annotations.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QLabel,
    QProgressBar,
    QPushButton,
    QSlider,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from napari_pathoseg._widgets._common import (
    adopt_units,
    form,
    hbox,
    layer_named,
    refill_combo,
    status_label,
    stop_button,
    vbox,
    watch_layer_list,
)
from napari_pathoseg._widgets._jobs import JobController, in_turns
from napari_pathoseg._widgets.nuclei import place_result, shape_region, view_region
from napari_pathoseg._widgets.slide import slide_layers, slide_of_layer
from napari_pathoseg.errors import PathosegError
from napari_pathoseg.events import Progress
from napari_pathoseg.methods.lesion.detect import LesionResult, iter_detect_lesions, region_table

if TYPE_CHECKING:
    import napari

__all__ = ["LesionWidget", "lesion_models", "LesionLayers"]

logger = logging.getLogger(__name__)

TASK = "lesion"
REGIONS = ("Current view", "Drawn rectangle", "Whole slide")
#: Maps up to this many pixels are re-thresholded on the GUI thread; larger ones in the background.
SYNC_PIXELS = 1 << 20


def lesion_models() -> list[Any]:
    """The registered lesion models (shipped first)."""
    from napari_pathoseg.models.registry import list_models

    return list(list_models(task=TASK))


@dataclass
class LesionLayers:
    """A run's result with its region labels, prepared off the GUI thread."""

    result: LesionResult
    labels: np.ndarray

    @property
    def cancelled(self) -> bool:
        return bool(self.result.cancelled)


def detect_job(slide: Any, model_ref: str, *, region: Any, mpp: float | None, threshold: float,
               fill_holes: bool, min_area: float, cancel: Any):
    """The dock's job: load the model, detect, label the regions (worker thread)."""
    from napari_pathoseg.models.registry import load_model

    yield Progress(0, 0, "loading the model…", stage="model")
    model = load_model(model_ref, task=TASK)
    for ev in iter_detect_lesions(slide, model, mpp=mpp, region=region, threshold=threshold, fill_holes=fill_holes,
                                  min_area_um2=min_area, tissue_only=True, cancel=cancel):
        if isinstance(ev, LesionResult):
            yield LesionLayers(ev, region_table(ev.mask, mpp=ev.mpp)[0])
        else:
            yield ev


def rethreshold_job(result: LesionResult, threshold: float, fill_holes: bool, min_area: float) -> LesionLayers:
    """A new mask from the stored probabilities (no network)."""
    from dataclasses import replace

    res = replace(result, fill_holes=fill_holes, min_area_um2=min_area).rethreshold(threshold)
    return LesionLayers(res, region_table(res.mask, mpp=res.mpp)[0])


class LesionWidget(QWidget):
    """Detect lesions with a lesion model; heat map, editable outline, areas, GeoJSON export."""

    def __init__(self, napari_viewer: "napari.Viewer") -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._models: dict[str, str] = {}
        self.result: LesionResult | None = None
        self._slide_layer: Any = None

        self.layer_combo = QComboBox()
        self.model_combo = QComboBox()
        self.region_combo = QComboBox()
        self.region_combo.addItems(REGIONS)
        self.shapes_combo = QComboBox()
        self.draw_btn = QPushButton("Draw…")
        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setDecimals(4)
        self.mpp_spin.setRange(0.0, 100.0)
        self.mpp_spin.setSpecialValueText("from slide")
        self.mpp_spin.setToolTip("µm per pixel of the image; 'from slide' uses the slide's own")
        self.threshold = QSlider(Qt.Orientation.Horizontal)
        self.threshold.setRange(1, 99)
        self.threshold.setValue(50)
        self.threshold_label = QLabel("0.50")
        self.min_area = QDoubleSpinBox()
        self.min_area.setRange(0.0, 1e9)
        self.min_area.setDecimals(0)
        self.min_area.setSuffix(" µm²")
        self.fill_holes = QCheckBox("fill holes")
        self.fill_holes.setChecked(True)
        self.run_btn = QPushButton("Detect lesions")
        self.stop_btn = stop_button()
        self.export_btn = QPushButton("Export GeoJSON…")
        self.progress = QProgressBar()
        self.status = status_label()
        self.table = QTableWidget(0, 2)
        self.table.setHorizontalHeaderLabels(["region", "area (mm²)"])
        self.table.setMaximumHeight(180)

        vbox(
            self,
            form(
                ("Slide", self.layer_combo),
                ("Model", self.model_combo),
                ("Region", self.region_combo),
                ("Rectangle layer", hbox((self.shapes_combo, 1), self.draw_btn)),
                ("µm/px", self.mpp_spin),
                ("Threshold", hbox((self.threshold, 1), self.threshold_label)),
                ("Minimum area", hbox((self.min_area, 1), self.fill_holes)),
            ),
            hbox(self.run_btn, self.stop_btn),
            self.progress,
            self.status,
            self.table,
            self.export_btn,
            stretch_end=True,
        )
        self.jobs = JobController(self, progress=self.progress, status=self.status, stop_button=self.stop_btn,
                                  run_buttons=[self.run_btn], why_not=self._why_not, on_busy=self._on_busy,
                                  action="Lesion detection")
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(120)
        self._timer.timeout.connect(self.apply_threshold)

        self.run_btn.clicked.connect(self._on_run)
        self.draw_btn.clicked.connect(self._on_draw)
        self.export_btn.clicked.connect(self._on_export)
        self.threshold.valueChanged.connect(self._on_threshold_moved)
        self.min_area.valueChanged.connect(lambda *_: self._timer.start())
        self.fill_holes.toggled.connect(lambda *_: self._timer.start())
        for combo in (self.layer_combo, self.region_combo, self.shapes_combo, self.model_combo):
            combo.currentIndexChanged.connect(self.jobs.refresh)
        watch_layer_list(self.viewer, self._refresh)
        self.refresh_models()
        self._refresh()

    # ------------------------------------------------------------------ state
    def refresh_models(self) -> None:
        """Fill the model list with the registry's lesion models."""
        try:
            for m in lesion_models():
                self._models[m["name"]] = str(m["path"])
        except PathosegError as exc:
            show_error(str(exc))
        refill_combo(self.model_combo, list(self._models), current=self.model_combo.currentText())
        self.jobs.refresh()

    def _refresh(self, event: Any = None) -> None:
        from napari.layers import Shapes

        refill_combo(self.layer_combo, [ly.name for ly in slide_layers(self.viewer)])
        refill_combo(self.shapes_combo, [ly.name for ly in self.viewer.layers if isinstance(ly, Shapes)])
        self.jobs.refresh()

    def _why_not(self) -> str:
        if not self.layer_combo.currentText():
            return "Open a slide first (File > Open or the Slide dock)."
        if not self.model_combo.currentText():
            return "No lesion model is registered."
        if self.region_combo.currentText() == "Drawn rectangle" and not self.shapes_combo.currentText():
            return "Draw a rectangle on the slide first (Draw…)."
        return ""

    def _on_busy(self, running: bool) -> None:
        self.export_btn.setEnabled(not running and self.labels_layer() is not None)

    @property
    def threshold_value(self) -> float:
        return self.threshold.value() / 100.0

    def slide_layer(self) -> Any:
        return layer_named(self.viewer, self.layer_combo.currentText())

    def _names(self) -> tuple[str, str]:
        base = self._slide_layer.name if self._slide_layer is not None else "slide"
        return f"{base} lesion probability", f"{base} lesions"

    def labels_layer(self) -> Any:
        return layer_named(self.viewer, self._names()[1]) if self.result is not None else None

    # ------------------------------------------------------------------ run
    def _on_draw(self) -> Any:
        slide = self.slide_layer()
        shapes = self.viewer.add_shapes(name="lesion region", shape_type="rectangle", edge_color="yellow",
                                        face_color="transparent",
                                        units=tuple(slide.units) if slide is not None else None)
        shapes.mode = "add_rectangle"
        self.shapes_combo.setCurrentText(shapes.name)
        self.region_combo.setCurrentText("Drawn rectangle")
        return shapes

    def current_region(self) -> tuple[int, int, int, int] | None:
        layer = self.slide_layer()
        choice = self.region_combo.currentText()
        if choice == "Whole slide":
            return None
        if choice == "Drawn rectangle":
            shapes = layer_named(self.viewer, self.shapes_combo.currentText())
            if shapes is not None:
                adopt_units(shapes, layer)
            return shape_region(shapes, layer)
        return view_region(layer, self.viewer)

    def _on_run(self) -> None:
        layer = self.slide_layer()
        slide = slide_of_layer(layer) if layer is not None else None
        if slide is None:
            show_error("Choose a slide layer opened by napari-pathoseg.")
            return
        try:
            region = self.current_region()
        except PathosegError as exc:
            show_error(str(exc))
            return
        model_ref = self._models.get(self.model_combo.currentText(), self.model_combo.currentText())
        args = dict(region=region, mpp=self.mpp_spin.value() or None, threshold=self.threshold_value,
                    fill_holes=self.fill_holes.isChecked(), min_area=self.min_area.value())
        self.jobs.start(lambda token: detect_job(slide, model_ref, cancel=token, **args), done_type=LesionLayers,
                        on_event=self._on_progress, on_done=lambda prepared, _l=layer: self._on_done(_l, prepared),
                        message="loading the model…")

    def _on_progress(self, ev: Any) -> None:
        if isinstance(ev, Progress) and ev.total and ev.stage == "inference":
            self.status.setText(f"{ev.done}/{ev.total} tiles")

    def _on_done(self, slide_layer: Any, prepared: LesionLayers) -> None:
        self.result, self._slide_layer = prepared.result, slide_layer
        res = prepared.result
        place = place_result(slide_layer, res)
        heat, lab = self._names()
        for n in (heat, lab):
            if n in self.viewer.layers:
                self.viewer.layers.remove(n)
        meta = {"model": res.model, "region_xywh": list(res.region), "mpp": res.mpp, "slide": slide_layer.metadata.get("slide"),
                "pathoseg_slide": slide_of_layer(slide_layer), "object_type": "annotation", "class_name": "Tumor"}

        def add_heat() -> None:
            self.viewer.add_image(res.prob, name=heat, colormap="inferno", contrast_limits=(0.0, 1.0), opacity=0.5,
                                  blending="additive", metadata=dict(meta), **place)

        def add_labels() -> None:
            self.viewer.add_labels(prepared.labels, name=lab, opacity=0.5, metadata=dict(meta), **place)
            self.viewer.layers.selection.active = slide_layer

        in_turns(add_heat, add_labels)
        self._show_regions(res)
        self.jobs.refresh()
        if prepared.cancelled:
            show_info(f"Stopped: the lesions of the {res.tiles} finished tiles are kept")

    # ------------------------------------------------------------------ threshold
    def _on_threshold_moved(self, value: int) -> None:
        self.threshold_label.setText(f"{value / 100:.2f}")
        self._timer.start()

    def apply_threshold(self) -> None:
        """Re-make the mask from the stored probabilities with the current threshold and options."""
        if self.result is None:
            return
        if self.jobs.running:
            self._timer.start()
            return
        args = (self.result, self.threshold_value, self.fill_holes.isChecked(), self.min_area.value())
        if self.result.prob.size <= SYNC_PIXELS:
            self._on_rethreshold(rethreshold_job(*args))
        else:
            self.jobs.start(lambda token: rethreshold_job(*args), on_done=self._on_rethreshold,
                            message="new threshold…", action="Re-thresholding", abandon_on_stop=True)

    def _on_rethreshold(self, prepared: LesionLayers) -> None:
        self.result = prepared.result
        layer = self.labels_layer()
        if layer is not None:
            layer.data = prepared.labels
        self._show_regions(prepared.result)

    def _show_regions(self, res: LesionResult) -> None:
        rows = sorted(res.regions, key=lambda r: -r["area_um2"])
        self.table.setRowCount(len(rows))
        for i, r in enumerate(rows):
            self.table.setItem(i, 0, QTableWidgetItem(str(r["id"])))
            self.table.setItem(i, 1, QTableWidgetItem(f"{r['area_um2'] / 1e6:.4f}"))
        s = res.summary()
        self.status.setText(f"{s['n_regions']} lesion regions · {s['lesion_area_um2'] / 1e6:.3f} mm² · "
                            f"{100 * s['lesion_fraction_of_tissue']:.1f} % of the tissue · threshold {res.threshold:.2f}")

    # ------------------------------------------------------------------ export
    def export_geojson(self, path: str) -> int:
        """Write the regions of the Labels layer (with the user's corrections) as QuPath annotations."""
        from dataclasses import replace

        from napari_pathoseg.methods.lesion.detect import export_regions_geojson

        layer = self.labels_layer()
        if layer is None or self.result is None:
            raise PathosegError("Detect lesions first: there is no lesion layer to export.")
        edited = replace(self.result, mask=np.asarray(layer.data) > 0)
        return export_regions_geojson(edited, slide_of_layer(self._slide_layer), path)

    def _on_export(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export lesion regions", "lesions.geojson", "GeoJSON (*.geojson)")
        if not path:
            return
        try:
            n = self.export_geojson(path)
        except PathosegError as exc:
            show_error(str(exc))
            return
        show_info(f"{n} lesion regions written to {path}")

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt API
        self.jobs.shutdown()
        super().closeEvent(event)
