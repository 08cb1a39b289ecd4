"""The Review dock's "Generate pseudo-labels" box: run a teacher over a slide or image folder.

:class:`GenerateBox` runs :func:`napari_pathoseg.review.project.generate_pseudolabels` through
the docks' :class:`~napari_pathoseg._widgets._jobs.JobController` (background thread, progress
bar, Stop, errors shown once). The model is loaded in the job, off the GUI thread. A finished
run, and a stopped one (whose finished tiles are kept), emit :attr:`GenerateBox.project_ready`
with the project folder, which the dock opens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QComboBox, QGroupBox, QLabel, QLineEdit, QProgressBar, QPushButton, QSpinBox

from napari_pathoseg._widgets._common import ask_directory, ask_open_file, hbox, stop_button, vbox
from napari_pathoseg._widgets._jobs import JobController
from napari_pathoseg._widgets._models import DEFAULT_MODEL, nuclei_model_names
from napari_pathoseg.errors import CancelledError
from napari_pathoseg.review.project import GenerationDone, GenerationProgress, generate_pseudolabels

__all__ = ["GenerateBox", "GenerationEnded", "default_model_loader", "generation_job"]

logger = logging.getLogger(__name__)


@dataclass
class GenerationEnded:
    """Result of a generation job: the project folder, finished or stopped early.

    Attributes
    ----------
    root : Path
        The review project folder.
    processed, kept : int
        Tiles processed and kept (``-1`` when stopped: the project itself tells).
    cancelled : bool
        Stopped by the user; the tiles finished so far are in the project.
    message : str
        What happened, for the status line.
    """

    root: Path
    processed: int
    kept: int
    cancelled: bool = False
    message: str = ""


def default_model_loader(name: str) -> Any:
    """Load a nucleus model from the registry (a name or a checkpoint path)."""
    from napari_pathoseg.models.registry import load_model

    return load_model(name, task="nuclei")


def generation_job(source: str, out: str, model_name: str, loader: Callable[[str], Any],
                   max_tiles: int | None) -> Callable[[Any], Iterator[Any]]:
    """The job ``job(token)`` for :meth:`JobController.start`: progress events, then a
    :class:`GenerationEnded` as the generator's return value (also when stopped)."""

    def job(token: Any) -> Iterator[Any]:
        model = loader(model_name)  # in the worker thread: loading takes a while
        done = None
        try:
            for event in generate_pseudolabels(
                source, out, predict=model.predict, to_instances=model.to_instances,
                model_name=model_name, tile_size=int(getattr(model, "tile_size", 256)),
                mpp=getattr(model, "mpp", None), max_tiles=max_tiles, cancel=token,
            ):
                if isinstance(event, GenerationDone):
                    done = event
                else:
                    yield event
        except CancelledError as exc:  # Stop: the tiles finished so far are kept
            return GenerationEnded(Path(out), -1, -1, cancelled=True, message=str(exc))
        if done is None:
            raise RuntimeError("pseudo-label generation ended without a result")
        cancelled = bool(getattr(done, "cancelled", False))
        what = f"{done.kept} of {done.processed} tiles kept"
        return GenerationEnded(done.project.root, done.processed, done.kept, cancelled=cancelled,
                               message=f"Pseudo-labels stopped: {what} in {done.project.root.name}." if cancelled
                               else f"Pseudo-labels: {what}.")

    return job


class GenerateBox(QGroupBox):
    """Source, teacher, tile budget, Generate / Stop and progress of pseudo-label generation.

    Parameters
    ----------
    viewer : napari.Viewer
    status : QLabel
        The dock's status line.
    out_dir : callable
        ``out_dir() -> str``: the project folder to create ("" when none is chosen).
    on_busy : callable, optional
        ``on_busy(running)`` when a generation starts or ends.

    Attributes
    ----------
    model_loader : callable
        ``loader(name) -> model`` with ``predict`` / ``to_instances`` / ``tile_size`` /
        ``mpp`` (default: the registry's ``load_model``); replaceable, e.g. in tests.
    jobs : JobController

    Signals
    -------
    project_ready : str
        The folder of a project that finished generating (or was stopped, keeping its tiles).
    """

    project_ready = Signal(str)

    def __init__(self, viewer: Any, *, status: QLabel, out_dir: Callable[[], str],
                 on_busy: Callable[[bool], Any] | None = None) -> None:
        super().__init__("Generate pseudo-labels")
        self.viewer = viewer
        self.model_loader: Callable[[str], Any] = default_model_loader
        self._out_dir = out_dir
        self.source_edit = QLineEdit()
        self.source_edit.setPlaceholderText("slide file or folder of tiles (default: open slide)")
        self.browse_source_btn = QPushButton("Browse…")
        self.model_combo = QComboBox()
        self.model_combo.setEditable(True)
        self.model_combo.addItems(nuclei_model_names())
        self.model_combo.setToolTip("the teacher: a nucleus model of the registry (or a checkpoint path)")
        self.max_tiles_spin = QSpinBox()
        self.max_tiles_spin.setRange(0, 1_000_000)
        self.max_tiles_spin.setSpecialValueText("all")
        self.max_tiles_spin.setToolTip("process at most this many tiles (0 = all)")
        self.generate_btn = QPushButton("Generate")
        self.stop_btn = stop_button()
        self.progress = QProgressBar()
        vbox(
            self,
            hbox(self.source_edit, self.browse_source_btn),
            hbox(QLabel("Teacher:"), (self.model_combo, 1), QLabel("Max tiles:"), self.max_tiles_spin),
            hbox(self.generate_btn, self.stop_btn),
            self.progress,
        )
        self.jobs = JobController(
            self, progress=self.progress, status=status, stop_button=self.stop_btn,
            run_buttons=[self.generate_btn], why_not=self._why_not, on_busy=on_busy,
            action="Pseudo-label generation",
        )
        self.browse_source_btn.clicked.connect(self._on_browse_source)
        self.generate_btn.clicked.connect(self._on_generate)

    def _why_not(self) -> str:
        if not self._out_dir():
            return "Type the folder of the new review project above; Generate writes the project there."
        return ""

    def refresh(self) -> None:
        """Follow the inputs (the project folder of the dock) in the Generate button."""
        self.jobs.refresh()

    def _on_browse_source(self) -> None:
        if not ask_open_file(self, "Slide to pseudo-label", into=self.source_edit):
            ask_directory(self, "...or a folder of tiles", into=self.source_edit)

    def _default_source(self) -> str:
        from napari_pathoseg._widgets.slide import slide_layers

        layers = slide_layers(self.viewer)
        return str(layers[0].metadata["pathoseg_slide"].metadata.path) if layers else ""

    def _on_generate(self) -> None:
        source = self.source_edit.text().strip() or self._default_source()
        out = self._out_dir()
        if not source or not out:
            show_error("Choose a source (slide or folder of tiles) and a new project folder first.")
            return
        self.source_edit.setText(source)
        self.generate(source, out, max_tiles=self.max_tiles_spin.value() or None)

    def generate(self, source: str | Path, out: str | Path, *, model_name: str | None = None,
                 max_tiles: int | None = None):
        """Start generating a project in the background; returns the :class:`~._jobs.Job` (None when busy)."""
        name = model_name or self.model_combo.currentText().strip() or DEFAULT_MODEL
        return self.jobs.start(
            generation_job(str(source), str(out), name, self.model_loader, max_tiles or None),
            on_event=self._on_event,
            on_done=self._on_done,
            message=f"generating pseudo-labels with {name}…",
        )

    def _on_event(self, event: Any) -> None:
        if isinstance(event, GenerationProgress) and self.jobs.status is not None:
            self.jobs.status.setText(f"{event.done}/{event.total or '?'} tiles, {event.kept} kept")

    def _on_done(self, ended: GenerationEnded) -> None:
        show_info(ended.message)
        self.project_ready.emit(str(ended.root))

    def stop(self) -> bool:
        """Stop a running generation (the finished tiles are kept)."""
        return self.jobs.stop()
