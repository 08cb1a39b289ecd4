"""The "Fine-tune" dock: fine-tune a nucleus model in the background and compare it with its base.

The dock drives :func:`napari_pathoseg.methods.nuclei.finetune.iter_finetune` (no computation
here) through the docks' :class:`~napari_pathoseg._widgets._jobs.JobController`:

* base model (the registry's nucleus models, a checkpoint file, or none), student
  architecture (default: the base's own, so the run fine-tunes the base), data (strong-label
  folders and/or a review project: the one open in the Review dock or one on disk), epochs,
  steps per epoch, learning rate, model name and output folder;
* Start runs the generator in a worker thread; every step moves the progress bar and the live
  plot (:class:`~._plot.LossPlot`: per-step loss, per-epoch validation AJI, the base's AJI);
  scoring the base and each validation say so ("validating…");
* Stop sets the cancel token: the worker finishes its step, saves a resumable checkpoint and
  ends; Start with the same output folder resumes;
* when the run ends the status compares the new model with its base (validation AJI on the
  same images); its warnings (not registered below the AJI floor, not better than the base)
  are shown as warnings, never silently; the nuclei of the current view are segmented by the
  new model and by its base (:mod:`._widgets.finetune_compare`) and overlaid;
* closing napari (or the dock) while training stops the run and waits (bounded) for the
  checkpoint to be saved, so nothing is left running.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QEvent, QObject
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
    docked_widgets,
    form,
    hbox,
    refill_combo,
    status_label,
    stop_button,
    vbox,
)
from napari_pathoseg._widgets._jobs import JobController
from napari_pathoseg._widgets._models import nuclei_models
from napari_pathoseg._widgets._plot import LossPlot
from napari_pathoseg._widgets._region import view_region
from napari_pathoseg._widgets.finetune_compare import (
    OverlayLayer,
    compare_job,
    compare_region,
)
from napari_pathoseg._widgets.nuclei import place_result
from napari_pathoseg._widgets.slide import slide_layers
from napari_pathoseg.errors import PathosegError
from napari_pathoseg.methods.nuclei.finetune import (
    FinetuneConfig,
    FinetuneDone,
    FinetuneStage,
    iter_finetune,
    parse_strong,
)
from napari_pathoseg.training.engine import EpochEvent, StepEvent, ValidationEvent

if TYPE_CHECKING:
    import napari

__all__ = ["FinetuneWidget", "LossPlot", "WorkerStarted", "compare_region"]

logger = logging.getLogger(__name__)

FRESH = "(none: fresh student)"
SAME_AS_BASE = "same as base (fine-tune it)"
STUDENT_PRESETS = ("transcycle-lite", "transcycle", "attcycle-lite", "attcycle")
#: Seconds :meth:`FinetuneWidget.shutdown` waits for the worker to save and end.
SHUTDOWN_TIMEOUT = 60.0


@dataclass
class WorkerStarted:
    """First event of the training job: the id of the thread it runs on."""

    thread_id: int


def _training_job(config: FinetuneConfig, ended: threading.Event):
    def job(token: Any) -> Iterator[Any]:
        try:
            yield WorkerStarted(threading.get_ident())
            yield from iter_finetune(config, cancel=token)
        finally:
            ended.set()

    return job


def training_threads() -> int:
    """torch threads for training in napari: every core but one, which stays with the GUI."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def _aji(metrics: dict[str, Any] | None) -> float | None:
    if not metrics:
        return None
    value = metrics.get("best_aji", metrics.get("aji"))
    return None if value is None else float(value)


def _shutdown_on_destroy(tokens: dict[str, Any], *args: Any) -> None:
    """Stop the jobs when the dock is deleted without a close event."""
    for job in tokens.values():
        if job is not None and not job.ended:
            job.token.set()


class _CloseFilter(QObject):
    """Calls ``callback`` when the watched window gets a Close event."""

    def __init__(self, callback: Any) -> None:
        super().__init__()
        self._callback = callback

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt name)
        if event.type() == QEvent.Type.Close:
            self._callback()
        return False


class FinetuneWidget(QWidget):
    """Fine-tune a nucleus model on strong labels + reviewed pseudo-labels, in the background.

    Parameters
    ----------
    napari_viewer : napari.Viewer

    Attributes
    ----------
    jobs, compare_jobs : JobController
        Training, and the comparison of the new model with its base on the view.
    worker_thread_id : int or None
        Thread the last training job ran on (not the GUI thread).
    last_done : FinetuneDone or None
        Last event of the last run.
    overlay_layers : list of str
        Names of the Labels layers added for the comparison.
    done_message : str
        The finished run's status text.
    overlay_counts : dict
        Nuclei each compared model finds in the view.
    """

    def __init__(self, napari_viewer: "napari.Viewer") -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.worker_thread_id: int | None = None
        self.last_done: FinetuneDone | None = None
        self.overlay_layers: list[str] = []
        self.compare_models: list[str] = []
        self.done_message = ""
        self.overlay_counts: dict[str, int] = {}
        self._ended: threading.Event | None = None
        self._compare_ended: threading.Event | None = None
        self._running_jobs: dict[str, Any] = {}
        self._config: FinetuneConfig | None = None
        self._presets: dict[str, str] = {}  # model name -> architecture preset
        self._extra_models: dict[str, str] = {}

        # --- widgets
        self.base_combo = QComboBox()
        self.base_combo.setToolTip("The model to fine-tune (the teacher); its weights start the student.")
        self.base_btn = QPushButton("Checkpoint…")
        self.preset_combo = QComboBox()
        self.preset_combo.addItems([SAME_AS_BASE, *STUDENT_PRESETS])
        self.preset_combo.setToolTip(
            "Student architecture. 'same as base' fine-tunes the base model itself (all its weights); "
            "another architecture takes only the base's matching weights (a fresh student without a base)."
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

        self._inputs = (self.base_combo, self.base_btn, self.preset_combo, self.strong_edit, self.strong_btn,
                        self.project_edit, self.project_btn, self.review_btn, self.epochs_spin, self.steps_spin,
                        self.lr_spin, self.name_edit, self.out_edit, self.out_btn, self.strong_mpp, self.pending_check)
        self.jobs = JobController(
            self, progress=self.progress, status=self.status, stop_button=self.stop_btn,
            run_buttons=[self.start_btn], why_not=self._why_not, on_busy=self._on_busy, action="Fine-tuning",
        )
        self.compare_jobs = JobController(
            self, progress=self.progress, stop_button=self.stop_btn, action="Comparing the models",
        )
        self.base_btn.clicked.connect(self._on_browse_base)
        self.strong_btn.clicked.connect(self._on_add_strong)
        self.project_btn.clicked.connect(self._on_browse_project)
        self.review_btn.clicked.connect(self.use_review_project)
        self.out_btn.clicked.connect(self._on_browse_out)
        self.start_btn.clicked.connect(self._on_start)
        self.base_combo.currentIndexChanged.connect(self._update_enabled)
        for edit in (self.strong_edit, self.project_edit, self.name_edit):
            edit.textChanged.connect(self._update_enabled)

        # stop cleanly when napari closes (the filter goes on the top-level window once a run
        # starts, when the dock is surely inside it) or when the dock is deleted
        self._close_filter = _CloseFilter(self.shutdown)
        self._watched_window: Any = None  # weakref to the window watched (no strong ref: no leak)
        self.destroyed.connect(functools.partial(_shutdown_on_destroy, self._running_jobs))
        self.refresh_models()
        self._update_enabled()

    # ================================================================== inputs
    def refresh_models(self, select: str | None = None) -> None:
        """Fill the base-model combo with the registry's nucleus models (plus checkpoints chosen on disk)."""
        current = select or self.base_combo.currentText()
        models = nuclei_models()
        self._presets.update({str(m["name"]): str(m.get("preset") or "") for m in models})
        names = [str(m["name"]) for m in models]
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

    def _preset(self) -> str | None:
        text = self.preset_combo.currentText()
        return None if text == SAME_AS_BASE else text

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
            preset=self._preset(),
            strong=parse_strong(self.strong_edit.text()),
            strong_mpp=mpp if mpp > 0 else None,
            projects=(project,) if project else (),
            include_pending=self.pending_check.isChecked(),
            epochs=self.epochs_spin.value(),
            steps_per_epoch=self.steps_spin.value(),
            lr=self.lr_spin.value(),
            threads=training_threads(),
        )

    def _why_not(self) -> str:
        if not parse_strong(self.strong_edit.text()):
            return "Add a strong-label folder: validation (and the best epoch) needs expert masks."
        if not self.name_edit.text().strip():
            return "Give the new model a name."
        return ""

    def _update_enabled(self, *args: Any) -> None:
        self.jobs.refresh()
        if self.compare_jobs.running:  # the two share Stop
            self.compare_jobs.refresh()
        base = self._base_ref()
        what = (f"fine-tunes {Path(base).name if base else ''}".strip() if self._preset() is None and base
                else "trains a fresh student" if base is None else "takes the base's matching weights")
        self.preset_combo.setToolTip(f"This run {what}. " + (
            "'same as base' fine-tunes the base model itself (all its weights); another architecture takes "
            "only the base's matching weights."))
        if not self.jobs.running:
            self.start_btn.setToolTip(self._why_not() or
                                      f"Train in the background ({what}); Stop saves a checkpoint, Start resumes.")

    def _on_busy(self, running: bool) -> None:
        for w in self._inputs:
            w.setEnabled(not running)

    # ================================================================== run
    def start(self, config: FinetuneConfig | None = None):
        """Start (or resume) training in the background; returns the :class:`~._jobs.Job`
        (None on bad input or while another run is going)."""
        if self.jobs.running:
            return self.jobs.job
        try:
            config = config or self.make_config()
        except PathosegError as exc:
            show_error(str(exc))
            self.status.setText(str(exc))
            return None
        self.compare_jobs.stop()
        self._config = config
        self._watch_window()
        self._ended = threading.Event()
        self.last_done = None
        self.plot.clear(config.epochs * config.steps_per_epoch)
        job = self.jobs.start(
            _training_job(config, self._ended), done_type=FinetuneDone, on_event=self._on_event,
            on_done=self._on_done, message=f"starting {config.name}…",
        )
        self._running_jobs["train"] = job
        return job

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
        """Ask the training to finish its step, save a checkpoint and end (and stop a comparison)."""
        self.jobs.stop()
        self.compare_jobs.stop()

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> bool:
        """Stop any work and wait (at most ``timeout`` s) for it to end; True when it ended."""
        ok = True
        for controller, ended in ((self.jobs, self._ended), (self.compare_jobs, self._compare_ended)):
            controller.stop()
            if ended is not None and controller.job is not None and controller.job.worker is not None:
                if not ended.wait(timeout):
                    logger.warning("the fine-tune worker did not stop within %.0f s", timeout)
                    ok = False
        return ok

    def _on_event(self, ev: Any) -> None:
        cfg = self._config
        if isinstance(ev, WorkerStarted):
            self.worker_thread_id = ev.thread_id
        elif isinstance(ev, FinetuneStage):
            self.plot.set_note("validating…" if ev.stage == "base" else "")
            self.status.setText(ev.message + ("…" if ev.stage == "base" else ""))
        elif isinstance(ev, StepEvent):
            self.plot.set_note("")
            loss = ev.losses.get("seg", ev.losses.get("total", float("nan")))
            self.plot.add_step(ev.done, loss)
            epochs = cfg.epochs if cfg is not None else ev.epochs
            self.status.setText(f"epoch {ev.epoch + 1}/{epochs} · step {ev.step + 1}/{ev.steps_per_epoch} · "
                                f"seg loss {loss:.3f}")
        elif isinstance(ev, ValidationEvent):
            self.plot.set_note("validating…")
            self.status.setText(f"epoch {ev.epoch + 1}: validating…")
        elif isinstance(ev, EpochEvent):
            self.plot.set_note("")
            aji = _aji(ev.val_metrics)
            spe = cfg.steps_per_epoch if cfg is not None else 1
            if aji is not None:
                self.plot.add_epoch((ev.epoch + 1) * spe, aji)
            best = " (best)" if ev.is_best else ""
            self.status.setText(f"epoch {ev.epoch + 1}: val AJI {aji if aji is not None else float('nan'):.3f}{best} "
                                "· checkpoint saved")
        base_aji = _aji(getattr(ev, "base_metrics", None))
        if base_aji is not None:
            self.plot.set_base(base_aji)

    def summary(self, done: FinetuneDone) -> str:
        """One line: the new model against its base, and what became of it."""
        new, base = _aji(done.best_metrics), _aji(done.base_metrics)
        cfg = self._config
        base_name = Path(cfg.base).stem if cfg is not None and cfg.base else "base"
        if new is None:
            text = "done"
        elif base is not None:
            text = f"done: val AJI {new:.3f} vs base {base_name} {base:.3f} ({new - base:+.3f})"
        else:
            text = f"done: best val AJI {new:.3f}"
        if done.registered is not None:
            text += f"; registered as {done.registered['name']!r}"
        else:
            text += "; NOT registered"
        return text

    def _on_done(self, done: FinetuneDone) -> None:
        self.last_done = done
        self.plot.set_note("")
        self.plot.set_base(_aji(done.base_metrics))
        if done.cancelled:
            where = done.last_checkpoint or (self._config.out_dir if self._config else "")
            self.status.setText(f"stopped; checkpoint {where} (Start resumes)")
            show_info("Fine-tuning stopped; the checkpoint is saved, Start resumes it.")
            return
        msg = self.summary(done)
        warnings = list(done.warnings)
        if warnings:
            msg += " · warning: " + "; ".join(warnings)
        self.done_message = msg
        self.overlay_counts = {}
        self.status.setText(msg)
        if done.registered is not None:
            self._refresh_nuclei_docks()
            self.refresh_models()
        for text in warnings:
            show_warning(f"Fine-tuning: {text}")
        if not warnings:
            show_info(f"Fine-tuning finished: {msg}")
        self.compare_on_view()

    def _refresh_nuclei_docks(self) -> None:
        """Make the new model selectable in open Nuclei docks."""
        from napari_pathoseg._widgets.nuclei import NucleiWidget

        for widget in docked_widgets(self.viewer, NucleiWidget):
            try:
                widget.refresh_models()
            except (PathosegError, RuntimeError) as exc:
                logger.warning("cannot refresh the Nuclei dock: %s", exc)

    # ================================================================== comparison overlay
    def compare_on_view(self):
        """Segment the current view with the new model and its base in the background;
        returns the :class:`~._jobs.Job` or None (no finished run, no slide, nothing in view)."""
        done, cfg = self.last_done, self._config
        if done is None or done.cancelled or cfg is None:
            return None
        new_ref = str(done.registered["name"]) if done.registered is not None else (
            str(done.best_checkpoint) if done.best_checkpoint is not None else None)
        if new_ref is None:
            return None
        layers = slide_layers(self.viewer)
        if not layers:
            self.status.setText(self.status.text() + " · open a slide to compare the models on it")
            return None
        layer = layers[0]
        try:
            region = compare_region(view_region(layer, self.viewer))
        except (PathosegError, ValueError, IndexError, AttributeError) as exc:
            logger.warning("cannot read the view region: %s", exc)
            return None
        # the new model by its registered name (else its best checkpoint); the base as outlines
        models = [(f"{cfg.name} nuclei", new_ref, False)]
        if cfg.base:
            models.append((f"{Path(cfg.base).stem} nuclei (base)", cfg.base, True))
        self.compare_models = [label for label, _, _ in models]
        self._compare_ended = threading.Event()
        job = self.compare_jobs.start(
            compare_job(layer.metadata["pathoseg_slide"], models, region, ended=self._compare_ended),
            on_event=functools.partial(self._on_overlay, layer),
            on_done=lambda _result: self.status.setText(self._overlay_status()),
            message=f"{self.done_message} · segmenting the view with both models…",
        )
        self._running_jobs["compare"] = job
        return job

    def _overlay_status(self) -> str:
        counts = ", ".join(f"{label}: {n} nuclei" for label, n in self.overlay_counts.items())
        return f"{self.done_message} · in the view: {counts}" if counts else self.done_message

    def _on_overlay(self, slide_layer: Any, ev: Any) -> None:
        """Add one model's prepared labels (GUI thread: no computation here)."""
        if not isinstance(ev, OverlayLayer):
            return
        if slide_layer not in self.viewer.layers:
            return
        result = ev.result
        if ev.label in self.viewer.layers:
            self.viewer.layers.remove(ev.label)
        self.viewer.add_labels(
            ev.data, name=ev.label, opacity=0.9 if ev.outline else 0.6,
            metadata={"model": result.model, "region_xywh": list(result.region), "mpp": result.mpp,
                      "table": result.table, "pathoseg_slide": slide_layer.metadata.get("pathoseg_slide"),
                      "object_type": "detection", "class_name": "Nucleus", "outline": ev.outline},
            **place_result(slide_layer, result),
        )
        if ev.label not in self.overlay_layers:
            self.overlay_layers.append(ev.label)
        self.viewer.layers.selection.active = slide_layer
        # keep the run's result on the status line; add each model's count in the view
        self.overlay_counts[ev.label] = ev.n_nuclei
        self.status.setText(self._overlay_status())

    # ================================================================== Qt
    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt name)
        self.shutdown()
        super().closeEvent(event)
