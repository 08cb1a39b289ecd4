"""Patch-level (multi-hot) labels: WSSS4LUAD file names, CSV files and folders.

Three forms are read, all giving :class:`PatchLabel` records (image path + multi-hot vector
over the model's classes):

* WSSS4LUAD file names ``<slide>-<x>-<y>-[1, 0, 1].png``: the bracketed vector is the label
  (:func:`parse_wsss_name`);
* a CSV with a column ``image`` (path relative to the CSV) and either one ``0``/``1`` column per
  class (named as the classes) or a ``labels`` column holding a ``[a, b, c]`` vector, or a
  ``classes`` column naming the classes present separated by ``;``
  (:func:`read_label_csv`); WSSS4LUAD-style columns such as
  ``image_level_label_tumor_stroma_normal`` are read as ``labels``;
* a folder: its ``labels.csv`` when present, else every image whose name holds a vector, else
  sub-folders named after a class (one-class patches, as in Kather-2016 / NCT-CRC)
  (:func:`read_label_folder`).

Bad input (unknown class names, a malformed or wrong-length vector, no class at all, a missing
image) raises :class:`PatchLabelError` naming the file and the row.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from napari_pathoseg.errors import PathosegError

__all__ = [
    "IMAGE_SUFFIXES",
    "PatchLabel",
    "PatchLabelError",
    "parse_class_names",
    "parse_vector",
    "parse_wsss_name",
    "read_label_csv",
    "read_label_folder",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_VEC = re.compile(r"\[([^\]]*)\]")


class PatchLabelError(PathosegError):
    """A patch-label file or name cannot be read."""


@dataclass(frozen=True)
class PatchLabel:
    """One labelled patch: ``path`` and ``labels`` (tuple of 0/1, one per class)."""

    path: Path
    labels: tuple[int, ...]

    @property
    def present(self) -> list[int]:
        """Indices of the classes present."""
        return [i for i, v in enumerate(self.labels) if v]


def parse_vector(text: str, n: int, *, where: str) -> tuple[int, ...]:
    """``"[1, 0, 1]"`` (or ``"1 0 1"``) -> ``(1, 0, 1)``; length ``n``, values 0/1, at least one 1."""
    body = str(text).strip()
    m = _VEC.fullmatch(body)
    if m:
        body = m.group(1)
    parts = [p for p in re.split(r"[,\s;]+", body.strip()) if p]
    if len(parts) != n or any(p not in ("0", "1") for p in parts):
        raise PatchLabelError(f"{where}: label {text!r} is not a vector of {n} zeros/ones (one per class); "
                              "write it as [1, 0, 1].")
    vec = tuple(int(p) for p in parts)
    if not any(vec):
        raise PatchLabelError(f"{where}: label {text!r} names no class; every patch contains at least one class.")
    return vec


def parse_wsss_name(name: str, n: int) -> tuple[int, ...]:
    """The label of a WSSS4LUAD file name ``436219-9328-56427-[1, 1, 0].png``."""
    found = _VEC.findall(Path(name).stem)
    if not found:
        raise PatchLabelError(f"{name}: no [a, b, c] label vector in the file name.")
    return parse_vector("[" + found[-1] + "]", n, where=name)


def _class_index(classes: Sequence[str]) -> dict[str, int]:
    return {c.strip().lower(): i for i, c in enumerate(classes)}


def parse_class_names(text: str, classes: Sequence[str], *, where: str) -> tuple[int, ...]:
    """``"tumour; stroma"`` (names separated by ``;`` or ``,``, any case) -> multi-hot vector over ``classes``."""
    idx = _class_index(classes)
    names = [s.strip().lower() for s in re.split(r"[;,]", str(text or "")) if s.strip()]
    bad = [s for s in names if s not in idx]
    if bad:
        raise PatchLabelError(f"{where}: unknown class {bad[0]!r}; the classes are {list(classes)}.")
    if not names:
        raise PatchLabelError(f"{where}: names no class; every patch contains at least one class.")
    return tuple(int(c.strip().lower() in names) for c in classes)


def read_label_csv(path: str | Path, classes: Sequence[str]) -> list[PatchLabel]:
    """Read a CSV of multi-hot patch labels (see the module docstring for its columns)."""
    path = Path(path)
    n = len(classes)
    idx = _class_index(classes)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise PatchLabelError(f"{path}: cannot read the label CSV ({exc.strerror}).") from None
    if not rows:
        raise PatchLabelError(f"{path}: no rows; write a header 'image,...' and one row per patch.")
    cols = {c.strip().lower(): c for c in rows[0] if c}
    if "image" not in cols:
        raise PatchLabelError(f"{path}: no 'image' column; columns are {sorted(cols)}.")
    vec_col = cols.get("labels") or next((c for k, c in cols.items() if k.startswith("image_level_label")), None)
    class_cols = [cols[k] for k in idx if k in cols]
    out = []
    for r, row in enumerate(rows, start=2):
        where = f"{path}, row {r}"
        if vec_col is not None:
            vec = parse_vector(row[vec_col], n, where=where)
        elif "classes" in cols:
            vec = parse_class_names(row[cols["classes"]], classes, where=where)
        elif len(class_cols) == n:
            vals = [(row[c] or "").strip() for c in class_cols]
            vec = parse_vector(" ".join(vals), n, where=where)
        else:
            extra = sorted(set(cols) - {"image"} - set(idx))
            raise PatchLabelError(f"{path}: no 'labels' or 'classes' column and the class columns do not match the "
                                  f"classes {list(classes)} (unknown columns: {extra}).")
        img = (path.parent / row[cols["image"]]).resolve()
        if not img.is_file():
            raise PatchLabelError(f"{where}: image {row[cols['image']]!r} not found next to the CSV.")
        out.append(PatchLabel(img, vec))
    return out


def read_label_folder(folder: str | Path, classes: Sequence[str]) -> list[PatchLabel]:
    """Labels of a folder: ``labels.csv``, else vectors in file names, else one sub-folder per class."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PatchLabelError(f"{folder}: not a folder of labelled patches.")
    if (folder / "labels.csv").is_file():
        return read_label_csv(folder / "labels.csv", classes)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    named = [p for p in files if _VEC.search(p.stem)]
    if named:
        return [PatchLabel(p.resolve(), parse_wsss_name(p.name, len(classes))) for p in named]
    idx = _class_index(classes)
    subs = sorted(p for p in folder.iterdir() if p.is_dir())
    if subs:
        bad = [s.name for s in subs if s.name.strip().lower() not in idx]
        if bad:
            raise PatchLabelError(f"{folder}: sub-folder {bad[0]!r} is not a class; the classes are {list(classes)}.")
        out = []
        for s in subs:
            vec = tuple(int(i == idx[s.name.strip().lower()]) for i in range(len(classes)))
            out += [PatchLabel(p.resolve(), vec) for p in sorted(s.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        if out:
            return out
    raise PatchLabelError(f"{folder}: no labels.csv, no [a, b, c] file names and no class sub-folders with images.")
