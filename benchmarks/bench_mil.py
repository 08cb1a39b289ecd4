"""M4 slide classification speed on this CPU: tiles/s and whole-slide times. Prints JSON.

Three measurements with one slide model (``--model``; default the shipped ``slidecls-crc-lite``,
else an untrained lite checkpoint of the same structure: speed does not depend on the weights,
and the JSON says which was used):

* ``network``: ``SlideClassifier.predict_tiles`` alone on real H&E tiles of the bundled sample
  (``model.tile_size`` px), batches of ``--batch``, best of 3 passes: tiles/s of the network;
* ``slides``: :func:`~napari_pathoseg.methods.mil.classify.run_classify` over each whole slide
  given (default: the bundled sample), i.e. reading and resampling, entropy filter (tissue mask with ``--tissue-mask``),
  network and pooling: wall s, tiles, tiles/s, and the engine's read / network split;
* ``large``: with ``--large SLIDE`` (e.g. the 50,000² synthetic slide of ``bench_inference.py``,
  ``wsi.synth.make_large_slide``: real H&E mirrored, 0.5 µm/px), a ``--large-side``
  square region at its centre is classified and the time per tile **extrapolated** linearly to
  every tile the whole slide reads (all grid tiles by default; those on the tissue mask with
  ``--tissue-mask``). The JSON marks this as extrapolated, with the measured
  region.

* ``cohort``: with ``--cohort TEST.csv`` (mosaic slides of ``scripts/make_mil_cohort.py``, each
  with its ``.cells.csv`` per-cell truth beside it), every slide is classified through the same
  path as ``pathoseg mil`` and scored: slide ROC AUC and accuracy (the model's call) and the
  tile ROC AUC of the heat map against the hidden tile truth (a tile is positive when its
  mosaic cell is tumour; tiles line up with the 64 µm cells). This checks the slide pipeline
  against the model card's numbers, which the core computes from tiles cut its own way.

Usage::

    python benchmarks/bench_mil.py [SLIDE ...] [--model NAME] [--threads 1] [--batch 16]
        [--large /tmp/pathoseg-bench/synthetic_50000.tif --large-side 6400]
        [--cohort TEST.csv] [--out JSON]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _model(name: str | None, tmp: Path):
    from napari_pathoseg.models.registry import list_models, load_model

    names = [m["name"] for m in list_models(task="slide")]
    if name is None:
        name = "slidecls-crc-lite" if "slidecls-crc-lite" in names else None
    if name is None:
        from napari_pathoseg.methods.mil.release import build_untrained

        path = tmp / "untrained-lite.safetensors"
        build_untrained(path, preset="lite", seed=0)
        return load_model(path, task="slide", device="cpu"), "untrained lite (same structure; speed only)"
    return load_model(name, task="slide", device="cpu"), name


def _network(model, *, batch: int, n: int = 512) -> dict:
    from napari_pathoseg.wsi.slide import open_slide, sample_slide_path

    t = model.tile_size
    with open_slide(sample_slide_path()) as s:
        img = s.read_region(level=0, row=1024, col=512, height=1536, width=1536)
    rng = np.random.default_rng(0)
    rows, cols = rng.integers(0, img.shape[0] - t, n), rng.integers(0, img.shape[1] - t, n)
    tiles = np.stack([img[r:r + t, c:c + t] for r, c in zip(rows, cols)])
    model.predict_tiles(tiles[:batch])  # warm-up
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            model.predict_tiles(tiles[i:i + batch])
        best = min(best, time.perf_counter() - t0)
    return {"tiles": n, "tile_px": t, "batch": batch, "seconds": round(best, 3), "tiles_per_s": round(n / best, 1)}


def _slide(model, path: str, *, batch: int, region=None, tissue_mask: bool = False) -> dict:
    from napari_pathoseg.methods.mil.classify import run_classify
    from napari_pathoseg.wsi.slide import open_slide

    with open_slide(path) as slide:
        w, h = slide.metadata.level_dimensions[0]
        t0 = time.perf_counter()
        res = run_classify(slide, model=model, region=region, batch_size=batch, tissue_mask=tissue_mask)
        wall = time.perf_counter() - t0
        mpp = slide.mpp
    tm = res.timings
    return {
        "slide": Path(path).name, "level0": [w, h], "slide_mpp": mpp, "region_xywh": list(res.region),
        "tiles_run": res.tiles_run, "tiles_kept": res.n_tiles, "dropped_entropy": res.n_dropped,
        "tissue_mask": tissue_mask, "wall_s": round(wall, 2), "tiles_per_s": round(res.tiles_run / wall, 1),
        "read_s": tm.get("read_s"), "read_wait_s": tm.get("read_wait_s"), "network_s": tm.get("network_s"),
        "engine_total_s": tm.get("total_s"), "label": res.label, "probability": round(res.probability, 4),
    }


def _large(model, path: str, *, side: int, batch: int, tissue_mask: bool = False) -> dict:
    from napari_pathoseg.inference.engine import plan_tiles
    from napari_pathoseg.wsi.slide import open_slide

    with open_slide(path) as slide:
        w, h = slide.metadata.level_dimensions[0]
        t0 = time.perf_counter()
        plan = plan_tiles(slide, mpp=model.mpp, slide_mpp=slide.mpp, tile=model.tile_size, overlap=0,
                          tissue_only=tissue_mask)
        plan_s = time.perf_counter() - t0
    x, y = (w - side) // 2, (h - side) // 2
    part = _slide(model, path, batch=batch, region=(x, y, side, side), tissue_mask=tissue_mask)
    per_tile = part["wall_s"] / max(1, part["tiles_run"])
    whole = len(plan.tiles)
    return {
        "slide": Path(path).name, "level0": [w, h], "measured_region": part, "plan_s": round(plan_s, 2),
        "tiles_read_whole_slide": whole, "grid_tiles_whole_slide": plan.grid_size,
        "seconds_per_tile_measured": round(per_tile, 5),
        "whole_slide_s_extrapolated": round(plan_s + per_tile * whole, 1),
        "whole_slide_min_extrapolated": round((plan_s + per_tile * whole) / 60, 1),
        "note": "extrapolated linearly from the measured centre region to every tissue tile of the slide",
    }


def _cell_truth(slide: Path) -> dict[tuple[int, int], int]:
    """(x, y) level-0 -> 1 tumour / 0 other, from the mosaic's ``<stem>.cells.csv``."""
    import csv

    cells = slide.with_name(slide.name[: -len(slide.suffix)] + ".cells.csv")
    with open(cells, newline="") as fh:
        return {(int(r["x"]), int(r["y"])): int(r["tumour"]) for r in csv.DictReader(fh) if r["class"] != "background"}


def _cohort_scores(model, cohort: str, *, batch: int, tissue_mask: bool = False) -> dict:
    from napari_pathoseg.methods.mil.classify import run_classify
    from napari_pathoseg.methods.mil.cohort_csv import read_cohort
    from napari_pathoseg.methods.mil.train import roc_auc

    slides, tile_p, tile_t, unmatched = [], [], [], 0
    t0 = time.perf_counter()
    for cs in read_cohort(cohort):
        res = run_classify(cs.slide, model=model, mpp=cs.mpp, batch_size=batch, tissue_mask=tissue_mask)
        truth = _cell_truth(Path(cs.slide))
        for tl in res.tiles:
            if (tl["x"], tl["y"]) in truth:
                tile_p.append(tl["probability"])
                tile_t.append(truth[(tl["x"], tl["y"])])
            else:
                unmatched += 1
        slides.append({"slide": Path(cs.slide).name, "label": cs.label, "probability": round(res.probability, 4),
                       "call": res.label, "n_tiles": res.n_tiles})
    probs = np.array([s["probability"] for s in slides])
    labels = np.array([s["label"] for s in slides])
    calls = np.array([s["call"] == "positive" for s in slides])
    return {
        "cohort": str(cohort), "slides": len(slides), "seconds": round(time.perf_counter() - t0, 1),
        "slide_auc": roc_auc(probs, labels), "slide_accuracy": round(float((calls == labels.astype(bool)).mean()), 4),
        "tile_auc": roc_auc(np.array(tile_p), np.array(tile_t)), "tiles_scored": len(tile_p),
        "tiles_positive": int(np.sum(tile_t)), "tiles_not_on_a_tissue_cell": unmatched, "per_slide": slides,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("slides", nargs="*")
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--large", default=None, help="a large slide (e.g. 50,000²) to extrapolate to")
    ap.add_argument("--large-side", type=int, default=6400, help="side of the measured centre region (level-0 px)")
    ap.add_argument("--tissue-mask", action="store_true", help="skip tiles off the tissue mask (pathoseg mil --tissue-mask)")
    ap.add_argument("--cohort", default=None, help="score held-out mosaic slides (CSV with .cells.csv truth beside them)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from napari_pathoseg.wsi.slide import sample_slide_path

    with tempfile.TemporaryDirectory(prefix="bench-mil-") as tmp:
        model, used = _model(args.model, Path(tmp))
        doc: dict = {"model": used, "tile_px": model.tile_size, "mpp": model.mpp, "threads": args.threads,
                     "entropy_threshold": model.entropy_threshold}
        doc["network"] = _network(model, batch=args.batch)
        print(json.dumps(doc["network"]), file=sys.stderr)
        doc["slides"] = []
        for s in args.slides or ([] if args.cohort else [str(sample_slide_path())]):
            doc["slides"].append(_slide(model, s, batch=args.batch, tissue_mask=args.tissue_mask))
            print(json.dumps(doc["slides"][-1]), file=sys.stderr)
        if args.large:
            doc["large"] = _large(model, args.large, side=args.large_side, batch=args.batch, tissue_mask=args.tissue_mask)
        if args.cohort:
            doc["cohort"] = _cohort_scores(model, args.cohort, batch=args.batch, tissue_mask=args.tissue_mask)
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
