"""The user registry file (``models.json``): tolerant reads, locked read-merge-write updates.

The file is ``{"version": 2, "models": [<card dict>, ...]}``. Reading never fails a run: an
unreadable file, bad JSON, a top-level list or a ``models`` that is not a list give no user
models and one logged warning, and malformed entries are skipped one by one (the registry
then lists the shipped models and the good entries).

Updates (:func:`update_entries`) hold an exclusive lock on ``models.json.lock`` while they
re-read the file, apply the change and write it atomically (:mod:`napari_pathoseg._atomic`),
so processes registering at the same time never lose each other's entries. A file that
cannot be parsed is copied aside (``models.json.corrupt-<time>``) before it is rewritten.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from napari_pathoseg._atomic import write_json
from napari_pathoseg.errors import PathosegError

__all__ = ["read_entries", "update_entries", "registry_lock", "check_writable", "FORMAT_VERSION", "LOCK_TIMEOUT_S"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
#: How long an update waits for another process's lock before giving up.
LOCK_TIMEOUT_S = 60.0

_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    """Log a registry problem once per process (listings run often, e.g. on every dock refresh)."""
    if msg not in _warned:
        _warned.add(msg)
        logger.warning(msg)


def _parse(path: Path) -> tuple[list[Any], bool]:
    """``(raw entries, parsed_ok)``; a missing file is ``([], True)``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], True
    except OSError as exc:
        _warn_once(f"model registry {path} is unreadable ({exc}); only the shipped models are listed")
        return [], False
    try:
        data = json.loads(text)
    except ValueError as exc:
        _warn_once(f"model registry {path} is not valid JSON ({exc}); only the shipped models are listed. "
                   "Fix it, or register a model to start a new one (the old file is kept aside).")
        return [], False
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list):
        _warn_once(f"model registry {path} is not an object with a \"models\" list; only the shipped models are "
                   "listed. Fix it, or register a model to start a new one (the old file is kept aside).")
        return [], False
    return models, True


def _entry_ok(entry: Any, path: Path) -> bool:
    if not isinstance(entry, dict):
        _warn_once(f"model registry {path}: skipping an entry that is not an object ({entry!r:.60})")
        return False
    name, ckpt = entry.get("name"), entry.get("path")
    if not isinstance(name, str) or not name:
        _warn_once(f"model registry {path}: skipping an entry without a name ({entry!r:.80})")
        return False
    if not isinstance(ckpt, str) or not ckpt:
        _warn_once(f"model registry {path}: skipping model {name!r}, which has no checkpoint path")
        return False
    return True


def read_entries(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The well-formed entries of the registry file (objects with a ``name`` and a ``path``).

    Never raises for a damaged file: problems are logged once and the entry (or the file)
    is skipped. A later entry with the same name replaces an earlier one.
    """
    path = Path(path)
    models, _ = _parse(path)
    by_name: dict[str, dict[str, Any]] = {}
    for entry in models:
        if _entry_ok(entry, path):
            by_name.pop(entry["name"], None)
            by_name[entry["name"]] = entry
    return list(by_name.values())


def check_writable(path: str | os.PathLike) -> None:
    """Refuse, before any long work, a registry whose folder cannot be written (its lock cannot be taken)."""
    with registry_lock(path, timeout_s=LOCK_TIMEOUT_S):
        pass


@contextlib.contextmanager
def registry_lock(path: str | os.PathLike, *, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (``fcntl.flock``; ``msvcrt`` on Windows).

    Raises
    ------
    PathosegError
        When another process holds the lock for longer than ``timeout_s``.
    """
    path = Path(path)
    lock = path.with_name(path.name + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise PathosegError(
            f"cannot write the model registry in {path.parent} ({exc.strerror or exc}); make that folder writable "
            "or set PATHOSEG_HOME to a writable folder"
        ) from exc
    try:
        _acquire(fd, lock, timeout_s)
        try:
            yield
        finally:
            _release(fd)
    finally:
        os.close(fd)


def _acquire(fd: int, lock: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if os.name == "nt":  # pragma: no cover - Windows
                import msvcrt

                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise PathosegError(
                    f"the model registry is locked by another process ({lock}); try again when it has "
                    "finished, or delete the lock file if no napari-pathoseg process is running"
                ) from None
            time.sleep(0.01)


def _release(fd: int) -> None:
    if os.name == "nt":  # pragma: no cover - Windows
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)


def update_entries(path: str | os.PathLike, change: Callable[[list[Any]], list[Any]]) -> list[Any]:
    """Apply ``change(entries) -> entries`` to the registry file under its lock; returns the new list.

    ``change`` sees every stored entry, malformed ones included (they are kept as they were:
    the user's file is not silently trimmed). A file that cannot be parsed is copied to
    ``<path>.corrupt-<time>`` and replaced by a new one.
    """
    path = Path(path)
    with registry_lock(path):
        models, ok = _parse(path)
        if not ok and path.exists():
            aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.copy2(path, aside)
            logger.warning("model registry %s could not be parsed; kept it as %s and started a new one", path, aside)
        models = change(list(models))
        write_json(path, {"version": FORMAT_VERSION, "models": models}, create_parent=True)
    return models
