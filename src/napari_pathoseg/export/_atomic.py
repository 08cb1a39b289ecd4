"""Output files written under a temporary name beside their destination, then renamed into place.

Shared by the GeoJSON writer (:mod:`.geojson`) and the CSV table writer
(:mod:`.measurements`): a failed or cancelled export calls :meth:`AtomicFile.abort` and
leaves nothing behind; a finished one calls :meth:`AtomicFile.commit` (``os.replace``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from napari_pathoseg.errors import PathosegError

__all__ = ["AtomicFile", "ExportError"]


class ExportError(PathosegError):
    """Objects cannot be exported as asked (bad labels, object too large, bad options, no such folder)."""


class AtomicFile:
    """A temporary file ``.NAME.XXXX.tmp`` open in the destination's folder.

    Parameters
    ----------
    path : Path
        Destination; its folder must exist (else :class:`ExportError`).
    mode : str
        Mode of the open temporary file (``"wb"``, ``"w"``).
    **open_kwargs
        Passed on to :func:`os.fdopen` (e.g. ``newline``, ``encoding``).

    Attributes
    ----------
    path : Path
        Destination.
    """

    def __init__(self, path: Path, *, mode: str, **open_kwargs: Any) -> None:
        if not path.parent.is_dir():
            raise ExportError(f"cannot write {path}: the folder {path.parent} does not exist")
        self.path = path
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        self._tmp = Path(tmp)
        self._fh = os.fdopen(fd, mode, **open_kwargs)

    def commit(self) -> Path:
        """Close the temporary file and move it into place; returns the destination."""
        self._fh.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file (the destination is not touched)."""
        try:
            self._fh.close()
        finally:
            self._tmp.unlink(missing_ok=True)
