"""Saving and loading fitted stain normalisers as small, validated JSON files.

The file (written atomically by :meth:`~napari_pathoseg.stain.base.StainNormalizer.save`)
holds ``format``, ``version``, the method, its options, the target's stain parameters and the
reference it was fitted to. Loading refuses large, non-JSON, other-format or malformed files
with a :class:`~napari_pathoseg.errors.StainError` naming the file and the problem.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from napari_pathoseg.errors import StainError
from napari_pathoseg.stain.base import FILE_FORMAT, FILE_VERSION, StainNormalizer
from napari_pathoseg.stain.params import StainParams
from napari_pathoseg.stain.registry import NORMALIZERS, get_normalizer

__all__ = ["MAX_FILE_BYTES", "load_normalizer", "normalizer_from_dict", "save_normalizer"]

#: Saved normaliser files larger than this are refused (they are a few hundred bytes).
MAX_FILE_BYTES = 1 << 20


def save_normalizer(normalizer: StainNormalizer, path: str | os.PathLike) -> Path:
    """Save a fitted normaliser as a small JSON file, atomically.

    The file holds the method, its options and the target's stain parameters; see
    :func:`load_normalizer`.

    Returns
    -------
    Path
    """
    if not isinstance(normalizer, StainNormalizer):
        raise StainError(f"expected a fitted stain normaliser, got {type(normalizer).__name__}")
    return normalizer.save(path)


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
    if not isinstance(method, str) or method not in NORMALIZERS:
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
    except (RecursionError, ValueError) as exc:  # absurdly nested JSON, numbers of thousands of digits
        kind = "nested too deeply" if isinstance(exc, RecursionError) else "an unreadable value"
        raise StainError(f"{path}: not a normaliser file (JSON {kind}); choose a normaliser .json saved by napari-pathoseg") from None
    return normalizer_from_dict(d, what=str(path))
