"""Score an M4 slide classifier on held-out mosaic slides with their hidden tile truth.

For every slide of a cohort CSV: the tissue tiles at the model's scale (:func:`.data.slide_tiles`,
entropy filter, no cap), the student's positive probability per tile, and the tile truth from
the mosaic's ``NAME.cells.csv`` beside the slide (a tile is tumour when at least half of its
area lies in cells whose ``tumour`` is 1). The truth is read here only, never in training.

Figures (:func:`evaluate_checkpoint`): slide ROC AUC and accuracy (the model's pooling and
call threshold), tile ROC AUC of the heat map against the truth over all tiles of all slides
(``tile_auc``) and within positive slides only (``tile_auc_in_positive``: does the heat map
find the tumour region inside a positive slide). :func:`compare_poolings` gives the slide AUC
and accuracy of every pooling on the same tile probabilities.

    python -m napari_pathoseg.methods.mil.evaluate MODEL_OR_CHECKPOINT TEST.csv [--json OUT]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathoseg.methods.mil.cohort_csv import read_cohort
from napari_pathoseg.methods.mil.data import slide_tiles
from napari_pathoseg.methods.mil.pooling import pool
from napari_pathoseg.methods.mil.train import roc_auc

__all__ = [
    "POOLING_GRID",
    "compare_poolings",
    "evaluate_checkpoint",
    "pick_threshold",
    "scores_by_group",
    "source_of",
    "tile_truth",
]

logger = logging.getLogger(__name__)

#: The poolings compared: (method, k).
POOLING_GRID = (("max", 1), ("topk_mean", 3), ("topk_mean", 5), ("topk_mean", 10), ("topk_mean", 0.05),
                ("topk_mean", 0.1), ("share", 0.05), ("share", 0.1), ("share", 0.2))


def tile_truth(slide: str | os.PathLike, boxes: np.ndarray, *, shape: tuple[int, int]) -> np.ndarray | None:
    """Tumour share of each level-0 box from the mosaic's ``NAME.cells.csv`` (``None`` without it)."""
    slide = Path(slide)
    cells = slide.with_name(slide.name[: -len(slide.suffix)] + ".cells.csv")
    if not cells.is_file():
        return None
    mask = np.zeros(shape, np.uint8)
    with open(cells, newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            if r.get("tumour") == "1":
                x, y, w, h = (int(float(r[k])) for k in ("x", "y", "w", "h"))
                mask[y:y + h, x:x + w] = 1
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    out = np.zeros(len(boxes), np.float32)
    for i, (x, y, w, h) in enumerate(boxes):
        x1, y1 = min(x + w, shape[1]), min(y + h, shape[0])
        s = integral[y1, x1] - integral[y, x1] - integral[y1, x] + integral[y, x]
        out[i] = s / max(1, w * h)
    return out


def pick_threshold(probs: np.ndarray, labels: np.ndarray) -> float:
    """Call threshold with the best accuracy on (probs, labels): the midpoint of the best gap."""
    p = np.sort(np.unique(np.asarray(probs, np.float64)))
    cands = np.concatenate([[0.0], (p[:-1] + p[1:]) / 2, [1.0]]) if len(p) > 1 else np.array([0.5])
    accs = [float(((probs >= c) == (labels == 1)).mean()) for c in cands]
    best = max(accs)
    good = [c for c, a in zip(cands, accs) if a == best]
    return float(good[len(good) // 2])


def evaluate_checkpoint(model_or_path: Any, cohort_csv: str | os.PathLike, *, threads: int | None = None,
                        threshold: float | None = None) -> dict[str, Any]:
    """Slide and tile scores of a model (a loaded :class:`SlideClassifier`, a name or a checkpoint path)."""
    import torch

    from napari_pathoseg.methods.mil.model import SlideClassifier
    from napari_pathoseg.models.registry import load_model
    from napari_pathoseg.wsi.slide import open_slide

    if threads:
        torch.set_num_threads(int(threads))
    model = model_or_path if isinstance(model_or_path, SlideClassifier) else load_model(model_or_path, task="slide",
                                                                                         device="cpu")
    thr = model.threshold if threshold is None else float(threshold)
    slides = []
    for s in read_cohort(cohort_csv):
        st = slide_tiles(s.slide, mpp=model.mpp, tile_size=model.tile_size, entropy_threshold=model.entropy_threshold,
                         slide_mpp=s.mpp)
        with open_slide(s.slide) as sl:
            shape = sl.shape
        probs = model.predict_tiles(st.tiles)
        truth = tile_truth(s.slide, st.boxes, shape=shape)
        slides.append({"slide": s.slide.name, "label": s.label, "probs": probs,
                       "truth": None if truth is None else (truth >= 0.5).astype(np.int8)})
        logger.info("%s: %d tiles, pooled %.3f", s.slide.name, len(probs), model.pool(probs) if len(probs) else -1)
    labels = np.array([d["label"] for d in slides])
    pooled = np.array([model.pool(d["probs"]) if len(d["probs"]) else 0.0 for d in slides])
    have = [d for d in slides if d["truth"] is not None]
    tile_auc = tile_auc_pos = None
    if have:
        tile_auc = roc_auc(np.concatenate([d["probs"] for d in have]), np.concatenate([d["truth"] for d in have]))
        pos = [d for d in have if d["label"] == 1]
        if pos:
            tile_auc_pos = roc_auc(np.concatenate([d["probs"] for d in pos]), np.concatenate([d["truth"] for d in pos]))
    for d, p in zip(slides, pooled):
        d["probability"] = float(p)
    return {
        "slide_auc": roc_auc(pooled, labels),
        "slide_accuracy": float(((pooled >= thr) == (labels == 1)).mean()),
        "threshold": thr,
        "pooling": model.pooling, "pooling_k": model.pooling_k,
        "tile_auc": tile_auc, "tile_auc_in_positive": tile_auc_pos,
        "n_slides": len(slides), "n_positive": int(labels.sum()),
        "n_tiles": int(sum(len(d["probs"]) for d in slides)),
        "n_tumour_tiles": int(sum(int(d["truth"].sum()) for d in have)),
        "per_slide": [{"slide": d["slide"], "label": d["label"], "probability": round(d["probability"], 4),
                       "tiles": len(d["probs"])} for d in slides],
        "slides": slides,
    }


def compare_poolings(slides: list[dict[str, Any]], *, grid: tuple = POOLING_GRID) -> list[dict[str, Any]]:
    """Slide AUC, and accuracy at the best threshold for these slides, of every pooling in ``grid``."""
    labels = np.array([d["label"] for d in slides])
    out = []
    for method, k in grid:
        p = np.array([pool(d["probs"], method=method, k=k) if len(d["probs"]) else 0.0 for d in slides])
        thr = pick_threshold(p, labels)
        out.append({"pooling": method, "k": k, "slide_auc": roc_auc(p, labels),
                    "accuracy_at_0.5": float(((p >= 0.5) == (labels == 1)).mean()),
                    "best_threshold": thr, "accuracy_at_best": float(((p >= thr) == (labels == 1)).mean())})
    return out


def source_of(slide_name: str) -> str:
    """The data set of a cohort mosaic from its name (``kather_pos_03.tif`` -> ``kather``)."""
    return slide_name.split("_", 1)[0]


def scores_by_group(slides: list[dict[str, Any]], group_of: Any = source_of) -> dict[str, dict[str, Any]]:
    """Slide AUC (of the pooled ``probability``) and tile AUC per group of slides (data set)."""
    out: dict[str, dict[str, Any]] = {}
    for g in sorted({group_of(d["slide"]) for d in slides}):
        part = [d for d in slides if group_of(d["slide"]) == g]
        have = [d for d in part if d["truth"] is not None]
        out[g] = {
            "slides": len(part),
            "slide_auc": roc_auc([d["probability"] for d in part], [d["label"] for d in part]),
            "tile_auc": roc_auc(np.concatenate([d["probs"] for d in have]), np.concatenate([d["truth"] for d in have]))
            if have else None,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m napari_pathoseg.methods.mil.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="registered name or .safetensors checkpoint")
    ap.add_argument("cohort", help="cohort CSV of mosaic slides (with NAME.cells.csv beside each)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    res = evaluate_checkpoint(args.model, args.cohort, threads=args.threads)
    slides = res.pop("slides")
    res["by_source"] = scores_by_group(slides)
    res["poolings"] = compare_poolings(slides)
    text = json.dumps(res, indent=1)
    if args.json:
        from napari_pathoseg._atomic import write_json

        write_json(args.json, res)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
