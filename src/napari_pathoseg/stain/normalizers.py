"""Stain normalisation of H&E images: Macenko, Vahadane and Reinhard.

Every normaliser is fitted once to a *target* (a reference image a lab trusts) and then
maps *source* images onto the target's stain appearance:

* :class:`MacenkoNormalizer` (Macenko et al., ISBI 2009): the two stain vectors are the
  extreme angles of the tissue optical densities (OD) projected on the plane of their
  two main principal components; concentrations by least squares, scaled so that their
  99th percentiles match the target's. Same algorithm as torchstain's and StainTools'.
* :class:`VahadaneNormalizer` (Vahadane et al., IEEE TMI 2016): the stain basis ``W``
  and non-negative concentrations ``H`` come from a sparse non-negative factorisation
  of the tissue OD, ``V ~ W H`` with an L1 penalty on ``H``; the image is rebuilt as
  ``V = (P99(H_target) / P99(H_source)) W_target H_source`` and ``I = I_0 exp(-V)``
  (the M3 pre-processing of ``methods.md``).
* :class:`ReinhardNormalizer` (Reinhard et al., 2001): the mean and standard deviation
  of each CIE-Lab channel over the tissue are matched to the target's.

Only tissue pixels are used for fitting: pixels whose optical density is below
``beta`` are background. A fit on too little tissue, or on an image whose stains do not
look like haematoxylin and eosin, raises :class:`~napari_pathoseg.errors.StainError`.

Fitting is separate from applying: :meth:`StainNormalizer.estimate` measures an image's
stain parameters (:class:`StainParams`); :meth:`StainNormalizer.transform` maps an image
with parameters measured on itself (the classic per-image use) or with parameters
measured once for a whole slide (``source=``), which keeps tiles seamless. With both
sides known every method is a fixed per-pixel colour function: Macenko's is separable
and evaluated exactly with small per-channel tables; whole slides (and large images for
Vahadane and Reinhard) go through a 256³ colour table, exact for Macenko and
interpolated from an 86³ grid, within a few grey levels, for the others (see
:mod:`napari_pathoseg.stain._lut`).

A fitted normaliser saves to a small JSON file (:func:`save_normalizer`) and loads back
(:func:`load_normalizer`) with validation.

This module gathers the public API and the tile step (:func:`normalize_tile`); the code lives in
:mod:`.params` (:class:`StainParams`), :mod:`.solvers` (tissue OD, Macenko's vectors, Vahadane's
factorisation, the H&E check), :mod:`.base` (:class:`StainNormalizer`), one module per method
(:mod:`.macenko`, :mod:`.vahadane`, :mod:`.reinhard`), :mod:`.registry`
(:func:`get_normalizer`) and :mod:`.persistence` (JSON files).

Examples
--------
>>> from napari_pathoseg.stain import get_normalizer
>>> norm = get_normalizer("macenko").fit(reference)          # doctest: +SKIP
>>> out = norm.transform(image)                               # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from napari_pathoseg.errors import StainError
from napari_pathoseg.stain._image import as_rgb_uint8
from napari_pathoseg.stain.base import FILE_FORMAT, FILE_VERSION, StainNormalizer
from napari_pathoseg.stain.macenko import MacenkoNormalizer
from napari_pathoseg.stain.params import StainParams
from napari_pathoseg.stain.persistence import MAX_FILE_BYTES, load_normalizer, normalizer_from_dict, save_normalizer
from napari_pathoseg.stain.registry import NORMALIZERS, available_normalizers, get_normalizer
from napari_pathoseg.stain.reinhard import ReinhardNormalizer
from napari_pathoseg.stain.solvers import check_he_stains, macenko_stain_matrix
from napari_pathoseg.stain.vahadane import VahadaneNormalizer

__all__ = [
    "FILE_FORMAT",
    "FILE_VERSION",
    "MAX_FILE_BYTES",
    "StainParams",
    "StainNormalizer",
    "MacenkoNormalizer",
    "VahadaneNormalizer",
    "ReinhardNormalizer",
    "NORMALIZERS",
    "available_normalizers",
    "get_normalizer",
    "save_normalizer",
    "load_normalizer",
    "normalizer_from_dict",
    "normalize_tile",
    "check_he_stains",
    "macenko_stain_matrix",
]

logger = logging.getLogger(__name__)


def normalize_tile(
    tile: Any,
    normalizer: StainNormalizer,
    *,
    source: StainParams | None = None,
    skip_blank: bool = True,
) -> np.ndarray:
    """Normalise one tile (the nucleus pipeline's pre-processing step).

    Parameters
    ----------
    tile : (rows, cols, 3) array
        uint8, uint16 or float in [0, 1].
    normalizer : StainNormalizer
        A fitted normaliser.
    source : StainParams, optional
        Stain parameters of the slide the tile comes from (seamless tiles); when
        omitted they are measured on the tile.
    skip_blank : bool
        Only without ``source``: return a tile with too little tissue to measure
        unchanged (as uint8) instead of raising.

    Returns
    -------
    (rows, cols, 3) uint8
    """
    rgb, _ = as_rgb_uint8(tile, what="tile")
    if source is not None:
        return normalizer.transform(rgb, source=source, what="tile")
    try:
        src = normalizer.estimate(rgb, what="tile")
    except StainError as exc:
        if skip_blank and "too little tissue" in str(exc):
            logger.debug("tile left unnormalised: %s", exc)
            return rgb
        raise
    return normalizer.transform(rgb, source=src, what="tile")
