"""The "Tissue" dock: a tissue-type map (M5) of the view, a drawn rectangle or the whole slide.

The model is loaded and the region segmented in a background thread through the dock job
controller; the class-id pyramid is built there too; the GUI thread only adds the Labels layer
(class colours, class names as layer features) and fills the per-class area table. Stop keeps
the tiles already finished. **Export GeoJSON…** writes the class regions of the map (as the
user may have edited it) as QuPath annotations with their class, in the background. The
training panel (:mod:`._widgets.tissue_train`) trains a model from tiles tagged on the slide.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QProgressBar,
    QPushButton,
    QSlider,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from napari_pathoseg._widgets._common import (
    display_levels,
    follow_slide_units,
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
from napari_pathoseg._widgets._region import REGIONS, chosen_region
from napari_pathoseg._widgets.nuclei import place_result
from napari_pathoseg._widgets.slide import slide_layers, slide_of_layer
from napari_pathoseg.errors import PathosegError
from napari_pathoseg.events import Progress
from napari_pathoseg.methods.tissue.segment import (
    CLASS_COLOURS,
    TissueResult,
    iter_tissue,
)

if TYPE_CHECKING:
    import napari

__all__ = ["TissueWidget", "class_colormap", "tissue_models"]

logger = logging.getLogger(__name__)

TASK = "tissue"
MODES = {"M5 windows (224 px, 50 % overlap)": "literal", "Fast (fully convolutional)": "fast"}


def tissue_models() -> list[Any]:
    """The registered models of the tissue task (shipped first)."""
    from napari_pathoseg.models.registry import list_models

    return list(list_models(task=TASK))


def class_colormap(n: int) -> dict[Any, Any]:
    """Label colours: background transparent, then the class palette (RGBA 0..1)."""
    colours: dict[Any, Any] = {None: (0, 0, 0, 0), 0: (0, 0, 0, 0)}
    for i in range(1, n + 1):
        r, g, b = CLASS_COLOURS[i % len(CLASS_COLOURS)] if i < len(CLASS_COLOURS) else CLASS_COLOURS[1 + i % 8]
        colours[i] = (r / 255, g / 255, b / 255, 1.0)
    return colours


@dataclass
class TissueLayers:
    """A tissue result with its label pyramid prepared off the GUI thread."""

    result: TissueResult
    levels: list[Any]

    @property
    def cancelled(self) -> bool:
        return bool(self.result.cancelled)


@dataclass
class ExportDone:
    """A finished GeoJSON export: the file and the regions per class (``total``)."""

    path: str
    counts: dict[str, int]
    cancelled: bool = False


def tissue_job(slide: Any, model_ref: str, *, region: Any, mpp: float | None, mode: str, work_dir: str | None,
               cancel: Any):
    """The dock's job: load the model, map the tissue, prepare the label levels (worker thread)."""
    from napari_pathoseg.models.registry import load_model

    yield Progress(0, 0, "loading the model…", stage="model")
    model = load_model(model_ref, task=TASK)
    for ev in iter_tissue(slide, model, mode=mode, region=region, mpp=mpp, tissue_only=True, work_dir=work_dir,
                          cancel=cancel):
        if isinstance(ev, TissueResult):
            yield Progress(ev.tiles, max(ev.tiles, ev.tiles_total), "preparing the layer…")
            yield TissueLayers(ev, display_levels(ev.ids))
        else:
            yield ev


class TissueWidget(QWidget):
    """Tissue segmentation with a shipped or user model; the map as Labels with an area table."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._tmps: list[tempfile.TemporaryDirectory] = []
        self._models: dict[str, str] = {}
        self.layer_combo = QComboBox()
        self.model_combo = QComboBox()
        self.region_combo = QComboBox()
        self.region_combo.addItems(REGIONS)
        self.shapes_combo = QComboBox()
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(list(MODES))
        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setDecimals(4)
        self.mpp_spin.setRange(0.0, 100.0)
        self.mpp_spin.setSpecialValueText("from slide")
        self.run_btn = QPushButton("Segment tissue")
        self.stop_btn = stop_button()
        self.progress = QProgressBar()
        self.status = status_label()
        self.opacity = QSlider(Qt.Orientation.Horizontal)
        self.opacity.setRange(0, 100)
        self.opacity.setValue(60)
        self.table = QTableWidget(0, 4)
        self.table.setHorizontalHeaderLabels(["class", "id", "area (mm²)", "fraction"])
        self.export_btn = QPushButton("Export GeoJSON…")
        from napari_pathoseg._widgets.tissue_train import TissueTrainPanel

        self.train_panel = TissueTrainPanel(self)
        vbox(
            self,
            form(("Slide", self.layer_combo), ("Model", self.model_combo), ("Region", self.region_combo),
                 ("Rectangle layer", self.shapes_combo), ("Inference", self.mode_combo), ("µm/px", self.mpp_spin)),
            hbox(self.run_btn, self.stop_btn),
            self.progress,
            self.status,
            form(("Opacity", self.opacity)),
            self.table,
            hbox(self.export_btn),
            self.train_panel,
        )
        self.jobs = JobController(self, progress=self.progress, status=self.status, stop_button=self.stop_btn,
                                  run_buttons=[self.run_btn], why_not=self._why_not, on_busy=self._on_busy,
                                  action="Tissue segmentation")
        self.run_btn.clicked.connect(self._on_run)
        self.export_btn.clicked.connect(self._on_export)
        self.opacity.valueChanged.connect(self._on_opacity)
        for combo in (self.layer_combo, self.region_combo, self.shapes_combo, self.model_combo):
            combo.currentIndexChanged.connect(self.jobs.refresh)
        watch_layer_list(self.viewer, self._refresh)
        follow_slide_units(self.viewer, slide_layers)
        self.refresh_models()
        self._refresh()

    # ------------------------------------------------------------------ state
    def refresh_models(self, select: str | None = None) -> None:
        """Fill the model list with the registry's tissue models."""
        current = select or self.model_combo.currentText()
        try:
            models = tissue_models()
        except PathosegError as exc:
            show_error(str(exc))
            models = []
        for m in models:
            self._models[m["name"]] = str(m["path"])
        refill_combo(self.model_combo, list(self._models), current=current)
        self.jobs.refresh()

    def _refresh(self, event: Any = None) -> None:
        from napari.layers import Shapes

        refill_combo(self.layer_combo, [ly.name for ly in slide_layers(self.viewer)])
        refill_combo(self.shapes_combo, [ly.name for ly in self.viewer.layers if isinstance(ly, Shapes)])
        self.train_panel.refresh()
        self.jobs.refresh()

    def _on_busy(self, running: bool) -> None:
        self.export_btn.setEnabled(not running and layer_named(self.viewer, self.labels_name()) is not None)
        self.train_panel.train_btn.setEnabled(not running)

    def _why_not(self) -> str:
        if not self.layer_combo.currentText():
            return "Open a slide first (File > Open or the Slide dock)."
        if not self.model_combo.currentText():
            return "No tissue model registered: train one with pathoseg tissue-train."
        if self.region_combo.currentText() == "Drawn rectangle" and not self.shapes_combo.currentText():
            return "Draw a rectangle on the slide first."
        return ""

    def slide_layer(self) -> Any:
        return layer_named(self.viewer, self.layer_combo.currentText())

    def labels_name(self) -> str:
        return f"{self.layer_combo.currentText()} tissue"

    def current_region(self) -> tuple[int, int, int, int] | None:
        """Level-0 (x, y, w, h) of the chosen region; ``None`` for the whole slide."""
        return chosen_region(self.viewer, self.slide_layer(), self.region_combo.currentText(),
                             self.shapes_combo.currentText())

    # ------------------------------------------------------------------ callbacks
    def _on_opacity(self, value: int) -> None:
        layer = layer_named(self.viewer, self.labels_name())
        if layer is not None:
            layer.opacity = value / 100.0

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
        mpp = self.mpp_spin.value() or None
        mode = MODES[self.mode_combo.currentText()]
        model_ref = self._models.get(self.model_combo.currentText(), self.model_combo.currentText())
        work_dir = None
        if region is None:  # whole slide: probabilities as files while the job runs
            tmp = tempfile.TemporaryDirectory(prefix="pathoseg-tissue-")
            self._tmps.append(tmp)
            work_dir = tmp.name
        self.jobs.start(
            lambda token: tissue_job(slide, model_ref, region=region, mpp=mpp, mode=mode, work_dir=work_dir,
                                     cancel=token),
            done_type=TissueLayers,
            on_event=self._on_progress,
            on_done=lambda prepared, _l=layer: self._on_done(_l, prepared),
            message="loading the model…",
        )

    def _on_progress(self, ev: Any) -> None:
        if isinstance(ev, Progress) and ev.total:
            self.status.setText(f"{ev.done}/{ev.total} tiles · {ev.message}")

    def fill_table(self, result: TissueResult) -> None:
        """One row per class: name, id, area in mm², fraction of the tissue."""
        rows = [(name, a) for name, a in result.areas.items() if name != "background"]
        self.table.setRowCount(len(rows))
        for r, (name, a) in enumerate(rows):
            for c, text in enumerate((name, str(a["id"]), f"{a['area_um2'] / 1e6:.4f}", f"{a['fraction']:.3f}")):
                self.table.setItem(r, c, QTableWidgetItem(text))

    def _on_done(self, slide_layer: Any, prepared: TissueLayers) -> None:
        from napari.utils.colormaps import DirectLabelColormap

        result = prepared.result
        place = place_result(slide_layer, result)
        name = self.labels_name()
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        n = len(result.classes)
        features = {"index": np.arange(n + 1), "class": ["background", *result.classes]}

        def add_labels() -> None:
            levels = prepared.levels
            self.viewer.add_labels(
                levels if len(levels) > 1 else levels[0], multiscale=len(levels) > 1, name=name,
                opacity=self.opacity.value() / 100.0, features=features,
                colormap=DirectLabelColormap(color_dict=class_colormap(n)),
                metadata={"model": result.model, "region_xywh": list(result.region), "mpp": result.mpp,
                          "level0_pixels_per_pixel": result.scale,
                          "classes": list(result.classes), "areas": result.areas, "cancelled": prepared.cancelled,
                          "slide": slide_layer.metadata.get("slide"), "pathoseg_slide": slide_of_layer(slide_layer),
                          "object_type": "annotation"},
                **place,
            )
            self.viewer.layers.selection.active = slide_layer

        in_turns(add_labels, self.jobs.refresh)
        self.fill_table(result)
        tissue = sum(a["pixels"] for k, a in result.areas.items() if k != "background")
        if prepared.cancelled:
            self.status.setText(f"stopped: the {result.tiles} of {result.tiles_total} tiles finished are kept")
            show_info(f"Stopped: {result.tiles} finished tiles are kept")
            return
        self.status.setText(f"{tissue * result.mpp ** 2 / 1e6:.3f} mm² tissue · {result.tiles} tiles · "
                            f"{result.timings.get('total_s', 0):.1f} s ({result.model})")

    # ------------------------------------------------------------------ export
    def start_export(self, path: str) -> Any:
        """Export the class regions of the tissue layer to ``path`` (QuPath annotations) as a background job."""
        from napari_pathoseg.methods.tissue.regions import export_tissue_geojson

        layer = layer_named(self.viewer, self.labels_name())
        if layer is None:
            raise PathosegError("Segment tissue first: there is no tissue layer to export.")
        md = layer.metadata
        ids = layer.data[0] if layer.multiscale else layer.data
        slide = md.get("pathoseg_slide")
        x, y = md["region_xywh"][:2]

        def job(token: Any):
            yield Progress(0, 0, "tracing the class regions…", stage="export")
            counts = export_tissue_geojson(np.asarray(ids), md["classes"], path, region_xy=(x, y),
                                           scale=float(md.get("level0_pixels_per_pixel", 1.0)),
                                           slide_metadata=getattr(slide, "metadata", None), cancel=token,
                                           metadata={"model": str(md.get("model", ""))})
            yield ExportDone(path, counts)

        return self.jobs.start(job, done_type=ExportDone, on_done=self._on_exported, message="exporting…",
                               action="GeoJSON export")

    def _on_export(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export tissue regions", "tissue.geojson", "GeoJSON (*.geojson)")
        if not path:
            return
        try:
            self.start_export(path)
        except PathosegError as exc:
            show_error(str(exc))

    def _on_exported(self, done: ExportDone) -> None:
        per = ", ".join(f"{v} {k}" for k, v in done.counts.items() if k != "total")
        self.status.setText(f"exported {done.counts['total']} regions ({per}) to {done.path}")

    def closeEvent(self, event: Any) -> None:
        self.jobs.shutdown()
        super().closeEvent(event)
