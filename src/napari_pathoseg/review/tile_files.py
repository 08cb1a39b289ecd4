"""Reading and writing a review project's files, with clear errors for damaged ones.

Every write goes through :mod:`napari_pathoseg._atomic` (a temporary file beside the
destination, fsync, then ``os.replace``), so a crash while saving leaves either the old or the
new version, never a damaged one; :func:`remove_temp_files` clears what a killed process left.
Reads turn a missing or damaged file into a
:class:`~napari_pathoseg.review.records.ReviewProjectError` that says what to do. The array
checks bring what is stored to its on-disk form (RGB uint8 tiles, uint16 labels 1..N).
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage.segmentation import relabel_sequential

from napari_pathoseg._atomic import TMP_SUFFIX, write_bytes
from napari_pathoseg.review.records import PROJECT_FILE, TILES_DIR, ReviewProjectError

__all__ = [
    "check_rgb",
    "png_bytes",
    "read_json",
    "read_png",
    "remove_temp_files",
    "to_uint16_labels",
    "write_json",
    "write_png",
]

logger = logging.getLogger(__name__)

#: Prefix of the temporary files projects held before the shared atomic writer (still cleaned).
LEGACY_TMP_PREFIX = ".tmp-"


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON (indent 1, no NaN) to ``path`` atomically, creating its folder."""
    write_bytes(path, json.dumps(obj, indent=1, allow_nan=False).encode("utf-8"), create_parent=True)


def write_png(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as a PNG to ``path`` atomically, creating its folder."""
    write_bytes(path, png_bytes(array), create_parent=True)


def remove_temp_files(root: Path) -> list[Path]:
    """Remove the temporary files a process killed while saving left in project ``root``.

    Returns the files removed (those of the atomic writer, ``.NAME.<random>.tmp-pathoseg``, and
    of older versions, ``.tmp-*``), in the project folder and its tile folders.
    """
    removed = []
    found: list[Path] = []
    for folder_glob in ("", f"{TILES_DIR}/*/"):
        found += root.glob(f"{folder_glob}{LEGACY_TMP_PREFIX}*")
        found += root.glob(f"{folder_glob}.*{TMP_SUFFIX}")
    for tmp in sorted(set(found)):
        try:
            tmp.unlink()
        except OSError:
            continue
        logger.info("removed leftover temporary file %s", tmp)
        removed.append(tmp)
    return removed


def png_bytes(array: np.ndarray) -> bytes:
    """``array`` (uint8 RGB, or uint8/uint16 grey) encoded as PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def read_json(path: Path) -> Any:
    """The JSON in ``path``; a missing or damaged file raises :class:`ReviewProjectError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReviewProjectError(
            f"{path} is missing: this folder is not a complete review project. Open the "
            f"project folder that contains {PROJECT_FILE}, or generate the pseudo-labels again."
        ) from None
    except OSError as exc:
        raise ReviewProjectError(f"Cannot read {path}: {exc}.") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReviewProjectError(
            f"{path} is damaged (not valid JSON: {exc.msg} at line {exc.lineno}); restore it "
            f"from a backup or generate the pseudo-labels again."
        ) from None


def read_png(path: Path) -> np.ndarray:
    """The pixels of a PNG; a missing or damaged file raises :class:`ReviewProjectError`."""
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im)
    except FileNotFoundError:
        raise ReviewProjectError(
            f"{path} is missing from the review project; restore it or generate the "
            f"pseudo-labels again."
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ReviewProjectError(
            f"{path} is damaged and cannot be read as PNG ({exc}); restore it or regenerate."
        ) from exc


def check_rgb(array: np.ndarray, name: str) -> np.ndarray:
    """``array`` as (H, W, 3) uint8 (floats in [0, 1] scaled by 255); ``name`` is for errors."""
    a = np.asarray(array)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ReviewProjectError(f"{name} must be an (H, W, 3) RGB array, got shape {a.shape}.")
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.size and a.max() <= 1.0:
            a = a * 255.0
        a = np.clip(np.round(a), 0, 255).astype(np.uint8)
    return a


def to_uint16_labels(labels: np.ndarray) -> np.ndarray:
    """Instance labels (or a boolean mask, labelled) as uint16 ``1..N`` consecutive."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ReviewProjectError(f"A mask must be a 2-D label image, got shape {labels.shape}.")
    if not np.issubdtype(labels.dtype, np.integer):
        if np.issubdtype(labels.dtype, np.bool_):
            labels = ndi.label(labels)[0]
        else:
            raise ReviewProjectError(f"A mask must hold integer labels, got dtype {labels.dtype}.")
    if labels.size and labels.min() < 0:
        raise ReviewProjectError("A mask must not hold negative labels.")
    seq = relabel_sequential(labels.astype(np.int64, copy=False))[0]
    if seq.size and seq.max() > np.iinfo(np.uint16).max:
        raise ReviewProjectError(f"A tile mask holds {seq.max()} nuclei; at most 65535 fit a uint16 PNG.")
    return seq.astype(np.uint16)
