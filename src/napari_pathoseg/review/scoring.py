"""How sure the teacher is: per-pixel, per-tile and per-nucleus confidence.

M2 step S23 (methods.md): a tile's quality score is the mean over its pixels of the
confidence ``max(p, 1 - p)`` of the nucleus probability ``p``; tiles above a threshold are kept.

Examples
--------
>>> import numpy as np
>>> tile_score(np.array([[0.0, 1.0], [0.5, 0.9]]))
0.85
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from napari_pathoseg.review.records import ReviewProjectError

__all__ = ["confidence", "nucleus_confidences", "tile_score"]


def confidence(prob: np.ndarray) -> np.ndarray:
    """Per-pixel confidence ``max(p, 1 - p)`` of a nucleus probability map, as float32."""
    p = np.asarray(prob, dtype=np.float32)
    return np.maximum(p, 1.0 - p)


def tile_score(prob: np.ndarray) -> float:
    """Quality score of a tile: the mean over its pixels of ``max(p, 1 - p)``.

    Parameters
    ----------
    prob : (H, W) float array
        Nucleus probability in [0, 1].

    Returns
    -------
    float
        In [0.5, 1]; 1 means the teacher is certain of every pixel.

    Examples
    --------
    >>> tile_score(np.array([[0.0, 1.0], [0.5, 0.9]]))
    0.85
    """
    if np.asarray(prob).size == 0:
        raise ReviewProjectError("Cannot score an empty probability map.")
    return round(float(confidence(prob).mean(dtype=np.float64)), 6)


def nucleus_confidences(prob: np.ndarray, labels: np.ndarray) -> list[float]:
    """Per-nucleus confidence: the mean of ``max(p, 1 - p)`` over each nucleus.

    Parameters
    ----------
    prob : (H, W) float array
        Nucleus probability in [0, 1].
    labels : (H, W) int array
        Instance labels, 0 background, 1..N consecutive.

    Returns
    -------
    list of float
        Entry ``i`` is the confidence of label ``i + 1`` (N entries, rounded to 4
        decimals); a label with no pixels gets 0.
    """
    labels = np.asarray(labels)
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return []
    means = ndi.mean(confidence(prob), labels=labels, index=np.arange(1, n + 1))
    return [round(float(m), 4) if np.isfinite(m) else 0.0 for m in np.atleast_1d(means)]
