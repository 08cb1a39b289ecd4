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

__all__ = [
    "ExportError",
    "ExportOutputError",
    "StreamedFile",
    "TABLE_HEADS",
    "is_export_table",
    "table_destination",
    "commit_outputs",
    "abort_outputs",
]


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


#: First columns of the tables exports write (labels, shapes): how a table of ours is recognised.
TABLE_HEADS = ("id,label,class,centroid_x,centroid_y", "id,index,class,centroid_x,centroid_y")


def is_export_table(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a CSV table an export wrote (its header starts with :data:`TABLE_HEADS`)."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            first = fh.readline(65536).rstrip("\r\n")
    except (OSError, UnicodeDecodeError):
        return False
    return any(first == head or first.startswith(head + ",") for head in TABLE_HEADS)


def table_destination(path: Path, measurements_path: str | os.PathLike | None | bool, measured: bool) -> Path | None:
    """Where an export's CSV table goes (None: no table).

    ``measurements_path`` True (the default) puts ``OUT.csv`` beside ``OUT.geojson`` when
    something is ``measured``, but never over a file that is not a table an export wrote
    (e.g. the table ``pathoseg nuclei --table`` wrote): that raises, so a user's file is
    only replaced when its path was asked for. None or False writes no table; a path is
    used as it is (the caller asked for it).

    Raises
    ------
    ExportOutputError
        The implied ``OUT.csv`` is someone else's file, or the table would be the GeoJSON.
    """
    if measurements_path in (None, False):
        return None
    if measurements_path is True:
        if not measured:
            return None
        dest = path.with_suffix(".csv")
        if dest.exists() and not is_export_table(dest):
            raise ExportOutputError(
                f"{dest} exists and is not a measurement table written by an export, so it is left as it is; "
                "choose where the table goes (--table PATH / measurements_path=) or write none (--no-table / measurements_path=False)"
            )
    else:
        dest = Path(measurements_path)  # type: ignore[arg-type]
    if dest.expanduser().resolve() == path.expanduser().resolve():
        raise ExportOutputError(f"the measurement table {dest} would replace the GeoJSON {path}; give the table another path")
    return dest


def commit_outputs(writer: StreamedFile, table: StreamedFile | None) -> tuple[Path, Path | None]:
    """Move the GeoJSON and the CSV table (if any) into place; returns both paths."""
    return writer.commit(), (table.commit() if table is not None else None)


def abort_outputs(writer: StreamedFile, table: StreamedFile | None) -> None:
    """Delete the temporary GeoJSON and CSV table (if any) of a failed or cancelled export."""
    writer.abort()
    if table is not None:
        table.abort()
