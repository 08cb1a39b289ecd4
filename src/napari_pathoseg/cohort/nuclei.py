"""The nuclei analysis of one cohort slide (``pathoseg batch --task nuclei``).

Runs :func:`~napari_pathoseg.methods.nuclei.segment.iter_segment_nuclei` over the slide's tissue
(or the manifest's region) with the labels in memory-mapped files in the work folder, so memory
is bounded by the tiles in flight, not the slide. Writes into the slide's folder:

* ``nuclei_labels.tif`` - uint32 instance labels on the level-0 grid of the region (as
  ``pathoseg nuclei --out``);
* ``nuclei.csv`` - one row per nucleus: id, x, y (level-0 pixels), area_um2, confidence.

Key figures: ``n_nuclei``, ``tissue_mm2`` (tissue in the analysed region, from the tissue mask),
``nuclei_per_mm2``, ``mean_area_um2`` and ``tiles``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathoseg.cohort.tasks import SlideOutput
from napari_pathoseg.errors import PathosegError

__all__ = ["run_nuclei_slide", "tissue_area_mm2"]

logger = logging.getLogger(__name__)


def tissue_area_mm2(slide: Any, *, region: tuple[int, int, int, int] | None, mpp: float | None) -> float | None:
    """Tissue area (mm²) of ``region`` (default the whole slide) from the low-resolution tissue mask.

    ``None`` when the µm per pixel is unknown.
    """
    from napari_pathoseg.tiling import tissue_mask

    um = mpp or getattr(slide, "mpp", None) or getattr(getattr(slide, "metadata", None), "mpp", None)
    if isinstance(um, (tuple, list)):
        um = float(np.mean(um))
    if not um:
        return None
    mask, ds = tissue_mask(slide)
    if region is not None:
        x, y, w, h = region
        r0, c0 = int(y / ds), int(x / ds)
        r1, c1 = int(np.ceil((y + h) / ds)), int(np.ceil((x + w) / ds))
        mask = mask[r0:r1, c0:c1]
    return float(mask.sum()) * (ds * float(um)) ** 2 / 1e6


def run_nuclei_slide(
    slide: Any,
    *,
    model: Any,
    out_dir: str | os.PathLike,
    region: tuple[int, int, int, int] | None = None,
    mpp: float | None = None,
    work_dir: str | os.PathLike | None = None,
    cancel: Any = None,
) -> SlideOutput:
    """Segment the nuclei of one slide and write its labels and table (see the module docstring)."""
    from napari_pathoseg.events import run_to_end
    from napari_pathoseg.methods.nuclei.segment import (
        NucleiResult,
        iter_segment_nuclei,
        write_labels_tiff,
        write_table_csv,
    )

    out = Path(out_dir)
    result = run_to_end(
        iter_segment_nuclei(
            slide, model, region=region, mpp=mpp, tissue_only=True, with_normalized=False,
            work_dir=work_dir, cancel=cancel,
        ),
        NucleiResult,
    )
    if result.cancelled:
        raise PathosegError(f"stopped after {result.tiles} of {result.tiles_total} tiles")
    files = {
        "labels": write_labels_tiff(result, out / "nuclei_labels.tif"),
        "table": write_table_csv(result, out / "nuclei.csv"),
    }
    n = result.n_nuclei
    tissue = tissue_area_mm2(slide, region=region, mpp=mpp)
    areas = [float(r["area_um2"]) for r in result.table if r.get("area_um2") is not None]
    figures = {
        "n_nuclei": n,
        "tissue_mm2": round(tissue, 6) if tissue is not None else None,
        "nuclei_per_mm2": round(n / tissue, 3) if tissue else None,
        "mean_area_um2": round(float(np.mean(areas)), 3) if areas else None,
        "tiles": result.tiles,
    }
    del result  # its labels map a file in work_dir, removed by the caller
    return SlideOutput(figures=figures, files=files)
