"""Read a cohort: a CSV manifest of slides (with optional µm/px, label and region) or a folder.

A manifest is a CSV file with a ``slide`` column (paths, absolute or relative to the manifest's
folder) and optional columns:

* ``mpp`` - µm per level-0 pixel, for slides whose files do not say (plain images);
* ``label`` - any text (a diagnosis, a study arm): copied to ``summary.csv``;
* ``region`` - ``x,y,w,h`` in level-0 pixels (quoted in the CSV), or ``x y w h``: analyse only
  that rectangle.

Any other column (a patient id...) is kept and copied to ``summary.csv``. A folder stands for
all the slides in it (not its sub-folders), in name order.

Everything is checked before a run starts: a missing file, a bad value or a missing ``slide``
column is a :class:`ManifestError` naming the line, so no slide is analysed from a manifest that
would stop half way.

Examples
--------
>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "a.svs").write_bytes(b"x")
>>> _ = (d / "cohort.csv").write_text('slide,label,region\\na.svs,tumour,"0,0,512,512"\\n')
>>> [(s.stem, s.label, s.region) for s in read_manifest(d / "cohort.csv")]
[('a', 'tumour', (0, 0, 512, 512))]
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from napari_pathoseg.errors import PathosegError

__all__ = ["ManifestError", "CohortSlide", "read_manifest", "slides_in_folder", "KNOWN_COLUMNS", "slide_stem"]

logger = logging.getLogger(__name__)

#: Columns the manifest gives a meaning to; others are copied to the summary as they are.
KNOWN_COLUMNS = ("slide", "mpp", "label", "region")
#: At most this many problems are listed in one error message.
_MAX_LISTED = 5


class ManifestError(PathosegError):
    """A cohort manifest cannot be used (missing column or file, bad value)."""


@dataclass(frozen=True)
class CohortSlide:
    """One slide of a cohort.

    Attributes
    ----------
    path : Path
        The slide file (absolute).
    stem : str
        Its output folder name (``DIR/<stem>/``): the file name without its extension(s).
    mpp : float or None
        Declared µm per level-0 pixel (None: the slide's own).
    label : str
        Free text from the manifest.
    region : (x, y, w, h) or None
        Level-0 rectangle to analyse (None: the whole slide's tissue).
    extra : dict
        Other manifest columns, copied to the summary.
    line : int
        Line of the manifest (0 for a folder).
    """

    path: Path
    stem: str
    mpp: float | None = None
    label: str = ""
    region: tuple[int, int, int, int] | None = None
    extra: dict[str, str] = field(default_factory=dict)
    line: int = 0


def slide_stem(path: str | os.PathLike) -> str:
    """The output folder name of a slide: its name without extensions (``a.ome.tiff`` -> ``a``)."""
    name = Path(path).name
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def _parse_mpp(text: str, where: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ManifestError(f"{where}: mpp must be a number of µm per pixel, got {text!r}") from None
    if not math.isfinite(value) or not 0 < value <= 100:
        raise ManifestError(f"{where}: mpp must be in (0, 100] µm per pixel, got {text!r}")
    return value


def _parse_region(text: str, where: str) -> tuple[int, int, int, int] | None:
    text = text.strip()
    if not text:
        return None
    parts = text.replace(";", ",").replace(" ", ",").split(",")
    parts = [p for p in parts if p]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        vals = []
    if len(vals) != 4 or not all(math.isfinite(v) and v == int(v) for v in vals):
        raise ManifestError(f'{where}: region must be "x,y,w,h" in level-0 pixels (integers), got {text!r}')
    x, y, w, h = (int(v) for v in vals)
    if x < 0 or y < 0 or w <= 0 or h <= 0:
        raise ManifestError(f"{where}: region needs x, y >= 0 and w, h > 0, got {text!r}")
    return (x, y, w, h)


def _check_unique(slides: list[CohortSlide], source: Path) -> None:
    by_path = Counter(s.path for s in slides)
    dup = [p for p, n in by_path.items() if n > 1]
    if dup:
        lines = [str(s.line) for s in slides if s.path == dup[0]]
        raise ManifestError(f"{source}: {dup[0].name} is listed more than once (lines {', '.join(lines)}); list each slide once")
    by_stem = Counter(s.stem for s in slides)
    clash = [st for st, n in by_stem.items() if n > 1]
    if clash:
        names = [str(s.path) for s in slides if s.stem == clash[0]]
        raise ManifestError(
            f"{source}: {len(names)} slides are named {clash[0]!r} ({', '.join(names[:3])}) and would write to the "
            "same output folder; rename or copy one of them"
        )


def slides_in_folder(folder: str | os.PathLike) -> list[CohortSlide]:
    """Every slide file in ``folder`` (not sub-folders, not hidden files), in name order."""
    from napari_pathoseg.wsi.slide import is_slide_path

    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise ManifestError(f"{folder} is not a folder; give a manifest CSV or a folder of slides")
    slides = [
        CohortSlide(path=p, stem=slide_stem(p))
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and is_slide_path(p)
    ]
    if not slides:
        raise ManifestError(f"{folder} holds no slide files (.svs, .ndpi, .tif, .mrxs, .png...); point to the folder of the slides")
    _check_unique(slides, folder)
    return slides


def read_manifest(source: str | os.PathLike) -> list[CohortSlide]:
    """Read a manifest CSV, or list a folder of slides.

    Parameters
    ----------
    source : path
        A CSV file (see the module docstring) or a folder.

    Returns
    -------
    list of CohortSlide
        In manifest order; every file exists.

    Raises
    ------
    ManifestError
        No such file, no ``slide`` column, empty manifest, missing slide files, bad ``mpp`` or
        ``region`` values, one slide listed twice, two slides with the same name.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return slides_in_folder(path)
    if not path.is_file():
        raise ManifestError(f"{path} does not exist; give a manifest CSV or a folder of slides")
    base = path.resolve().parent
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(f"cannot read the manifest {path}: {exc}") from exc
    if "slide" not in header:
        found = ", ".join(repr(h) for h in header) or "none"
        raise ManifestError(
            f"{path}: the manifest needs a 'slide' column (paths of the slides); columns found: {found}. "
            "Optional columns: mpp, label, region"
        )
    if len(set(header)) != len(header):
        dup = [h for h, n in Counter(header).items() if n > 1]
        raise ManifestError(f"{path}: the column {dup[0]!r} appears twice; keep one")
    slides: list[CohortSlide] = []
    missing: list[str] = []
    for i, raw in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in raw.items() if k is not None}
        if None in raw:
            raise ManifestError(f"{path} line {i}: more values than columns; quote values that hold commas (region)")
        where = f"{path} line {i}"
        name = row.get("slide", "")
        if not name:
            if not any(row.values()):
                continue  # a blank line
            raise ManifestError(f"{where}: the slide column is empty")
        p = Path(name).expanduser()
        p = p if p.is_absolute() else base / p
        if not p.is_file():
            missing.append(f"line {i}: {name}")
            continue
        slides.append(
            CohortSlide(
                path=p.resolve(),
                stem=slide_stem(p),
                mpp=_parse_mpp(row.get("mpp", ""), where),
                label=row.get("label", ""),
                region=_parse_region(row.get("region", ""), where),
                extra={k: v for k, v in row.items() if k not in KNOWN_COLUMNS and k},
                line=i,
            )
        )
    if missing:
        more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        raise ManifestError(
            f"{path}: {len(missing)} slide file(s) not found ({'; '.join(missing[:_MAX_LISTED])}{more}); "
            f"paths are absolute or relative to {base}"
        )
    if not slides:
        raise ManifestError(f"{path} lists no slides; add one path per line under the 'slide' column")
    _check_unique(slides, path)
    return slides
