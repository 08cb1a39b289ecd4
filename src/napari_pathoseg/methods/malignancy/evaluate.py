"""Scores of M1 networks on held-out images: C/A's ROC AUC and accuracy, B's Dice.

* Classification: each image's malignant probability (the whole image through the classifier,
  or the area-weighted tile mean for large images, :func:`model.pooled_probability`), ROC AUC
  over images and accuracy at the threshold.
* Segmentation: B's probability on each held-out malignant image that has a mask, thresholded;
  ``dice`` is the pooled Dice over all their pixels, ``dice_mean`` the mean per image.
* False positives: B on each held-out *benign* image, where the whole region must be empty;
  ``benign_fp_area`` is the share of all benign pixels B marks, ``benign_fp_images`` the share
  of benign images with more than 5 % of their pixels marked.
* A mosaic slide (:func:`region_scores`, ``python -m napari_pathoseg.methods.malignancy.evaluate
  MASK SIDECAR``): B's region TIFF (``pathoseg malignancy --mask``) against the label TIFF of a
  ``pathoseg mosaic`` slide: Dice, precision and recall of the tumour labels and the share of
  each label's pixels the region covers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_pathoseg.methods.malignancy.data import LabelItem, Sample, load_samples
from napari_pathoseg.methods.malignancy.model import pad_to_multiple, pooled_probability
from napari_pathoseg.methods.malignancy.network import to_input

__all__ = [
    "FP_IMAGE_SHARE",
    "benign_scores",
    "call_scores",
    "classify_scores",
    "dice_scores",
    "evaluate_model",
    "evaluate_nets",
    "image_probabilities",
    "mask_counts",
    "net_classifier",
    "net_segmenter",
    "predict_mask",
    "region_scores",
    "roc_auc",
    "run_summary",
    "segment_scores",
]


def roc_auc(score: np.ndarray, truth: np.ndarray) -> float:
    """ROC AUC by the rank-sum statistic (ties averaged); NaN without both classes."""
    from scipy.stats import rankdata

    truth = np.asarray(truth, bool).ravel()
    n_pos = int(truth.sum())
    n_neg = truth.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(score, np.float64).ravel())
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def net_classifier(net: torch.nn.Module, *, device: Any = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    """``batch (N, H, W, 3) uint8 -> (N,) malignant probability`` of a classifier network (eval mode)."""

    def run(batch: np.ndarray) -> np.ndarray:
        net.eval()
        with torch.inference_mode():
            logits = net(to_input(pad_to_multiple(batch)).to(device))
            return torch.softmax(logits.float(), 1)[:, 1].cpu().numpy()

    return run


def net_segmenter(net: torch.nn.Module, *, device: Any = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    """``batch (N, H, W, 3) uint8 -> (N, H, W) probability`` of a segmenter network (eval mode)."""

    def run(batch: np.ndarray) -> np.ndarray:
        net.eval()
        h, w = batch.shape[1:3]
        with torch.inference_mode():
            logits = net(to_input(pad_to_multiple(batch)).to(device))[:, 0, :h, :w]
            return torch.sigmoid(logits.float()).cpu().numpy()

    return run


def image_probabilities(classify: Callable[[np.ndarray], np.ndarray], samples: Iterable[Sample], *, side: int,
                        min_size: int = 64) -> np.ndarray:
    """Each sample's malignant probability (whole image, or the area-weighted tile mean): (N,) float64."""
    out = []
    for s in samples:
        img = pad_to_multiple(s.image[None], minimum=min_size)[0]
        out.append(pooled_probability(img, side=side, classify=classify))
    return np.asarray(out, np.float64)


def call_scores(probs: np.ndarray, labels: np.ndarray, *, threshold: float = 0.5) -> dict[str, Any]:
    """ROC AUC, accuracy, sensitivity and specificity of image probabilities vs labels (1 = malignant)."""
    p, t = np.asarray(probs, np.float64), np.asarray(labels, bool)
    if not len(p):
        return {"images": 0}
    call = p >= threshold
    return {
        "auc": roc_auc(p, t),
        "accuracy": float(np.mean(call == t)),
        "sensitivity": float(np.mean(call[t])) if t.any() else float("nan"),
        "specificity": float(np.mean(~call[~t])) if (~t).any() else float("nan"),
        "images": len(p),
        "malignant": int(t.sum()),
    }


def classify_scores(classify: Callable[[np.ndarray], np.ndarray], samples: Iterable[Sample], *, side: int,
                    threshold: float = 0.5, min_size: int = 64) -> dict[str, Any]:
    """ROC AUC, accuracy, sensitivity and specificity of image-level probabilities."""
    samples = list(samples)
    probs = image_probabilities(classify, samples, side=side, min_size=min_size)
    return call_scores(probs, np.array([s.label for s in samples], bool), threshold=threshold)


#: A benign image counts as a false-positive image when B marks more than this share of it.
FP_IMAGE_SHARE = 0.05


def predict_mask(segment: Callable[[np.ndarray], np.ndarray], image: np.ndarray, *, threshold: float = 0.5,
                 tile: int = 512) -> np.ndarray:
    """B's thresholded region (H, W) bool on one image (tiles of ``tile`` px)."""
    h, w = image.shape[:2]
    img = pad_to_multiple(image[None], minimum=64)
    prob = np.zeros(img.shape[1:3], np.float32)
    for y in range(0, img.shape[1], tile):
        for x in range(0, img.shape[2], tile):
            part = pad_to_multiple(img[:, y:y + tile, x:x + tile], minimum=64)
            ph, pw = min(tile, img.shape[1] - y), min(tile, img.shape[2] - x)
            prob[y:y + ph, x:x + pw] = segment(part)[0, :ph, :pw]
    return prob[:h, :w] >= threshold


def mask_counts(segment: Callable[[np.ndarray], np.ndarray], sample: Sample, *, threshold: float = 0.5,
                tile: int = 512) -> tuple[float, float]:
    """``(|pred & truth|, |pred| + |truth|)`` of B on one masked sample (tiles of ``tile`` px)."""
    pred = predict_mask(segment, sample.image, threshold=threshold, tile=tile)
    truth = sample.mask > 0
    return float(np.sum(pred & truth)), float(pred.sum() + truth.sum())


def benign_scores(marked: list[tuple[float, float]]) -> dict[str, Any]:
    """False positives of B on benign images from ``(marked px, image px)`` pairs (empty dict without any)."""
    if not marked:
        return {}
    m, n = np.array(marked, np.float64).T
    return {"benign_fp_area": float(m.sum() / max(n.sum(), 1.0)),
            "benign_fp_images": float(np.mean(m / np.maximum(n, 1.0) > FP_IMAGE_SHARE)),
            "benign_images": len(m)}


def region_scores(region: np.ndarray, labels: np.ndarray, *, tumour_ids: Iterable[int],
                  names: dict[int, str] | None = None) -> dict[str, Any]:
    """B's ``region`` (bool) against a mosaic ``labels`` image: Dice, precision, recall, coverage per label.

    Parameters
    ----------
    region, labels : np.ndarray
        Same shape; ``labels`` holds the mosaic's label ids (0 = background).
    tumour_ids : iterable of int
        The ids that are the truth (e.g. HGIN and adenocarcinoma).
    names : dict, optional
        Label id -> name for the per-label coverage (default: the ids as strings).
    """
    region = np.asarray(region) > 0
    labels = np.asarray(labels)
    if region.shape != labels.shape:
        raise ValueError(f"region {region.shape} and labels {labels.shape} differ in shape.")
    truth = np.isin(labels, list(tumour_ids))
    inter, pred_n, truth_n = float(np.sum(region & truth)), float(region.sum()), float(truth.sum())
    cover = {}
    for lid in np.unique(labels):
        sel = labels == lid
        cover[(names or {}).get(int(lid), str(int(lid)))] = float(region[sel].mean())
    return {"dice": 2 * inter / (pred_n + truth_n) if pred_n + truth_n else 1.0,
            "precision": inter / pred_n if pred_n else float("nan"),
            "recall": inter / truth_n if truth_n else float("nan"), "covered": cover}


def dice_scores(counts: list[tuple[float, float]]) -> dict[str, Any]:
    """Pooled and mean per-image Dice from :func:`mask_counts` results."""
    if not counts:
        return {"masked_images": 0}
    inter, total = sum(c[0] for c in counts), sum(c[1] for c in counts)
    per = [2 * i / t if t else 1.0 for i, t in counts]
    return {"dice": 2 * inter / total if total else 1.0, "dice_mean": float(np.mean(per)), "masked_images": len(per)}


def segment_scores(segment: Callable[[np.ndarray], np.ndarray], samples: Iterable[Sample], *,
                   threshold: float = 0.5, tile: int = 512) -> dict[str, Any]:
    """Pooled and per-image Dice of B on the samples that have a mask."""
    return dice_scores([mask_counts(segment, s, threshold=threshold, tile=tile) for s in samples if s.mask is not None])


def evaluate_nets(samples: list[Sample], *, classifier: torch.nn.Module | None = None,
                  segmenter: torch.nn.Module | None = None, side: int, threshold: float = 0.5,
                  mask_threshold: float = 0.5) -> dict[str, Any]:
    """Scores of a classifier and/or a segmenter network on loaded samples."""
    out: dict[str, Any] = {}
    if classifier is not None:
        out.update(classify_scores(net_classifier(classifier), samples, side=side, threshold=threshold))
    if segmenter is not None:
        out.update(segment_scores(net_segmenter(segmenter), samples, threshold=mask_threshold))
    return out


def evaluate_model(model: Any, items: list[LabelItem], *, per_dataset: bool = True) -> dict[str, Any]:
    """Scores of a :class:`MalignancyModel` (C and B) on labelled items (read at the model's scale).

    Each image is classified once and each mask segmented once; the per-data-set scores reuse them.
    """
    from napari_pathoseg.methods.malignancy.model import WHOLE_IMAGE_FACTOR

    samples = load_samples(items, mpp=model.mpp)
    probs = image_probabilities(model.classify, samples, side=WHOLE_IMAGE_FACTOR * model.input_size,
                                min_size=model.min_size)
    labels = np.array([s.label for s in samples], bool)
    counts = {i: mask_counts(model.segment, s, threshold=model.mask_threshold)
              for i, s in enumerate(samples) if s.mask is not None}
    marked = {i: (float(predict_mask(model.segment, s.image, threshold=model.mask_threshold).sum()),
                  float(s.image.shape[0] * s.image.shape[1])) for i, s in enumerate(samples) if s.label == 0}
    res = call_scores(probs, labels, threshold=model.threshold)
    res.update(dice_scores(list(counts.values())))
    res.update(benign_scores(list(marked.values())))
    if per_dataset:
        res["per_dataset"] = {}
        for ds in sorted({s.dataset for s in samples}):
            idx = [i for i, s in enumerate(samples) if s.dataset == ds]
            r = call_scores(probs[idx], labels[idx], threshold=model.threshold)
            r.update(dice_scores([counts[i] for i in idx if i in counts]))
            r.update(benign_scores([marked[i] for i in idx if i in marked]))
            res["per_dataset"][ds] = r
    return res


def run_summary(run_dir: str | Path) -> dict[str, Any]:
    """Per stage of a run folder: epochs, best epoch, best validation metrics, seconds."""
    out: dict[str, Any] = {}
    for stage in ("A", "B", "C"):
        hist = Path(run_dir) / stage / "history.json"
        if not hist.is_file():
            continue
        h = json.loads(hist.read_text())
        best = [r for r in h if r.get("is_best")]
        out[stage] = {
            "epochs": len(h),
            "best_epoch": best[-1]["epoch"] if best else None,
            "best_val": best[-1]["val"] if best else None,
            "seconds": round(sum(r.get("seconds", 0.0) for r in h), 1),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m napari_pathoseg.methods.malignancy.evaluate MASK SIDECAR``: B's region on a mosaic slide (JSON)."""
    import argparse

    import tifffile

    ap = argparse.ArgumentParser(prog="python -m napari_pathoseg.methods.malignancy.evaluate",
                                 description=main.__doc__)
    ap.add_argument("mask", help="B's region TIFF (pathoseg malignancy --mask)")
    ap.add_argument("sidecar", help="the mosaic's .mosaic.json (names its label TIFF and tumour label ids)")
    args = ap.parse_args(argv)
    side = json.loads(Path(args.sidecar).read_text())
    labels = tifffile.imread(Path(args.sidecar).parent / side["files"]["labels"], level=0)
    region = tifffile.imread(args.mask, level=0)
    names = {int(k): v for k, v in side.get("label_ids", {}).items()}
    res = region_scores(np.squeeze(region), np.squeeze(labels), tumour_ids=side["tumour_label_ids"], names=names)
    print(json.dumps({"mask": args.mask, "slide": side["files"]["slide"], **res}, indent=1))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
