"""Export errors and the files an export writes progressively (GeoJSON, CSV table).

An export writes its GeoJSON and its CSV table chunk by chunk over a long job, so the
shared atomic writer (:func:`napari_pathoseg._atomic.atomic_open`) is held open across the
job by :class:`StreamedFile`: :meth:`StreamedFile.commit` renames the finished file into
place, :meth:`StreamedFile.abort` (a failed or cancelled export) removes the temporary file
and leaves the destination as it was.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any

from napari_pathoseg._atomic import OutputError, atomic_open
from napari_pathoseg.errors import PathosegError

__all__ = ["ExportError", "ExportOutputError", "StreamedFile", "table_destination", "commit_outputs", "abort_outputs"]


class ExportError(PathosegError):
    """Objects cannot be exported as asked (bad labels, object too large, bad options, no such folder)."""


class ExportOutputError(ExportError, OutputError):
    """An export's output cannot be written where asked (an input, a missing folder, a user's file...)."""


class _Aborted(Exception):
    """Thrown into the atomic writer to make it discard the temporary file."""


class StreamedFile:
    """A destination written progressively through :func:`~napari_pathoseg._atomic.atomic_open`.

    Parameters
    ----------
    path : path-like
        Destination; its folder must exist (else :class:`ExportOutputError`).
    mode : str
        ``"wb"`` or ``"w"``.
    **open_kwargs
        Passed on to :func:`open` (e.g. ``newline``, ``encoding``).

    Attributes
    ----------
    path : Path
        Destination.
    """

    def __init__(self, path: str | os.PathLike, *, mode: str, **open_kwargs: Any) -> None:
        self.path = Path(path)
        self._cm = atomic_open(self.path, mode, **open_kwargs)
        try:
            self._fh: IO[Any] = self._cm.__enter__()
        except OutputError as exc:
            raise ExportOutputError(str(exc)) from None
        self._open = True

    def commit(self) -> Path:
        """Finish the file and move it into place; returns the destination."""
        self._open = False
        try:
            self._cm.__exit__(None, None, None)
        except OutputError as exc:
            raise ExportOutputError(str(exc)) from None
        return self.path

    def abort(self) -> None:
        """Delete the temporary file (the destination is not touched); safe to call twice."""
        if not self._open:
            return
        self._open = False
        exc = _Aborted()
        self._cm.__exit__(_Aborted, exc, None)


def table_destination(path: Path, measurements_path: str | os.PathLike | None | bool, measured: bool) -> Path | None:
    """Where an export's CSV table goes (None: no table).

    ``measurements_path`` True (the default) puts ``OUT.csv`` beside ``OUT.geojson`` when
    something is ``measured``; None or False writes no table; a path is used as it is.
    """
    if measurements_path is True:
        return path.with_suffix(".csv") if measured else None
    if measurements_path in (None, False):
        return None
    return Path(measurements_path)  # type: ignore[arg-type]


def commit_outputs(writer: StreamedFile, table: StreamedFile | None) -> tuple[Path, Path | None]:
    """Move the GeoJSON and the CSV table (if any) into place; returns both paths."""
    return writer.commit(), (table.commit() if table is not None else None)


def abort_outputs(writer: StreamedFile, table: StreamedFile | None) -> None:
    """Delete the temporary GeoJSON and CSV table (if any) of a failed or cancelled export."""
    writer.abort()
    if table is not None:
        table.abort()
