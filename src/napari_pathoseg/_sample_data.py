"""npe2 sample data: the bundled CMU-1-Small-Region.svs (CC0) as a multiscale layer."""

from __future__ import annotations

from napari_pathoseg._reader import slide_layer_data
from napari_pathoseg.wsi.slide import open_slide, sample_slide_path

__all__ = ["cmu_small_region"]


def cmu_small_region() -> list:
    """CMU-1-Small-Region.svs: Aperio, 2220 x 2967 px, 0.499 µm/px, H&E skin (CC0)."""
    return [slide_layer_data(open_slide(sample_slide_path()))]
