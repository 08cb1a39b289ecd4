"""A slide's output folder and its completeness record (the done-marker of resume).

Every finished slide has ``DIR/<slide-stem>/summary.json``, written atomically **after** all its
other outputs. It holds the key figures, the run's parameters (task, model, region, µm/px), the
identity of the input (path, size, modification time) and, for every output file, its size and
SHA-256. :func:`verify_slide` re-checks all of this: a slide is complete only when the record
exists, was made with the same parameters from the same input, and every output is there with
the recorded size and hash. Anything else (a run killed half way, a deleted or edited output, a
changed slide, another model) makes the slide run again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from napari_pathoseg._atomic import write_json

__all__ = [
    "RECORD",
    "WORK_PREFIX",
    "file_record",
    "source_record",
    "write_record",
    "read_record",
    "verify_slide",
    "clear_record",
    "clean_work_dirs",
]

logger = logging.getLogger(__name__)

#: The per-slide JSON summary, written last: the slide's done-marker.
RECORD = "summary.json"
#: Scratch folders of a running slide (removed at its end, or by the next run of it).
WORK_PREFIX = ".work-"
#: Format version of the record.
VERSION = 1


def _sha256(path: Path, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def file_record(path: str | os.PathLike, *, folder: str | os.PathLike) -> dict[str, Any]:
    """``{"path": name relative to folder, "bytes": size, "sha256": hex}`` of an output file."""
    p = Path(path)
    return {"path": os.path.relpath(p, folder), "bytes": p.stat().st_size, "sha256": _sha256(p)}


def source_record(path: str | os.PathLike) -> dict[str, Any]:
    """Identity of an input slide: absolute path, size and modification time (ns)."""
    p = Path(path)
    st = p.stat()
    return {"path": str(p.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def write_record(folder: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write the slide's record (atomically, last of its outputs)."""
    return write_json(Path(folder) / RECORD, {"version": VERSION, **record})


def read_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The slide's record, or None when it is missing or unreadable."""
    try:
        data = json.loads((Path(folder) / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def clear_record(folder: str | os.PathLike) -> None:
    """Remove the record before a slide is (re)computed: no stale marker survives a crash."""
    (Path(folder) / RECORD).unlink(missing_ok=True)


def clean_work_dirs(folder: str | os.PathLike) -> None:
    """Remove scratch folders left in a slide folder by a killed run."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.glob(f"{WORK_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)


def verify_slide(folder: str | os.PathLike, *, params: dict[str, Any], source: str | os.PathLike) -> tuple[bool, str, dict[str, Any] | None]:
    """Is the slide in ``folder`` complete for these ``params`` and this input?

    Returns
    -------
    ok : bool
    reason : str
        Why not ("" when complete), e.g. ``"nuclei_labels.tif changed (sha256)"``.
    record : dict or None
        The record read (also when incomplete).
    """
    folder = Path(folder)
    rec = read_record(folder)
    if rec is None:
        return False, "no finished result", None
    if rec.get("version") != VERSION or rec.get("status") != "ok":
        return False, "no finished result", rec
    if rec.get("params") != params:
        diff = sorted(k for k in set(params) | set(rec.get("params") or {}) if params.get(k) != (rec.get("params") or {}).get(k))
        return False, f"made with other settings ({', '.join(diff)})", rec
    try:
        now = source_record(source)
    except OSError:
        return False, "the slide cannot be read", rec
    if rec.get("source") != now:
        return False, "the slide file changed", rec
    outputs = rec.get("outputs")
    if not isinstance(outputs, list) or not outputs:
        return False, "no outputs recorded", rec
    for item in outputs:
        try:
            p = folder / item["path"]
            if p.stat().st_size != item["bytes"]:
                return False, f"{item['path']} changed (size)", rec
            if _sha256(p) != item["sha256"]:
                return False, f"{item['path']} changed (sha256)", rec
        except (OSError, KeyError, TypeError):
            return False, f"{item.get('path', 'an output') if isinstance(item, dict) else 'an output'} is missing", rec
    return True, "", rec
