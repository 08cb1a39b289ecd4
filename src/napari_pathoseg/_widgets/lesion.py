"""The "Lesions" dock: lesion heat map and outline (M3) on the view, a drawn rectangle or the whole slide.

The model runs through the dock job controller (background thread, progress, Stop keeps the
finished tiles). The probability map becomes an image layer with a colormap, the mask a Labels
layer (one id per region, editable with napari's label tools). The threshold slider, the
minimum area and "fill holes" re-make the mask from the stored probability map without running
the network again (in the background for large maps). The table lists the area of every
region; "Export GeoJSON…" writes the regions of the (possibly corrected) Labels layer as QuPath
annotations.

A whole-slide run streams to a temporary work folder (:func:`iter_detect_lesions` with
``work_dir``): the probability map, mask and region labels are files there, the layers get
memory maps of them plus coarser display levels made in the worker, one band of rows at a time
(:func:`streamed_levels`), so nothing slide-sized is held in memory. While the threshold slider
is dragged the mask is previewed on a display level (at most 1024 px a side, GUI thread); when
it is released the full-resolution mask is streamed again in the background. The folder is
removed when the layers are replaced, when the dock closes, or when napari quits.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
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
from napari_pathoseg._widgets._region import (
    REGIONS,
    add_region_rectangle,
    chosen_region,
)
from napari_pathoseg._widgets.nuclei import place_result
from napari_pathoseg._widgets.slide import slide_layers, slide_of_layer
from napari_pathoseg.errors import PathosegError
from napari_pathoseg.events import Progress
from napari_pathoseg.methods.lesion.detect import (
    LesionResult,
    iter_detect_lesions,
    lesion_mask,
)

if TYPE_CHECKING:
    import napari

__all__ = ["LesionLayers", "LesionWidget", "lesion_models", "prepare_layers", "streamed_levels"]

logger = logging.getLogger(__name__)

TASK = "lesion"
#: Maps up to this many pixels are re-thresholded on the GUI thread; larger ones in the background.
SYNC_PIXELS = 1 << 20
#: A streamed map with a side above this gets coarser display levels (multiscale, view-only layers).
DISPLAY_MAX_SIDE = 2048
#: The coarsest display level has at most this side.
DISPLAY_MIN_SIDE = 512
#: The live threshold preview of a multiscale result runs on a display level of at most this side.
PREVIEW_MAX_SIDE = 1024
#: Rows read at a time when the display levels are made.
BAND_ROWS = 256
#: The area table lists at most this many regions (the largest; the export has them all).
MAX_TABLE_ROWS = 1000


def lesion_models() -> list[Any]:
    """The registered lesion models (shipped first)."""
    from napari_pathoseg.models.registry import list_models

    return list(list_models(task=TASK))


@dataclass
class LesionLayers:
    """A run's result with its layer data, prepared off the GUI thread.

    Attributes
    ----------
    result : LesionResult
    labels : list of arrays
        The region labels: one array, or the levels of a multiscale layer (full resolution first).
    heat : list of arrays, optional
        The probability map, likewise (``None`` after a re-threshold: the heat map is unchanged).
    preview : (array, int), optional
        A display level of the probability map in memory and its stride, for the live threshold
        preview of a multiscale result.
    files : list of Path
        Work-folder files of this mask (mask, labels and their display levels), deleted when
        a new threshold replaces them.
    """

    result: LesionResult
    labels: list[Any]
    heat: list[Any] | None = None
    preview: tuple[np.ndarray, int] | None = None
    files: list[Path] = field(default_factory=list)

    @property
    def cancelled(self) -> bool:
        return bool(self.result.cancelled)

    @property
    def multiscale(self) -> bool:
        return len(self.labels) > 1


def streamed_levels(read: Any, shape: tuple[int, int], dtype: Any, folder: Path, tag: str, *,
                    max_side: int | None = None, min_side: int | None = None) -> list[np.ndarray]:
    """The coarser display levels of a map on disk, as read-only memory maps of files in ``folder``.

    Level ``k`` is every ``2**k``-th pixel of the map (what
    :func:`~napari_pathoseg._widgets._common.display_levels` makes from an array), for levels
    down to a side of at most ``min_side``; none when the map's sides are at most ``max_side``.
    All levels are made in one pass over the map, ``BAND_ROWS`` rows at a time (``read(row0,
    row1)``), and written to ``folder/<tag>-level<k>.npy``.
    """
    from napari_pathoseg.inference._rows import RowStore

    max_side = DISPLAY_MAX_SIDE if max_side is None else max_side
    min_side = DISPLAY_MIN_SIDE if min_side is None else min_side
    rows, cols = int(shape[0]), int(shape[1])
    if max(rows, cols) <= max_side:
        return []
    strides, side = [], max(rows, cols)
    while side > min_side:
        strides.append(2 ** (len(strides) + 1))
        side = -(-side // 2)
    stores = [RowStore((-(-rows // st), -(-cols // st)), dtype, path=Path(folder) / f"{tag}-level{k}.npy")
              for k, st in enumerate(strides, start=1)]
    band = -(-max(BAND_ROWS, strides[-1]) // strides[-1]) * strides[-1]
    for r0 in range(0, rows, band):
        block = np.asarray(read(r0, min(rows, r0 + band)))
        for st, store in zip(strides, stores):
            store.write(r0 // st, block[::st, ::st])
    for store in stores:
        store.close()
    return [np.load(store.path, mmap_mode="r") for store in stores]


def prepare_layers(res: LesionResult, *, heat: bool = True) -> LesionLayers:
    """The layer data of a result (worker thread): labels and heat map, levels for a large streamed map."""
    if res.stores is None:  # arrays in memory (view, rectangle): one editable level, as always
        return LesionLayers(res, [res.labels()], [res.prob] if heat else None)
    labels_path = Path(res.stores["labels"].path)
    files = [Path(res.stores["mask"].path), labels_path]
    lab0 = res.labels()
    shape = tuple(res.prob.shape[:2])
    if max(shape) <= DISPLAY_MAX_SIDE:  # small: an editable copy of the labels, the memory-mapped map
        return LesionLayers(res, [np.array(lab0)], [res.prob] if heat else None, files=files)
    folder = labels_path.parent
    lab_levels = streamed_levels(lambda a, b: res.rows("labels", a, b), shape, np.int32, folder, labels_path.stem)
    files += [Path(str(lv.filename)) for lv in lab_levels]
    out = LesionLayers(res, [lab0, *lab_levels], files=files)
    if heat:
        heat_levels = streamed_levels(lambda a, b: res.rows("prob", a, b), shape, np.float32, folder,
                                      Path(res.stores["prob"].path).stem)
        out.heat = [res.prob, *heat_levels]
        stride, level = next((2 ** k, lv) for k, lv in enumerate(out.heat) if max(lv.shape[:2]) <= PREVIEW_MAX_SIDE)
        out.preview = (np.array(level, np.float32), stride)
    return out


def detect_job(slide: Any, model_ref: str, *, region: Any, mpp: float | None, threshold: float,
               fill_holes: bool, min_area: float, work_dir: str | None = None, cancel: Any):
    """The dock's job: load the model, detect (streamed to ``work_dir`` if given), prepare the layers (worker thread)."""
    from napari_pathoseg.models.registry import load_model

    yield Progress(0, 0, "loading the model…", stage="model")
    model = load_model(model_ref, task=TASK)
    for ev in iter_detect_lesions(slide, model, mpp=mpp, region=region, threshold=threshold, fill_holes=fill_holes,
                                  min_area_um2=min_area, tissue_only=True, work_dir=work_dir, cancel=cancel):
        if isinstance(ev, LesionResult):
            yield Progress(ev.tiles, max(ev.tiles, ev.tiles_total), "preparing the layers…", stage="layers")
            yield prepare_layers(ev)
        else:
            yield ev


def rethreshold_job(result: LesionResult, threshold: float, fill_holes: bool, min_area: float) -> LesionLayers:
    """A new mask from the stored probabilities (no network; streamed again when the run was)."""
    from dataclasses import replace

    res = replace(result, fill_holes=fill_holes, min_area_um2=min_area).rethreshold(threshold)
    return prepare_layers(res, heat=False)


@dataclass
class ExportDone:
    """A finished GeoJSON export: the file and the number of regions."""

    path: str
    n: int
    cancelled: bool = False


class LesionWidget(QWidget):
    """Detect lesions with a lesion model; heat map, editable outline, areas, GeoJSON export."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._models: dict[str, str] = {}
        self.result: LesionResult | None = None
        self._slide_layer: Any = None
        self._work: tempfile.TemporaryDirectory | None = None  # the shown whole-slide result's folder
        self._pending: tempfile.TemporaryDirectory | None = None  # the running whole-slide job's folder
        self._files: list[Path] = []  # the shown mask's own files in the work folder
        self._preview: tuple[np.ndarray, int] | None = None
        self._previewed: tuple[float, bool, float] | None = None  # the options the preview shows

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
        self.threshold.sliderReleased.connect(self._timer.start)
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

    def _names(self) -> tuple[str, str, str]:
        base = self._slide_layer.name if self._slide_layer is not None else "slide"
        return f"{base} lesion probability", f"{base} lesions", f"{base} lesions (preview)"

    @property
    def work_dir(self) -> str | None:
        """The work folder of the shown whole-slide result (``None``: arrays in memory)."""
        return self._work.name if self._work is not None else None

    def _release(self, attr: str) -> None:
        """Remove a work folder (``_work`` or ``_pending``) and forget it."""
        tmp = getattr(self, attr)
        setattr(self, attr, None)
        if tmp is not None:
            tmp.cleanup()

    def labels_layer(self) -> Any:
        return layer_named(self.viewer, self._names()[1]) if self.result is not None else None

    # ------------------------------------------------------------------ run
    def _on_draw(self) -> Any:
        """Add a rectangle layer in the slide's units, chosen for "Drawn rectangle", in draw mode."""
        shapes = add_region_rectangle(self.viewer, self.slide_layer(), "lesion region")
        self.shapes_combo.setCurrentText(shapes.name)
        self.region_combo.setCurrentText("Drawn rectangle")
        return shapes

    def current_region(self) -> tuple[int, int, int, int] | None:
        """Level-0 (x, y, w, h) of the chosen region; ``None`` for the whole slide."""
        return chosen_region(self.viewer, self.slide_layer(), self.region_combo.currentText(),
                             self.shapes_combo.currentText())

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
        if region is None and not self.jobs.running:  # whole slide: the maps go to files, not memory
            self._release("_pending")
            self._pending = tempfile.TemporaryDirectory(prefix="pathoseg-lesion-")
        work_dir = self._pending.name if region is None and self._pending is not None else None
        args = {"region": region, "mpp": self.mpp_spin.value() or None, "threshold": self.threshold_value,
                "fill_holes": self.fill_holes.isChecked(), "min_area": self.min_area.value(), "work_dir": work_dir}
        self.jobs.start(lambda token: detect_job(slide, model_ref, cancel=token, **args), done_type=LesionLayers,
                        on_event=self._on_progress, on_done=lambda prepared, _l=layer: self._on_done(_l, prepared),
                        on_error=lambda _exc: self._release("_pending"), message="loading the model…")

    def _on_progress(self, ev: Any) -> None:
        if isinstance(ev, Progress) and ev.total and ev.stage == "inference":
            self.status.setText(f"{ev.done}/{ev.total} tiles")

    def _on_done(self, slide_layer: Any, prepared: LesionLayers | None) -> None:
        if prepared is None:  # stopped before any result
            self._release("_pending")
            return
        for n in self._names():  # the previous result's layers, then its work folder
            if n in self.viewer.layers:
                self.viewer.layers.remove(n)
        self._timer.stop()  # a threshold moved for the old result must not re-threshold the new one
        self._release("_work")
        self._work = self._pending if prepared.result.stores is not None else None
        if self._work is None:
            self._release("_pending")
        self._pending = None
        self.result, self._slide_layer = prepared.result, slide_layer
        self._files, self._preview = list(prepared.files), prepared.preview
        res = prepared.result
        place = place_result(slide_layer, res)
        heat, lab, _ = self._names()
        meta = {"model": res.model, "region_xywh": list(res.region), "mpp": res.mpp, "slide": slide_layer.metadata.get("slide"),
                "pathoseg_slide": slide_of_layer(slide_layer), "object_type": "annotation", "class_name": "Tumor"}
        multi = prepared.multiscale

        def add_heat() -> None:
            levels = prepared.heat or [res.prob]
            self.viewer.add_image(levels if multi else levels[0], multiscale=multi, name=heat, colormap="inferno",
                                  contrast_limits=(0.0, 1.0), opacity=0.5, blending="additive", metadata=dict(meta),
                                  **place)

        def add_labels() -> None:
            levels = prepared.labels
            self.viewer.add_labels(levels if multi else levels[0], multiscale=multi, name=lab, opacity=0.5,
                                   metadata=dict(meta), **place)
            self.viewer.layers.selection.active = slide_layer

        def add_preview() -> None:  # hidden until the slider moves: dragging then only swaps its data
            stride = prepared.preview[1]
            level = int(np.log2(stride))
            placed = dict(place, scale=tuple(float(v) * stride for v in place["scale"]))
            self.viewer.add_labels(np.array(prepared.labels[level]), name=self._names()[2], opacity=0.5,
                                   visible=False, **placed)
            self.viewer.layers.selection.active = slide_layer

        in_turns(add_heat, add_labels, *([add_preview] if prepared.preview is not None else []))
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
        if self._preview is not None:  # a multiscale result: preview now, full resolution when released
            self.preview_threshold()
            if self.threshold.isSliderDown():
                return
        if self.jobs.running:
            self._timer.start()
            return
        args = (self.result, self.threshold_value, self.fill_holes.isChecked(), self.min_area.value())
        res = self.result
        if (res.threshold, res.fill_holes, res.min_area_um2) == args[1:]:
            return  # the mask shown already has these options (a late timer, or the slider released in place)
        if self.result.stores is None and self.result.prob.size <= SYNC_PIXELS:
            self._on_rethreshold(rethreshold_job(*args))
        else:
            self.jobs.start(lambda token: rethreshold_job(*args), on_done=self._on_rethreshold,
                            message="new threshold…", action="Re-thresholding", abandon_on_stop=True)

    def preview_threshold(self) -> Any:
        """Show the mask of the current options on a display level of the map (GUI thread, <= 1024 px a side)."""
        from scipy import ndimage as ndi

        if self._preview is None or self.result is None:
            return None
        options = (self.threshold_value, self.fill_holes.isChecked(), self.min_area.value())
        layer = layer_named(self.viewer, self._names()[2])
        if layer is not None and layer.visible and options == self._previewed:
            return layer  # already shown (the timer also fires while a re-threshold job runs)
        self._previewed = options
        prob, stride = self._preview
        px_um2 = (self.result.mpp * stride) ** 2
        mask = lesion_mask(prob, threshold=self.threshold_value, fill_holes=self.fill_holes.isChecked(),
                           min_area_px=int(np.ceil(self.min_area.value() / px_um2)))
        labels = ndi.label(mask)[0].astype(np.int32)
        name = self._names()[2]
        if layer is None:  # removed by the user
            place = place_result(self._slide_layer, self.result)
            place["scale"] = tuple(float(v) * stride for v in place["scale"])
            layer = self.viewer.add_labels(labels, name=name, opacity=0.5, **place)
            self.viewer.layers.selection.active = self._slide_layer
        else:
            layer.data = labels
            layer.visible = True
        return layer

    def _on_rethreshold(self, prepared: LesionLayers) -> None:
        self.result = prepared.result
        layer = self.labels_layer()
        if layer is not None:
            layer.data = prepared.labels if layer.multiscale else prepared.labels[0]
        preview = layer_named(self.viewer, self._names()[2])
        if preview is not None:
            preview.visible = False
        for old in self._files:  # the replaced mask's files in the work folder
            if old not in prepared.files:
                old.unlink(missing_ok=True)
        self._files = list(prepared.files)
        self._show_regions(prepared.result)

    def _show_regions(self, res: LesionResult) -> None:
        rows = sorted(res.regions, key=lambda r: -r["area_um2"])[:MAX_TABLE_ROWS]
        self.table.setUpdatesEnabled(False)
        self.table.setRowCount(len(rows))
        for i, r in enumerate(rows):
            self.table.setItem(i, 0, QTableWidgetItem(str(r["id"])))
            self.table.setItem(i, 1, QTableWidgetItem(f"{r['area_um2'] / 1e6:.4f}"))
        self.table.setUpdatesEnabled(True)
        s = res.summary()
        shown = f" (the {len(rows)} largest listed)" if len(rows) < len(res.regions) else ""
        self.status.setText(f"{s['n_regions']} lesion regions{shown} · {s['lesion_area_um2'] / 1e6:.3f} mm² · "
                            f"{100 * s['lesion_fraction_of_tissue']:.1f} % of the tissue · threshold {res.threshold:.2f}")

    # ------------------------------------------------------------------ export
    def _export_work(self, path: str) -> Any:
        """``work()`` writing the regions to ``path``; what to export is taken now, on the GUI thread."""
        from dataclasses import replace

        from napari_pathoseg.methods.lesion.detect import export_regions_geojson

        layer = self.labels_layer()
        if layer is None or self.result is None:
            raise PathosegError("Detect lesions first: there is no lesion layer to export.")
        slide = slide_of_layer(self._slide_layer)
        if layer.multiscale:  # a whole-slide outline (view-only): the result's labels, read from the work folder
            result = self.result
        else:  # the Labels layer as the user corrected it
            result = replace(self.result, mask=np.asarray(layer.data) > 0, stores=None, counts=None)
        return lambda: export_regions_geojson(result, slide, path)

    def export_geojson(self, path: str) -> int:
        """Write the regions of the Labels layer (with the user's corrections) as QuPath annotations, now."""
        return self._export_work(path)()

    def start_export(self, path: str) -> Any:
        """Export the regions to ``path`` in the background (the dock's Export GeoJSON… button)."""
        work = self._export_work(path)

        def job(token: Any):
            yield Progress(0, 0, "tracing the lesion regions…", stage="export")
            yield ExportDone(path, work())

        return self.jobs.start(job, done_type=ExportDone, on_done=self._on_exported, message="exporting…",
                               action="GeoJSON export")

    def _on_export(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export lesion regions", "lesions.geojson", "GeoJSON (*.geojson)")
        if not path:
            return
        try:
            self.start_export(path)
        except PathosegError as exc:
            show_error(str(exc))

    def _on_exported(self, done: ExportDone) -> None:
        self.status.setText(f"{done.n} lesion regions written to {done.path}")
        show_info(f"{done.n} lesion regions written to {done.path}")

    def closeEvent(self, event: Any) -> None:
        self._timer.stop()
        self.jobs.shutdown()
        self._release("_pending")
        self._release("_work")
        super().closeEvent(event)
