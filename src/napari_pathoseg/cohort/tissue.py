"""The tissue-type analysis of one cohort slide (``pathoseg batch --task tissue``, M5).

Runs :func:`~napari_pathoseg.methods.tissue.segment.iter_tissue` (M5's literal 224 px windows)
with the probabilities in the work folder and writes ``tissue_labels.tif`` (uint8 class ids on the
model grid: 0 background, 1..n the model's classes; metadata: classes, region, scale) into the
slide's folder.

Key figures: ``tissue_mm2`` (all classes), then per class ``<class>_fraction`` (of the tissue) and
``<class>_mm2``, and ``tiles``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from napari_pathoseg.cohort.tasks import SlideOutput
from napari_pathoseg.errors import PathosegError

__all__ = ["run_tissue_slide"]


def _column(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower() or "class"


def run_tissue_slide(slide: Any, *, model: Any, out_dir: str | os.PathLike, region: tuple[int, int, int, int] | None = None,
                     mpp: float | None = None, work_dir: str | os.PathLike | None = None, cancel: Any = None) -> SlideOutput:
    """Map the tissue types of one slide; write the class ids (see the module docstring)."""
    from napari_pathoseg.events import run_to_end
    from napari_pathoseg.methods.tissue.segment import TissueResult, iter_tissue, write_labels_tiff

    res = run_to_end(iter_tissue(slide, model, region=region, mpp=mpp, work_dir=work_dir, cancel=cancel), TissueResult)
    if res.cancelled:
        raise PathosegError(f"stopped after {res.tiles} of {res.tiles_total} tiles")
    files = {"labels": write_labels_tiff(res, Path(out_dir) / "tissue_labels.tif")}
    areas = {k: v for k, v in res.areas.items() if k != "background" and isinstance(v, dict)}
    figures: dict[str, Any] = {"tissue_mm2": round(sum(float(v["area_um2"]) for v in areas.values()) / 1e6, 6)}
    for name, v in areas.items():
        figures[f"{_column(name)}_fraction"] = round(float(v.get("fraction", 0.0)), 4)
        figures[f"{_column(name)}_mm2"] = round(float(v["area_um2"]) / 1e6, 6)
    figures["tiles"] = res.tiles
    del res
    return SlideOutput(figures=figures, files=files)
