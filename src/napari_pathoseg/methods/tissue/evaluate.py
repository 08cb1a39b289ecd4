"""Patch-level M5 inference (literal sliding window or one fully convolutional pass) and mIoU.

:func:`window_probs` is M5's inference on one patch: 224 px windows with 50 % overlap (the
image padded with white to at least one window), class probabilities averaged where windows
overlap. :func:`whole_probs` is the faster equivalent: one pass of the fully convolutional
network over the whole (padded) patch. :func:`tissue_map` takes the argmax and applies the
grey > 210 background rule.

:func:`miou` scores a map against a mask over the tissue pixels of the mask (mask != 0): per
class ``IoU = TP / (TP + FP + FN)``, a predicted background on a tissue pixel counting as a
miss. Classes absent from both prediction and truth are NaN and left out of the mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from napari_pathoseg.methods.tissue.cam import pad_to, to_input
from napari_pathoseg.methods.tissue.data import background_mask

__all__ = ["confusion", "evaluate_net", "miou", "tissue_map", "whole_probs", "window_probs", "window_starts"]


def window_starts(length: int, tile: int, stride: int) -> list[int]:
    """Window origins covering ``length`` (the last one flush with the end)."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def _softmax(net: torch.nn.Module, batch: np.ndarray, device: Any) -> np.ndarray:
    with torch.inference_mode():
        return torch.softmax(net(to_input(batch).to(device)).float(), 1).cpu().numpy()


def window_probs(net: torch.nn.Module, rgb: np.ndarray, *, tile: int = 224, overlap: float = 0.5,
                 device: Any = "cpu", batch: int = 8) -> np.ndarray:
    """(n, H, W) class probabilities of an (H, W, 3) patch by overlapping windows, averaged."""
    net.eval()
    h, w = rgb.shape[:2]
    img = pad_to(rgb, tile, multiple=1)
    H, W = img.shape[:2]
    stride = max(1, round(tile * (1 - overlap)))
    origins = [(y, x) for y in window_starts(H, tile, stride) for x in window_starts(W, tile, stride)]
    acc = None
    count = np.zeros((H, W), np.float32)
    for i in range(0, len(origins), batch):
        chunk = origins[i:i + batch]
        p = _softmax(net, np.stack([img[y:y + tile, x:x + tile] for y, x in chunk]), device)
        if acc is None:
            acc = np.zeros((p.shape[1], H, W), np.float32)
        for (y, x), pk in zip(chunk, p):
            acc[:, y:y + tile, x:x + tile] += pk
            count[y:y + tile, x:x + tile] += 1
    return (acc / count)[:, :h, :w]


def whole_probs(net: torch.nn.Module, rgb: np.ndarray, *, tile: int = 224, device: Any = "cpu") -> np.ndarray:
    """(n, H, W) class probabilities of one fully convolutional pass over the padded patch."""
    net.eval()
    h, w = rgb.shape[:2]
    return _softmax(net, pad_to(rgb, tile)[None], device)[0][:, :h, :w]


def tissue_map(probs: np.ndarray, rgb: np.ndarray, *, threshold: float = 210.0) -> np.ndarray:
    """Class ids (H, W) uint8: 1 + argmax of ``probs``, 0 where grey > ``threshold``."""
    ids = (np.argmax(probs, axis=0) + 1).astype(np.uint8)
    ids[background_mask(rgb, threshold=threshold)] = 0
    return ids


def confusion(pred: np.ndarray, truth: np.ndarray, n: int) -> np.ndarray:
    """(n+1, n+1) counts of truth (rows) x prediction (columns), ids 0..n, on pixels with truth != 0."""
    t = np.asarray(truth).ravel().astype(np.int64)
    p = np.asarray(pred).ravel().astype(np.int64)
    keep = (t > 0) & (t <= n)
    return np.bincount(t[keep] * (n + 1) + np.clip(p[keep], 0, n), minlength=(n + 1) ** 2).reshape(n + 1, n + 1)


def miou(conf: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Per-class IoU and means from a :func:`confusion` matrix (tissue pixels only)."""
    n = len(classes)
    out: dict[str, Any] = {}
    ious = []
    for c in range(1, n + 1):
        tp = conf[c, c]
        fn = conf[c].sum() - tp
        fp = conf[1:, c].sum() - tp
        denom = tp + fp + fn
        iou = float(tp / denom) if denom else float("nan")
        out[f"iou_{classes[c - 1]}"] = iou
        ious.append(iou)
    vals = [v for v in ious if np.isfinite(v)]
    out["miou"] = float(np.mean(vals)) if vals else float("nan")
    if n >= 2:
        two = [v for v in ious[:2] if np.isfinite(v)]
        out["miou_tumour_stroma"] = float(np.mean(two)) if two else float("nan")
    total = conf[1:].sum()
    out["pixel_accuracy"] = float(np.trace(conf[1:, 1:]) / total) if total else float("nan")
    out["pixels"] = int(total)
    return out


def evaluate_net(net: torch.nn.Module, images: Sequence[Any], classes: Sequence[str], *, tile: int = 224,
                 mode: str = "window", device: Any = "cpu", threshold: float = 210.0) -> dict[str, Any]:
    """Pooled mIoU of a segmentation ``net`` on patches with masks (``mode``: ``window`` or ``whole``)."""
    n = len(classes)
    conf = np.zeros((n + 1, n + 1), np.int64)
    for item in images:
        if item.mask is None:
            continue
        if mode == "window":
            p = window_probs(net, item.image, tile=tile, device=device)
        else:
            p = whole_probs(net, item.image, tile=tile, device=device)
        conf += confusion(tissue_map(p, item.image, threshold=threshold), item.mask, n)
    res = miou(conf, classes)
    res["images"] = sum(1 for i in images if i.mask is not None)
    return res
