"""Lesion detection on a mosaic slide with ground truth (``pathoseg mosaic`` of held-out lesion tiles). Prints JSON.

Runs the lesion model over the whole mosaic (as ``pathoseg lesion`` does) and scores the
probability map at the inference level against the mosaic's label pyramid: lesion = the
``tumour_label_ids`` of the sidecar (the glands of the tumour classes), scored over the tissue
pixels (label >= 1): pooled pixel ROC AUC and Dice at the threshold. Build the mosaic from the
**test** part of the split only (a folder with a filtered ``index.csv``), e.g.::

    pathoseg mosaic --data RUNS/ebhi_test --out RUNS/ebhi_test_8k.tif --size 8192 --mpp 0.5 --seed 0 \
        --tumour-fraction 0.4 --tumour-classes adenocarcinoma hgin lgin polyp
    python benchmarks/bench_lesion_mosaic.py RUNS/ebhi_test_8k.tif
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("slide")
    ap.add_argument("--model", default="lesion-lite")
    ap.add_argument("--threshold", type=float, default=0.5)
    args = ap.parse_args()
    import tifffile

    from napari_pathoseg.methods.lesion.detect import run_detect_lesions
    from napari_pathoseg.methods.lesion.train import pixel_scores
    from napari_pathoseg.models.registry import load_model
    from napari_pathoseg.wsi.slide import open_slide

    slide_path = Path(args.slide)
    side = json.loads(slide_path.with_suffix(".mosaic.json").read_text())
    lesion_ids = np.array(sorted(int(i) for i in side["tumour_label_ids"]))
    model = load_model(args.model, task="lesion")
    t = time.perf_counter()
    with open_slide(slide_path) as slide:
        res = run_detect_lesions(slide, model, threshold=args.threshold)
    seconds = time.perf_counter() - t
    # labels of level 0 at the centres of the output pixels (nearest), read from the finest level
    labels0 = tifffile.imread(slide_path.with_suffix("").with_suffix(".labels.tif"), level=0)
    x, y = res.region[:2]
    rows = (y + (np.arange(res.prob.shape[0]) + 0.5) * res.scale).astype(np.int64).clip(0, labels0.shape[0] - 1)
    cols = (x + (np.arange(res.prob.shape[1]) + 0.5) * res.scale).astype(np.int64).clip(0, labels0.shape[1] - 1)
    lab = labels0[rows[:, None], cols[None, :]]
    tissue = lab >= 1
    truth = np.isin(lab, lesion_ids)
    scores = pixel_scores(res.prob[tissue], truth[tissue], threshold=args.threshold)
    print(json.dumps({
        "slide": slide_path.name, "model": res.model, "level0": list(res.region[2:]), "map_shape": list(res.prob.shape),
        "mpp": res.mpp, "tiles": res.tiles, "seconds": round(seconds, 1), "timings": res.timings,
        "tissue_pixels": int(tissue.sum()), "lesion_fraction_truth": round(float(truth[tissue].mean()), 4),
        "pixel_auc": scores["auc"], "dice": scores["dice"], "summary": res.summary(),
    }, indent=1))


if __name__ == "__main__":
    main()
