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
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from napari_pathoseg.errors import StainError
from napari_pathoseg.stain._image import as_rgb_uint8, rgb_to_od, sample_pixels
from napari_pathoseg.stain._lut import ColourMap, separable_tables

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
#: Largest blue/green OD ratio accepted for eosin (see :func:`check_he_stains`).
BLUE_GREEN_LIMIT = 1.25


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


def _tall_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
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


def _gram(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a.T @ b`` for tall ``(N, k)``, ``(N, m)`` matrices (small result), without BLAS."""
    return np.einsum("ni,nj->ij", a, b)


def _cov(od: np.ndarray) -> np.ndarray:
    """Covariance of the columns of a tall ``(N, 3)`` matrix, without BLAS."""
    centred = od - od.mean(axis=0)
    return _gram(centred, centred) / max(od.shape[0] - 1, 1)


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
    cov = _cov(od)
    if not np.all(np.isfinite(cov)):
        raise StainError("the tissue optical densities are not finite; the image is corrupt")
    _, vecs = np.linalg.eigh(cov)
    plane = vecs[:, 1:3]  # (3, 2): the two main principal directions
    # point both axes into the positive OD octant: angles then stay inside (-pi/2, pi/2)
    plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)
    proj = _tall_dot(od, plane)
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
    b = _tall_dot(od, basis)  # (N, 2)
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


def _sparse_nmf(
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
        c = _nn_lasso2(od, w, lam)  # (N, 2)
        a = _gram(c, c)  # (2, 2)
        b = _gram(od, c)  # (3, 2)
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


def _percentile99(conc: np.ndarray, *, what: str) -> np.ndarray:
    """99th percentile of each stain's concentrations; refuses a stain that is absent."""
    maxc = np.array([np.percentile(conc[:, k], 99) for k in range(conc.shape[1])])
    if np.any(~np.isfinite(maxc)) or np.any(maxc <= 1e-6):
        absent = [STAIN_NAMES[i] for i in range(2) if not (np.isfinite(maxc[i]) and maxc[i] > 1e-6)]
        raise StainError(
            f"{what}: no {' or '.join(absent)} found in the tissue (99th-percentile concentration "
            f"{np.round(maxc, 4).tolist()}); an H&E reference needs both stains"
        )
    return maxc


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Round float values into 0..255 uint8."""
    values = values + 0.5
    np.clip(values, 0.0, 255.0, out=values)
    return values.astype(np.uint8)


# ====================================================================== normalisers


class StainNormalizer(ABC):
    """Base class: fit to a target, estimate a source, map source colours onto the target.

    Parameters
    ----------
    beta : float
        Optical-density threshold separating tissue from background (0.15 = Macenko's).
    max_samples : int or None
        At most this many pixels (an even lattice over the image) are examined per
        estimate; None uses all.
    min_tissue_pixels : int
        Fewer tissue pixels than this make :meth:`estimate` raise :class:`StainError`.
    check_he : bool
        Refuse images whose stains do not look like H&E (:func:`check_he_stains`).

    Attributes
    ----------
    target : StainParams or None
        The fitted target, None until :meth:`fit` (or :meth:`set_target`).
    reference : str or None
        Where the target came from (file name, region), saved with the normaliser.
    """

    #: Registry name.
    name: ClassVar[str] = ""
    #: StainParams fields a fitted target must have.
    REQUIRED: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        *,
        beta: float = 0.15,
        max_samples: int | None = 1 << 18,
        min_tissue_pixels: int = 2500,
        check_he: bool = True,
    ) -> None:
        self.beta = _check_range("beta", beta, 0.0, 3.0)
        if max_samples is not None:
            max_samples = int(_check_range("max_samples", max_samples, 1000, 1e10))
        self.max_samples = max_samples
        self.min_tissue_pixels = int(_check_range("min_tissue_pixels", min_tissue_pixels, 10, 1e10))
        self.check_he = bool(check_he)
        self.target: StainParams | None = None
        self.reference: str | None = None
        self._maps: dict[int, tuple[StainParams, ColourMap]] = {}

    # ------------------------------------------------------------------ options
    def options(self) -> dict[str, Any]:
        """The constructor options (JSON-ready)."""
        return {
            "beta": self.beta,
            "max_samples": self.max_samples,
            "min_tissue_pixels": self.min_tissue_pixels,
            "check_he": self.check_he,
        }

    # ------------------------------------------------------------------ fitting
    @abstractmethod
    def estimate(self, image: Any, *, what: str = "image") -> StainParams:
        """Measure the stain parameters of an image's tissue.

        Parameters
        ----------
        image : (..., 3) or (..., 4) array
            RGB(A) pixels: an image ``(rows, cols, 3)`` or a pixel list ``(N, 3)``;
            uint8, uint16 or float in [0, 1]. Transparent pixels are ignored.
        what : str
            Name used in error messages.

        Returns
        -------
        StainParams

        Raises
        ------
        StainError
            Too little tissue, not H&E, or unusable input.
        """

    def fit(self, target: Any, *, what: str = "target image", reference: str | None = None) -> "StainNormalizer":
        """Fit to a target image (see :meth:`estimate`); returns ``self``."""
        self.set_target(self.estimate(target, what=what), reference=reference)
        return self

    def set_target(self, params: StainParams, *, reference: str | None = None) -> None:
        """Use already measured stain parameters as the target."""
        if not isinstance(params, StainParams) or params.method != self.name:
            got = getattr(params, "method", type(params).__name__)
            raise StainError(f"a {self.name} normaliser needs {self.name} stain parameters, got {got}")
        self.target = params
        self.reference = reference
        self._maps.clear()

    @property
    def is_fitted(self) -> bool:
        """Whether a target has been set."""
        return self.target is not None

    def _require_target(self) -> StainParams:
        if self.target is None:
            raise StainError(
                f"the {self.name} normaliser has no target yet: fit it to a reference image "
                "or load a saved normaliser first"
            )
        return self.target

    # ------------------------------------------------------------------ applying
    @abstractmethod
    def _make_colour_map(self, source: StainParams, target: StainParams) -> ColourMap:
        """The per-pixel mapping from ``source`` to ``target``."""

    def colour_map(self, source: StainParams) -> ColourMap:
        """The per-pixel colour mapping from ``source`` onto the target (cached).

        Use it to normalise many tiles of one slide with the same source parameters;
        :meth:`ColourMap.build_lut` makes every later call a table look-up.
        """
        target = self._require_target()
        if not isinstance(source, StainParams) or source.method != self.name:
            got = getattr(source, "method", type(source).__name__)
            raise StainError(f"a {self.name} normaliser needs {self.name} source parameters, got {got}")
        hit = self._maps.get(id(source))
        if hit is not None and hit[0] is source:
            return hit[1]
        cmap = self._make_colour_map(source, target)
        if len(self._maps) >= 4:
            self._maps.pop(next(iter(self._maps)))
        self._maps[id(source)] = (source, cmap)
        return cmap

    def transform(self, image: Any, *, source: StainParams | None = None, what: str = "image") -> np.ndarray:
        """Normalise an image onto the target's stain appearance.

        Parameters
        ----------
        image : (..., 3) or (..., 4) array
            uint8, uint16 or float in [0, 1]; an alpha channel is passed through.
        source : StainParams, optional
            The image's stain parameters, e.g. measured once for a whole slide with
            :func:`napari_pathoseg.stain.slide.estimate_slide_stain`. When omitted they
            are measured on ``image`` itself (needs enough tissue).
        what : str
            Name used in error messages.

        Returns
        -------
        (..., 3) or (..., 4) uint8
            Same spatial shape; 4 channels when the input had alpha.
        """
        self._require_target()
        rgb, alpha = as_rgb_uint8(image, what=what)
        if source is None:
            source = self.estimate(image, what=what)
        out = self.colour_map(source)(rgb)
        if alpha is not None:
            out = np.concatenate([out, alpha[..., None]], axis=-1)
        return out

    def __call__(self, image: Any) -> np.ndarray:
        """Same as :meth:`transform` with the image's own source parameters."""
        return self.transform(image)

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description: method, options and fitted target."""
        from napari_pathoseg import __version__

        return {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "method": self.name,
            "options": self.options(),
            "target": self._require_target().to_dict(),
            "reference": self.reference,
            "written_by": f"napari-pathoseg {__version__}",
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Save the fitted normaliser as JSON (see :func:`save_normalizer`)."""
        return save_normalizer(self, path)

    def __repr__(self) -> str:
        state = repr(self.target) if self.target is not None else "unfitted"
        return f"{type(self).__name__}({state})"


def _check_range(name: str, value: Any, lo: float, hi: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise StainError(f"option {name} must be a number, got {value!r}") from None
    if not (math.isfinite(v) and lo <= v <= hi):
        raise StainError(f"option {name}={value!r} is out of range [{lo:g}, {hi:g}]")
    return v


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
    REQUIRED = ("stain_matrix", "max_concentrations")

    def __init__(
        self,
        *,
        io: float = 240.0,
        alpha: float = 1.0,
        percentile_over: str = "tissue",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.io = _check_range("io", io, 1.0, 1e4)
        self.alpha = _check_range("alpha", alpha, 0.0, 49.0)
        if percentile_over not in ("tissue", "all"):
            raise StainError(f"option percentile_over must be 'tissue' or 'all', got {percentile_over!r}")
        self.percentile_over = percentile_over

    def options(self) -> dict[str, Any]:
        return {**super().options(), "io": self.io, "alpha": self.alpha, "percentile_over": self.percentile_over}

    def estimate(self, image: Any, *, what: str = "image") -> StainParams:
        od, frac, od_all = _tissue_od(
            image, io=self.io, beta=self.beta, rule="all", max_samples=self.max_samples,
            min_tissue_pixels=self.min_tissue_pixels, what=what,
        )
        he = macenko_stain_matrix(od, alpha=self.alpha)
        if self.check_he:
            check_he_stains(he, what=what)
        unmix = np.linalg.pinv(he).T  # (3, 2): least-squares concentrations
        conc = _tall_dot(od if self.percentile_over == "tissue" else od_all, unmix)  # (N, 2)
        maxc = _percentile99(conc, what=what)
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
    REQUIRED = ("stain_matrix", "max_concentrations")

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
        self.io = _check_range("io", io, 1.0, 1e4)
        self.lambda1 = _check_range("lambda1", lambda1, 0.0, 10.0)
        self.lambda_c = _check_range("lambda_c", lambda_c, 0.0, 10.0)
        self.n_iter = int(_check_range("n_iter", n_iter, 1, 10_000))
        self.fit_samples = int(_check_range("fit_samples", fit_samples, 100, 1e9))

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
        od, frac, _ = _tissue_od(
            image, io=self.io, beta=self.beta, rule="any", max_samples=self.max_samples,
            min_tissue_pixels=self.min_tissue_pixels, what=what,
        )
        fit_od = od
        if od.shape[0] > self.fit_samples:
            idx = np.random.default_rng(1).choice(od.shape[0], size=self.fit_samples, replace=False)
            fit_od = od[idx]
        try:
            w = _sparse_nmf(fit_od, lam=self.lambda1, n_iter=self.n_iter, init=RUIFROK_HE)
        except StainError as exc:
            raise StainError(f"{what}: {exc}") from None
        if w[0, 0] < w[0, 1]:  # haematoxylin first: the larger red absorbance
            w = w[:, ::-1].copy()
        if self.check_he:
            check_he_stains(w, what=what)
        conc = _nn_lasso2(od, w, self.lambda_c)
        maxc = _percentile99(conc, what=what)
        return StainParams(self.name, stain_matrix=w, max_concentrations=maxc, n_pixels=len(od), tissue_fraction=frac)

    def _make_colour_map(self, source: StainParams, target: StainParams) -> ColourMap:
        w_s = np.asarray(source.stain_matrix, np.float64)
        w_t = np.asarray(target.stain_matrix, np.float32)
        scale = (np.asarray(target.max_concentrations) / np.asarray(source.max_concentrations)).astype(np.float32)
        io, lam = self.io, self.lambda_c

        def vahadane_map(pixels: np.ndarray) -> np.ndarray:
            od = rgb_to_od(pixels, io=io, dtype=np.float32)  # (N, 3)
            conc = _nn_lasso2(od, w_s, lam)  # (N, 2)
            conc *= scale
            out = _tall_dot(conc, w_t.T)  # (N, 3) target optical density
            np.negative(out, out=out)
            np.exp(out, out=out)
            out *= io
            out -= 1.0
            return _to_uint8(out)

        return ColourMap(vahadane_map, name="vahadane")


class ReinhardNormalizer(StainNormalizer):
    """Reinhard et al. (2001) colour transfer in CIE-Lab.

    Each Lab channel of the image is shifted and scaled so that its mean and standard
    deviation over the tissue match the target's tissue. Simple and fast, but it
    moves all colours together (stains are not separated), so it suits images whose
    stain *proportions* are similar to the target's.

    Parameters
    ----------
    keep_background : bool
        Leave the background as it is: a pixel is not moved when its largest OD is
        below ``beta / 2`` (white or light grey glass), fully moved from ``1.5 * beta``
        on, and linearly in between.
        Plain Reinhard (False) tints a white background with the tissue's colour shift.
    **kwargs
        See :class:`StainNormalizer`. A pixel is tissue when any channel's OD
        (``-log((I + 1) / 256)``) is at least ``beta``; with ``check_he`` the
        Macenko stain vectors of the tissue must look like H&E.
    """

    name = "reinhard"
    REQUIRED = ("lab_mean", "lab_std")
    IO = 256.0

    def __init__(self, *, keep_background: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keep_background = bool(keep_background)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "keep_background": self.keep_background}

    def estimate(self, image: Any, *, what: str = "image") -> StainParams:
        from skimage.color import rgb2lab

        rgb, alpha = as_rgb_uint8(image, what=what)
        pixels = sample_pixels(rgb, max_samples=self.max_samples, alpha=alpha)
        if pixels.shape[0] == 0:
            raise StainError(f"{what}: every pixel is transparent (alpha = 0); there is no tissue to measure")
        od = rgb_to_od(pixels, io=self.IO)
        keep = (od >= self.beta).any(axis=1)
        n = int(keep.sum())
        frac = n / pixels.shape[0]
        if n < self.min_tissue_pixels:
            raise StainError(
                f"{what}: too little tissue to measure its colours: {n} of {pixels.shape[0]} pixels "
                f"({100 * frac:.1f}%) are stained (optical density >= {self.beta}), at least "
                f"{self.min_tissue_pixels} are needed. Choose a region with more tissue."
            )
        if self.check_he:
            check_he_stains(macenko_stain_matrix(od[keep]), what=what)
        lab = rgb2lab(pixels[keep][None]).reshape(-1, 3)
        mean, std = lab.mean(axis=0), lab.std(axis=0)
        if np.any(std < 0.1):
            raise StainError(
                f"{what}: the tissue colours hardly vary (Lab standard deviations "
                f"{np.round(std, 3).tolist()}); a greyscale or flat image cannot be normalised"
            )
        return StainParams(self.name, lab_mean=mean, lab_std=std, n_pixels=n, tissue_fraction=frac)

    def _make_colour_map(self, source: StainParams, target: StainParams) -> ColourMap:
        from skimage.color import lab2rgb, rgb2lab

        gain = np.asarray(target.lab_std) / np.asarray(source.lab_std)
        shift = np.asarray(target.lab_mean) - np.asarray(source.lab_mean) * gain
        keep_background, beta, io = self.keep_background, self.beta, self.IO

        def reinhard_map(pixels: np.ndarray) -> np.ndarray:
            lab = rgb2lab(pixels[None]).reshape(-1, 3)
            lab *= gain
            lab += shift
            np.clip(lab[:, 0], 0.0, 100.0, out=lab[:, 0])
            # keep Z >= 0 (the gamut edge scikit-image would clip, with a warning)
            np.minimum(lab[:, 2], 200.0 * (lab[:, 0] + 16.0) / 116.0, out=lab[:, 2])
            rgb = lab2rgb(lab[None]).reshape(-1, 3) * 255.0
            if keep_background:
                weight = np.clip(rgb_to_od(pixels, io=io).max(axis=1) / beta - 0.5, 0.0, 1.0)[:, None]
                rgb = pixels + weight * (rgb - pixels)
            return _to_uint8(rgb)

        return ColourMap(reinhard_map, name="reinhard")


# ====================================================================== registry


NORMALIZERS: dict[str, type[StainNormalizer]] = {
    "macenko": MacenkoNormalizer,
    "vahadane": VahadaneNormalizer,
    "reinhard": ReinhardNormalizer,
}


def available_normalizers() -> tuple[str, ...]:
    """Names accepted by :func:`get_normalizer`."""
    return tuple(NORMALIZERS)


def get_normalizer(name: str, **options: Any) -> StainNormalizer:
    """Create an unfitted normaliser by name.

    Parameters
    ----------
    name : {"macenko", "vahadane", "reinhard"}
        Case-insensitive.
    **options
        Keyword options of that normaliser's class.

    Raises
    ------
    StainError
        For an unknown name (the message lists the valid ones) or option.

    Examples
    --------
    >>> get_normalizer("Macenko")
    MacenkoNormalizer(unfitted)
    >>> get_normalizer("macenk")
    Traceback (most recent call last):
    ...
    napari_pathoseg.errors.StainError: unknown stain normalisation method 'macenk'; valid: macenko, vahadane, reinhard
    """
    key = str(name).strip().lower()
    if key not in NORMALIZERS:
        raise StainError(f"unknown stain normalisation method {name!r}; valid: {', '.join(NORMALIZERS)}")
    try:
        return NORMALIZERS[key](**options)
    except TypeError as exc:
        raise StainError(f"invalid option for the {key} normaliser: {exc}") from None


# ====================================================================== persistence


def save_normalizer(normalizer: StainNormalizer, path: str | os.PathLike) -> Path:
    """Save a fitted normaliser as a small JSON file, atomically.

    The file holds the method, its options and the target's stain parameters; see
    :func:`load_normalizer`.

    Returns
    -------
    Path
    """
    path = Path(path)
    text = json.dumps(normalizer.to_dict(), indent=2) + "\n"
    if not path.parent.is_dir():
        raise StainError(f"{path}: the folder {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise StainError(f"{path}: cannot write the normaliser file ({exc})") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    logger.info("saved %s normaliser to %s", normalizer.name, path)
    return path


def normalizer_from_dict(d: Any, *, what: str = "normaliser") -> StainNormalizer:
    """Rebuild a fitted normaliser from :meth:`StainNormalizer.to_dict` output (validated)."""
    if not isinstance(d, dict):
        raise StainError(f"{what}: expected a JSON object, got {type(d).__name__}")
    if d.get("format") != FILE_FORMAT:
        raise StainError(
            f"{what}: not a napari-pathoseg stain normaliser (format {d.get('format')!r}, "
            f"expected {FILE_FORMAT!r}); save one from the Stain dock or `pathoseg normalize "
            "--save-normalizer`"
        )
    version = d.get("version")
    if version != FILE_VERSION:
        raise StainError(f"{what}: file version {version!r} is not supported (this napari-pathoseg reads {FILE_VERSION})")
    method = d.get("method")
    if method not in NORMALIZERS:
        raise StainError(f"{what}: unknown method {method!r}; valid: {', '.join(NORMALIZERS)}")
    options = d.get("options", {})
    if not isinstance(options, dict):
        raise StainError(f"{what}: 'options' must be an object, got {type(options).__name__}")
    try:
        norm = get_normalizer(method, **options)
    except StainError as exc:
        raise StainError(f"{what}: {exc}") from None
    target = StainParams.from_dict(d.get("target"), what=f"{what}: target")
    if target.method != method:
        raise StainError(f"{what}: the target was measured by {target.method!r}, not {method!r}")
    ref = d.get("reference")
    norm.set_target(target, reference=str(ref) if ref is not None else None)
    return norm


def load_normalizer(path: str | os.PathLike) -> StainNormalizer:
    """Load a normaliser saved by :func:`save_normalizer`.

    Raises
    ------
    StainError
        When the file is missing, too large, not JSON, or does not hold valid
        normaliser fields; the message names the file and the problem.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise StainError(f"{path}: cannot read the normaliser file ({exc.strerror or exc})") from None
    if size > MAX_FILE_BYTES:
        raise StainError(f"{path}: {size} bytes is far too large for a normaliser file; is it the right file?")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise StainError(f"{path}: not a text (JSON) file; choose a normaliser .json saved by napari-pathoseg") from None
    except json.JSONDecodeError as exc:
        raise StainError(
            f"{path}: corrupted normaliser file, invalid JSON at line {exc.lineno}, column {exc.colno} "
            f"({exc.msg}); fit and save the normaliser again"
        ) from None
    return normalizer_from_dict(d, what=str(path))


# ====================================================================== tiles


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
