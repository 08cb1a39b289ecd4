"""The main job on a slide (by default the bundled sample): the README's first command.

Headless, it prints the slide's metadata, finds the tissue and writes a thumbnail with
the tissue outlined; with a display it opens napari with the slide and the plugin's docks.
Headless, it also segments every nucleus of the slide with the shipped model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathoseg._atomic import atomic_path, write_json
from napari_pathoseg.wsi.slide import open_slide, sample_slide_path
from napari_pathoseg.tiling import tile_grid, tissue_mask

__all__ = ["run_demo", "save_png", "overlay_outline"]

logger = logging.getLogger(__name__)


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write an RGB (r, c, 3) uint8 PNG atomically."""
    from PIL import Image

    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(rgb)).save(tmp, format="PNG")
    return path


def overlay_outline(rgb: np.ndarray, mask: np.ndarray, *, color=(0, 160, 0)) -> np.ndarray:
    """Draw the outline of ``mask`` ((r, c) bool or labels, same size as ``rgb``) on a copy."""
    from skimage.segmentation import find_boundaries

    out = rgb.copy()
    out[find_boundaries(mask, mode="inner")] = color
    return out


def run_demo(
    *,
    slide_path: str | os.PathLike | None = None,
    out_dir: str | os.PathLike = "pathoseg-demo",
    headless: bool = True,
    nuclei: bool = True,
) -> dict[str, Any]:
    """Run the main job; return a JSON-ready summary.

    Headless: slide metadata, tissue mask thumbnail, and (``nuclei``) the shipped
    nucleus model over the whole slide's tissue: labels TIFF, overlay PNG, table CSV.
    With a display: napari with the slide and the plugin's docks.
    """
    path = Path(slide_path) if slide_path else sample_slide_path()
    if not headless:
        from napari_pathoseg._widgets.launch import launch_viewer

        launch_viewer(path)
        return {"slide": str(path), "napari": True}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open_slide(path) as slide:
        meta = slide.metadata.to_dict()
        mask, ds = tissue_mask(slide)
        thumb = slide.thumbnail(max_size=max(mask.shape))
        from skimage.transform import resize

        m = resize(mask.astype(float), thumb.shape[:2], order=0) > 0.5
        thumb_path = save_png(out / "thumbnail_tissue.png", overlay_outline(thumb, m))
        tiles = tile_grid(slide, mpp=slide.mpp, size=512, mask=(mask, ds)) if slide.mpp else tile_grid(slide, size=512, mask=(mask, ds))
        summary: dict[str, Any] = {
            "slide": str(path),
            "metadata": meta,
            "tissue_fraction": float(mask.mean()),
            "tissue_tiles_512": len(tiles),
            "thumbnail": str(thumb_path),
        }
        if nuclei:
            from napari_pathoseg.methods.nuclei.segment import demo_nuclei

            summary["nuclei"] = demo_nuclei(slide, out_dir=out)
    write_json(out / "summary.json", summary, indent=2)
    return summary
