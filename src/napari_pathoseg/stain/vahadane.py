"""Vahadane et al. (IEEE TMI 2016) structure-preserving stain normalisation.

The stain basis ``W`` and non-negative concentrations ``H`` come from a sparse non-negative
factorisation of the tissue OD, ``V ~ W H`` with an L1 penalty on ``H``
(:func:`~napari_pathoseg.stain.solvers.sparse_nmf`); the image is rebuilt as
``V = (P99(H_target) / P99(H_source)) W_target H_source`` and ``I = I_0 exp(-V)`` (the M3
pre-processing of ``methods.md``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_pathoseg.errors import StainError
from napari_pathoseg.stain._image import rgb_to_od
from napari_pathoseg.stain._lut import ColourMap
from napari_pathoseg.stain.base import StainNormalizer, check_range
from napari_pathoseg.stain.params import METHOD_FIELDS, StainParams
from napari_pathoseg.stain.solvers import (
    RUIFROK_HE,
    check_he_stains,
    nn_lasso2,
    percentile99,
    sparse_nmf,
    tall_dot,
    tissue_od,
    to_uint8,
)

__all__ = ["VahadaneNormalizer"]


class VahadaneNormalizer(StainNormalizer):
    """Vahadane et al. (2016) structure-preserving stain normalisation.

    The stain basis comes from a sparse non-negative factorisation of the tissue optical
    density (alternating an exact non-negative lasso for the concentrations with a
    non-negative least-squares basis update, started from the Ruifrok H&E vectors);
    concentrations are non-negative and sparse. The image is rebuilt with the target
    basis and concentrations rescaled by the ratio of 99th percentiles, then converted
    back with the inverse Beer-Lambert law (M3 in ``methods.md``).

    Parameters
    ----------
    io : float
        Background intensity (``OD = -log((I + 1) / io)``); 256 maps white to zero OD,
        so that the non-negative concentrations keep the background white.
    lambda1 : float
        Sparsity weight of the factorisation (0.1, as StainTools' dictionary learning).
    lambda_c : float
        Sparsity weight when computing concentrations (0.01, as StainTools).
    n_iter : int
        Maximum factorisation iterations.
    fit_samples : int
        Tissue pixels used to learn the basis (drawn at random, seeded).
    **kwargs
        See :class:`StainNormalizer`. A pixel is tissue when any channel's OD is at
        least ``beta``.
    """

    name = "vahadane"
    REQUIRED = METHOD_FIELDS["vahadane"]

    def __init__(
        self,
        *,
        io: float = 256.0,
        lambda1: float = 0.1,
        lambda_c: float = 0.01,
        n_iter: int = 100,
        fit_samples: int = 65_536,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.io = check_range("io", io, 1.0, 1e4)
        self.lambda1 = check_range("lambda1", lambda1, 0.0, 10.0)
        self.lambda_c = check_range("lambda_c", lambda_c, 0.0, 10.0)
        self.n_iter = int(check_range("n_iter", n_iter, 1, 10_000))
        self.fit_samples = int(check_range("fit_samples", fit_samples, 100, 1e9))

    def options(self) -> dict[str, Any]:
        return {
            **super().options(),
            "io": self.io,
            "lambda1": self.lambda1,
            "lambda_c": self.lambda_c,
            "n_iter": self.n_iter,
            "fit_samples": self.fit_samples,
        }

    def estimate(self, image: Any, *, what: str = "image") -> StainParams:
        od, frac, _ = tissue_od(
            image, io=self.io, beta=self.beta, rule="any", max_samples=self.max_samples,
            min_tissue_pixels=self.min_tissue_pixels, what=what,
        )
        fit_od = od
        if od.shape[0] > self.fit_samples:
            idx = np.random.default_rng(1).choice(od.shape[0], size=self.fit_samples, replace=False)
            fit_od = od[idx]
        try:
            w = sparse_nmf(fit_od, lam=self.lambda1, n_iter=self.n_iter, init=RUIFROK_HE)
        except StainError as exc:
            raise StainError(f"{what}: {exc}") from None
        if w[0, 0] < w[0, 1]:  # haematoxylin first: the larger red absorbance
            w = w[:, ::-1].copy()
        if self.check_he:
            check_he_stains(w, what=what)
        conc = nn_lasso2(od, w, self.lambda_c)
        maxc = percentile99(conc, what=what)
        return StainParams(self.name, stain_matrix=w, max_concentrations=maxc, n_pixels=len(od), tissue_fraction=frac)

    def _make_colour_map(self, source: StainParams, target: StainParams) -> ColourMap:
        w_s = np.asarray(source.stain_matrix, np.float64)
        w_t = np.asarray(target.stain_matrix, np.float32)
        scale = (np.asarray(target.max_concentrations) / np.asarray(source.max_concentrations)).astype(np.float32)
        io, lam = self.io, self.lambda_c

        def vahadane_map(pixels: np.ndarray) -> np.ndarray:
            od = rgb_to_od(pixels, io=io, dtype=np.float32)  # (N, 3)
            conc = nn_lasso2(od, w_s, lam)  # (N, 2)
            conc *= scale
            out = tall_dot(conc, w_t.T)  # (N, 3) target optical density
            np.negative(out, out=out)
            np.exp(out, out=out)
            out *= io
            out -= 1.0
            return to_uint8(out)

        return ColourMap(vahadane_map, name="vahadane")
