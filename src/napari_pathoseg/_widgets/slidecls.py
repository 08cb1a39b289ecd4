"""The "Slide classification" dock: the slide call with its tile heat map (M4), and training.

*Classify.* A slide model (registry task ``"slide"``) runs through the dock job controller on
the whole slide, the view or a drawn rectangle (background thread, progress, Stop keeps the
finished tiles). The call and its pooled probability are shown; the tile probabilities become
an image layer over the slide (one pixel per tile, in the slide's units; cells without a
tissue tile are transparent) whose colormap and opacity the dock sets. The table lists the
strongest tiles (at most :data:`MAX_ROWS`) by probability; clicking a row centres the view on
that tile and zooms to it.

*Train.* A cohort CSV (columns ``slide,label[,mpp]``), a run folder, a preset and epochs run
:func:`~napari_pathoseg.methods.mil.train.train_mil` in the background (progress per step,
Stop keeps a resumable checkpoint, "resume" continues it); a name registers the trained model,
which then appears in the model list.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QGroupBox,
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
    follow_slide_units,
    form,
    grid_placement,
    hbox,
    layer_named,
    refill_combo,
    status_label,
    stop_button,
    vbox,
    watch_layer_list,
)
from napari_pathoseg._widgets._jobs import JobController, add_layer_in_turns, in_turns
from napari_pathoseg._widgets._region import add_region_rectangle, chosen_region
from napari_pathoseg._widgets.slide import slide_layers, slide_of_layer
from napari_pathoseg.errors import PathosegError
from napari_pathoseg.events import Progress
from napari_pathoseg.methods.mil.classify import (
    ClassifyResult,
    iter_classify,
    top_tiles,
)

if TYPE_CHECKING:
    import napari

__all__ = ["SlideClassificationWidget", "TrainOutcome", "heat_colormap", "heat_display", "slide_models", "train_job"]

logger = logging.getLogger(__name__)

TASK = "slide"
REGIONS = ("Whole slide", "Current view", "Drawn rectangle")
COLORMAPS = ("turbo", "inferno", "viridis", "magma", "plasma", "red")
PRESETS = ("lite", "m4")
#: The table lists at most this many tiles (the strongest): filling it stays well under 200 ms.
MAX_ROWS = 200
#: Display value of heat-map cells without a tissue tile (below 0: transparent in :func:`heat_colormap`).
OFF = -1.0 / 64.0


def slide_models() -> list[Any]:
    """The registered slide models (shipped first); each maps ``name`` and ``path``."""
    from napari_pathoseg.models.registry import list_models

    return list(list_models(task=TASK))


def heat_colormap(name: str) -> Any:
    """napari colormap ``name`` over probabilities 0-1, transparent at :data:`OFF` (cells without a tile).

    Use with ``contrast_limits=(OFF, 1)``: 0 maps to the colormap's first colour, OFF to nothing.
    """
    from napari.utils.colormaps import Colormap, ensure_colormap

    base = ensure_colormap(name)
    xs = np.linspace(0.0, 1.0, 33)
    cols = np.asarray(base.map(xs), np.float32)
    cols[:, 3] = 1.0
    pos = (xs - OFF) / (1.0 - OFF)
    colors = np.vstack([[0.0, 0.0, 0.0, 0.0], cols])
    controls = np.concatenate([[0.0], pos])
    return Colormap(colors=colors, controls=controls, name=f"{name} heat map", interpolation="linear")


def heat_display(heatmap: np.ndarray) -> np.ndarray:
    """The heat map with cells without a tile set to :data:`OFF` (napari draws no NaN)."""
    return np.where(np.isfinite(heatmap), heatmap, OFF).astype(np.float32)


def classify_job(slide: Any, model_ref: str, *, region: Any, mpp: float | None, tissue_mask: bool, cancel: Any):
    """The dock's job: load the model, classify (worker thread)."""
    from napari_pathoseg.models.registry import load_model

    yield Progress(0, 0, "loading the model…", stage="model")
    model = load_model(model_ref, task=TASK)
    yield from iter_classify(slide, model=model, mpp=mpp, region=region, tissue_mask=tissue_mask, cancel=cancel)


@dataclass
class TrainOutcome:
    """The end of a training run started from the dock.

    ``result`` is what :func:`~napari_pathoseg.methods.mil.train.train_mil` ended with (with
    ``model_path``, ``scores`` and ``card`` when it finished), ``cancelled`` when Stop ended it.
    """

    result: Any
    cancelled: bool = False
    registered: str | None = None

    @property
    def model_path(self) -> Any:
        return getattr(self.result, "model_path", None)


def train_job(*, cohort: str, run_dir: str, preset: str, epochs: int | None, resume: bool, register: str | None,
              cancel: Any):
    """Run ``train_mil`` as progress events, ending in a :class:`TrainOutcome` (worker thread)."""
    from napari_pathoseg.methods.mil.train import train_mil

    yield Progress(0, 0, "reading the cohort…", stage="cohort")
    last: Any = None
    for ev in train_mil(cohort=cohort, run_dir=run_dir, preset=preset, epochs=epochs, resume=resume,
                        register_as=register or None, cancel=cancel, threads=1):
        last = ev
        done, total = getattr(ev, "done", None), getattr(ev, "total", None)
        if isinstance(ev, Progress):  # cutting the slides into tiles
            yield ev
        elif hasattr(ev, "steps_per_epoch") and not hasattr(ev, "losses"):  # the run starts
            yield Progress(0, 0, str(getattr(ev, "message", "training…")), stage="start")
        elif isinstance(done, int) and isinstance(total, int):  # one optimisation step
            losses = getattr(ev, "losses", None) or {}
            text = " ".join(f"{k} {v:.3f}" for k, v in list(losses.items())[:3])
            yield Progress(done, total, f"epoch {getattr(ev, 'epoch', 0) + 1}, step {done}/{total} {text}".strip(),
                           stage="train")
        elif getattr(ev, "checkpoint_path", None) is not None:
            metrics = getattr(ev, "val_metrics", None) or {}
            text = " ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))
            yield Progress(0, 0, f"epoch {ev.epoch + 1} done {text}".strip(), stage="epoch")
    cancelled = bool(getattr(last, "cancelled", False)) or (cancel is not None and cancel.is_set()
                                                            and getattr(last, "model_path", None) is None)
    yield TrainOutcome(last, cancelled=cancelled, registered=register or None if not cancelled else None)


class SlideClassificationWidget(QWidget):
    """Classify a slide with a slide model: call, probability, heat map, strongest tiles; train a model."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._models: dict[str, str] = {}
        self.result: ClassifyResult | None = None
        self._slide_layer: Any = None
        self._rows: list[dict[str, Any]] = []

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
        self.mask_check = QCheckBox("skip tiles off the tissue mask (faster; may drop pale tissue)")
        self.mask_check.setToolTip("Off: every tile is read and M4's entropy filter drops the glass, as in training")
        self.run_btn = QPushButton("Classify slide")
        self.stop_btn = stop_button()
        self.progress = QProgressBar()
        self.status = status_label()
        self.call_label = QLabel("")
        self.call_label.setWordWrap(True)
        self.call_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.cmap_combo = QComboBox()
        self.cmap_combo.addItems(COLORMAPS)
        self.opacity = QSlider(Qt.Orientation.Horizontal)
        self.opacity.setRange(0, 100)
        self.opacity.setValue(60)
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["probability", "x (px)", "y (px)"])
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.table.setToolTip("Tiles by decreasing probability; click one to go there")
        self.table.setMaximumHeight(220)

        vbox(
            self,
            form(
                ("Slide", self.layer_combo),
                ("Model", self.model_combo),
                ("Region", self.region_combo),
                ("Rectangle layer", hbox((self.shapes_combo, 1), self.draw_btn)),
                ("µm/px", self.mpp_spin),
                ("", self.mask_check),
            ),
            hbox(self.run_btn, self.stop_btn),
            self.progress,
            self.status,
            self.call_label,
            form(("Heat map", self.cmap_combo), ("Opacity", self.opacity)),
            self.table,
            self._build_training(),
            stretch_end=True,
        )
        self.jobs = JobController(self, progress=self.progress, status=self.status, stop_button=self.stop_btn,
                                  run_buttons=[self.run_btn], why_not=self._why_not, action="Slide classification")
        self.train_jobs = JobController(self, progress=self.train_progress, status=self.train_status,
                                        stop_button=self.train_stop_btn, run_buttons=[self.train_btn],
                                        why_not=self._why_not_train, action="Training")

        self.run_btn.clicked.connect(self._on_run)
        self.draw_btn.clicked.connect(self._on_draw)
        self.cmap_combo.currentTextChanged.connect(self._on_style)
        self.opacity.valueChanged.connect(self._on_style)
        self.table.cellClicked.connect(lambda row, _col: self.go_to_tile(row))
        self.train_btn.clicked.connect(self._on_train)
        for combo in (self.layer_combo, self.region_combo, self.shapes_combo, self.model_combo):
            combo.currentIndexChanged.connect(self.jobs.refresh)
        for edit in (self.cohort_edit, self.run_edit):
            edit.textChanged.connect(self.train_jobs.refresh)
        watch_layer_list(self.viewer, self._refresh)
        follow_slide_units(self.viewer, slide_layers)
        self.refresh_models()
        self._refresh()

    def _build_training(self) -> QGroupBox:
        box = QGroupBox("Train a classifier from slide labels")
        self.cohort_edit = QLineEdit()
        self.cohort_edit.setPlaceholderText("cohort CSV: slide,label[,mpp]")
        self.cohort_btn = QPushButton("…")
        self.cohort_btn.clicked.connect(lambda: ask_open_file(self, "Cohort CSV", "CSV (*.csv)", into=self.cohort_edit))
        self.run_edit = QLineEdit()
        self.run_edit.setPlaceholderText("run folder (checkpoints, log)")
        self.run_dir_btn = QPushButton("…")
        self.run_dir_btn.clicked.connect(lambda: ask_directory(self, "Run folder", into=self.run_edit))
        self.preset_combo = QComboBox()
        self.preset_combo.addItems(PRESETS)
        self.preset_combo.setToolTip("lite: trains on a CPU; m4: the described network (ResNet-18, 512 px tiles)")
        self.epochs_spin = QSpinBox()
        self.epochs_spin.setRange(0, 1000)
        self.epochs_spin.setSpecialValueText("preset's")
        self.resume_check = QCheckBox("resume the run in this folder")
        self.register_edit = QLineEdit()
        self.register_edit.setPlaceholderText("register as (name, optional)")
        self.train_btn = QPushButton("Train")
        self.train_stop_btn = stop_button()
        self.train_progress = QProgressBar()
        self.train_status = status_label()
        vbox(
            box,
            form(
                ("Cohort CSV", hbox((self.cohort_edit, 1), self.cohort_btn)),
                ("Run folder", hbox((self.run_edit, 1), self.run_dir_btn)),
                ("Preset", self.preset_combo),
                ("Epochs", self.epochs_spin),
                ("", self.resume_check),
                ("Register", self.register_edit),
            ),
            hbox(self.train_btn, self.train_stop_btn),
            self.train_progress,
            self.train_status,
        )
        return box

    # ------------------------------------------------------------------ state
    def refresh_models(self, select: str | None = None) -> None:
        """Fill the model list with the registry's slide models."""
        try:
            for m in slide_models():
                self._models[m["name"]] = str(m["path"])
        except PathosegError as exc:
            show_error(str(exc))
        refill_combo(self.model_combo, list(self._models), current=select or self.model_combo.currentText())
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
            return "No slide model is registered: train one below (or pathoseg mil-train)."
        if self.region_combo.currentText() == "Drawn rectangle" and not self.shapes_combo.currentText():
            return "Draw a rectangle on the slide first (Draw…)."
        return ""

    def _why_not_train(self) -> str:
        if not self.cohort_edit.text().strip():
            return "Choose a cohort CSV (columns slide,label[,mpp])."
        if not self.run_edit.text().strip():
            return "Choose a run folder for the checkpoints."
        return ""

    def slide_layer(self) -> Any:
        return layer_named(self.viewer, self.layer_combo.currentText())

    def heat_name(self) -> str:
        base = self._slide_layer.name if self._slide_layer is not None else "slide"
        return f"{base} slide heat map"

    def heat_layer(self) -> Any:
        return layer_named(self.viewer, self.heat_name()) if self.result is not None else None

    # ------------------------------------------------------------------ classify
    def _on_draw(self) -> Any:
        """Add a rectangle layer in the slide's units, chosen for "Drawn rectangle", in draw mode."""
        shapes = add_region_rectangle(self.viewer, self.slide_layer(), "slide region")
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
        mpp, mask = self.mpp_spin.value() or None, self.mask_check.isChecked()
        self.jobs.start(lambda token: classify_job(slide, model_ref, region=region, mpp=mpp, tissue_mask=mask,
                                                   cancel=token),
                        done_type=ClassifyResult, on_event=self._on_progress,
                        on_done=lambda res, _l=layer: self._on_done(_l, res), message="loading the model…")

    def _on_progress(self, ev: Any) -> None:
        if isinstance(ev, Progress) and ev.total and ev.stage == "inference":
            self.status.setText(f"{ev.done}/{ev.total} tiles")

    def _on_done(self, slide_layer: Any, res: ClassifyResult) -> None:
        self.result, self._slide_layer = res, slide_layer
        self._add_heat(slide_layer, res, then=lambda: self._show(res))
        self.jobs.refresh()
        if res.cancelled:
            show_info(f"Stopped: the call pools the {res.n_tiles} finished tissue tiles")

    def _add_heat(self, slide_layer: Any, res: ClassifyResult, *, then: Any) -> None:
        """Put the heat map over the slide in short GUI steps, then run ``then`` (the call and the table)."""
        from napari.layers import Image

        place = grid_placement(slide_layer, row=res.origin[1], col=res.origin[0], downsample=res.cell)
        meta = {"model": res.model, "probability": res.probability, "label": res.label, "mpp": res.heatmap_mpp,
                "origin_xy": list(res.origin), "level0_pixels_per_pixel": res.cell,
                "slide": slide_layer.metadata.get("slide"), "pathoseg_slide": slide_of_layer(slide_layer)}
        data = heat_display(res.heatmap)
        layer = layer_named(self.viewer, self.heat_name())
        if layer is not None and getattr(layer, "_type_string", "") == "image" and layer.ndim == 2:
            # a new run over the same slide: update the layer (removing one costs napari ~0.5 s)
            def update() -> None:
                layer.metadata = meta
                layer.scale, layer.translate = place["scale"], place["translate"]
                layer.data = data
                layer.contrast_limits = (OFF, 1.0)

            in_turns(update, then)
            return
        layer = Image(data, name=self.heat_name(), colormap=heat_colormap(self.cmap_combo.currentText()),
                      contrast_limits=(OFF, 1.0), opacity=self.opacity.value() / 100.0, blending="translucent",
                      interpolation2d="nearest", metadata=meta, **place)
        add_layer_in_turns(self.viewer, layer, select=slide_layer, then=then)

    def _show(self, res: ClassifyResult) -> None:
        p = "n/a" if not np.isfinite(res.probability) else f"{res.probability:.3f}"
        k = f" {res.pooling_k}" if res.pooling == "topk_mean" else ""
        self.call_label.setText(
            f"<b>{res.label}</b> · probability {p} (pooling {res.pooling}{k}, threshold {res.threshold:.2f})"
            f"{' · stopped early' if res.cancelled else ''}<br>{res.n_tiles} tissue tiles of "
            f"{res.tile_size * res.mpp:g} µm, {res.n_dropped} dropped as background; strongest tile "
            f"{res.top_tile_probability:.3f}" if res.tiles else f"<b>{res.label}</b> · no tile finished")
        self._rows = top_tiles(res.tiles, n=MAX_ROWS)
        self.table.setRowCount(len(self._rows))
        for i, t in enumerate(self._rows):
            for j, v in enumerate((f"{t['probability']:.3f}", str(t["x"]), str(t["y"]))):
                self.table.setItem(i, j, QTableWidgetItem(v))
        self.status.setText(f"{res.label}: {res.n_tiles} tiles in {res.timings.get('total_s', 0):.1f} s")

    def _on_style(self, *_: Any) -> None:
        layer = self.heat_layer()
        if layer is None:
            return
        layer.colormap = heat_colormap(self.cmap_combo.currentText())
        layer.opacity = self.opacity.value() / 100.0

    def go_to_tile(self, row: int) -> None:
        """Centre the view on the tile of table row ``row`` and zoom so it fills about a third of the canvas."""
        if not 0 <= row < len(self._rows) or self._slide_layer is None:
            return
        t = self._rows[row]
        layer = self._slide_layer
        cy, cx = t["y"] + t["h"] / 2.0 - 0.5, t["x"] + t["w"] / 2.0 - 0.5  # level-0 data coordinates (pixel centres)
        world = np.asarray(layer.data_to_world([cy, cx]), float)
        side = max(t["w"], t["h"]) * float(abs(layer.scale[-1]))
        cam = camera(self.viewer)
        center = list(np.asarray(cam.center, float))
        center[-2:] = world[-2:]
        cam.center = tuple(center)
        canvas = min(self.viewer.canvas.size) if hasattr(self.viewer, "canvas") else 600
        cam.zoom = float(max(1e-6, canvas / (3.0 * side)))

    # ------------------------------------------------------------------ train
    def _on_train(self) -> None:
        args = {"cohort": self.cohort_edit.text().strip(), "run_dir": self.run_edit.text().strip(),
                "preset": self.preset_combo.currentText(), "epochs": self.epochs_spin.value() or None,
                "resume": self.resume_check.isChecked(), "register": self.register_edit.text().strip() or None}
        self.train_jobs.start(lambda token: train_job(cancel=token, **args), done_type=TrainOutcome,
                              on_done=self._on_trained, message="reading the cohort…")

    def _on_trained(self, out: TrainOutcome) -> None:
        if out.cancelled:
            self.train_status.setText("stopped; tick 'resume' and Train to continue from the last checkpoint")
            return
        scores = getattr(out.result, "scores", None) or {}
        text = ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if isinstance(v, (int, float)))
        self.train_status.setText(f"done: {out.model_path}" + (f" ({text})" if text else ""))
        if out.registered:
            self.refresh_models(select=out.registered)
            show_info(f"Registered {out.registered}; it is selected in the model list")

    def closeEvent(self, event: Any) -> None:
        self.jobs.shutdown()
        self.train_jobs.shutdown()
        super().closeEvent(event)
