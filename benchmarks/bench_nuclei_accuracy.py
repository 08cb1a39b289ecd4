"""Nucleus segmentation accuracy on held-out images, clean and stain-perturbed.

Prints JSON: AJI, AJI+, Dice, mIoU, F1, PQ (DQ, SQ) of a model on the test
images of its split (``models/weights/nuclei-lite.split.json``; never trained
on), each image at its own resolution (MoNuSeg 40x, CPM-15 20x/40x), and the
same after a strong HED stain perturbation (alpha +-0.3, beta +-0.03, seeded
per image), with the AJI drop.  ``--val`` scores the validation images with
both instance methods instead (how the post-processing was chosen).

    python benchmarks/bench_nuclei_accuracy.py [--model nuclei-lite] [--data /work/shared/data]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib

import numpy as np

from napari_pathoseg.models.registry import load_model
from napari_pathoseg.cli.train import DEFAULT_DATA, SHIPPED_SPLIT
from napari_pathoseg.training.augment import hed_perturb
from napari_pathoseg.methods.nuclei.datasets import load_nuclei_originals, load_split
from napari_pathoseg.methods.nuclei.evaluate import evaluate_items


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="nuclei-lite")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--split", default=str(SHIPPED_SPLIT))
    ap.add_argument("--val", action="store_true", help="validation images, both instance methods")
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--beta", type=float, default=0.03)
    ap.add_argument("--per-image", action="store_true")
    args = ap.parse_args(argv)

    model = load_model(args.model)
    split = load_split(args.split)
    names = split["val"] if args.val else split["test"]
    items = load_nuclei_originals(args.data, names=names)
    t0 = time.perf_counter()
    out = {"model": model.name, "preset": model.config.preset, "images": "val" if args.val else "test",
           "n_images": len(items), "instance_method": model.instance_method}
    if args.val:
        for method in ("boundary", "distance"):
            out[method] = evaluate_items(model, items, method=method, per_image=args.per_image)
    else:
        clean = evaluate_items(model, items, per_image=args.per_image)

        def perturb(img: np.ndarray) -> np.ndarray:
            seed = zlib.crc32(img[:8, :8].tobytes())
            return hed_perturb(img, rng=np.random.default_rng(seed), alpha=args.alpha, beta=args.beta)

        strong = evaluate_items(model, items, perturb=perturb, per_image=args.per_image)
        out.update(
            clean=clean,
            stain_perturbed=dict(strong, alpha=args.alpha, beta=args.beta),
            aji_drop=clean["metrics"]["aji"] - strong["metrics"]["aji"],
        )
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
