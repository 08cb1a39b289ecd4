"""The "Cohort" dock: run an analysis over a cohort of slides and watch it; open finished slides.

Choose a manifest CSV or a folder of slides, the task, its model, an output folder, and either
the local cluster's workers or the address of a running dask scheduler. The cohort runs through
the dock job controller (:mod:`napari_pathoseg._widgets._jobs`) on
:func:`napari_pathoseg.cohort.runner.iter_cohort`; the table shows every slide with its status
and key figures as results arrive. Stop cancels the slides not yet finished (a re-run does them).
Double-click a finished slide to open it with its results as layers (read lazily, in a job).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from napari.utils.notifications import show_info
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from napari_pathoseg._widgets._common import (
    ask_directory,
    ask_open_file,
    form,
    grid_placement,
    hbox,
    load_small_levels,
    refill_combo,
    status_label,
    stop_button,
    vbox,
)
from napari_pathoseg._widgets._jobs import JobController
from napari_pathoseg.cohort.runner import CohortResult, CohortStarted, SlideFinished, available_cores, iter_cohort
from napari_pathoseg.cohort.tasks import available_tasks, get_batch_task

if TYPE_CHECKING:
    import napari

__all__ = ["CohortWidget", "open_job"]

logger = logging.getLogger(__name__)

BASE = ("slide", "status", "seconds")


def task_models(task: str) -> list[str]:
    """Names of the registered models of the batch task's model task (its default first)."""
    from napari_pathoseg.models.registry import list_models

    spec = get_batch_task(task)
    if spec.model_task is None:
        return []
    try:
        names = [str(m["name"]) for m in list_models(task=spec.model_task)]
    except Exception as exc:  # noqa: BLE001 - a broken registry still leaves the default
        logger.warning("cannot list models: %s", exc)
        names = []
    default = spec.default_model
    return ([default] if default and default not in names else []) + names


def open_job(out_dir: str, stem: str) -> tuple[Any, tuple, list]:
    """Open a finished slide and its result layers (worker thread): small levels read here."""
    from napari_pathoseg._reader import slide_layer_data
    from napari_pathoseg.cohort.results import slide_results
    from napari_pathoseg.wsi.slide import open_slide

    res = slide_results(out_dir, stem)
    slide = open_slide(res.slide)
    data, kwargs, _ = slide_layer_data(slide)
    if kwargs.get("multiscale"):
        data = load_small_levels(data)
    layers = [(ly, load_small_levels(ly.levels)) for ly in res.layers]
    return slide, (data, kwargs), layers


class CohortWidget(QWidget):
    """Launch ``pathoseg batch`` from napari, follow it slide by slide, open the results."""

    def __init__(self, napari_viewer: "napari.Viewer") -> None:
        super().__init__()
        self.viewer = napari_viewer
        #: local workers as processes (the default); tests use threads of this process
        self.processes = True
        self._figures: tuple[str, ...] = ()
        self._row_of: dict[str, int] = {}
        self._out = ""

        self.source_edit = QLineEdit()
        self.source_edit.setPlaceholderText("manifest CSV or folder of slides")
        self.manifest_btn = QPushButton("CSV…")
        self.folder_btn = QPushButton("Folder…")
        self.task_combo = QComboBox()
        self.model_combo = QComboBox()
        self.model_combo.setEditable(True)
        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText("output folder")
        self.out_btn = QPushButton("…")
        self.workers_spin = QSpinBox()
        self.workers_spin.setRange(1, 1024)
        self.workers_spin.setValue(max(1, available_cores() - 1))  # one core left to napari
        self.threads_spin = QSpinBox()
        self.threads_spin.setRange(1, 64)
        self.scheduler_edit = QLineEdit()
        self.scheduler_edit.setPlaceholderText("empty: local cluster; or tcp://host:8786")
        self.force_check = QCheckBox("Recompute complete slides")
        self.run_btn = QPushButton("Run cohort")
        self.stop_btn = stop_button()
        self.progress = QProgressBar()
        self.status = status_label()
        self.table = QTableWidget(0, len(BASE))
        self.table.setHorizontalHeaderLabels(list(BASE))
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setToolTip("Double-click a finished slide to open it with its results")

        vbox(
            self,
            form(
                ("Slides", hbox((self.source_edit, 1), self.manifest_btn, self.folder_btn)),
                ("Task", self.task_combo),
                ("Model", self.model_combo),
                ("Output", hbox((self.out_edit, 1), self.out_btn)),
                ("Workers", hbox(self.workers_spin, self.threads_spin)),
                ("Scheduler", self.scheduler_edit),
            ),
            self.force_check,
            hbox(self.run_btn, self.stop_btn),
            self.progress,
            self.status,
            self.table,
        )
        self.jobs = JobController(
            self, progress=self.progress, status=self.status, stop_button=self.stop_btn,
            run_buttons=[self.run_btn], why_not=self._why_not, action="The cohort",
        )
        self.open_jobs = JobController(self, action="Opening the slide")

        self.manifest_btn.clicked.connect(lambda: ask_open_file(self, "Cohort manifest", "CSV (*.csv)", into=self.source_edit))
        self.folder_btn.clicked.connect(lambda: ask_directory(self, "Folder of slides", into=self.source_edit))
        self.out_btn.clicked.connect(lambda: ask_directory(self, "Output folder", into=self.out_edit))
        for edit in (self.source_edit, self.out_edit):
            edit.textChanged.connect(self.jobs.refresh)
        self.scheduler_edit.textChanged.connect(self._on_scheduler_changed)
        self.task_combo.currentTextChanged.connect(self._on_task_changed)
        self.run_btn.clicked.connect(self._on_run)
        self.table.cellDoubleClicked.connect(self._on_open_row)
        refill_combo(self.task_combo, available_tasks())
        self._on_task_changed(self.task_combo.currentText())

    # ------------------------------------------------------------------ state
    def _why_not(self) -> str:
        if not self.source_edit.text().strip():
            return "Choose a manifest CSV or a folder of slides."
        if not self.out_edit.text().strip():
            return "Choose an output folder."
        if not self.task_combo.currentText():
            return "No analysis can run in this version."
        return ""

    def _on_task_changed(self, task: str) -> None:
        if not task:
            return
        refill_combo(self.model_combo, task_models(task))
        self.model_combo.setEnabled(get_batch_task(task).model_task is not None)
        self.jobs.refresh()

    def _on_scheduler_changed(self, text: str) -> None:
        local = not text.strip()
        self.workers_spin.setEnabled(local)
        self.threads_spin.setEnabled(local)

    # ------------------------------------------------------------------ run
    def _on_run(self) -> None:
        from napari_pathoseg.cohort.manifest import read_manifest
        from napari_pathoseg.errors import PathosegError
        from napari.utils.notifications import show_error

        task = self.task_combo.currentText()
        try:
            slides = read_manifest(self.source_edit.text().strip())
        except PathosegError as exc:
            show_error(str(exc))
            self.status.setText(str(exc))
            return
        self._figures = get_batch_task(task).figures
        self._out = self.out_edit.text().strip()
        self._fill_table([{"stem": s.stem, "status": "pending"} for s in slides])
        kwargs = dict(
            task=task, out_dir=self._out, model=self.model_combo.currentText() or None,
            workers=self.workers_spin.value(), threads_per_worker=self.threads_spin.value(),
            scheduler=self.scheduler_edit.text().strip() or None, processes=self.processes,
            force=self.force_check.isChecked(), dashboard=None,
        )
        self.jobs.start(
            lambda token: iter_cohort(slides, cancel=token, **kwargs),
            done_type=CohortResult, on_event=self._on_event, on_done=self._on_done,
            message="starting the cluster…",
        )

    def _fill_table(self, rows: list[dict]) -> None:
        cols = list(BASE) + list(self._figures) + ["error"]
        self.table.clear()
        self.table.setColumnCount(len(cols))
        self.table.setHorizontalHeaderLabels(cols)
        self.table.setRowCount(len(rows))
        self._row_of = {}
        for i, row in enumerate(rows):
            self._row_of[str(row["stem"])] = i
            self._set_row(row)

    def _set_row(self, row: dict) -> None:
        i = self._row_of.get(str(row.get("stem")))
        if i is None:
            return
        cols = [self.table.horizontalHeaderItem(c).text() for c in range(self.table.columnCount())]
        for c, key in enumerate(cols):
            value = row.get("stem") if key == "slide" else row.get(key, "")
            text = "" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))
            item = QTableWidgetItem(text)
            if key == "slide":
                item.setToolTip(str(row.get("slide", "")))
            if key == "error" and text:
                item.setToolTip(text)
            self.table.setItem(i, c, item)

    def _on_event(self, ev: Any) -> None:
        if isinstance(ev, CohortStarted):
            for row in ev.rows:
                self._set_row(row)
            where = f"scheduler {ev.scheduler}" if ev.scheduler else "nothing to run"
            self.status.setText(f"{ev.to_run} to run, {ev.skipped} complete · {ev.workers} worker(s) · {where}")
        elif isinstance(ev, SlideFinished):
            self._set_row(ev.row)
            self.status.setText(ev.message)

    def _on_done(self, result: CohortResult) -> None:
        for row in result.rows:
            self._set_row(row)
        state = "stopped" if result.cancelled else "done"
        text = (f"{state}: {result.n_ok} ok, {result.n_failed} failed, {result.n_skipped} skipped, "
                f"{result.n_pending} pending · {result.summary}")
        self.status.setText(text)
        show_info(f"Cohort {text}")

    # ------------------------------------------------------------------ open
    def _on_open_row(self, row: int, column: int = 0) -> None:
        stem_item = self.table.item(row, 0)
        status_item = self.table.item(row, 1)
        if stem_item is None or status_item is None:
            return
        if status_item.text() not in ("ok", "skipped"):
            self.status.setText(f"{stem_item.text()} has no finished result to open ({status_item.text()})")
            return
        self.open_slide_results(stem_item.text())

    def open_slide_results(self, stem: str) -> None:
        """Open the finished slide ``stem`` of the current output folder with its results (in a job)."""
        out = self._out or self.out_edit.text().strip()
        self.open_jobs.start(lambda token: open_job(out, stem), on_done=self._add_layers, message=f"opening {stem}…")

    def _add_layers(self, opened: tuple) -> None:
        slide, (data, kwargs), layers = opened
        slide_layer = self.viewer.add_image(data, **kwargs)
        for ly, levels in layers:
            x, y, _, _ = ly.region
            place = grid_placement(slide_layer, row=y, col=x, downsample=ly.downsample)
            data = levels if len(levels) > 1 else levels[0]
            meta = {**ly.metadata, "pathoseg_slide": slide, "slide": slide_layer.metadata.get("slide")}
            if ly.kind == "labels":
                self.viewer.add_labels(data, multiscale=len(levels) > 1, name=ly.name, opacity=0.6, metadata=meta, **place)
            else:
                self.viewer.add_image(data, multiscale=len(levels) > 1, name=ly.name, metadata=meta, **place)
        self.viewer.layers.selection.active = slide_layer

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt API
        self.jobs.shutdown()
        self.open_jobs.shutdown()
        super().closeEvent(event)
