"""Macenko et al. (ISBI 2009) stain normalisation.

The two stain vectors are the extreme angles of the tissue optical densities projected on the
plane of their two main principal components; concentrations by least squares, scaled so that
their 99th percentiles match the target's. Same algorithm as torchstain's and StainTools'. With
both sides known the mapping is a fixed linear map in OD space, evaluated exactly with small
per-channel tables (:func:`napari_pathoseg.stain._lut.separable_tables`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_pathoseg.errors import StainError
from napari_pathoseg.stain._lut import ColourMap, separable_tables
from napari_pathoseg.stain.base import StainNormalizer, check_range
from napari_pathoseg.stain.params import METHOD_FIELDS, StainParams
from napari_pathoseg.stain.solvers import check_he_stains, macenko_stain_matrix, percentile99, tall_dot, tissue_od

__all__ = ["MacenkoNormalizer"]


class MacenkoNormalizer(StainNormalizer):
    """Macenko et al. (2009) stain normalisation.

    Parameters
    ----------
    io : float
        Background intensity for optical density, ``OD = -log((I + 1) / io)``; 240 as
        in Macenko's reference code (and torchstain).
    alpha : float
        Percentile of the angle distribution taken as each stain's extreme direction.
    percentile_over : {"tissue", "all"}
        Pixels whose concentrations give the 99th percentiles: the tissue only
        (default: independent of how much background the image has), or every pixel
        as in Macenko's reference code and torchstain (``"all"`` with
        ``max_samples=None`` reproduces torchstain's output to rounding).
    **kwargs
        ``beta``, ``max_samples``, ``min_tissue_pixels``, ``check_he``: see
        :class:`StainNormalizer`. A pixel is tissue when *every* channel's OD is at
        least ``beta`` (Macenko's rule).

    Examples
    --------
    >>> from napari_pathoseg.wsi.slide import open_slide, sample_slide_path
    >>> with open_slide(sample_slide_path()) as s:
    ...     ref = s.read_region(level=0, row=1920, col=768, height=512, width=512)
    ...     img = s.read_region(level=0, row=500, col=500, height=512, width=512)
    >>> norm = MacenkoNormalizer().fit(ref)
    >>> norm.transform(img).shape
    (512, 512, 3)
    """

    name = "macenko"
    REQUIRED = METHOD_FIELDS["macenko"]

    def __init__(
        self,
        *,
        io: float = 240.0,
        alpha: float = 1.0,
        percentile_over: str = "tissue",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.io = check_range("io", io, 1.0, 1e4)
        self.alpha = check_range("alpha", alpha, 0.0, 49.0)
        if percentile_over not in ("tissue", "all"):
            raise StainError(f"option percentile_over must be 'tissue' or 'all', got {percentile_over!r}")
        self.percentile_over = percentile_over

    def options(self) -> dict[str, Any]:
        return {**super().options(), "io": self.io, "alpha": self.alpha, "percentile_over": self.percentile_over}

    def estimate(self, image: Any, *, what: str = "image") -> StainParams:
        od, frac, od_all = tissue_od(
            image, io=self.io, beta=self.beta, rule="all", max_samples=self.max_samples,
            min_tissue_pixels=self.min_tissue_pixels, what=what,
        )
        he = macenko_stain_matrix(od, alpha=self.alpha)
        if self.check_he:
            check_he_stains(he, what=what)
        unmix = np.linalg.pinv(he).T  # (3, 2): least-squares concentrations
        conc = tall_dot(od if self.percentile_over == "tissue" else od_all, unmix)  # (N, 2)
        maxc = percentile99(conc, what=what)
        return StainParams(self.name, stain_matrix=he, max_concentrations=maxc, n_pixels=len(od), tissue_fraction=frac)

    def od_matrix(self, source: StainParams, target: StainParams | None = None) -> np.ndarray:
        """The (3, 3) matrix ``M`` of the mapping ``OD_out = OD_in @ M``.

        ``M = pinv(W_s)^T diag(P99_t / P99_s) W_t^T``: unmix with the source stain
        vectors, rescale the concentrations, remix with the target's.
        """
        target = target or self._require_target()
        scale = np.asarray(target.max_concentrations) / np.asarray(source.max_concentrations)
        return np.linalg.pinv(source.stain_matrix).T @ np.diag(scale) @ np.asarray(target.stain_matrix).T

    def _make_colour_map(self, source: StainParams, target: StainParams) -> ColourMap:
        m = self.od_matrix(source, target)
        return ColourMap(tables=separable_tables(m, io_in=self.io, io_out=self.io), offset=1.0, name="macenko")
