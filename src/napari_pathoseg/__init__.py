"""napari-pathoseg: interactive H&E whole-slide image analysis for napari.

The core (slides, tiling, stain, models, training, pseudo-labels, metrics, export, cli)
never imports Qt or napari; the dock widgets live in :mod:`napari_pathoseg._widgets`.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
