"""The stain normalisers by name: :func:`get_normalizer` and :func:`available_normalizers`."""

from __future__ import annotations

from typing import Any

from napari_pathoseg.errors import StainError
from napari_pathoseg.stain.base import StainNormalizer
from napari_pathoseg.stain.macenko import MacenkoNormalizer
from napari_pathoseg.stain.reinhard import ReinhardNormalizer
from napari_pathoseg.stain.vahadane import VahadaneNormalizer

__all__ = ["NORMALIZERS", "available_normalizers", "get_normalizer"]


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

