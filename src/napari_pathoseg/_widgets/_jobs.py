"""The one dock job controller: a core job in a background thread, with progress, Stop and errors.

Every dock runs its long work through a :class:`JobController`, so all docks behave alike:

* the job runs in napari's ``thread_worker`` (or synchronously, see *Tests* below);
* its progress events (anything with ``done`` and ``total``, e.g. :class:`~napari_pathoseg.events.Progress`)
  move the progress bar, and their ``message`` goes to the status line;
* while it runs the dock's run buttons are disabled and Stop is enabled;
* Stop sets the job's :class:`~napari_pathoseg.events.CancelToken`; a job that keeps a partial
  result (finished tiles, a resumable checkpoint) yields it with ``cancelled=True`` and the
  dock's ``on_done`` receives it like any result; a job that keeps nothing raises
  :class:`~napari_pathoseg.errors.CancelledError`, shown as "stopped";
* a :class:`~napari_pathoseg.errors.PathosegError` is shown once as a napari notification and on
  the status line; anything else is a bug: logged with its traceback and shown once.

A job is a callable ``job(token)``. It either returns a generator of events (the core's
``iter_*`` functions) or, for short work, returns its result directly. With ``done_type`` the
result is the generator's last event of that type (the others are progress); without it the
result is the generator's return value.

Usage
-----
::

    class MyDock(QWidget):
        def __init__(self, viewer):
            ...
            self.jobs = JobController(
                self,
                progress=self.progress,          # QProgressBar (optional)
                status=self.status,              # QLabel (optional)
                stop_button=self.stop_btn,       # enabled only while a job runs
                run_buttons=[self.run_btn],      # disabled while a job runs
                why_not=self._why_not,           # "" when the inputs allow a run, else the reason
                action="Nucleus segmentation",   # names the job in messages
            )

        def _on_run(self):
            slide, model = ...                   # read the widgets here, on the GUI thread
            self.jobs.start(
                lambda token: iter_segment_nuclei(slide, model, cancel=token),
                done_type=NucleiResult,
                on_done=self._on_done,           # also gets a partial result (result.cancelled)
                message="loading the model…",
            )

        def closeEvent(self, event):
            self.jobs.shutdown()             # stop the job and drop what it still delivers
            super().closeEvent(event)

Call ``self.jobs.refresh()`` when the inputs change, so the run buttons and their tooltips
follow ``why_not``. Docks whose buttons follow richer rules pass ``on_busy`` instead and read
``self.jobs.running`` in their own state update.

Keep ``on_done`` short: it runs on the GUI thread. Compute layer data in the job (e.g. a
multiscale pyramid, contrast limits) and only add the prepared data in ``on_done``; add several
layers with :func:`in_turns` (one layer per turn of the event loop).

Tests
-----
Set ``napari_pathoseg._widgets._jobs.SYNC = True`` (the ``sync_jobs`` fixture of
``tests/conftest.py``) or the environment variable ``PATHOSEG_SYNC_JOBS=1``: jobs then run to
their end inside :meth:`JobController.start`, on the calling thread, with the same callbacks, so
a test needs no waiting. Stop still works from an ``on_event`` callback.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
from typing import Any, Callable, Sequence

from napari.utils.notifications import show_info
from qtpy.QtCore import QObject, QTimer, Signal
from qtpy.QtWidgets import QLabel, QProgressBar, QPushButton, QWidget

from napari_pathoseg._widgets._common import report_error
from napari_pathoseg.errors import CancelledError
from napari_pathoseg.events import CancelToken

__all__ = ["Job", "JobController", "SYNC", "sync_mode", "in_turns", "add_layer_in_turns"]

logger = logging.getLogger(__name__)

#: Run jobs synchronously (tests). ``None``: follow the ``PATHOSEG_SYNC_JOBS`` environment variable.
SYNC: bool | None = None


def sync_mode() -> bool:
    """True when jobs run synchronously (:data:`SYNC`, else ``PATHOSEG_SYNC_JOBS=1``)."""
    if SYNC is not None:
        return bool(SYNC)
    return os.environ.get("PATHOSEG_SYNC_JOBS", "").strip().lower() in ("1", "true", "yes", "on")


def in_turns(*steps: Callable[[], Any], action: str = "Adding the layers") -> None:
    """Run ``steps`` one per turn of the Qt event loop, so napari answers between them.

    Adding a layer costs napari 0.1-0.3 s on the GUI thread (its visuals and controls); a
    result of several layers is added one layer per turn, each turn under the ~200 ms
    budget, instead of freezing the window for their sum. The first step runs now; in
    synchronous mode (tests) all of them do. An error in a later step is reported like a
    job's error.
    """
    pending = list(steps)

    def next_step() -> None:
        if not pending:
            return
        step = pending.pop(0)
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - shown to the user, logged when a bug
            report_error(exc, action=action)
            pending.clear()
            return
        if pending:
            if sync_mode():
                next_step()
            else:
                QTimer.singleShot(0, next_step)

    next_step()


def add_layer_in_turns(
    viewer: Any, layer: Any, *, select: Any = None, then: Callable[[], Any] | None = None,
    action: str = "Adding the layers",
) -> None:
    """Add a prepared napari layer in short GUI-thread steps, one per turn of the event loop.

    napari does three costly things when a layer is added: it builds the layer's visual and its
    controls, draws the canvas (a new layer becomes the selected one, whose controls are shown,
    which repaints), and uploads the texture of what is on screen. Together they take 0.2-0.6 s.
    Here the layer is first added hidden (visual and controls, nothing to draw), then shown (its
    data is uploaded at the next repaint, a turn of its own), then ``select`` (a layer) becomes
    the selected layer again, then ``then()`` runs. In synchronous mode (tests) all of it runs now.

    Parameters
    ----------
    viewer : napari.Viewer
    layer : napari layer
        Built on the GUI thread from data prepared in the job (a pyramid, contrast limits).
    select : napari layer, optional
        The layer to select afterwards (e.g. the slide under a result).
    then : callable, optional
        Runs in the last turn (status, combos).
    """
    visible = bool(layer.visible)

    def add() -> None:
        layer.visible = False
        viewer.add_layer(layer)

    def show() -> None:
        if layer in viewer.layers:
            layer.visible = visible

    steps: list[Callable[[], Any]] = [add, show]
    if select is not None:
        steps.append(lambda: setattr(viewer.layers.selection, "active", select) if select in viewer.layers else None)
    if then is not None:
        steps.append(then)
    in_turns(*steps, action=action)


class Job:
    """One run of a job: its cancel token and, once it ended, its outcome.

    Attributes
    ----------
    token : CancelToken
        Set by :meth:`JobController.stop`; the job checks it between steps.
    action : str
        What the job does (used in messages).
    result : Any
        The result delivered to ``on_done`` (None until then, or when the job failed).
    error : BaseException or None
        The exception the job (or ``on_done``) raised.
    ended : bool
        True once the job finished, failed, was cancelled or abandoned.
    abandoned : bool
        Stop detached the job: whatever it still produces is dropped.
    worker : napari GeneratorWorker or None
        The background worker (None in synchronous mode).
    """

    def __init__(self, action: str) -> None:
        self.token = CancelToken()
        self.action = action
        self.result: Any = None
        self.error: BaseException | None = None
        self.ended = False
        self.abandoned = False
        self.worker: Any = None
        self.abandon_on_stop = False
        self.on_event: Callable[[Any], Any] | None = None

    @property
    def cancelled(self) -> bool:
        """True when the job was stopped (partial result, CancelledError or abandoned)."""
        return self.abandoned or isinstance(self.error, CancelledError) or bool(getattr(self.result, "cancelled", False))


class _Poster(QObject):
    """Carries events posted from a worker thread to the GUI thread (queued signal)."""

    posted = Signal(object)


_WARM = {"done": False}


def _warm_imports() -> None:
    """Prepare in the worker what napari sets up lazily on the GUI thread when a layer is made.

    napari imports pandas the first time a Labels, Points or Shapes layer is created
    (0.3-0.7 s on the GUI thread), and the first layer with units builds pint's unit registry
    (parsing its definition files: 0.2-0.5 s); a job does both first, off the GUI thread (once).
    """
    if _WARM["done"]:
        return
    _WARM["done"] = True
    if "pandas" not in sys.modules:
        try:
            importlib.import_module("pandas")
        except ImportError:  # pragma: no cover - napari depends on pandas
            pass
    try:
        import pint

        pint.get_application_registry().pixel  # noqa: B018 - the attribute access builds the registry
    except Exception:  # noqa: BLE001 - only a speed-up  # pragma: no cover
        logger.debug("could not prepare the unit registry", exc_info=True)


def _run(job: Callable[[CancelToken], Any], token: CancelToken, done_type: type | None):
    """The generator a worker runs: yields progress events, returns the job's result."""
    _warm_imports()
    out = job(token)
    if not (inspect.isgenerator(out) or (hasattr(out, "__next__") and hasattr(out, "__iter__"))):
        return out  # a short job: its result itself
    result = None
    try:
        while True:
            try:
                event = next(out)
            except StopIteration as stop:
                if done_type is None:
                    result = stop.value
                break
            if done_type is not None and isinstance(event, done_type):
                result = event
            else:
                yield event
    finally:
        close = getattr(out, "close", None)
        if close is not None:
            close()
    if done_type is not None and result is None:
        if token.is_set():
            raise CancelledError("stopped; nothing was kept")
        raise RuntimeError(f"the job ended without a {done_type.__name__}")
    return result


class JobController:
    """Runs a dock's jobs one at a time (see the module docstring).

    Parameters
    ----------
    parent : QWidget
        The dock (messages name it through ``action``).
    progress : QProgressBar, optional
        Busy while the job starts, then ``done`` of ``total``; empty when idle, full when done.
    status : QLabel, optional
        The status line: the job's messages, its error, "stopped".
    stop_button : QPushButton, optional
        Enabled only while a job runs (and not yet stopped); clicking it calls :meth:`stop`.
    run_buttons : sequence of QPushButton
        Disabled while a job runs; when idle enabled if ``why_not()`` is empty.
    why_not : callable, optional
        ``why_not() -> str``: why the inputs do not allow a run ("" when they do); shown as the
        run buttons' tooltip.
    on_busy : callable, optional
        ``on_busy(running)`` after every change of state (for docks with their own button rules).
    action : str
        Names the jobs in messages ("Nucleus segmentation failed: ...").
    """

    def __init__(
        self,
        parent: QWidget,
        *,
        progress: QProgressBar | None = None,
        status: QLabel | None = None,
        stop_button: QPushButton | None = None,
        run_buttons: Sequence[QPushButton] = (),
        why_not: Callable[[], str] | None = None,
        on_busy: Callable[[bool], Any] | None = None,
        action: str = "The job",
    ) -> None:
        self.parent = parent
        self.progress = progress
        self.status = status
        self.stop_button = stop_button
        self.run_buttons = list(run_buttons)
        self.why_not = why_not
        self.on_busy = on_busy
        self.action = action
        self.job: Job | None = None
        self._poster = _Poster()
        self._poster.posted.connect(self._on_posted)
        if stop_button is not None:
            stop_button.clicked.connect(lambda *_: self.stop())
        self._idle_progress(0)
        self._update_buttons()  # on_busy is not called here: the dock may not be built yet

    # ------------------------------------------------------------------ state
    @property
    def running(self) -> bool:
        """True while a job runs (a stopped job that has not ended yet still runs)."""
        return self.job is not None and not self.job.ended

    @property
    def token(self) -> CancelToken | None:
        """The cancel token of the running job, or None."""
        return self.job.token if self.running else None

    def refresh(self, *_: Any) -> None:
        """Update the run / Stop buttons from the state and ``why_not()``, then call ``on_busy``."""
        self._update_buttons()
        if self.on_busy is not None:
            self.on_busy(self.running)

    def _update_buttons(self) -> None:
        running = self.running
        why = "" if running or self.why_not is None else (self.why_not() or "")
        for button in self.run_buttons:
            button.setEnabled(not running and not why)
            button.setToolTip("A job is running; Stop ends it." if running else (why or "Runs in the background; Stop cancels."))
        if self.stop_button is not None:
            self.stop_button.setEnabled(running and not self.job.token.is_set())

    def _set_status(self, text: str) -> None:
        if self.status is not None:
            self.status.setText(text)

    def _idle_progress(self, value: int) -> None:
        if self.progress is not None:
            self.progress.setRange(0, 1)
            self.progress.setValue(value)

    # ------------------------------------------------------------------ run
    def start(
        self,
        job: Callable[[CancelToken], Any],
        *,
        done_type: type | None = None,
        on_event: Callable[[Any], Any] | None = None,
        on_done: Callable[[Any], Any] | None = None,
        on_error: Callable[[BaseException], Any] | None = None,
        message: str = "working…",
        action: str | None = None,
        abandon_on_stop: bool = False,
    ) -> Job | None:
        """Run ``job(token)``; returns its :class:`Job`, or None when another job still runs.

        Parameters
        ----------
        job : callable
            ``job(token)`` returns a generator of events, or the result itself.
        done_type : type, optional
            The type of the result event; other events are progress.
        on_event : callable, optional
            Called (GUI thread) with every progress event, after the bar and status moved.
        on_done : callable, optional
            Called (GUI thread) with the result, also a partial one (``result.cancelled``).
        on_error : callable, optional
            Called (GUI thread) after an error was shown (cleanup); not for a stop.
        message : str
            Status line while the job starts.
        action : str, optional
            Names this job in messages (default: the controller's ``action``).
        abandon_on_stop : bool
            For short jobs that never check the token: Stop detaches the job at once and its
            result is dropped when it arrives.
        """
        if self.running:
            show_info(f"{self.action} is still running: wait, or press Stop.")
            return None
        run = Job(action or self.action)
        run.abandon_on_stop = abandon_on_stop
        run.on_event = on_event
        self.job = run
        self._set_status(message)
        if self.progress is not None:
            self.progress.setRange(0, 0)  # busy until the first progress event
        self.refresh()
        callbacks = (on_event, on_done, on_error)
        if sync_mode():
            self._run_sync(run, job, done_type, callbacks)
        else:
            self._run_thread(run, job, done_type, callbacks)
        return run

    def _run_sync(self, run: Job, job: Callable, done_type: type | None, callbacks: tuple) -> None:
        gen = _run(job, run.token, done_type)
        try:
            while True:
                try:
                    event = next(gen)
                except StopIteration as stop:
                    self._deliver(run, stop.value, callbacks)
                    break
                if run.abandoned:
                    gen.close()
                    break
                self._event(run, event, callbacks[0])
        except Exception as exc:  # noqa: BLE001 - shown to the user, logged when a bug
            self._failed(run, exc, callbacks[2])
        self._finished(run)

    def _run_thread(self, run: Job, job: Callable, done_type: type | None, callbacks: tuple) -> None:
        from napari.qt.threading import create_worker

        worker = create_worker(_run, job, run.token, done_type, _start_thread=False, _ignore_errors=True)
        run.worker = worker
        worker.yielded.connect(lambda event: self._event(run, event, callbacks[0]))
        worker.returned.connect(lambda result: self._deliver(run, result, callbacks))
        worker.errored.connect(lambda exc: self._failed(run, exc, callbacks[2]))
        worker.finished.connect(lambda: self._finished(run))
        worker.start()

    def _event(self, run: Job, event: Any, on_event: Callable | None) -> None:
        if run.abandoned or run is not self.job:
            return
        done, total = getattr(event, "done", None), getattr(event, "total", None)
        if self.progress is not None and isinstance(done, int) and isinstance(total, int) and total > 0:
            self.progress.setRange(0, total)
            self.progress.setValue(min(done, total))
        text = getattr(event, "message", None)
        if text and not run.token.is_set():
            self._set_status(f"{done}/{total} · {text}" if isinstance(done, int) and total else str(text))
        if on_event is not None:
            try:
                on_event(event)
            except Exception as exc:  # noqa: BLE001
                report_error(exc, action=run.action)

    def _deliver(self, run: Job, result: Any, callbacks: tuple) -> None:
        if run.abandoned:
            return
        run.result = result
        if getattr(result, "cancelled", False):
            self._set_status("stopped: the finished part is kept")
        else:
            self._set_status("")
        _, on_done, on_error = callbacks
        if on_done is not None:
            try:
                on_done(result)
            except Exception as exc:  # noqa: BLE001
                self._failed(run, exc, on_error)
                return
        self._idle_progress(1 if not getattr(result, "cancelled", False) else 0)

    def _failed(self, run: Job, exc: BaseException, on_error: Callable | None) -> None:
        if run.abandoned:
            return
        run.error = exc
        self._idle_progress(0)
        if isinstance(exc, CancelledError):
            self._set_status(f"stopped: {exc}")
            show_info(f"{run.action} stopped.")
            return
        self._set_status(report_error(exc, action=run.action))
        if on_error is not None:
            try:
                on_error(exc)
            except Exception:  # noqa: BLE001
                logger.exception("%s: error handler failed", run.action)

    def _finished(self, run: Job) -> None:
        run.ended = True
        if run is self.job:
            self.refresh()

    def post(self, event: Any) -> None:
        """Report a progress event from inside a running job (any thread).

        For core functions that report through a callback (``progress=self.jobs.post``) rather
        than by yielding: the event reaches the bar, the status line and ``on_event`` on the
        GUI thread, exactly like a yielded one.
        """
        run = self.job
        if run is None:
            return
        self._poster.posted.emit((run, event))  # queued from a worker thread, direct on the GUI thread

    def _on_posted(self, item: tuple) -> None:
        run, event = item
        self._event(run, event, run.on_event)

    # ------------------------------------------------------------------ stop
    def stop(self) -> bool:
        """Ask the running job to stop; False when nothing runs.

        The job ends at its next check of the token; a short job started with
        ``abandon_on_stop`` is detached at once (its result is dropped).
        """
        run = self.job
        if run is None or run.ended or run.token.is_set():
            return False
        run.token.set()
        if run.abandon_on_stop:
            run.abandoned = True
            run.ended = True
            if run.worker is not None:
                run.worker.quit()
            self._idle_progress(0)
            self._set_status("stopped")
        else:
            self._set_status("stopping…")
        self.refresh()
        return True

    def shutdown(self) -> None:
        """The dock is closing: stop the running job and drop whatever it still delivers."""
        run = self.job
        if run is None or run.ended:
            return
        run.token.set()
        run.abandoned = True
        run.ended = True
        if run.worker is not None:
            run.worker.quit()

    def wait(self, timeout_s: float = 30.0) -> bool:
        """Block (processing Qt events) until the job ended; False on timeout. For scripts and shutdown."""
        import time

        from qtpy.QtWidgets import QApplication

        end = time.monotonic() + timeout_s
        while self.running and time.monotonic() < end:
            QApplication.processEvents()
            time.sleep(0.01)
        return not self.running
