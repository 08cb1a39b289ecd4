"""The "Fine-tune" dock: train an M2 student in the background and compare it with its teacher.

The dock drives :func:`napari_pathoseg.methods.nuclei.finetune.iter_finetune` (no computation here):

* base model (registered names + a checkpoint file), student preset, data (strong-label
  folders and/or a review project: the one open in the Review dock or one on disk),
  epochs, steps per epoch, learning rate, model name and output folder;
* Start runs the generator in napari's ``thread_worker``; every yielded step moves the
  progress bar and the live plot (per-step segmentation loss, per-epoch validation AJI);
* Stop sets the cancel token: the worker finishes its step, saves a resumable checkpoint
  and ends; Start with the same output folder resumes;
* when the run ends the model is registered and the nuclei of the current view are
  segmented by the new model and by its base model (in a second worker) and overlaid as two
  Labels layers over the slide for comparison;
* closing napari (or the dock) while training sets the cancel token and waits (bounded)
  for the worker, so the checkpoint is saved and nothing is left running.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QEvent, QObject, QPointF
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QWidget,
)

from napari_pathoseg._widgets._common import (
    ask_directory,
    ask_open_file,
    connect_worker,
    docked_widgets,
    form,
    hbox,
    refill_combo,
    request_stop,
    show_worker_error,
    status_label,
    stop_button,
    vbox,
)
from napari_pathoseg.errors import PathosegError
from napari_pathoseg.methods.nuclei.finetune import FinetuneConfig, FinetuneDone, FinetuneStage, iter_finetune, parse_strong
from napari_pathoseg.methods.nuclei.train import EpochEvent, StepEvent
from napari_pathoseg._widgets.nuclei import place_result, view_region
from napari_pathoseg._widgets.slide import slide_layers

if TYPE_CHECKING:
    import napari

__all__ = ["FinetuneWidget", "LossPlot", "WorkerStarted"]

logger = logging.getLogger(__name__)

FRESH = "(none: fresh student)"
STUDENT_PRESETS = ("transcycle-lite", "transcycle", "attcycle-lite", "attcycle")
#: Seconds :meth:`FinetuneWidget.shutdown` waits for the worker to save and end.
SHUTDOWN_TIMEOUT = 60.0
#: Largest side (level-0 pixels) of the view compared after training; a larger view is
#: cropped to its centre so the comparison stays quick at any zoom.
MAX_COMPARE_SIDE = 4096


def compare_region(view: tuple[int, int, int, int], *, max_side: int = MAX_COMPARE_SIDE) -> tuple[int, int, int, int]:
    """The centre of a level-0 ``(x, y, w, h)`` view, at most ``max_side`` pixels a side."""
    x, y, w, h = (int(v) for v in view)
    cw, ch = min(w, max_side), min(h, max_side)
    return (x + (w - cw) // 2, y + (h - ch) // 2, cw, ch)


@dataclass
class WorkerStarted:
    """First event of the training worker: the id of the thread it runs on."""

    thread_id: int


@dataclass
class OverlayResult:
    """Nuclei of one model over the view (event of the overlay worker)."""

    label: str
    result: Any  # NucleiResult


# ------------------------------------------------------------------------------------------
# workers (run in napari's thread pool)


@thread_worker(ignore_errors=True)  # errors go to FinetuneWidget._on_error
def _train_worker(config: FinetuneConfig, cancel: threading.Event, ended: threading.Event):
    try:
        yield WorkerStarted(threading.get_ident())
        yield from iter_finetune(config, cancel=cancel)
    finally:
        ended.set()


@thread_worker(ignore_errors=True)
def _overlay_worker(slide: Any, models: list[tuple[str, str]], region: tuple[int, int, int, int],
                    cancel: threading.Event, ended: threading.Event):
    from napari_pathoseg.models.registry import load_model
    from napari_pathoseg.methods.nuclei.segment import segment_nuclei

    try:
        for label, ref in models:
            if cancel.is_set():
                return
            model = load_model(ref)
            yield OverlayResult(label, segment_nuclei(slide, model, region=region, cancel=cancel,
                                                      with_normalized=False))
    finally:
        ended.set()


def _shutdown_on_destroy(cancel_box: dict[str, Any], *args: Any) -> None:
    """Set the cancel tokens when the dock is deleted without a close event."""
    for key in ("train", "overlay"):
        ev = cancel_box.get(key)
        if ev is not None:
            ev.set()


# ------------------------------------------------------------------------------------------
# the live plot


class LossPlot(QWidget):
    """A small line plot: per-step loss (left axis) and per-epoch validation AJI (right, 0..1).

    Attributes
    ----------
    steps : list of (global step, loss)
    epochs : list of (global step at the epoch's end, AJI)
    """

    LOSS_COLOR = QColor(230, 120, 40)
    AJI_COLOR = QColor(60, 160, 230)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.steps: list[tuple[int, float]] = []
        self.epochs: list[tuple[int, float]] = []
        self.total_steps = 1
        self.setMinimumHeight(130)
        self.setToolTip("orange: segmentation loss per step; blue: validation AJI per epoch (right axis, 0-1)")

    def clear(self, total_steps: int = 1) -> None:
        self.steps, self.epochs = [], []
        self.total_steps = max(1, int(total_steps))
        self.update()

    def add_step(self, step: int, loss: float) -> None:
        if math.isfinite(loss):
            self.steps.append((int(step), float(loss)))
            self.update()

    def add_epoch(self, step: int, aji: float) -> None:
        if math.isfinite(aji):
            self.epochs.append((int(step), float(aji)))
            self.update()

    def paintEvent(self, event: Any) -> None:  # noqa: N802 (Qt name)
        p = QPainter(self)
        try:
            p.setRenderHint(QPainter.Antialiasing)
            w, h = self.width(), self.height()
            left, right, top, bottom = 34, 30, 8, 18
            pw, ph = max(1, w - left - right), max(1, h - top - bottom)
            p.fillRect(self.rect(), QColor(38, 41, 48))
            p.setPen(QPen(QColor(120, 120, 120), 1))
            p.drawRect(left, top, pw, ph)
            pal = QColor(200, 200, 200)
            p.setPen(pal)
            n = max(self.total_steps, max((s for s, _ in self.steps), default=1))
            p.drawText(left, h - 4, "0")
            p.drawText(left + pw - 30, h - 4, f"{n} steps")
            lmax = max((v for _, v in self.steps), default=1.0) or 1.0
            p.drawText(2, top + 10, f"{lmax:.2g}")
            p.drawText(w - right + 3, top + 10, "1.0")
            p.drawText(w - right + 3, top + ph, "0")

            def pt(step: float, frac: float) -> QPointF:
                return QPointF(left + pw * step / n, top + ph * (1.0 - min(max(frac, 0.0), 1.0)))

            if self.steps:
                p.setPen(QPen(self.LOSS_COLOR, 1.5))
                p.drawPolyline(QPolygonF([pt(s, v / lmax) for s, v in self.steps]))
            if self.epochs:
                p.setPen(QPen(self.AJI_COLOR, 2))
                pts = [pt(s, v) for s, v in self.epochs]
                if len(pts) > 1:
                    p.drawPolyline(QPolygonF(pts))
                p.setBrush(self.AJI_COLOR)
                for q in pts:
                    p.drawEllipse(q, 3, 3)
                last, best = self.epochs[-1][1], max(v for _, v in self.epochs)
                p.drawText(left + 4, top + 12, f"val AJI {last:.3f} (best {best:.3f})")
        finally:
            p.end()


# ------------------------------------------------------------------------------------------
# the dock


class _CloseFilter(QObject):
    """Calls ``callback`` when the watched window gets a Close event."""

    def __init__(self, callback: Any) -> None:
        super().__init__()
        self._callback = callback

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt name)
        if event.type() == QEvent.Close:
            self._callback()
        return False


class FinetuneWidget(QWidget):
    """Fine-tune a nucleus student on strong labels + reviewed pseudo-labels, in the background.

    Parameters
    ----------
    napari_viewer : napari.Viewer

    Attributes
    ----------
    worker : GeneratorWorker or None
        The running training worker.
    worker_thread_id : int or None
        Thread the last training worker ran on (not the GUI thread).
    last_done : FinetuneDone or None
        Last event of the last run.
    overlay_layers : list of str
        Names of the Labels layers added for the comparison.
    """

    def __init__(self, napari_viewer: "napari.Viewer") -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.worker = None
        self.overlay_worker = None
        self.worker_thread_id: int | None = None
        self.last_done: FinetuneDone | None = None
        self.overlay_layers: list[str] = []
        self.compare_models: list[str] = []
        #: the finished run's status text, and the nuclei each compared model finds in the view
        self.done_message = ""
        self.overlay_counts: dict[str, int] = {}
        self._cancel: threading.Event | None = None
        self._ended: threading.Event | None = None
        self._overlay_cancel: threading.Event | None = None
        self._overlay_ended: threading.Event | None = None
        self._cancel_box: dict[str, Any] = {}
        self._config: FinetuneConfig | None = None
        self._extra_models: dict[str, str] = {}

        # --- widgets
        self.base_combo = QComboBox()
        self.base_btn = QPushButton("Checkpoint…")
        self.preset_combo = QComboBox()
        self.preset_combo.addItems(STUDENT_PRESETS)
        self.preset_combo.setToolTip(
            "Student architecture. The base model's weights are used when it has the same "
            "architecture (e.g. attcycle-lite on nuclei-lite); otherwise the student starts fresh."
        )
        self.strong_edit = QLineEdit()
        self.strong_edit.setPlaceholderText("folders with images/ + instance_masks/ (; separated)")
        self.strong_btn = QPushButton("Add…")
        self.strong_mpp = QDoubleSpinBox()
        self.strong_mpp.setDecimals(3)
        self.strong_mpp.setRange(0.0, 10.0)
        self.strong_mpp.setSingleStep(0.05)
        self.strong_mpp.setSpecialValueText("model's")
        self.strong_mpp.setToolTip("µm/px of plain images/ folders (the shared datasets declare their own)")
        self.project_edit = QLineEdit()
        self.project_edit.setPlaceholderText("review project folder (accepted tiles)")
        self.project_btn = QPushButton("Browse…")
        self.review_btn = QPushButton("From Review dock")
        self.pending_check = QCheckBox("also pending tiles above the threshold")
        self.epochs_spin = QSpinBox()
        self.epochs_spin.setRange(1, 1000)
        self.epochs_spin.setValue(10)
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 100000)
        self.steps_spin.setValue(100)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(6)
        self.lr_spin.setRange(1e-6, 1.0)
        self.lr_spin.setSingleStep(1e-4)
        self.lr_spin.setValue(2e-4)
        self.name_edit = QLineEdit("student")
        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText("output folder (default: next to the model registry)")
        self.out_btn = QPushButton("Browse…")
        self.start_btn = QPushButton("Start")
        self.stop_btn = stop_button()
        self.progress = QProgressBar()
        self.plot = LossPlot()
        self.status = status_label()

        vbox(
            self,
            form(
                ("Base model", hbox((self.base_combo, 1), self.base_btn)),
                ("Student", self.preset_combo),
                ("Strong labels", hbox((self.strong_edit, 1), self.strong_btn)),
                ("their µm/px", self.strong_mpp),
                ("Pseudo-labels", hbox((self.project_edit, 1), self.project_btn, self.review_btn)),
                ("", self.pending_check),
                ("Epochs", self.epochs_spin),
                ("Steps / epoch", self.steps_spin),
                ("Learning rate", self.lr_spin),
                ("Model name", self.name_edit),
                ("Output", hbox((self.out_edit, 1), self.out_btn)),
            ),
            hbox(self.start_btn, self.stop_btn),
            self.progress,
            self.plot,
            self.status,
            stretch_end=True,
        )

        self.base_btn.clicked.connect(self._on_browse_base)
        self.strong_btn.clicked.connect(self._on_add_strong)
        self.project_btn.clicked.connect(self._on_browse_project)
        self.review_btn.clicked.connect(self.use_review_project)
        self.out_btn.clicked.connect(self._on_browse_out)
        self.start_btn.clicked.connect(self._on_start)
        self.stop_btn.clicked.connect(self.stop)
        for edit in (self.strong_edit, self.project_edit, self.name_edit):
            edit.textChanged.connect(self._update_enabled)

        # stop cleanly when napari closes (the filter goes on the top-level window once a run
        # starts, when the dock is surely inside it) or when the dock is deleted
        self._close_filter = _CloseFilter(self.shutdown)
        self._watched_window: Any = None  # weakref to the window watched (no strong ref: no leak)
        self.destroyed.connect(functools.partial(_shutdown_on_destroy, self._cancel_box))
        self.refresh_models()
        self._update_enabled()

    # ================================================================== inputs
    def refresh_models(self, select: str | None = None) -> None:
        """Fill the base-model combo from the registry (plus checkpoints chosen on disk)."""
        from napari_pathoseg.models.registry import list_models

        current = select or self.base_combo.currentText()
        try:
            names = [m["name"] for m in list_models()]
        except PathosegError as exc:
            show_error(str(exc))
            names = []
        refill_combo(self.base_combo, names + list(self._extra_models) + [FRESH], current=current)

    def add_base_checkpoint(self, path: str) -> None:
        """Offer a ``.safetensors`` checkpoint as base model and select it."""
        label = Path(path).name
        self._extra_models[label] = str(path)
        self.refresh_models(select=label)

    def _on_browse_base(self) -> None:
        path = ask_open_file(self, "Base checkpoint", "Checkpoints (*.safetensors)")
        if path:
            self.add_base_checkpoint(path)

    def _on_add_strong(self) -> None:
        path = ask_directory(self, "Strong-label folder (images/ + instance_masks/)")
        if path:
            current = parse_strong(self.strong_edit.text())
            self.strong_edit.setText("; ".join(current + (path,)))

    def _on_browse_project(self) -> None:
        ask_directory(self, "Review project folder", into=self.project_edit)

    def _on_browse_out(self) -> None:
        ask_directory(self, "Output folder", into=self.out_edit)

    def _review_dock_project(self) -> Any:
        from napari_pathoseg._widgets.review import ReviewWidget

        for widget in docked_widgets(self.viewer, ReviewWidget):
            if widget.project is not None:
                return widget.project
        return None

    def use_review_project(self) -> None:
        """Use the project open in the Review dock."""
        project = self._review_dock_project()
        if project is None:
            show_error("No review project is open in the Review dock; open one there or browse for a folder.")
            return
        self.project_edit.setText(str(project.root))

    def _base_ref(self) -> str | None:
        text = self.base_combo.currentText()
        if not text or text == FRESH:
            return None
        return self._extra_models.get(text, text)

    def _out_dir(self, name: str) -> str:
        text = self.out_edit.text().strip()
        if text:
            return text
        from napari_pathoseg.models.registry import registry_path

        out = registry_path().parent / "finetune" / name
        self.out_edit.setText(str(out))
        return str(out)

    def make_config(self) -> FinetuneConfig:
        """The :class:`FinetuneConfig` the inputs describe (raises FinetuneError on bad input)."""
        name = self.name_edit.text().strip()
        project = self.project_edit.text().strip()
        mpp = self.strong_mpp.value()
        return FinetuneConfig(
            out_dir=self._out_dir(name or "student"),
            name=name,
            base=self._base_ref(),
            preset=self.preset_combo.currentText(),
            strong=parse_strong(self.strong_edit.text()),
            strong_mpp=mpp if mpp > 0 else None,
            projects=(project,) if project else (),
            include_pending=self.pending_check.isChecked(),
            epochs=self.epochs_spin.value(),
            steps_per_epoch=self.steps_spin.value(),
            lr=self.lr_spin.value(),
        )

    def _update_enabled(self, *args: Any) -> None:
        running = self.worker is not None
        reason = ""
        if not parse_strong(self.strong_edit.text()):
            reason = "Add a strong-label folder: validation (and the best epoch) needs expert masks."
        elif not self.name_edit.text().strip():
            reason = "Give the new model a name."
        self.start_btn.setEnabled(not running and not reason)
        self.start_btn.setToolTip(reason or "Train in the background; Stop saves a checkpoint, Start resumes.")
        self.stop_btn.setEnabled(running)
        for w in (self.base_combo, self.base_btn, self.preset_combo, self.strong_edit, self.strong_btn,
                  self.project_edit, self.project_btn, self.review_btn, self.epochs_spin, self.steps_spin,
                  self.lr_spin, self.name_edit, self.out_edit, self.out_btn, self.strong_mpp, self.pending_check):
            w.setEnabled(not running)

    # ================================================================== run
    def start(self, config: FinetuneConfig | None = None):
        """Start (or resume) training in a worker thread; returns the worker (None on bad input)."""
        if self.worker is not None:
            return self.worker
        try:
            config = config or self.make_config()
        except PathosegError as exc:
            show_error(str(exc))
            self.status.setText(str(exc))
            return None
        self._config = config
        self._watch_window()
        self._cancel = threading.Event()
        self._ended = threading.Event()
        self._cancel_box["train"] = self._cancel
        self.last_done = None
        total = config.epochs * config.steps_per_epoch
        self.progress.setRange(0, total)
        self.progress.setValue(0)
        self.plot.clear(total)
        worker = connect_worker(
            _train_worker(config, self._cancel, self._ended),
            yielded=self._on_event,
            errored=self._on_error,
            finished=self._on_finished,
        )
        self.worker = worker
        self.status.setText(f"starting {config.name} ({config.preset})…")
        self._update_enabled()
        worker.start()
        return worker

    def _watch_window(self) -> None:
        """Watch the napari window this dock sits in for Close (once per window)."""
        top = self.window()
        watched = self._watched_window() if self._watched_window is not None else None
        if top is not self and top is not watched:
            if watched is not None:
                watched.removeEventFilter(self._close_filter)
            top.installEventFilter(self._close_filter)
            self._watched_window = weakref.ref(top)

    def _on_start(self) -> None:
        self.start()

    def stop(self) -> None:
        """Ask the worker to finish its step, save a checkpoint and end."""
        request_stop(self._cancel if self.worker is not None else None, status=self.status,
                     message="stopping after the current step (saving a checkpoint)…", stop_button=self.stop_btn)
        if self._overlay_cancel is not None:
            self._overlay_cancel.set()

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> bool:
        """Stop any work and wait (at most ``timeout`` s) for it to end; True when it ended."""
        ok = True
        for cancel, ended in ((self._cancel, self._ended), (self._overlay_cancel, self._overlay_ended)):
            if cancel is not None and ended is not None and not ended.is_set():
                cancel.set()
                if not ended.wait(timeout):
                    logger.warning("the fine-tune worker did not stop within %.0f s", timeout)
                    ok = False
        return ok

    def _on_event(self, ev: Any) -> None:
        cfg = self._config
        spe = cfg.steps_per_epoch if cfg is not None else 1
        if isinstance(ev, WorkerStarted):
            self.worker_thread_id = ev.thread_id
        elif isinstance(ev, FinetuneStage):
            self.status.setText(ev.message)
        elif isinstance(ev, StepEvent):
            g = ev.epoch * ev.steps_per_epoch + ev.step + 1
            self.progress.setValue(min(g, self.progress.maximum()))
            loss = ev.losses.get("seg", ev.losses.get("total", float("nan")))
            self.plot.add_step(g, loss)
            self.status.setText(f"epoch {ev.epoch + 1}/{cfg.epochs if cfg else '?'} · step {ev.step + 1}/{ev.steps_per_epoch} · seg loss {loss:.3f}")
        elif isinstance(ev, EpochEvent):
            aji = ev.val_metrics.get("best_aji", ev.val_metrics.get("aji", float("nan")))
            self.plot.add_epoch((ev.epoch + 1) * spe, aji)
            best = " (best)" if ev.is_best else ""
            self.status.setText(f"epoch {ev.epoch + 1}: val AJI {aji:.3f}{best} · checkpoint saved")
        elif isinstance(ev, FinetuneDone):
            self._on_done(ev)

    def _on_done(self, done: FinetuneDone) -> None:
        self.last_done = done
        if done.cancelled:
            where = done.last_checkpoint or (self._config.out_dir if self._config else "")
            self.status.setText(f"stopped; checkpoint {where} (Start resumes)")
            show_info("Fine-tuning stopped; the checkpoint is saved, Start resumes it.")
            return
        aji = done.best_metrics.get("best_aji", done.best_metrics.get("aji"))
        msg = f"done: best val AJI {aji:.3f}" if aji is not None else "done"
        if done.registered is not None:
            msg += f"; registered as {done.registered['name']!r}"
            self._refresh_nuclei_docks(done.registered["name"])
            self.refresh_models()
        self.done_message = msg
        self.overlay_counts = {}
        self.status.setText(msg)
        show_info(f"Fine-tuning finished: {msg}")
        if done.registered is not None:
            self.compare_on_view()

    def _on_error(self, exc: Exception) -> None:
        show_worker_error(exc, action="Fine-tuning", status=self.status)

    def _on_finished(self) -> None:
        self.worker = None
        self._update_enabled()

    def _refresh_nuclei_docks(self, name: str) -> None:
        """Make the new model selectable in open Nuclei docks."""
        from napari_pathoseg._widgets.nuclei import NucleiWidget

        for widget in docked_widgets(self.viewer, NucleiWidget):
            try:
                widget.refresh_models()
            except (PathosegError, RuntimeError) as exc:
                logger.warning("cannot refresh the Nuclei dock: %s", exc)

    # ================================================================== comparison overlay
    def compare_on_view(self) -> Any:
        """Segment the current view with the new model and its base; returns the worker or None."""
        done, cfg = self.last_done, self._config
        if done is None or done.registered is None or cfg is None:
            return None
        layers = slide_layers(self.viewer)
        if not layers:
            self.status.setText(self.status.text() + " · open a slide to compare the models on it")
            return None
        layer = layers[0]
        slide = layer.metadata["pathoseg_slide"]
        try:
            region = compare_region(view_region(layer, self.viewer))
        except (PathosegError, ValueError, IndexError, AttributeError) as exc:
            logger.warning("cannot read the view region: %s", exc)
            return None
        # the new model by its registered name, so its layers and results carry that name
        models = [(f"{cfg.name} nuclei", str(done.registered["name"]))]
        if cfg.base:
            models.append((f"{Path(cfg.base).stem} nuclei (base)", cfg.base))
        self.compare_models = [label for label, _ in models]
        self._overlay_cancel = threading.Event()
        self._overlay_ended = threading.Event()
        self._cancel_box["overlay"] = self._overlay_cancel
        worker = connect_worker(
            _overlay_worker(slide, models, region, self._overlay_cancel, self._overlay_ended),
            yielded=functools.partial(self._on_overlay, layer),
            errored=self._on_error,
        )
        self.overlay_worker = worker
        worker.start()
        return worker

    def _on_overlay(self, slide_layer: Any, ev: OverlayResult) -> None:
        place = place_result(slide_layer, ev.result)
        if ev.label in self.viewer.layers:
            self.viewer.layers.remove(ev.label)
        layer = self.viewer.add_labels(
            ev.result.labels, name=ev.label, opacity=0.6,
            metadata={"model": ev.result.model, "region_xywh": list(ev.result.region), "mpp": ev.result.mpp},
            **place,
        )
        if ev.label.endswith("(base)"):
            layer.contour = 1  # the base model as outlines over the new model's filled nuclei
        if ev.label not in self.overlay_layers:
            self.overlay_layers.append(ev.label)
        self.viewer.layers.selection.active = slide_layer
        # keep the run's result on the status line; add each model's count in the view
        self.overlay_counts[ev.label] = ev.result.n_nuclei
        counts = ", ".join(f"{label}: {n} nuclei" for label, n in self.overlay_counts.items())
        self.status.setText(f"{self.done_message} · in the view: {counts}")

    # ================================================================== Qt
    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt name)
        self.shutdown()
        super().closeEvent(event)
