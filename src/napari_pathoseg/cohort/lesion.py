"""The lesion analysis of one cohort slide (``pathoseg batch --task lesion``, M3).

Runs :func:`~napari_pathoseg.methods.lesion.detect.iter_detect_lesions` (threshold 0.5, holes
filled) with the probability map in the work folder and writes into the slide's folder:

* ``lesion_mask.tif`` - uint8 0/1 mask on the model's grid (metadata: region, µm/px, scale);
* ``lesion_probability.tif`` - probability x 255 on the same grid.

Key figures: ``lesion_mm2``, ``tissue_mm2``, ``lesion_fraction`` (of the tissue), ``n_regions``,
``tiles``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from napari_pathoseg.cohort.tasks import SlideOutput
from napari_pathoseg.errors import PathosegError

__all__ = ["run_lesion_slide"]


def run_lesion_slide(slide: Any, *, model: Any, out_dir: str | os.PathLike, region: tuple[int, int, int, int] | None = None,
                     mpp: float | None = None, work_dir: str | os.PathLike | None = None, cancel: Any = None) -> SlideOutput:
    """Detect the lesions of one slide; write its mask and probability map (see the module docstring)."""
    from napari_pathoseg.events import run_to_end
    from napari_pathoseg.methods.lesion.detect import (
        LesionResult,
        iter_detect_lesions,
        write_mask_tiff,
        write_probability_tiff,
    )

    out = Path(out_dir)
    res = run_to_end(iter_detect_lesions(slide, model, mpp=mpp, region=region, work_dir=work_dir, cancel=cancel),
                     LesionResult)
    if res.cancelled:
        raise PathosegError(f"stopped after {res.tiles} of {res.tiles_total} tiles")
    files = {"mask": write_mask_tiff(res, out / "lesion_mask.tif"),
             "probability": write_probability_tiff(res, out / "lesion_probability.tif")}
    s = res.summary()
    figures = {
        "lesion_mm2": round(s["lesion_area_um2"] / 1e6, 6),
        "tissue_mm2": round(s["tissue_area_um2"] / 1e6, 6),
        "lesion_fraction": s["lesion_fraction_of_tissue"],
        "n_regions": s["n_regions"],
        "tiles": s["tiles"],
    }
    del res
    return SlideOutput(figures=figures, files=files)
