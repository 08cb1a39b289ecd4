"""``DIR/summary.csv``: one row per slide of the cohort, rewritten atomically as results arrive.

Columns: ``slide`` (path), ``stem``, ``status`` (``ok``, ``failed``, ``skipped`` - complete from an
earlier run -, ``pending`` while it waits or after a Stop), ``error`` (one line), ``seconds``,
``attempts``, ``worker``, ``peak_rss_mb`` (peak memory of the worker process so far), ``label``,
``mpp``, ``region``, then the task's key figures (declared, then any further ones it reports, such
as per-class fractions), then any other manifest column.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from napari_pathoseg._atomic import write_text
from napari_pathoseg.cohort.manifest import CohortSlide

__all__ = ["SUMMARY", "BASE_COLUMNS", "new_row", "summary_columns", "write_summary", "read_summary"]

logger = logging.getLogger(__name__)

SUMMARY = "summary.csv"
BASE_COLUMNS = ("slide", "stem", "status", "error", "seconds", "attempts", "worker", "peak_rss_mb", "label", "mpp",
                "region")


def new_row(slide: CohortSlide) -> dict[str, Any]:
    """The row of a slide that has not run yet (status ``pending``)."""
    return {
        "slide": str(slide.path),
        "stem": slide.stem,
        "status": "pending",
        "error": "",
        "seconds": "",
        "attempts": 0,
        "worker": "",
        "label": slide.label,
        "mpp": "" if slide.mpp is None else slide.mpp,
        "region": "" if slide.region is None else ",".join(str(v) for v in slide.region),
        **slide.extra,
    }


def summary_columns(figures: Sequence[str], slides: Sequence[CohortSlide]) -> list[str]:
    """The columns: base columns, the task's figures, then extra manifest columns."""
    cols = list(BASE_COLUMNS) + [f for f in figures if f not in BASE_COLUMNS]
    for s in slides:
        for k in s.extra:
            if k not in cols:
                cols.append(k)
    return cols


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def write_summary(path: str | os.PathLike, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> Path:
    """Write the rows as CSV, atomically (readers never see a half-written table)."""
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    wr.writeheader()
    for row in rows:
        wr.writerow({k: _cell(row.get(k)) for k in columns})
    return write_text(path, buf.getvalue())


def read_summary(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a ``summary.csv`` (strings)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))
