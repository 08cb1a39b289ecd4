"""The slide classification of one cohort slide (``pathoseg batch --task mil``, M4).

Runs :func:`~napari_pathoseg.methods.mil.classify.iter_classify` with the task's slide model
and writes into the slide's folder:

* ``mil.json`` - the call, its probability, pooling and every tissue tile's probability (the
  document ``pathoseg mil --json`` writes);
* ``mil_heatmap.tif`` - float32 tile heat map, one pixel per tile, NaN off tissue (metadata:
  ``region_xywh``, ``level0_pixels_per_pixel``), opened over the slide by the Cohort dock.

Key figures: ``probability``, ``call`` (the label), ``n_tiles`` (tissue tiles kept by the
entropy filter) and ``top_tile_probability``. A slide without tissue fails with that one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from napari_pathoseg.cohort.tasks import SlideOutput
from napari_pathoseg.errors import PathosegError

__all__ = ["FIGURES", "run_mil_slide"]

#: The key-figure columns of ``summary.csv``.
FIGURES = ("probability", "call", "n_tiles", "top_tile_probability")


def run_mil_slide(slide: Any, *, model: Any, out_dir: str | os.PathLike, region: tuple[int, int, int, int] | None = None,
                  mpp: float | None = None, work_dir: str | os.PathLike | None = None, cancel: Any = None) -> SlideOutput:
    """Classify one slide; write its call and heat map (see the module docstring)."""
    from napari_pathoseg._atomic import write_json
    from napari_pathoseg.events import run_to_end
    from napari_pathoseg.methods.mil.classify import (
        ClassifyResult,
        iter_classify,
        write_heatmap_tiff,
    )

    out = Path(out_dir)
    res = run_to_end(iter_classify(slide, model=model, mpp=mpp, region=region, cancel=cancel), ClassifyResult)
    if res.cancelled:
        raise PathosegError(f"stopped after {res.tiles_run} of {res.tiles_total} tiles")
    doc = {"input": str(getattr(slide.metadata, "path", "")), **res.summary()}
    files = {"json": write_json(out / "mil.json", doc), "heatmap": write_heatmap_tiff(res, out / "mil_heatmap.tif")}
    figures = {
        "probability": round(float(res.probability), 5),
        "call": res.label,
        "n_tiles": res.n_tiles,
        "top_tile_probability": round(float(res.top_tile_probability), 5),
    }
    return SlideOutput(figures=figures, files=files)
