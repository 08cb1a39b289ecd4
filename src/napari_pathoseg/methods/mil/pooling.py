"""From tile probabilities to one slide probability.

Three poolings (``POOLINGS``), compared on held-out mosaic slides in
``docs/model_card_slidecls.md``:

* ``"max"`` — the highest tile probability;
* ``"topk_mean"`` — the mean of the ``k`` highest (``k`` an int: that many tiles; a float in
  (0, 1): that share of the tiles, at least one);
* ``"share"`` — the share of tiles above ``threshold``, mapped to a probability by
  ``min(1, share / k)`` when ``k`` is a share in (0, 1] (``k`` then is the share of positive
  tiles that makes a slide certainly positive), else the plain share.

The default (``DEFAULT_POOLING``, ``DEFAULT_K``) is what the shipped model's card uses.
"""

from __future__ import annotations

import math

import numpy as np

from napari_pathoseg.errors import PathosegError

__all__ = ["DEFAULT_K", "DEFAULT_POOLING", "POOLINGS", "check_pooling", "pool"]

POOLINGS = ("max", "topk_mean", "share")
DEFAULT_POOLING = "topk_mean"
DEFAULT_K: int | float = 5


def check_pooling(method: str, k: float) -> None:
    """Refuse an unknown pooling or a ``k`` it cannot use (one line saying what to pass)."""
    if method not in POOLINGS:
        raise PathosegError(f"Unknown pooling {method!r}; use one of {', '.join(POOLINGS)}.")
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or k <= 0:
        raise PathosegError(f"pooling k must be a positive number (tiles, or a share in (0, 1)), got {k!r}.")


def pool(probs: np.ndarray, *, method: str = DEFAULT_POOLING, k: float = DEFAULT_K,
         threshold: float = 0.5) -> float:
    """Pool tile probabilities into a slide probability.

    Parameters
    ----------
    probs : array-like of float
        Positive probability of each tissue tile.
    method : {"max", "topk_mean", "share"}
    k : int or float
        ``topk_mean``: tiles (int >= 1) or a share of the tiles (float in (0, 1));
        ``share``: the share of tiles above ``threshold`` that maps to probability 1.
    threshold : float
        Tile threshold of ``share``.

    Returns
    -------
    float
        Slide probability in [0, 1].

    Raises
    ------
    PathosegError
        No tiles, an unknown method or a bad ``k``.

    Examples
    --------
    >>> pool([0.1, 0.9, 0.8], method="topk_mean", k=2)
    0.85
    """
    check_pooling(method, k)
    p = np.asarray(probs, np.float64).ravel()
    if p.size == 0:
        raise PathosegError("No tissue tiles to pool: the slide (or region) holds no tissue at the model's scale.")
    p = np.clip(np.nan_to_num(p, nan=0.0), 0.0, 1.0)
    if method == "max":
        return float(p.max())
    if method == "topk_mean":
        n = int(k) if k >= 1 else max(1, int(math.ceil(k * p.size)))
        n = min(n, p.size)
        return float(np.partition(p, p.size - n)[p.size - n:].mean())
    share = float((p > threshold).mean())
    return min(1.0, share / k) if k <= 1 else share
