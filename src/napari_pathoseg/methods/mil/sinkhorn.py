"""Sinkhorn-Knopp re-solve of the pseudo-labels of positive-slide tiles (M4 step 2).

Given the teacher's predictions ``P`` (N tiles x 2 classes) over all positive-slide tiles (the
prediction bank) and the share ``K`` of positive tiles among them, find the pseudo-labels ``Y``
that minimise the cross-entropy to ``P`` subject to ``sum(Y[:, positive]) = K * N``. Relaxed to
soft labels this is an optimal-transport problem (Asano et al. 2020) whose solution is
``Q = diag(u) P**lambda diag(v)``, with ``u, v`` found by alternately scaling rows to 1 and
columns to ``N (1 - K), N K`` (:func:`sinkhorn`). :func:`hard_labels` rounds ``Q`` to labels that
meet the constraint exactly: the ``round(K N)`` tiles with the largest positive mass.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["hard_labels", "pseudo_labels", "sinkhorn"]


def sinkhorn(probs: torch.Tensor | np.ndarray, *, k: float, iters: int = 50, lam: float = 1.0,
             eps: float = 1e-8) -> torch.Tensor:
    """Transport plan of ``N`` tiles onto the two classes with class totals ``N (1-k), N k``.

    Parameters
    ----------
    probs : (N, 2) or (N,) tensor or array
        Class probabilities (an (N,) input is the positive probability).
    k : float
        Share of positive tiles, in (0, 1).
    iters : int
        Row/column scaling rounds.
    lam : float
        Sharpness: the plan starts from ``probs ** lam``.

    Returns
    -------
    (N, 2) float64 tensor
        Rows sum to 1; columns sum to ``N (1-k)`` and ``N k`` (to the accuracy reached in
        ``iters`` rounds; the last scaling is by rows).

    Examples
    --------
    >>> q = sinkhorn(torch.rand(100, 2), k=0.2)
    >>> round(float(q[:, 1].sum()))
    20
    """
    if not 0.0 < k < 1.0:
        raise ValueError(f"k must be in (0, 1), got {k}")
    p = torch.as_tensor(probs, dtype=torch.float64)
    if p.ndim == 1:
        p = torch.stack([1 - p, p], 1)
    n = p.shape[0]
    q = p.clamp_min(eps).pow(lam)
    q = q / q.sum()
    cols = torch.tensor([1.0 - k, k], dtype=torch.float64)
    for _ in range(max(1, iters)):
        q = q * (cols / q.sum(0).clamp_min(1e-300))
        q = q / (n * q.sum(1, keepdim=True).clamp_min(1e-300))
    return q * n


def hard_labels(q: torch.Tensor, *, k: float) -> torch.Tensor:
    """0/1 labels: the ``round(k N)`` tiles with the largest positive mass are 1 (exactly)."""
    n = q.shape[0]
    n_pos = int(round(k * n))
    y = torch.zeros(n, dtype=torch.long)
    if n_pos:
        y[torch.topk(q[:, 1], n_pos).indices] = 1
    return y


def pseudo_labels(bank: torch.Tensor, *, k: float, iters: int = 50, lam: float = 1.0) -> torch.Tensor:
    """Hard pseudo-labels of every tile of the bank (positive probabilities, (N,))."""
    return hard_labels(sinkhorn(bank, k=k, iters=iters, lam=lam), k=k)
