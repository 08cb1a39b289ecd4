"""The stain normaliser base class: fit to a target, estimate a source, map colours.

:class:`StainNormalizer` holds what every method shares: the tissue options, the fitted
target (:class:`~napari_pathoseg.stain.params.StainParams`), a small cache of colour maps
(:class:`~napari_pathoseg.stain._lut.ColourMap`) from source parameters onto the target, and
the JSON form of a fitted normaliser, saved atomically. The methods are in
:mod:`.macenko`, :mod:`.vahadane` and :mod:`.reinhard`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from napari_pathoseg._atomic import OutputError, write_text
from napari_pathoseg.errors import StainError
from napari_pathoseg.stain._image import as_rgb_uint8
from napari_pathoseg.stain._lut import ColourMap
from napari_pathoseg.stain.params import StainParams

__all__ = ["FILE_FORMAT", "FILE_VERSION", "StainNormalizer", "check_range"]

logger = logging.getLogger(__name__)

#: ``"format"`` value of saved normaliser files.
FILE_FORMAT = "napari-pathoseg-stain-normalizer"
#: Version of the saved file layout.
FILE_VERSION = 1


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
        self.beta = check_range("beta", beta, 0.0, 3.0)
        if max_samples is not None:
            max_samples = int(check_range("max_samples", max_samples, 1000, 1e10))
        self.max_samples = max_samples
        self.min_tissue_pixels = int(check_range("min_tissue_pixels", min_tissue_pixels, 10, 1e10))
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
        """Save the fitted normaliser as a small JSON file, atomically; returns ``path``.

        The file holds the method, its options and the target's stain parameters; load it
        with :func:`napari_pathoseg.stain.normalizers.load_normalizer`.

        Raises
        ------
        StainError
            The normaliser is not fitted, the folder does not exist, or the write fails.
        """
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if not path.parent.is_dir():
            raise StainError(f"{path}: the folder {path.parent} does not exist")
        try:
            write_text(path, text)
        except OutputError as exc:
            raise StainError(f"{path}: cannot write the normaliser file ({exc})") from exc
        logger.info("saved %s normaliser to %s", self.name, path)
        return path

    def __repr__(self) -> str:
        state = repr(self.target) if self.target is not None else "unfitted"
        return f"{type(self).__name__}({state})"


def check_range(name: str, value: Any, lo: float, hi: float) -> float:
    """``value`` as a float in ``[lo, hi]``; a :class:`StainError` naming option ``name`` otherwise."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise StainError(f"option {name} must be a number, got {value!r}") from None
    if not (math.isfinite(v) and lo <= v <= hi):
        raise StainError(f"option {name}={value!r} is out of range [{lo:g}, {hi:g}]")
    return v
