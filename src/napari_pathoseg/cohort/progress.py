"""A progress bar over a cohort for the terminal: slides done / failed / remaining and the ETA.

At a terminal the bar is redrawn in place on stderr; otherwise (a log file, CI) one line is
written per finished slide, so the log tells which slide failed and why.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from napari_pathoseg.cohort.runner import CohortResult, CohortStarted, SlideFinished, format_seconds

__all__ = ["TerminalProgress"]


class TerminalProgress:
    """Call with every event of :func:`~napari_pathoseg.cohort.runner.iter_cohort`.

    Parameters
    ----------
    stream : file, optional
        Default ``sys.stderr``.
    width : int
        Characters of the bar.
    tty : bool, optional
        Redraw in place (default: whether ``stream`` is a terminal).
    """

    def __init__(self, stream: IO[str] | None = None, *, width: int = 30, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty()) if callable(isatty) else False
        self.tty = tty
        self._open_line = False

    def _write(self, text: str, *, inplace: bool = False) -> None:
        try:
            if self.tty and inplace:
                self.stream.write("\r\x1b[2K" + text)
                self._open_line = True
            else:
                if self._open_line:
                    self.stream.write("\n")
                    self._open_line = False
                self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def bar(self, done: int, total: int) -> str:
        """``[#######.......]`` for ``done`` of ``total``."""
        filled = int(round(self.width * done / total)) if total else self.width
        return "[" + "#" * filled + "." * (self.width - filled) + "]"

    def __call__(self, event: Any) -> None:
        if isinstance(event, CohortStarted):
            where = f"scheduler {event.scheduler}" if event.scheduler else "no cluster needed"
            self._write(f"pathoseg batch: {event.total} slides, {event.to_run} to run, {event.skipped} complete · "
                        f"{event.workers} worker(s) · {where}")
            if event.dashboard:
                self._write(f"pathoseg batch: dask dashboard at {event.dashboard}")
        elif isinstance(event, SlideFinished):
            row = event.row
            eta = "" if event.eta_s is None else f" · ETA {format_seconds(event.eta_s)}"
            counts = f"{event.done}/{event.total} done · {event.failed} failed · {event.remaining} remaining{eta}"
            if row.get("status") == "failed":
                self._write(f"failed: {row.get('stem')}: {row.get('error')}")
            elif not self.tty:
                self._write(f"{row.get('status')}: {row.get('stem')} ({row.get('seconds')} s) · {counts}")
            if self.tty:
                self._write(f"{self.bar(event.done, event.total)} {counts}", inplace=True)
        elif isinstance(event, CohortResult):
            state = "stopped" if event.cancelled else "done"
            self._write(f"pathoseg batch: {state} in {format_seconds(event.seconds)}: {event.n_ok} ok, "
                        f"{event.n_failed} failed, {event.n_skipped} skipped, {event.n_pending} pending · {event.summary}")
