"""The numerical core of stain normalisation: tissue optical densities and stain solvers.

* :func:`tissue_od`: optical densities of an image's tissue pixels (background below ``beta``).
* :func:`macenko_stain_matrix`: Macenko's stain vectors (extreme angles in the plane of the
  two main principal components of the tissue OD).
* :func:`sparse_nmf` and :func:`nn_lasso2`: Vahadane's sparse non-negative factorisation
  and its exact two-stain non-negative lasso.
* :func:`check_he_stains`: refuse stain vectors that cannot be haematoxylin and eosin.

The thin products of tall pixel matrices by tiny stain matrices avoid BLAS
(:func:`tall_dot`, :func:`gram`): multi-threaded BLAS stalls on them when the CPU is shared.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from napari_pathoseg.errors import StainError
from napari_pathoseg.stain._image import as_rgb_uint8, rgb_to_od, sample_pixels

__all__ = [
    "BLUE_GREEN_LIMIT",
    "RUIFROK_HE",
    "STAIN_NAMES",
    "check_he_stains",
    "gram",
    "macenko_stain_matrix",
    "nn_lasso2",
    "od_covariance",
    "percentile99",
    "sparse_nmf",
    "tall_dot",
    "tissue_od",
    "to_uint8",
]

logger = logging.getLogger(__name__)

#: Ruifrok & Johnston haematoxylin and eosin OD vectors (scikit-image ``rgb_from_hed``).
RUIFROK_HE = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]]).T  # (3, 2)
RUIFROK_HE = RUIFROK_HE / np.linalg.norm(RUIFROK_HE, axis=0)

STAIN_NAMES = ("hematoxylin", "eosin")
#: Largest blue/green OD ratio accepted for eosin (see :func:`check_he_stains`).
BLUE_GREEN_LIMIT = 1.25


def tissue_od(
    image: Any,
    *,
    io: float,
    beta: float,
    rule: str,
    max_samples: int | None,
    min_tissue_pixels: int,
    what: str,
) -> tuple[np.ndarray, float, np.ndarray]:
    """Optical densities of the tissue pixels of ``image``.

    ``rule="all"``: a pixel is tissue when every channel's OD is at least ``beta``
    (Macenko's rule); ``rule="any"``: when at least one is (keeps pale eosin).

    Returns
    -------
    od : (N, 3) float64
    fraction : float
        Tissue fraction of the examined pixels.
    od_all : (M, 3) float64
        Optical densities of all examined pixels.
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
    return od[keep], fraction, od


def tall_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for a tall ``(N, k)`` and a tiny ``(k, m)`` matrix, without BLAS.

    Multi-threaded BLAS stalls on such thin products when the CPU is shared (each
    call waits for a descheduled thread); k x m vector operations are cheap and steady.
    """
    b = np.asarray(b, dtype=a.dtype)
    out = np.empty((a.shape[0], b.shape[1]), a.dtype)
    for j in range(b.shape[1]):
        col = out[:, j]
        np.multiply(a[:, 0], b[0, j], out=col)
        for i in range(1, b.shape[0]):
            col += a[:, i] * b[i, j]
    return out


def gram(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a.T @ b`` for tall ``(N, k)``, ``(N, m)`` matrices (small result), without BLAS."""
    return np.einsum("ni,nj->ij", a, b)


def od_covariance(od: np.ndarray) -> np.ndarray:
    """Covariance of the columns of a tall ``(N, 3)`` matrix, without BLAS."""
    centred = od - od.mean(axis=0)
    return gram(centred, centred) / max(od.shape[0] - 1, 1)


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
    cov = od_covariance(od)
    if not np.all(np.isfinite(cov)):
        raise StainError("the tissue optical densities are not finite; the image is corrupt")
    _, vecs = np.linalg.eigh(cov)
    plane = vecs[:, 1:3]  # (3, 2): the two main principal directions
    # point both axes into the positive OD octant: angles then stay inside (-pi/2, pi/2)
    plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)
    proj = tall_dot(od, plane)
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
        second stain does not absorb mostly green light as eosin does: its red OD
        must not exceed its green OD, its blue OD not ``BLUE_GREEN_LIMIT`` times the
        green (DAB, fluorescence and photographs have 1.5-2; H&E at most ~1.1).
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
    if e[0] > e[1] or e[2] > BLUE_GREEN_LIMIT * e[1]:
        raise StainError(
            f"{what}: the second stain E={fmt(e)} (OD per R, G, B) absorbs mostly "
            f"{'red' if e[0] > e[1] else 'blue'} light; eosin absorbs green, so this does not "
            "look like an H&E image." + hint
        )


def nn_lasso2(od: np.ndarray, basis: np.ndarray, lam: float) -> np.ndarray:
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
    b = tall_dot(od, basis)  # (N, 2)
    b -= dt.type(lam)
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


def sparse_nmf(
    od: np.ndarray,
    *,
    lam: float,
    n_iter: int,
    init: np.ndarray,
    tol: float = 1e-5,
) -> np.ndarray:
    """Sparse non-negative factorisation ``od ~ C W^T`` (Vahadane's SNMF).

    Minimises ``0.5 ||od - C W^T||^2 + lam * sum(C)`` over ``C >= 0`` and ``W >= 0``
    with columns of norm at most 1, by alternating an exact two-atom non-negative
    lasso for ``C`` with a block-coordinate update of each column of ``W`` projected on
    the non-negative unit ball (the dictionary update of Mairal et al., 2010, which
    SPAMS' ``trainDL`` uses).

    Parameters
    ----------
    od : (N, 3) float
    lam : float
        L1 weight on the concentrations (sparsity: most pixels are mostly one stain).
    n_iter : int
    init : (3, 2) float
        Starting basis.
    tol : float
        Stop when no basis entry moves more than this.

    Returns
    -------
    (3, 2) float64
        Unit stain vectors (unordered).
    """
    w = np.asarray(init, np.float64).copy()
    for it in range(n_iter):
        c = nn_lasso2(od, w, lam)  # (N, 2)
        a = gram(c, c)  # (2, 2)
        b = gram(od, c)  # (3, 2)
        old = w.copy()
        for j in range(2):
            if a[j, j] <= 1e-12:
                raise StainError("the stain factorisation lost a stain; the image does not look like H&E")
            u = w[:, j] + (b[:, j] - w @ a[:, j]) / a[j, j]
            np.maximum(u, 0.0, out=u)
            w[:, j] = u / max(float(np.linalg.norm(u)), 1.0)
        if float(np.abs(w - old).max()) < tol:
            logger.debug("SNMF converged after %d iterations", it + 1)
            break
    norms = np.linalg.norm(w, axis=0)
    if np.any(norms < 1e-9):
        raise StainError("the stain factorisation lost a stain; the image does not look like H&E")
    return w / norms


def percentile99(conc: np.ndarray, *, what: str) -> np.ndarray:
    """99th percentile of each stain's concentrations; refuses a stain that is absent."""
    maxc = np.array([np.percentile(conc[:, k], 99) for k in range(conc.shape[1])])
    if np.any(~np.isfinite(maxc)) or np.any(maxc <= 1e-6):
        absent = [STAIN_NAMES[i] for i in range(2) if not (np.isfinite(maxc[i]) and maxc[i] > 1e-6)]
        raise StainError(
            f"{what}: no {' or '.join(absent)} found in the tissue (99th-percentile concentration "
            f"{np.round(maxc, 4).tolist()}); an H&E reference needs both stains"
        )
    return maxc


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Round float values into 0..255 uint8."""
    values = values + 0.5
    np.clip(values, 0.0, 255.0, out=values)
    return values.astype(np.uint8)
