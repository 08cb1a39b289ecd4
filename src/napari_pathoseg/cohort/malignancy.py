"""The malignancy analysis of one cohort slide (``pathoseg batch --task malignancy``, M1).

Runs :func:`~napari_pathoseg.methods.malignancy.slide.iter_malignancy` on the slide's tissue
(tile probabilities from classifier C, the region from segmenter B, the slide probability as
the top-k mean of the tiles, see ``docs/malignancy.md``) and writes into the slide's folder:

* ``malignancy_mask.tif`` - B's malignant region, uint8 0/1 at the inference level (metadata:
  region, µm/px, scale);
* ``malignancy_heatmap.tif`` - C's tile probabilities, float32 0-1, one pixel per tile step,
  NaN where no tile ran (metadata: origin and cell size in level-0 pixels);
* ``malignancy_tiles.csv`` - one row per tile: level-0 ``x, y, w, h`` and ``probability``.

Key figures: ``probability``, ``call`` (malignant / benign), ``malignant_area_mm2``,
``malignant_fraction`` (of the tissue), ``tissue_mm2``, ``tiles``.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from napari_pathoseg.cohort.tasks import SlideOutput
from napari_pathoseg.errors import PathosegError

__all__ = ["run_malignancy_slide"]


def _write_tiles_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    from napari_pathoseg._atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["x", "y", "w", "h", "probability"])
        w.writeheader()
        w.writerows(rows)
    return path


def run_malignancy_slide(slide: Any, *, model: Any, out_dir: str | os.PathLike, region: tuple[int, int, int, int] | None = None,
                         mpp: float | None = None, work_dir: str | os.PathLike | None = None, cancel: Any = None) -> SlideOutput:
    """Malignancy of one slide; write its mask, heat map and tile table (see the module docstring)."""
    from napari_pathoseg.events import run_to_end
    from napari_pathoseg.methods.malignancy.slide import (
        MalignancyResult,
        iter_malignancy,
        write_heatmap_tiff,
        write_mask_tiff,
    )

    out = Path(out_dir)
    res = run_to_end(iter_malignancy(slide, model=model, mpp=mpp, region=region, whole_image=False,
                                     work_dir=work_dir, cancel=cancel), MalignancyResult)
    if res.cancelled:
        raise PathosegError(f"stopped after {res.tiles} of {res.tiles_total} tiles")
    files = {"mask": write_mask_tiff(res, out / "malignancy_mask.tif"),
             "heatmap": write_heatmap_tiff(res, out / "malignancy_heatmap.tif"),
             "tiles": _write_tiles_csv(res.tile_table(), out / "malignancy_tiles.csv")}
    s = res.summary()
    figures = {
        "probability": s["probability"],
        "call": s["label"],
        "malignant_area_mm2": round(s["malignant_area_um2"] / 1e6, 6),
        "malignant_fraction": s["malignant_fraction"],
        "tissue_mm2": round(s["tissue_area_um2"] / 1e6, 6),
        "tiles": s["tiles_run"],
    }
    del res
    return SlideOutput(figures=figures, files=files)
