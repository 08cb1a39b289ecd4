"""Segmentation and normalisation metrics.

Instance metrics take two (H, W) integer label images (0 = background,
every other value one object; ids need not be consecutive):

* :func:`object_f1` -- objects matched one-to-one at IoU > ``iou`` (0.5),
  ``F1 = 2 TP / (2 TP + FP + FN)``.
* :func:`dice` -- Dice of the foregrounds ``2|G & P| / (|G| + |P|)``.
* :func:`miou` -- mean over the two classes (background, nucleus) of the
  pixel IoU.
* :func:`aji` -- Aggregated Jaccard Index (Kumar et al. 2017): every ground
  truth object is paired with the prediction of highest IoU; ``C`` sums the
  intersections, ``U`` the unions, and predictions never paired add their
  area to ``U``; ``AJI = C / U``.
* :func:`aji_plus` -- AJI+ (Graham et al. 2019): the same, but the pairing is
  one-to-one (maximum total IoU, Hungarian), so a prediction is not counted
  twice.
* :func:`pq` -- panoptic quality: ``DQ = TP / (TP + FP/2 + FN/2)`` at IoU >
  0.5, ``SQ`` = mean IoU of the matched pairs, ``PQ = DQ * SQ``.

Normalisation metrics (:func:`mae`, :func:`rmse`, :func:`ssim`) take two RGB
images (H, W, 3), uint8 or float in [0, 1]; they are computed in [0, 1].
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix

from napari_pathoseg.errors import PathosegError

__all__ = [
    "MetricError",
    "pairwise_overlap",
    "object_f1",
    "dice",
    "miou",
    "aji",
    "aji_plus",
    "pq",
    "mae",
    "rmse",
    "ssim",
    "instance_metrics",
    "roc_auc",
]


class MetricError(PathosegError):
    """Metric inputs do not fit together (shape, dimensionality)."""


def _labels(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.ndim != 2 or pred.ndim != 2:
        raise MetricError(f"Label images must be 2-D (H, W); got {gt.shape} and {pred.shape}.")
    if gt.shape != pred.shape:
        raise MetricError(f"Ground truth {gt.shape} and prediction {pred.shape} differ in shape.")
    return gt.astype(np.int64, copy=False), pred.astype(np.int64, copy=False)


def pairwise_overlap(gt: np.ndarray, pred: np.ndarray):
    """Intersections, areas and IoUs between all ground-truth and predicted objects.

    Returns
    -------
    inter : (G, P) int64 ndarray
        Pixels shared by ground truth object ``i`` and prediction ``j``.
    area_gt : (G,) int64 ndarray
    area_pred : (P,) int64 ndarray
    iou : (G, P) float64 ndarray
    """
    gt, pred = _labels(gt, pred)
    gi, g = np.unique(gt, return_inverse=True)
    pi, p = np.unique(pred, return_inverse=True)
    g = g.ravel()
    p = p.ravel()
    # drop the background index (value 0) if present
    g_off = 1 if gi.size and gi[0] == 0 else 0
    p_off = 1 if pi.size and pi[0] == 0 else 0
    n_g, n_p = gi.size - g_off, pi.size - p_off
    area_gt = np.bincount(g, minlength=gi.size)[g_off:].astype(np.int64)
    area_pred = np.bincount(p, minlength=pi.size)[p_off:].astype(np.int64)
    both = (g >= g_off) & (p >= p_off)
    if g_off:
        both &= gt.ravel() != 0
    if p_off:
        both &= pred.ravel() != 0
    m = coo_matrix(
        (np.ones(int(both.sum()), np.int64), (g[both] - g_off, p[both] - p_off)), shape=(n_g, n_p)
    )
    inter = m.toarray()
    union = area_gt[:, None] + area_pred[None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    return inter, area_gt, area_pred, iou


def _match(iou: np.ndarray, thr: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one pairs with IoU > thr (unique for thr >= 0.5; Hungarian otherwise)."""
    if iou.size == 0:
        return np.zeros(0, int), np.zeros(0, int)
    if thr >= 0.5:
        gi, pi = np.nonzero(iou > thr)
        return gi, pi
    gi, pi = linear_sum_assignment(-iou)
    keep = iou[gi, pi] > thr
    return gi[keep], pi[keep]


def object_f1(gt: np.ndarray, pred: np.ndarray, iou: float = 0.5) -> float:
    """Object-level F1 with one-to-one matches at IoU > ``iou``.

    >>> a = np.zeros((4, 4), int); a[:2, :2] = 1
    >>> object_f1(a, a)
    1.0
    """
    _, ag, ap, m = pairwise_overlap(gt, pred)
    if ag.size == 0 and ap.size == 0:
        return 1.0
    tp = len(_match(m, iou)[0])
    fp = ap.size - tp
    fn = ag.size - tp
    return float(2 * tp / max(1, 2 * tp + fp + fn))


def dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """Dice of the foregrounds (label > 0); 1.0 when both are empty."""
    gt, pred = _labels(gt, pred)
    g = gt > 0
    p = pred > 0
    s = g.sum() + p.sum()
    return 1.0 if s == 0 else float(2 * (g & p).sum() / s)


def miou(gt: np.ndarray, pred: np.ndarray) -> float:
    """Mean of the background and nucleus pixel IoUs (classes absent from both are skipped)."""
    gt, pred = _labels(gt, pred)
    g = gt > 0
    p = pred > 0
    ious = []
    for a, b in ((g, p), (~g, ~p)):
        u = (a | b).sum()
        if u:
            ious.append((a & b).sum() / u)
    return float(np.mean(ious)) if ious else 1.0


def aji(gt: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017); 1.0 when both are empty."""
    inter, ag, ap, iou = pairwise_overlap(gt, pred)
    if ag.size == 0:
        return 1.0 if ap.size == 0 else 0.0
    c = 0
    u = 0
    used = np.zeros(ap.size, bool)
    for i in range(ag.size):
        if ap.size and iou[i].max() > 0:
            j = int(np.argmax(iou[i]))
            c += inter[i, j]
            u += ag[i] + ap[j] - inter[i, j]
            used[j] = True
        else:
            u += ag[i]
    u += ap[~used].sum()
    return float(c / u) if u else 1.0


def aji_plus(gt: np.ndarray, pred: np.ndarray) -> float:
    """AJI+ : AJI with a one-to-one (Hungarian, max total IoU) pairing."""
    inter, ag, ap, iou = pairwise_overlap(gt, pred)
    if ag.size == 0:
        return 1.0 if ap.size == 0 else 0.0
    gi, pi = _match(iou, 0.0)
    c = inter[gi, pi].sum()
    u = (ag[gi] + ap[pi] - inter[gi, pi]).sum()
    g_un = np.ones(ag.size, bool)
    g_un[gi] = False
    p_un = np.ones(ap.size, bool)
    p_un[pi] = False
    u += ag[g_un].sum() + ap[p_un].sum()
    return float(c / u) if u else 1.0


def pq(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Panoptic quality with detection (DQ) and segmentation (SQ) quality."""
    _, ag, ap, iou = pairwise_overlap(gt, pred)
    if ag.size == 0 and ap.size == 0:
        return {"pq": 1.0, "dq": 1.0, "sq": 1.0}
    gi, pi = _match(iou, 0.5)
    tp = len(gi)
    fp = ap.size - tp
    fn = ag.size - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(iou[gi, pi].mean()) if tp else 0.0
    return {"pq": float(dq * sq), "dq": float(dq), "sq": sq}


def instance_metrics(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """All instance metrics of one image as a dict (aji, aji_plus, dice, miou, f1, pq, dq, sq)."""
    out = {
        "aji": aji(gt, pred),
        "aji_plus": aji_plus(gt, pred),
        "dice": dice(gt, pred),
        "miou": miou(gt, pred),
        "f1": object_f1(gt, pred),
    }
    out.update(pq(gt, pred))
    return out


def _images(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise MetricError(f"Images differ in shape: {a.shape} vs {b.shape}.")

    def f(x):
        return x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)

    return f(a), f(b)


def mae(reference: np.ndarray, image: np.ndarray) -> float:
    """Mean absolute error in [0, 1] intensity units."""
    a, b = _images(reference, image)
    return float(np.abs(a - b).mean())


def rmse(reference: np.ndarray, image: np.ndarray) -> float:
    """Root mean squared error in [0, 1] intensity units."""
    a, b = _images(reference, image)
    return float(np.sqrt(((a - b) ** 2).mean()))


def ssim(reference: np.ndarray, image: np.ndarray) -> float:
    """Structural similarity (:func:`skimage.metrics.structural_similarity`), RGB or grey."""
    from skimage.metrics import structural_similarity

    a, b = _images(reference, image)
    if a.ndim == 3:
        return float(structural_similarity(a, b, data_range=1.0, channel_axis=-1))
    return float(structural_similarity(a, b, data_range=1.0))


def roc_auc(score: np.ndarray, truth: np.ndarray) -> float:
    """ROC AUC of scores against a binary truth, by the rank-sum (Mann-Whitney) statistic.

    Ties are averaged (``scipy.stats.rankdata``), so equal scores count one half. The one AUC of
    every method (lesion pixels, malignancy images, MIL slides and tiles).

    Returns
    -------
    float
        In [0, 1]; NaN when the truth holds only one class.

    Examples
    --------
    >>> roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    0.75
    """
    from scipy.stats import rankdata

    truth = np.asarray(truth).ravel().astype(bool)
    n_pos = int(truth.sum())
    n_neg = truth.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(score, np.float64).ravel())
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
