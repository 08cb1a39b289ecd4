"""The "Malignancy" dock (M1): tile heat map, malignant region and the call; training on your own labels.

Run: a malignancy model (classifier C + segmenter B) over the view, a drawn rectangle or the
whole slide's tissue through the dock job controller (background thread, progress, Stop keeps
the finished tiles). C's tile probabilities become an image layer (one cell per tile step,
colormap, adjustable opacity, transparent where no tile ran), B's region a Labels layer on the
model's grid; the status line gives the call (the top-k mean of the tile probabilities, see
``docs/malignancy.md``), the malignant area and its share of the tissue. The region threshold
re-makes the mask from the stored probabilities without running the networks again.

Train: :func:`~napari_pathoseg.methods.malignancy.train.train_malignancy` (A -> B -> C, resumable)
on a CSV or a folder of image labels (``benign/``, ``malignant/``) and an optional mask folder,
in a run folder, in the background with progress and Stop (the run stays resumable); the model
is registered under the given name and offered in the model list.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
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
    QWidget,
)

from napari_pathoseg._widgets._common import (
    ask_directory,
    ask_open_file,
    display_levels,
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
from napari_pathoseg._widgets._jobs import JobController, in_turns
from napari_pathoseg._widgets._region import (
    REGIONS,
    add_region_rectangle,
    chosen_region,
)
from napari_pathoseg._widgets.slide import slide_layers, slide_of_layer
from napari_pathoseg.errors import PathosegError
from napari_pathoseg.events import Progress
from napari_pathoseg.methods.malignancy.slide import MalignancyResult, iter_malignancy

if TYPE_CHECKING:
    import napari

__all__ = ["MalignancyLayers", "MalignancyWidget", "TrainingDone", "malignancy_models", "train_job"]

logger = logging.getLogger(__name__)

TASK = "malignancy"
PRESETS = ("lite", "m1")
#: Display pixels per heat-map square side.
HEAT_SUB = 8
#: The region's outline colour.
REGION_COLOR = "cyan"
#: Region masks up to this many pixels are re-thresholded on the GUI thread; larger ones in the background.
SYNC_PIXELS = 1 << 20


def malignancy_models() -> list[Any]:
    """The registered malignancy models (shipped first)."""
    from napari_pathoseg.models.registry import list_models

    return list(list_models(task=TASK))


def heat_display(result: MalignancyResult, *, sub: int = HEAT_SUB) -> np.ndarray:
    """C's heat map with each tile square as ``sub`` x ``sub`` display pixels, cut at the region's edge.

    The last row and column of tiles reach past the slide (read as glass); whole squares would
    overhang it, so the display stops where the region does. Pixels are ``cell / sub`` level-0
    pixels (placed at ``result.origin``).
    """
    hm = result.heatmap
    big = np.repeat(np.repeat(hm, sub, axis=0), sub, axis=1)
    px = result.cell / sub
    x, y, w, h = result.region
    ox, oy = result.origin
    rows = max(1, math.ceil((y + h - oy) / px))
    cols = max(1, math.ceil((x + w - ox) / px))
    return big[:rows, :cols]


@dataclass
class MalignancyLayers:
    """A run's result with its layer data, prepared off the GUI thread."""

    result: MalignancyResult
    labels: list[np.ndarray]
    summary: dict[str, Any]
    heat: np.ndarray | None = None

    @classmethod
    def prepare(cls, result: MalignancyResult) -> MalignancyLayers:
        """Layer data and figures of ``result`` (worker thread: the mask and areas cost O(pixels))."""
        return cls(result, display_levels(result.mask.astype(np.uint8)), result.summary(), heat_display(result))

    @property
    def cancelled(self) -> bool:
        return bool(self.result.cancelled)


def run_job(slide: Any, model_ref: str, *, region: Any, mpp: float | None, mask_threshold: float,
            gate: bool = False, cancel: Any) -> Iterator[Any]:
    """The dock's job: load the model, run C and B over the tissue tiles, make the mask (worker thread)."""
    from napari_pathoseg.models.registry import load_model

    yield Progress(0, 0, "loading the model…", stage="model")
    model = load_model(model_ref, task=TASK)
    for ev in iter_malignancy(slide, model=model, region=region, mpp=mpp, mask_threshold=mask_threshold,
                              gate=gate, whole_image=False, cancel=cancel):
        if isinstance(ev, MalignancyResult):
            yield MalignancyLayers.prepare(ev)
        else:
            yield ev


@dataclass
class TrainingDone:
    """The end of a training job from the dock: the released model, or a stop (resumable)."""

    model_path: Path | None
    scores: dict[str, Any]
    registered: str | None
    cancelled: bool = False


def train_job(*, labels: str, masks: str | None, run_dir: str, preset: str, epochs: int, steps: int,
              register_as: str | None, resume: bool, cancel: Any, **options: Any) -> Iterator[Any]:
    """The training job: :func:`train_malignancy`'s events, then one :class:`TrainingDone`.

    ``options`` go to :func:`train_malignancy` as they are (``config``, ``threads``...).
    """
    from napari_pathoseg.methods.malignancy.train import (
        MalignancyTrainResult,
        train_malignancy,
    )

    result = None
    for ev in train_malignancy(labels=labels, masks=masks or None, run_dir=run_dir, preset=preset, epochs=epochs,
                               steps_per_epoch=steps, register_as=register_as or None, resume=resume, cancel=cancel,
                               **options):
        if isinstance(ev, MalignancyTrainResult):
            result = ev
        else:
            yield ev
    if result is None or result.cancelled or result.model_path is None:
        yield TrainingDone(None, {}, None, cancelled=True)
    else:
        flat = {f"{stage} {k}": v for stage, metrics in (result.scores or {}).items() if isinstance(metrics, dict)
                for k, v in metrics.items() if isinstance(v, (int, float))}
        yield TrainingDone(Path(result.model_path), flat, result.registered)


def _describe(ev: Any) -> str:
    """One status line for a training event."""
    losses = getattr(ev, "losses", None)
    if isinstance(losses, dict):
        metrics = {**losses, **(getattr(ev, "val_metrics", None) or {})}
        text = ", ".join(f"{k} {v:.3g}" for k, v in metrics.items() if isinstance(v, (int, float)))
        return f"epoch {getattr(ev, 'epoch', '?')}: {text}"
    return str(getattr(ev, "message", "") or "")


class MalignancyWidget(QWidget):
    """Malignancy heat map, region and call on a slide; training a model on the user's own labels."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._models: dict[str, str] = {}
        self.result: MalignancyResult | None = None
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
        self.mask_threshold = QSlider(Qt.Orientation.Horizontal)
        self.mask_threshold.setRange(1, 99)
        self.mask_threshold.setValue(50)
        self.mask_threshold_label = QLabel("0.50")
        self.gate_check = QCheckBox("only in tiles C calls malignant")
        self.gate_check.setToolTip("B alone also outlines benign glands; keep its region only where the heat map "
                                   "reaches the call threshold")
        self.opacity = QSlider(Qt.Orientation.Horizontal)
        self.opacity.setRange(0, 100)
        self.opacity.setValue(50)
        self.run_btn = QPushButton("Run malignancy")
        self.stop_btn = stop_button()
        self.progress = QProgressBar()
        self.status = status_label()
        self.call_label = QLabel("")
        self.call_label.setWordWrap(True)
        self.call_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        train_box = self._build_training()
        vbox(
            self,
            form(
                ("Slide", self.layer_combo),
                ("Model", self.model_combo),
                ("Region", self.region_combo),
                ("Rectangle layer", hbox((self.shapes_combo, 1), self.draw_btn)),
                ("µm/px", self.mpp_spin),
                ("Region threshold", hbox((self.mask_threshold, 1), self.mask_threshold_label)),
                ("", self.gate_check),
                ("Heat map opacity", self.opacity),
            ),
            hbox(self.run_btn, self.stop_btn),
            self.progress,
            self.status,
            self.call_label,
            train_box,
            stretch_end=True,
        )
        self.jobs = JobController(self, progress=self.progress, status=self.status, stop_button=self.stop_btn,
                                  run_buttons=[self.run_btn], why_not=self._why_not, action="Malignancy")
        self.train_jobs = JobController(self, progress=self.train_progress, status=self.train_status,
                                        stop_button=self.train_stop_btn, run_buttons=[self.train_btn],
                                        why_not=self._why_not_train, action="Malignancy training")
        self.run_btn.clicked.connect(self._on_run)
        self.draw_btn.clicked.connect(self._on_draw)
        self.mask_threshold.valueChanged.connect(self._on_mask_threshold)
        self.gate_check.toggled.connect(lambda *_: self.apply_mask_threshold())
        self.opacity.valueChanged.connect(self._on_opacity)
        self.train_btn.clicked.connect(self._on_train)
        for combo in (self.layer_combo, self.region_combo, self.shapes_combo, self.model_combo):
            combo.currentIndexChanged.connect(self.jobs.refresh)
        for edit in (self.labels_edit, self.run_dir_edit):
            edit.textChanged.connect(self.train_jobs.refresh)
        watch_layer_list(self.viewer, self._refresh)
        self.refresh_models()
        self._refresh()

    def _build_training(self) -> QGroupBox:
        box = QGroupBox("Train on your own labels (A → B → C)")
        self.labels_edit = QLineEdit()
        self.labels_edit.setPlaceholderText("labels CSV, or a folder with benign/ and malignant/")
        self.labels_file_btn = QPushButton("CSV…")
        self.labels_dir_btn = QPushButton("Folder…")
        self.masks_edit = QLineEdit()
        self.masks_edit.setPlaceholderText("optional: masks named like their images")
        self.masks_btn = QPushButton("Folder…")
        self.run_dir_edit = QLineEdit()
        self.run_dir_edit.setPlaceholderText("run folder (checkpoints; resumable)")
        self.run_dir_btn = QPushButton("Folder…")
        self.preset_combo = QComboBox()
        self.preset_combo.addItems(PRESETS)
        self.epochs_spin = QSpinBox()
        self.epochs_spin.setRange(1, 1000)
        self.epochs_spin.setValue(5)
        self.epochs_spin.setSuffix(" epochs")
        self.epochs_spin.setToolTip("epochs of each stage (A, B, C)")
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 100000)
        self.steps_spin.setValue(40)
        self.steps_spin.setSuffix(" steps")
        self.steps_spin.setToolTip("training steps per epoch")
        #: More keyword options for train_malignancy (``config`` overrides, ``threads``), for scripts and tests.
        self.train_options: dict[str, Any] = {}
        self.resume_check = QCheckBox("resume")
        self.resume_check.setToolTip("continue the run in this folder from its last checkpoint")
        self.register_edit = QLineEdit()
        self.register_edit.setPlaceholderText("name to register the model under")
        self.train_btn = QPushButton("Train")
        self.train_stop_btn = stop_button()
        self.train_progress = QProgressBar()
        self.train_status = status_label()
        self.labels_file_btn.clicked.connect(lambda: ask_open_file(self, "Image labels", "CSV (*.csv)", into=self.labels_edit))
        self.labels_dir_btn.clicked.connect(lambda: ask_directory(self, "Folder of labelled images", into=self.labels_edit))
        self.masks_btn.clicked.connect(lambda: ask_directory(self, "Mask folder", into=self.masks_edit))
        self.run_dir_btn.clicked.connect(lambda: ask_directory(self, "Run folder", into=self.run_dir_edit))
        vbox(
            box,
            form(
                ("Labels", hbox((self.labels_edit, 1), self.labels_file_btn, self.labels_dir_btn)),
                ("Masks", hbox((self.masks_edit, 1), self.masks_btn)),
                ("Run folder", hbox((self.run_dir_edit, 1), self.run_dir_btn)),
                ("Preset", hbox((self.preset_combo, 1), self.epochs_spin, self.steps_spin)),
                ("", self.resume_check),
                ("Register as", self.register_edit),
            ),
            hbox(self.train_btn, self.train_stop_btn),
            self.train_progress,
            self.train_status,
        )
        return box

    # ------------------------------------------------------------------ state
    def refresh_models(self, *, select: str | None = None) -> None:
        """Fill the model list with the registry's malignancy models."""
        try:
            for m in malignancy_models():
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
            return "No malignancy model is registered: train one below or give a checkpoint."
        if self.region_combo.currentText() == "Drawn rectangle" and not self.shapes_combo.currentText():
            return "Draw a rectangle on the slide first (Draw…)."
        return ""

    def _why_not_train(self) -> str:
        if not self.labels_edit.text().strip():
            return "Choose the image labels (a CSV or a folder with benign/ and malignant/)."
        if not self.run_dir_edit.text().strip():
            return "Choose a run folder for the checkpoints."
        return ""

    def slide_layer(self) -> Any:
        return layer_named(self.viewer, self.layer_combo.currentText())

    def layer_names(self) -> tuple[str, str]:
        """Names of the heat-map and region layers of the last run."""
        base = self._slide_layer.name if self._slide_layer is not None else "slide"
        return f"{base} malignancy heat map", f"{base} malignant region"

    # ------------------------------------------------------------------ run
    def _on_draw(self) -> Any:
        """Add a rectangle layer in the slide's units, chosen for "Drawn rectangle", in draw mode."""
        shapes = add_region_rectangle(self.viewer, self.slide_layer(), "malignancy region")
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
        args = {"region": region, "mpp": self.mpp_spin.value() or None, "mask_threshold": self.mask_threshold.value() / 100,
                "gate": self.gate_check.isChecked()}
        self.jobs.start(lambda token: run_job(slide, model_ref, cancel=token, **args), done_type=MalignancyLayers,
                        on_event=self._on_progress, on_done=lambda prepared, _l=layer: self._on_done(_l, prepared),
                        message="loading the model…")

    def _on_progress(self, ev: Any) -> None:
        if isinstance(ev, Progress) and ev.total and ev.stage == "inference":
            self.status.setText(f"{ev.done}/{ev.total} tiles")

    def _on_done(self, slide_layer: Any, prepared: MalignancyLayers) -> None:
        self.result, self._slide_layer = prepared.result, slide_layer
        res = prepared.result
        heat, lab = self.layer_names()
        for n in (heat, lab):
            if n in self.viewer.layers:
                self.viewer.layers.remove(n)
        meta = {"model": res.model, "region_xywh": list(res.region), "mpp": res.mpp, "slide": slide_layer.metadata.get("slide"),
                "pathoseg_slide": slide_of_layer(slide_layer), "probability": res.probability, "call": res.label}
        ox, oy = res.origin
        heat_place = grid_placement(slide_layer, row=oy, col=ox, downsample=res.cell / HEAT_SUB)
        mask_place = grid_placement(slide_layer, row=res.region[1], col=res.region[0], downsample=res.scale)

        def add_heat() -> None:
            self.viewer.add_image(prepared.heat, name=heat, colormap="inferno", contrast_limits=(0.0, 1.0),
                                  opacity=self.opacity.value() / 100, interpolation2d="nearest",
                                  metadata=dict(meta, what="classifier C's malignant probability per tile"), **heat_place)

        def add_labels() -> None:
            data = prepared.labels if len(prepared.labels) > 1 else prepared.labels[0]
            from napari.utils.colormaps import DirectLabelColormap

            layer = self.viewer.add_labels(data, name=lab, opacity=0.9, multiscale=len(prepared.labels) > 1,
                                           colormap=DirectLabelColormap(color_dict={None: "transparent", 1: REGION_COLOR}),
                                           metadata=dict(meta, what="segmenter B's malignant region"), **mask_place)
            layer.contour = 2  # the outline: the heat map stays visible inside
            self.viewer.layers.selection.active = slide_layer

        in_turns(add_heat, add_labels)
        self._show_call(res, prepared.summary)
        self.jobs.refresh()
        if prepared.cancelled:
            show_info(f"Stopped: the {res.tiles} finished tiles are kept")

    def _show_call(self, res: MalignancyResult, s: dict[str, Any]) -> None:
        if s["probability"] is None:
            self.call_label.setText("No tissue tile ran: no call.")
            return
        stopped = f" (stopped: {res.tiles} of {res.tiles_total} tiles)" if res.cancelled else ""
        self.call_label.setText(
            f"<b>{res.label.capitalize()}</b>: probability {s['probability']:.3f} ({s['probability_from']}, "
            f"{res.tiles} tiles; call at {res.threshold:.2f}){stopped}<br>"
            f"malignant region {s['malignant_area_um2'] / 1e6:.3f} mm² · {100 * s['malignant_fraction']:.1f} % of the "
            f"tissue · region threshold {res.mask_threshold:.2f}{' · only in tiles C calls malignant' if res.gate else ''}")

    def _on_mask_threshold(self, value: int) -> None:
        self.mask_threshold_label.setText(f"{value / 100:.2f}")
        self.apply_mask_threshold()

    def apply_mask_threshold(self) -> None:
        """Re-make the region mask from the stored probabilities (no network; a comparison per pixel)."""
        if self.result is None or self.jobs.running:
            return
        res = self.result.with_mask_threshold(self.mask_threshold.value() / 100, gate=self.gate_check.isChecked())

        def job(token: Any) -> MalignancyLayers:
            return MalignancyLayers.prepare(res)

        if int(np.prod(res.shape)) <= SYNC_PIXELS:
            self._on_rethreshold(job(None))
        else:
            self.jobs.start(job, on_done=self._on_rethreshold, message="new region threshold…",
                            action="Re-thresholding", abandon_on_stop=True)

    def _on_rethreshold(self, prepared: MalignancyLayers) -> None:
        self.result = prepared.result
        layer = layer_named(self.viewer, self.layer_names()[1])
        if layer is not None:
            layer.data = prepared.labels if len(prepared.labels) > 1 else prepared.labels[0]
        self._show_call(prepared.result, prepared.summary)

    def _on_opacity(self, value: int) -> None:
        layer = layer_named(self.viewer, self.layer_names()[0]) if self.result is not None else None
        if layer is not None:
            layer.opacity = value / 100

    # ------------------------------------------------------------------ training
    def _on_train(self) -> None:
        args = {"labels": self.labels_edit.text().strip(), "masks": self.masks_edit.text().strip() or None,
                "run_dir": self.run_dir_edit.text().strip(), "preset": self.preset_combo.currentText(),
                "epochs": self.epochs_spin.value(), "steps": self.steps_spin.value(),
                "register_as": self.register_edit.text().strip() or None, "resume": self.resume_check.isChecked(),
                **self.train_options}
        self.train_jobs.start(lambda token: train_job(cancel=token, **args), done_type=TrainingDone,
                              on_event=self.on_train_event, on_done=self._on_trained, message="checking the labels…")

    def on_train_event(self, ev: Any) -> None:
        """Show a training event on the panel's status line."""
        text = _describe(ev)
        if text:
            self.train_status.setText(text)

    def _on_trained(self, done: TrainingDone) -> None:
        if done.cancelled:
            self.train_status.setText("Stopped; the run folder keeps the last checkpoint: tick 'resume' to continue.")
            self.resume_check.setChecked(True)
            return
        scores = ", ".join(f"{k} {v:.3f}" for k, v in done.scores.items())
        if done.registered:
            self.refresh_models(select=done.registered)
            self.train_status.setText(f"Registered {done.registered!r} ({scores}); it is selected above.")
        else:
            self._models[done.model_path.stem] = str(done.model_path)
            self.refresh_models(select=done.model_path.stem)
            self.train_status.setText(f"Trained: {done.model_path} ({scores}).")

    def closeEvent(self, event: Any) -> None:
        self.jobs.shutdown()
        self.train_jobs.shutdown()
        super().closeEvent(event)
