"""The cohort format of M4: a CSV of slides and their labels.

Columns (header required, extra columns ignored):

``slide``
    Path of the slide; a relative path is taken relative to the CSV's folder.
``label``
    ``negative`` / ``positive`` (also ``0`` / ``1``; case and surrounding spaces ignored).
    Mosaic slides' own labels ``normal`` / ``tumour`` (and ``tumor``) are accepted as
    negative / positive.
``mpp`` (optional)
    µm per pixel of the slide's level 0. Empty or absent: read from the slide file, else
    ``default_mpp``.

:func:`read_cohort` checks everything before any training starts and raises one
:class:`CohortError` naming the row and what to do: a missing or unreadable file, an unknown
label, a cohort with one class only, a slide without µm/px and no default.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

from napari_pathoseg.errors import PathosegError

__all__ = ["LABELS", "CohortError", "CohortSlide", "parse_label", "read_cohort"]


class CohortError(PathosegError):
    """A cohort CSV cannot be used as it is."""


#: Accepted label spellings -> 0 (negative) / 1 (positive).
LABELS = {"negative": 0, "0": 0, "normal": 0, "positive": 1, "1": 1, "tumour": 1, "tumor": 1}
_NAMES = ("negative", "positive")


@dataclass(frozen=True)
class CohortSlide:
    """One row of a cohort CSV.

    Attributes
    ----------
    slide : Path
        Absolute path of the slide.
    label : int
        0 negative, 1 positive.
    label_name : str
        ``"negative"`` or ``"positive"``.
    mpp : float or None
        µm/px of level 0 (from the CSV, the file or the default).
    """

    slide: Path
    label: int
    label_name: str
    mpp: float | None


def parse_label(value: str, *, where: str = "") -> int:
    """0 or 1 from a label spelling of :data:`LABELS`; :class:`CohortError` otherwise."""
    key = str(value).strip().lower()
    if key not in LABELS:
        raise CohortError(f"{where}unknown label {value!r}; use negative/positive (or 0/1).")
    return LABELS[key]


def _mpp_of(path: Path, where: str) -> float | None:
    from napari_pathoseg.wsi.slide import open_slide

    try:
        with open_slide(path) as slide:
            return slide.mpp
    except PathosegError as exc:
        raise CohortError(f"{where}cannot open {path}: {exc}") from None


def read_cohort(path: str | os.PathLike, *, default_mpp: float | None = None,
                check_mpp: bool = True) -> list[CohortSlide]:
    """Read and check a cohort CSV.

    Parameters
    ----------
    path : path-like
        The CSV (columns ``slide,label[,mpp]``).
    default_mpp : float, optional
        µm/px for slides whose row and file give none.
    check_mpp : bool
        Open each slide that has no ``mpp`` in its row to read it (and to check it opens).

    Returns
    -------
    list of CohortSlide

    Raises
    ------
    CohortError
        No such CSV, no header or rows, missing columns, a missing slide file, an unknown
        label, a bad or missing µm/px, one class only (M4 needs positive and negative slides).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CohortError(f"cohort CSV {path} does not exist; give a CSV with columns slide,label[,mpp].")
    if default_mpp is not None and not (math.isfinite(default_mpp) and default_mpp > 0):
        raise CohortError(f"the default µm/px must be a positive number, got {default_mpp!r}.")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            fields = [str(f).strip().lower() for f in (reader.fieldnames or [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CohortError(f"cannot read the cohort CSV {path}: {exc}; save it as UTF-8 CSV.") from None
    missing = [c for c in ("slide", "label") if c not in fields]
    if missing:
        raise CohortError(f"{path}: no {' or '.join(missing)} column (found {fields}); the header must be slide,label[,mpp].")
    if not rows:
        raise CohortError(f"{path} lists no slides; add one row per slide: slide,label[,mpp].")
    base = path.parent
    out: list[CohortSlide] = []
    for i, raw in enumerate(rows, start=2):
        row = {str(k).strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
        where = f"{path.name} line {i}: "
        if not row.get("slide"):
            raise CohortError(f"{where}no slide path; fill the slide column or remove the row.")
        slide = Path(row["slide"]).expanduser()
        slide = slide if slide.is_absolute() else (base / slide)
        if not slide.is_file():
            raise CohortError(f"{where}slide {slide} does not exist; fix the path (relative paths start at the CSV's folder).")
        label = parse_label(row.get("label", ""), where=where)
        mpp: float | None = None
        if row.get("mpp"):
            try:
                mpp = float(row["mpp"])
            except ValueError:
                mpp = float("nan")
            if not (math.isfinite(mpp) and 0 < mpp <= 100):
                raise CohortError(f"{where}mpp {row['mpp']!r} is not a µm/px value in (0, 100]; fix it or leave it empty.")
        elif check_mpp:
            mpp = _mpp_of(slide, where)
        if mpp is None and check_mpp:
            if default_mpp is None:
                raise CohortError(f"{where}{slide.name} has no µm/px in its file or the CSV; add an mpp column or pass a default (--mpp).")
            mpp = float(default_mpp)
        out.append(CohortSlide(slide.resolve(), label, _NAMES[label], mpp))
    labels = {s.label for s in out}
    if len(labels) < 2:
        only = _NAMES[labels.pop()]
        raise CohortError(f"{path}: every slide is {only}; M4 needs both positive and negative slides.")
    return out
