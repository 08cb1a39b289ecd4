"""Stain normalisation, colour deconvolution and stain augmentation for H&E images.

* :mod:`.normalizers`: the public face of stain normalisation: Macenko, Vahadane and
  Reinhard normalisers with ``fit`` / ``estimate`` / ``transform``, :func:`get_normalizer`,
  JSON save/load, and :func:`normalize_tile` for tile pipelines. The code behind it:
  :mod:`.params` (stain parameters), :mod:`.solvers` (tissue OD, Macenko vectors, Vahadane
  factorisation, H&E check), :mod:`.base` (the normaliser base class), :mod:`.macenko`,
  :mod:`.vahadane`, :mod:`.reinhard`, :mod:`.registry` and :mod:`.persistence`.
* :mod:`.slide`: estimate a slide's stains once, normalise its pyramid lazily (dask),
  deconvolution layers, and a streaming normalised pyramidal TIFF writer.
* :mod:`.deconvolution`: haematoxylin / eosin / DAB channels (scikit-image).
* :mod:`.augment`: random stain-concentration perturbation for training.

Nothing here imports napari or Qt.
"""

from __future__ import annotations

from napari_pathoseg.stain.augment import StainAugmenter, augment_stain
from napari_pathoseg.stain.deconvolution import STAINS, deconvolve, render_stain, stain_channel
from napari_pathoseg.stain.normalizers import (
    NORMALIZERS,
    MacenkoNormalizer,
    ReinhardNormalizer,
    StainNormalizer,
    StainParams,
    VahadaneNormalizer,
    available_normalizers,
    check_he_stains,
    get_normalizer,
    load_normalizer,
    normalize_tile,
    save_normalizer,
)
from napari_pathoseg.stain.slide import (
    WriteProgress,
    WriteResult,
    deconvolution_pyramid,
    estimate_slide_stain,
    fit_to_slide,
    normalized_pyramid,
    read_rect,
    sample_tissue,
    write_normalized_tiff,
)

__all__ = [
    "NORMALIZERS",
    "STAINS",
    "MacenkoNormalizer",
    "ReinhardNormalizer",
    "StainAugmenter",
    "StainNormalizer",
    "StainParams",
    "VahadaneNormalizer",
    "WriteProgress",
    "WriteResult",
    "augment_stain",
    "available_normalizers",
    "check_he_stains",
    "deconvolution_pyramid",
    "deconvolve",
    "estimate_slide_stain",
    "fit_to_slide",
    "get_normalizer",
    "load_normalizer",
    "normalize_tile",
    "normalized_pyramid",
    "read_rect",
    "render_stain",
    "sample_tissue",
    "save_normalizer",
    "stain_channel",
    "write_normalized_tiff",
]
