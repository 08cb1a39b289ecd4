"""Atomic file writes and output-path safety: the one helper every writer uses.

Every output napari-pathoseg writes goes to a temporary file beside its destination
(``.NAME.<random>.tmp-pathoseg``) and is renamed into place (:func:`os.replace`) only when it is
complete: a failed, cancelled or killed write never leaves a half-written destination, and the
temporary file is removed on every exit path that Python sees. Temporary files left by a killed
process are removed the next time the same destination is written (:func:`clean_stale`).

The final file gets the permissions a plain ``open()`` would give (``0o666 & ~umask``), not
``mkstemp``'s 0600.

:func:`check_output` refuses an output path that names one of the command's inputs (same file,
also through links), so no command can destroy the data it reads.

Examples
--------
>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> with atomic_path(d / "a.txt") as tmp:
...     _ = tmp.write_text("hello")
>>> (d / "a.txt").read_text()
'hello'
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from napari_pathoseg.errors import PathosegError

__all__ = [
    "OutputError",
    "TMP_SUFFIX",
    "atomic_path",
    "atomic_open",
    "write_bytes",
    "write_text",
    "write_json",
    "check_output",
    "clean_stale",
    "file_kind",
]

#: Suffix of every temporary file this module makes (``.NAME.<random>.tmp-pathoseg``).
TMP_SUFFIX = ".tmp-pathoseg"
#: Temporary files older than this (seconds) are taken as left by a killed run.
STALE_AFTER_S = 60.0


class OutputError(PathosegError):
    """An output cannot be written where asked (it is an input, its folder is missing, no space, ...)."""


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def clean_stale(path: str | os.PathLike, *, older_than_s: float = STALE_AFTER_S) -> int:
    """Remove temporary files of ``path`` left by killed runs; returns how many were removed."""
    path = Path(path)
    n = 0
    if not path.parent.is_dir():
        return 0
    now = time.time()
    for p in path.parent.glob(f".{path.name}.*{TMP_SUFFIX}"):
        try:
            if now - p.stat().st_mtime > older_than_s:
                p.unlink()
                n += 1
        except OSError:
            pass
    return n


def _parent_ok(path: Path, *, create_parent: bool) -> None:
    parent = path.parent
    if parent.is_dir():
        return
    if create_parent:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the folder {parent} for {path.name}: {exc.strerror or exc}") from exc
        return
    raise OutputError(f"cannot write {path}: the folder {parent} does not exist")


def _os_error(path: Path, exc: OSError) -> OutputError:
    import errno

    if exc.errno == errno.ENOSPC:
        return OutputError(f"no space left on the device to write {path}; free some space or choose another folder")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write {path}: permission denied (read-only or not yours)")
    return OutputError(f"cannot write {path}: {exc.strerror or exc}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, create_parent: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit rename it to ``path``.

    The caller writes the temporary file by name (tifffile, safetensors, PIL...). On any
    exception (``KeyboardInterrupt`` included) the temporary file is removed and the
    destination is left as it was. ``OSError`` (disk full, read-only folder) becomes
    :class:`OutputError` with one clear line.
    """
    path = Path(path)
    _parent_ok(path, create_parent=create_parent)
    clean_stale(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise _os_error(path, exc) from exc
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except OSError as exc:
        raise _os_error(path, exc) from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, create_parent: bool = False, **open_kwargs: Any) -> Iterator[IO[Any]]:
    """``open()`` a temporary file beside ``path``; renamed into place when the block ends cleanly."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path, create_parent=create_parent) as tmp:
        with open(tmp, mode, **open_kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


def write_bytes(path: str | os.PathLike, data: bytes, *, create_parent: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_open(path, "wb", create_parent=create_parent) as fh:
        fh.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, *, create_parent: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_open(path, "w", create_parent=create_parent, encoding="utf-8", newline="") as fh:
        fh.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1, create_parent: bool = False) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically; returns ``path``."""
    return write_text(path, json.dumps(obj, indent=indent, default=str) + "\n", create_parent=create_parent)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


#: What :func:`file_kind` may answer, and the kinds an output of each kind may replace.
_REPLACEABLE = {
    "tiff": ("tiff",),
    "png": ("png",),
    "json": ("json", "empty"),
    "csv": ("text", "json", "empty"),
    "text": ("text", "json", "empty"),
    "safetensors": ("safetensors", "empty"),
}
#: Vendor slide formats (TIFF inside, but never replaced by an output).
_SLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".bif", ".vms", ".vmu", ".mrxs", ".svslide")


def file_kind(path: str | os.PathLike) -> str:
    """What an existing file holds, from its first bytes: ``tiff``, ``png``, ``jpeg``, ``json``,
    ``safetensors``, ``text``, ``empty`` or ``binary``."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if not head:
        return "empty"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if len(head) > 8 and head[8:10] == b'{"':
        return "safetensors"
    if b"\x00" in head:
        return "binary"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut at the end of the block
            return "binary"
        text = head[: exc.start].decode("utf-8")
    return "json" if text.lstrip("\ufeff \t\r\n")[:1] in ("{", "[") else "text"


def check_output(
    out: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    what: str = "output",
    overwrite: bool = True,
    kind: str | None = None,
    need_folder: bool = False,
) -> Path:
    """Refuse an output path that would destroy an input; returns it as a :class:`Path`.

    Parameters
    ----------
    out : path
        Where a command will write.
    inputs : paths
        What the command reads (``None`` entries are ignored). ``out`` naming any of them
        (same file by inode, so also through hard or symbolic links) is refused.
    what : str
        How the message names the output (``"--out"``, ``"--table"``...).
    overwrite : bool
        ``False``: refuse an existing ``out`` too (the command has no documented right to
        replace it).
    kind : str, optional
        What the command writes (``"tiff"``, ``"png"``, ``"json"``, ``"csv"``, ``"text"``,
        ``"safetensors"``): an existing ``out`` of another kind (a slide under a CSV name, a
        PNG under ``.geojson``...) is refused, as is any vendor slide file (``.svs``...).
    need_folder : bool
        Refuse ``out`` when its folder does not exist (the CLI rule: refused before any work
        starts, never created on a typo).

    Raises
    ------
    OutputError
        ``out`` is an input, a folder, its folder is missing (with ``need_folder``), it
        exists while ``overwrite`` is false, or it is a file of another ``kind``.
    """
    out_p = Path(out).expanduser()
    for src in inputs:
        if src is None:
            continue
        src_p = Path(src).expanduser()
        if _same_file(out_p, src_p) or out_p.resolve() == src_p.resolve():
            raise OutputError(f"{what} {out_p} is also an input ({src_p}); choose another output path")
    if out_p.is_dir():
        raise OutputError(f"{what} {out_p} is a folder; give a file path")
    if need_folder and not out_p.parent.is_dir():
        raise OutputError(f"{what} {out_p}: the folder {out_p.parent} does not exist; create it first or choose another path")
    if out_p.exists() and not overwrite:
        raise OutputError(f"{what} {out_p} already exists; remove it or choose another path")
    if kind is not None and out_p.is_file():
        if kind not in _REPLACEABLE:
            raise ValueError(f"check_output: unknown kind {kind!r}")
        try:
            found = file_kind(out_p)
        except OSError as exc:
            raise OutputError(f"{what} {out_p} exists and cannot be read ({exc.strerror or exc}); choose another path") from exc
        if out_p.name.lower().endswith(_SLIDE_SUFFIXES) or found not in _REPLACEABLE[kind]:
            shown = "a slide" if out_p.name.lower().endswith(_SLIDE_SUFFIXES) else f"a {found.upper()} file"
            raise OutputError(
                f"{what} {out_p} exists and is {shown}, not an earlier {kind.upper()} output; "
                "it is not replaced: remove it yourself or choose another path"
            )
    return out_p
