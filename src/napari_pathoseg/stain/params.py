"""Stain parameters measured on an image's tissue (:class:`StainParams`), with validation.

What each normalisation method measures (:data:`METHOD_FIELDS`): stain vectors and 99th
percentile concentrations for Macenko and Vahadane, CIE-Lab means and standard deviations for
Reinhard. :meth:`StainParams.from_dict` validates what a saved normaliser file holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from napari_pathoseg.errors import StainError

__all__ = ["METHOD_FIELDS", "StainParams"]

#: The :class:`StainParams` fields each method's parameters must have (method names in registry order).
METHOD_FIELDS: dict[str, tuple[str, ...]] = {
    "macenko": ("stain_matrix", "max_concentrations"),
    "vahadane": ("stain_matrix", "max_concentrations"),
    "reinhard": ("lab_mean", "lab_std"),
}


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
        if not isinstance(method, str) or method not in METHOD_FIELDS:
            raise StainError(f"{what}: unknown method {method!r}; valid: {', '.join(METHOD_FIELDS)}")
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
        required = METHOD_FIELDS[method]
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
