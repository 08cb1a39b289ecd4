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
sides known every method is a fixed per-pixel colour function, applied through an exact
256³ colour table for large images (see :mod:`napari_pathoseg.stain._lut`).

A fitted normaliser saves to a small JSON file (:func:`save_normalizer`) and loads back
(:func:`load_normalizer`) with validation.

Examples
--------
>>> from napari_pathoseg.stain import get_normalizer
>>> norm = get_normalizer("macenko").fit(reference)          # doctest: +SKIP
>>> out = norm.transform(image)                               # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import StainError
from ._image import as_rgb_uint8, rgb_to_od, sample_pixels
from ._lut import ColourMap, separable_tables

__all__ = [
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

#: ``"format"`` value of saved normaliser files.
FILE_FORMAT = "napari-pathoseg-stain-normalizer"
#: Version of the saved file layout.
FILE_VERSION = 1
#: Saved normaliser files larger than this are refused (they are a few hundred bytes).
MAX_FILE_BYTES = 1 << 20

#: Ruifrok & Johnston haematoxylin and eosin OD vectors (scikit-image ``rgb_from_hed``).
RUIFROK_HE = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]]).T  # (3, 2)
RUIFROK_HE = RUIFROK_HE / np.linalg.norm(RUIFROK_HE, axis=0)

STAIN_NAMES = ("hematoxylin", "eosin")


# ====================================================================== parameters


@dataclass(frozen=True, eq=False)
class StainParams:
    """Stain parameters measured on the tissue of an image (or a slide).

    Attributes
    ----------
    method : str
        The normaliser that measured them.
    stain_matrix : (3, 2) float ndarray or None
        Unit OD vectors of haematoxylin (column 0) and eosin (column 1), RGB rows
        (Macenko, Vahadane).
    max_concentrations : (2,) float ndarray or None
        99th percentile of the H and E concentrations (Macenko, Vahadane).
    lab_mean, lab_std : (3,) float ndarray or None
        Mean and standard deviation of L*, a*, b* over the tissue (Reinhard).
    n_pixels : int
        Tissue pixels the estimate used.
    tissue_fraction : float
        Fraction of the examined pixels that were tissue.
    """

    method: str
    stain_matrix: np.ndarray | None = None
    max_concentrations: np.ndarray | None = None
    lab_mean: np.ndarray | None = None
    lab_std: np.ndarray | None = None
    n_pixels: int = 0
    tissue_fraction: float = 1.0

    _ARRAYS: ClassVar[dict[str, tuple[int, ...]]] = {
        "stain_matrix": (3, 2),
        "max_concentrations": (2,),
        "lab_mean": (3,),
        "lab_std": (3,),
    }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (arrays as nested lists)."""
        d: dict[str, Any] = {"method": self.method}
        for key in self._ARRAYS:
            val = getattr(self, key)
            if val is not None:
                d[key] = np.asarray(val, np.float64).tolist()
        d["n_pixels"] = int(self.n_pixels)
        d["tissue_fraction"] = float(self.tissue_fraction)
        return d

    @classmethod
    def from_dict(cls, d: Any, *, what: str = "stain parameters") -> "StainParams":
        """Build from :meth:`to_dict` output, validating shapes and values.

        Raises
        ------
        StainError
            When a field is missing, has the wrong shape, or holds non-finite values.
        """
        if not isinstance(d, dict):
            raise StainError(f"{what}: expected an object with the stain parameters, got {type(d).__name__}")
        method = d.get("method")
        if method not in NORMALIZERS:
            raise StainError(f"{what}: unknown method {method!r}; valid: {', '.join(NORMALIZERS)}")
        arrays: dict[str, np.ndarray | None] = {}
        for key, shape in cls._ARRAYS.items():
            if key not in d or d[key] is None:
                arrays[key] = None
                continue
            try:
                arr = np.asarray(d[key], dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise StainError(f"{what}: {key!r} must be numbers of shape {shape}: {exc}") from exc
            if arr.shape != shape:
                raise StainError(f"{what}: {key!r} must have shape {shape}, got {arr.shape}")
            if not np.all(np.isfinite(arr)):
                raise StainError(f"{what}: {key!r} holds NaN or infinite values")
            arrays[key] = arr
        required = NORMALIZERS[method].REQUIRED
        missing = [k for k in required if arrays.get(k) is None]
        if missing:
            raise StainError(f"{what}: a {method} normaliser needs {', '.join(missing)}")
        if arrays["stain_matrix"] is not None:
            norms = np.linalg.norm(arrays["stain_matrix"], axis=0)
            if np.any(norms < 1e-6):
                raise StainError(f"{what}: 'stain_matrix' has a zero stain vector")
            arrays["stain_matrix"] = arrays["stain_matrix"] / norms
        for key in ("max_concentrations", "lab_std"):
            if arrays[key] is not None and np.any(arrays[key] <= 0):
                raise StainError(f"{what}: {key!r} must be positive, got {arrays[key].tolist()}")
        try:
            n_pixels = int(d.get("n_pixels", 0))
            frac = float(d.get("tissue_fraction", 1.0))
        except (TypeError, ValueError) as exc:
            raise StainError(f"{what}: 'n_pixels'/'tissue_fraction' must be numbers: {exc}") from exc
        return cls(method=method, n_pixels=n_pixels, tissue_fraction=frac, **arrays)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        parts = [f"method={self.method!r}"]
        for key in self._ARRAYS:
            val = getattr(self, key)
            if val is not None:
                parts.append(f"{key}={np.round(val, 4).tolist()}")
        parts.append(f"n_pixels={self.n_pixels}")
        return f"StainParams({', '.join(parts)})"


# ====================================================================== shared maths


def _tissue_od(
    image: Any,
    *,
    io: float,
    beta: float,
    rule: str,
    max_samples: int | None,
    min_tissue_pixels: int,
    what: str,
) -> tuple[np.ndarray, float]:
    """Optical densities of the tissue pixels of ``image``.

    ``rule="all"``: a pixel is tissue when every channel's OD is at least ``beta``
    (Macenko's rule); ``rule="any"``: when at least one is (keeps pale eosin).

    Returns
    -------
    od : (N, 3) float64
    fraction : float
        Tissue fraction of the examined pixels.
    """
    rgb, alpha = as_rgb_uint8(image, what=what)
    pixels = sample_pixels(rgb, max_samples=max_samples, alpha=alpha)
    if pixels.shape[0] == 0:
        raise StainError(f"{what}: every pixel is transparent (alpha = 0); there is no tissue to measure")
    od = rgb_to_od(pixels, io=io)
    keep = (od >= beta).all(axis=1) if rule == "all" else (od >= beta).any(axis=1)
    n = int(keep.sum())
    fraction = n / pixels.shape[0]
    if n < min_tissue_pixels:
        raise StainError(
            f"{what}: too little tissue to estimate the stains: {n} of {pixels.shape[0]} pixels "
            f"({100 * fraction:.1f}%) are stained (optical density >= {beta}), at least "
            f"{min_tissue_pixels} are needed. Choose a region with more tissue (this one looks "
            "blank or background)."
        )
    return od[keep], fraction


def macenko_stain_matrix(od: np.ndarray, *, alpha: float = 1.0) -> np.ndarray:
    """Macenko's stain vectors of tissue optical densities.

    Parameters
    ----------
    od : (N, 3) float
        Optical densities of tissue pixels.
    alpha : float
        Percentile (of the angle distribution) taken as each extreme, robust to outliers.

    Returns
    -------
    (3, 2) float64
        Unit OD vectors, haematoxylin first (the one with the larger red component).
    """
    cov = np.cov(od, rowvar=False)
    if not np.all(np.isfinite(cov)):
        raise StainError("the tissue optical densities are not finite; the image is corrupt")
    _, vecs = np.linalg.eigh(cov)
    plane = vecs[:, 1:3]  # (3, 2): the two main principal directions
    # point both axes into the positive OD octant: angles then stay inside (-pi/2, pi/2)
    plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100.0 - alpha])
    v_lo = plane @ np.array([math.cos(lo), math.sin(lo)])
    v_hi = plane @ np.array([math.cos(hi), math.sin(hi)])
    he = np.stack([v_lo, v_hi], axis=1) if v_lo[0] > v_hi[0] else np.stack([v_hi, v_lo], axis=1)
    return he / np.linalg.norm(he, axis=0)


def check_he_stains(stain_matrix: np.ndarray, *, what: str = "image") -> None:
    """Refuse stain vectors that cannot be haematoxylin and eosin.

    Parameters
    ----------
    stain_matrix : (3, 2)
        Unit OD vectors, haematoxylin then eosin.

    Raises
    ------
    StainError
        When a vector has clearly negative absorbance, when the two stains are
        (nearly) the same colour (a greyscale or single-stain image), or when the
        second stain does not absorb mostly green light as eosin does (IHC/DAB,
        fluorescence, photographs).
    """
    h, e = stain_matrix[:, 0], stain_matrix[:, 1]
    hint = (
        " Is this a brightfield H&E image? For IHC use the colour deconvolution layers "
        "instead; to force a fit anyway, pass check_he=False."
    )
    fmt = lambda v: "[" + ", ".join(f"{x:.2f}" for x in v) + "]"  # noqa: E731
    if stain_matrix.min() < -0.1:
        raise StainError(
            f"{what}: the estimated stain vectors H={fmt(h)}, E={fmt(e)} (OD per R, G, B) have "
            "negative absorbance; this does not look like an H&E image (fluorescence or noise?)." + hint
        )
    cos = float(np.clip(h @ e, -1.0, 1.0))
    angle = math.degrees(math.acos(cos))
    if angle < 3.0:
        raise StainError(
            f"{what}: the two estimated stains have the same colour (angle {angle:.1f} degrees); "
            "the image looks greyscale or stained with a single dye, not H&E." + hint
        )
    if not (e[1] >= e[0] and e[1] >= e[2]):
        raise StainError(
            f"{what}: the second stain E={fmt(e)} (OD per R, G, B) absorbs mostly "
            f"{'red' if e[0] > e[2] else 'blue'} light; eosin absorbs green, so this does not "
            "look like an H&E image." + hint
        )


def _nn_lasso2(od: np.ndarray, basis: np.ndarray, lam: float) -> np.ndarray:
    """Exact non-negative lasso with two atoms, vectorised over pixels.

    Solves ``min_c 0.5 ||od_i - basis c||^2 + lam * sum(c)`` with ``c >= 0`` for every
    row ``od_i``, by comparing the optimum of each possible support.

    Parameters
    ----------
    od : (N, 3) float
    basis : (3, 2) float
    lam : float

    Returns
    -------
    (N, 2) float, same dtype as ``od``
    """
    dt = od.dtype
    g = basis.T @ basis  # (2, 2)
    b = od @ basis.astype(dt) - dt.type(lam)  # (N, 2)
    b0, b1 = b[:, 0], b[:, 1]
    g00, g01, g11 = float(g[0, 0]), float(g[0, 1]), float(g[1, 1])
    det = g00 * g11 - g01 * g01
    c = np.zeros_like(b)
    best = np.zeros(b.shape[0], dt)  # objective of c = 0
    # one stain only
    s0 = np.maximum(b0, 0) / g00
    f0 = -0.5 * g00 * s0 * s0
    m = f0 < best
    c[m, 0] = s0[m]
    best = np.where(m, f0, best)
    s1 = np.maximum(b1, 0) / g11
    f1 = -0.5 * g11 * s1 * s1
    m = f1 < best
    c[m, 0] = 0
    c[m, 1] = s1[m]
    best = np.where(m, f1, best)
    # both stains
    if det > 1e-12:
        p0 = (g11 * b0 - g01 * b1) / det
        p1 = (g00 * b1 - g01 * b0) / det
        fb = -0.5 * (b0 * p0 + b1 * p1)
        m = (p0 > 0) & (p1 > 0) & (fb < best)
        c[m, 0] = p0[m]
        c[m, 1] = p1[m]
    return c


def _sparse_nmf(
    od: np.ndarray,
    *,
    lam: float,
    n_iter: int,
    init: np.ndarray,
    tol: float = 1e-6,
) -> np.ndarray:
    """Sparse non-negative factorisation ``od ~ C W^T`` (Vahadane's SNMF).

    Alternates an exact two-atom non-negative lasso for the concentrations ``C`` with a
    non-negative least-squares update of the stain basis ``W`` (unit columns).

    Parameters
    ----------
    od : (N, 3) float
    lam : float
        L1 weight on the concentrations (sparsity: most pixels are mostly one stain).
    n_iter : int
    init : (3, 2) float
        Starting basis.

    Returns
    -------
    (3, 2) float64
        Unit stain vectors (unordered).
    """
    w = np.asarray(init, np.float64).copy()
    for it in range(n_iter):
        c = _nn_lasso2(od, w, lam)
        a = c.T @ c  # (2, 2)
        if np.linalg.matrix_rank(a) < 2:
            raise StainError("the stain factorisation collapsed to a single stain; the image does not look like H&E")
        rhs = c.T @ od  # (2, 3): each column is an independent 2-variable NNLS
        new = _nnls2_normal(a, rhs)  # (3, 2)
        norms = np.linalg.norm(new, axis=0)
        if np.any(norms < 1e-9):
            raise StainError("the stain factorisation lost a stain; the image does not look like H&E")
        new = new / norms
        delta = float(np.abs(new - w).max())
        w = new
        if delta < tol:
            logger.debug("SNMF converged after %d iterations", it + 1)
            break
    return w


def _nnls2_normal(a: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve ``min_w w^T a w / 2 - rhs_j . w`` with ``w >= 0`` for each column j of ``rhs``.

    Parameters
    ----------
    a : (2, 2) symmetric positive definite
    rhs : (2, K)

    Returns
    -------
    (K, 2) float64
        Row ``j`` solves column ``j`` (for the basis update, K = 3 colour channels).
    """
    out = np.zeros((rhs.shape[1], 2))
    a00, a01, a11 = a[0, 0], a[0, 1], a[1, 1]
    det = a00 * a11 - a01 * a01
    for j in range(rhs.shape[1]):
        r0, r1 = rhs[0, j], rhs[1, j]
        cands = [np.zeros(2)]
        if a00 > 0:
            cands.append(np.array([max(r0, 0) / a00, 0.0]))
        if a11 > 0:
            cands.append(np.array([0.0, max(r1, 0) / a11]))
        if det > 1e-12:
            p = np.array([(a11 * r0 - a01 * r1) / det, (a00 * r1 - a01 * r0) / det])
            if np.all(p > 0):
                cands.append(p)
        objective = [0.5 * c @ a @ c - (r0 * c[0] + r1 * c[1]) for c in cands]
        out[j] = cands[int(np.argmin(objective))]
    return out
