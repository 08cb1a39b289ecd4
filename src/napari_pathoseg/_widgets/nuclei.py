"""The "Nuclei" dock: segment nuclei on the view, a drawn rectangle or the whole slide."""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QComboBox, QDoubleSpinBox, QProgressBar, QPushButton, QWidget

from napari_pathoseg._widgets._common import (
    ask_open_file,
    connect_worker,
    form,
    grid_placement,
    hbox,
    layer_named,
    refill_combo,
    request_stop,
    show_worker_error,
    status_label,
    stop_button,
    vbox,
    view_rect,
    watch_layer_list,
)
from napari_pathoseg.errors import CancelledError, PathosegError
from napari_pathoseg.methods.nuclei.segment import NucleiResult, Progress, iter_segment_nuclei
from napari_pathoseg._widgets.slide import slide_layers, slide_of_layer

if TYPE_CHECKING:
    import napari

__all__ = ["NucleiWidget", "view_region", "shape_region", "place_result"]

logger = logging.getLogger(__name__)

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


def place_result(slide_layer: Any, result: NucleiResult) -> dict[str, Any]:
    """Scale and translate that put a result (model grid) exactly over ``slide_layer``."""
    x, y, _, _ = result.region
    return grid_placement(slide_layer, row=y, col=x, downsample=result.scale)


class NucleiWidget(QWidget):
    """Segment nuclei with a shipped or user model; results as Labels over the slide."""

    def __init__(self, napari_viewer: "napari.Viewer") -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._worker = None
        self._cancel: threading.Event | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._models: dict[str, str] = {}

        self.layer_combo = QComboBox()
        self.model_combo = QComboBox()
        self.model_btn = QPushButton("Checkpoint…")
        self.region_combo = QComboBox()
        self.region_combo.addItems(REGIONS)
        self.shapes_combo = QComboBox()
        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setDecimals(4)
        self.mpp_spin.setRange(0.0, 100.0)
        self.mpp_spin.setSingleStep(0.05)
        self.mpp_spin.setSpecialValueText("from slide")
        self.mpp_spin.setToolTip("µm per pixel of the image; 'from slide' uses the slide's own")
        self.run_btn = QPushButton("Segment nuclei")
        self.stop_btn = stop_button()
        self.progress = QProgressBar()
        self.status = status_label()

        vbox(
            self,
            form(
                ("Slide", self.layer_combo),
                ("Model", hbox((self.model_combo, 1), self.model_btn)),
                ("Region", self.region_combo),
                ("Rectangle layer", self.shapes_combo),
                ("µm/px", self.mpp_spin),
            ),
            hbox(self.run_btn, self.stop_btn),
            self.progress,
            self.status,
            stretch_end=True,
        )

        self.run_btn.clicked.connect(self._on_run)
        self.stop_btn.clicked.connect(self._on_stop)
        self.model_btn.clicked.connect(self._on_browse_model)
        self.layer_combo.currentIndexChanged.connect(self._update_run_state)
        self.region_combo.currentIndexChanged.connect(self._update_run_state)
        watch_layer_list(self.viewer, self._refresh)
        self.refresh_models()
        self._refresh()

    # ------------------------------------------------------------------ state
    def refresh_models(self, select: str | None = None) -> None:
        """Fill the model list from the registry (shipped and user models)."""
        from napari_pathoseg.models.registry import list_models

        current = select or self.model_combo.currentText()
        try:
            models = list_models()
        except PathosegError as exc:
            show_error(str(exc))
            models = []
        for m in models:
            self._models[m["name"]] = m["path"]
        refill_combo(self.model_combo, list(self._models), current=current)
        self._update_run_state()

    def _refresh(self, event: Any = None) -> None:
        from napari.layers import Shapes

        refill_combo(self.layer_combo, [ly.name for ly in slide_layers(self.viewer)])
        refill_combo(self.shapes_combo, [ly.name for ly in self.viewer.layers if isinstance(ly, Shapes)])
        self._update_run_state()

    def _update_run_state(self, *args: Any) -> None:
        why = ""
        if not self.layer_combo.currentText():
            why = "Open a slide first (File > Open or the Slide dock)."
        elif not self.model_combo.currentText():
            why = "No nucleus model: choose a checkpoint file."
        elif self.region_combo.currentText() == "Drawn rectangle" and not self.shapes_combo.currentText():
            why = "Add a Shapes layer and draw a rectangle on the slide."
        running = self._worker is not None
        self.run_btn.setEnabled(not why and not running)
        self.run_btn.setToolTip(why or "Run in the background; Stop cancels.")

    def slide_layer(self):
        return layer_named(self.viewer, self.layer_combo.currentText())

    # ------------------------------------------------------------------ callbacks
    def _on_browse_model(self) -> None:
        path = ask_open_file(self, "Nucleus model checkpoint", "Checkpoints (*.safetensors)")
        if path:
            self.add_model_path(path)

    def add_model_path(self, path: str) -> None:
        """Make a checkpoint file selectable (and select it)."""
        name = Path(path).name
        self._models[name] = path
        if self.model_combo.findText(name) < 0:
            self.model_combo.addItem(name)
        self.model_combo.setCurrentText(name)

    def current_region(self) -> tuple[int, int, int, int] | None:
        layer = self.slide_layer()
        choice = self.region_combo.currentText()
        if choice == "Whole slide":
            return None
        if choice == "Drawn rectangle":
            return shape_region(layer_named(self.viewer, self.shapes_combo.currentText()), layer)
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
        mpp = self.mpp_spin.value() or None
        model_ref = self._models.get(self.model_combo.currentText(), self.model_combo.currentText())
        self._cancel = threading.Event()
        if region is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="pathoseg-nuclei-")
        work_dir = self._tmp.name if (region is None and self._tmp) else None
        self.progress.setValue(0)
        self.status.setText("loading model…")
        worker = connect_worker(
            _segment_worker(slide, model_ref, region=region, mpp=mpp, cancel=self._cancel, work_dir=work_dir),
            yielded=self._on_progress,
            returned=lambda res, _l=layer: self._on_done(_l, res),
            errored=self._on_error,
            finished=self._on_finished,
        )
        self._worker = worker
        self.stop_btn.setEnabled(True)
        self._update_run_state()
        worker.start()

    def _on_stop(self) -> None:
        request_stop(self._cancel, status=self.status)

    def _on_progress(self, ev: Progress) -> None:
        self.progress.setMaximum(max(1, ev.total))
        self.progress.setValue(ev.done)
        self.status.setText(f"{ev.done}/{ev.total} tiles · {ev.message}")

    def _on_done(self, slide_layer: Any, result: NucleiResult) -> None:
        place = place_result(slide_layer, result)
        name = f"{slide_layer.name} nuclei"
        norm_name = f"{slide_layer.name} normalised"
        for n in (name, norm_name):
            if n in self.viewer.layers:
                self.viewer.layers.remove(n)
        if result.normalized is not None:
            self.viewer.add_image(result.normalized, name=norm_name, rgb=True, contrast_limits=(0, 255), visible=False, **place)
        self.viewer.add_labels(
            result.labels,
            name=name,
            opacity=0.6,
            metadata={
                "model": result.model,
                "region_xywh": list(result.region),
                "table": result.table,
                "mpp": result.mpp,
                # the slide under the labels: the Export dock and the GeoJSON writer read it
                "slide": slide_layer.metadata.get("slide"),
                "pathoseg_slide": slide_of_layer(slide_layer),
                "object_type": "detection",
                "class_name": "Nucleus",
            },
            **place,
        )
        self.viewer.layers.selection.active = slide_layer
        self.status.setText(
            f"{result.n_nuclei} nuclei · {result.tiles} tiles · {result.timings.get('total_s', 0):.1f} s ({result.model})"
        )
        show_info(f"{result.n_nuclei} nuclei found")

    def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, CancelledError):
            self.status.setText(f"stopped: {exc}")
            show_info("Nucleus segmentation stopped.")
        else:
            show_worker_error(exc, action="Nucleus segmentation", status=self.status)

    def _on_finished(self) -> None:
        self._worker = None
        self.stop_btn.setEnabled(False)
        self._update_run_state()

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt API
        if self._cancel is not None:
            self._cancel.set()
        super().closeEvent(event)


@thread_worker(ignore_errors=True)  # errors go to NucleiWidget._on_error
def _segment_worker(slide, model_ref, *, region, mpp, cancel, work_dir):
    from napari_pathoseg.models.registry import load_model

    model = load_model(model_ref)
    result = None
    for ev in iter_segment_nuclei(slide, model, region=region, mpp=mpp, cancel=cancel, work_dir=work_dir):
        if isinstance(ev, Progress):
            yield ev
        else:
            result = ev
    return result
