"""M1 malignancy on whole slides: time, engine overhead, peak memory, and the slide pooling. Prints JSON.

Part ``speed`` (every ``--slides`` file, one child process each):
:func:`napari_pathoseg.methods.malignancy.slide.run_malignancy` over the slide's tissue (C per
tile and B per pixel, 128-px tiles at the model's 1 µm/px, overlap 32, batches of 4, B's map in a
work folder) and reports ``total_s``, the engine's ``network_s``; then the same network
(``MalignancyPredictor.predict``) alone on the very tiles of the run, pre-read, ``bare_network_s``;
``engine_overhead = total_s / bare_network_s - 1`` (everything: the slide's tissue mask, reading,
resampling, stitching, mask, areas, the mask TIFF) and ``engine_loop_overhead`` (the engine's own
tile loop only: its ``total_s`` / ``bare_network_s`` - 1); ``run_s`` / ``summary_s`` /
``mask_tiff_s`` split the total; ``peak_rss_mb`` (``VmHWM`` of the child). With two slide sizes the JSON ends with
``peak_rss_ratio`` (largest / smallest).

Part ``pooling`` (``--pooling-slides`` CSV with ``slide,label``; label ``tumour``/``malignant`` or
``normal``/``benign``, e.g. the ``pathoseg mosaic`` sidecars' slide labels): classifier C over
every slide's tissue tiles, then the slide score by each pooling (max, top-10 % mean, mean, share
of tiles >= 0.5), their ROC AUC over the slides and the accuracy of the call at 0.5.

Usage::

    python benchmarks/bench_malignancy.py --slides S1.tif S2.tif [--model malignancy-lite] [--threads 1]
    python benchmarks/bench_malignancy.py --pooling-slides slides.csv [--model malignancy-lite]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: Keep at most this many tiles for the bare-network timing (memory: 128² x 3 bytes each).
MAX_KEPT_TILES = 4000


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child_speed(path: str, model_name: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from napari_pathoseg.methods.malignancy import slide as ms
    from napari_pathoseg.methods.malignancy.predictor import MalignancyPredictor
    from napari_pathoseg.models.registry import load_model
    from napari_pathoseg.wsi.slide import open_slide

    model = load_model(model_name, task="malignancy", device="cpu")
    kept: list[np.ndarray] = []
    original = MalignancyPredictor.predict

    def recording(self, batch):  # keep the tiles the engine hands over, to time the network alone later
        if sum(len(b) for b in kept) < MAX_KEPT_TILES:
            kept.append(np.array(batch))
        return original(self, batch)

    MalignancyPredictor.predict = recording
    with open_slide(path) as slide, tempfile.TemporaryDirectory(prefix="bench-malignancy-", dir=Path(path).parent) as wd:
        t = time.perf_counter()
        res = ms.run_malignancy(slide, model=model, batch_size=4, work_dir=wd)
        t_run = time.perf_counter()
        summary = res.summary()
        t_summary = time.perf_counter()
        ms.write_mask_tiff(res, Path(wd) / "mask.tif")
        total = time.perf_counter() - t
        phases = {"run_s": round(t_run - t, 2), "summary_s": round(t_summary - t_run, 2),
                  "mask_tiff_s": round(total - (t_summary - t), 2)}
        w, h = slide.metadata.level_dimensions[0]
        shape = list(res.shape)
        del res
    MalignancyPredictor.predict = original
    pred = MalignancyPredictor(model)
    n_kept = sum(len(b) for b in kept)
    t = time.perf_counter()
    for b in kept:
        pred.predict(b)
    bare = (time.perf_counter() - t) * summary["tiles_run"] / max(1, n_kept)
    print(json.dumps({
        "slide": os.path.basename(path), "level0": [w, h], "model_grid": shape, "tiles": summary["tiles_run"],
        "total_s": round(total, 2), "network_s_in_run": summary["timings"]["network_s"],
        "engine_timings": summary["timings"], **phases, "bare_network_s": round(bare, 2),
        "engine_overhead": round(total / bare - 1, 4),
        "engine_loop_overhead": round(summary["timings"]["total_s"] / bare - 1, 4), "bare_timed_tiles": n_kept,
        "peak_rss_mb": round(_peak_rss_mb(), 1), "probability": summary["probability"],
        "malignant_fraction": summary["malignant_fraction"], "threads": threads,
    }))


def _pooling(csv_path: Path, model_name: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from napari_pathoseg.methods.malignancy.evaluate import roc_auc
    from napari_pathoseg.methods.malignancy.slide import (
        pool_tile_probabilities,
        run_malignancy,
    )
    from napari_pathoseg.models.registry import load_model
    from napari_pathoseg.wsi.slide import open_slide

    model = load_model(model_name, task="malignancy", device="cpu")
    with open(csv_path, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    scores: dict[str, list[float]] = {"max": [], "topk": [], "mean": [], "share": []}
    truth, per_slide = [], []
    for r in rows:
        path = (csv_path.parent / r["slide"]).resolve()
        label = 1 if r["label"].strip().lower() in ("tumour", "tumor", "malignant", "1") else 0
        t = time.perf_counter()
        with open_slide(path) as slide:
            res = run_malignancy(slide, model=model, with_mask=False, batch_size=8)
        p = res.tile_probs
        s = {"max": pool_tile_probabilities(p, pooling="max"), "topk": pool_tile_probabilities(p, pooling="topk"),
             "mean": pool_tile_probabilities(p, pooling="mean"), "share": float(np.mean(p >= 0.5))}
        for k, v in s.items():
            scores[k].append(v)
        truth.append(label)
        per_slide.append({"slide": r["slide"], "label": label, "tiles": int(p.size), "seconds": round(time.perf_counter() - t, 1),
                          **{k: round(v, 4) for k, v in s.items()}})
        print(json.dumps(per_slide[-1]), file=sys.stderr)
    y = np.array(truth)
    out = {"slides": per_slide, "n_tumour": int(y.sum()), "n_normal": int((1 - y).sum())}
    for k, v in scores.items():
        v = np.array(v)
        out[f"auc_{k}"] = round(float(roc_auc(v, y)), 4) if 0 < y.sum() < len(y) else None
        out[f"accuracy_{k}_at_0.5"] = round(float(np.mean((v >= 0.5) == y)), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", nargs="*", default=[], help="slides for the speed / memory part")
    ap.add_argument("--pooling-slides", default=None, help="CSV slide,label for the pooling comparison")
    ap.add_argument("--model", default="malignancy-lite")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child_speed(args.child, args.model, args.threads)
        return
    report: dict = {"model": args.model, "threads": args.threads}
    if args.slides:
        runs = []
        for s in args.slides:
            cmd = [sys.executable, __file__, "--child", s, "--model", args.model, "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), file=sys.stderr)
        report["speed"] = runs
        if len(runs) > 1:
            rss = [r["peak_rss_mb"] for r in runs]
            px = [r["model_grid"][0] * r["model_grid"][1] for r in runs]
            report["peak_rss_ratio"] = round(rss[int(np.argmax(px))] / rss[int(np.argmin(px))], 3)
            report["pixel_ratio"] = round(max(px) / min(px), 2)
    if args.pooling_slides:
        report["pooling"] = _pooling(Path(args.pooling_slides), args.model, args.threads)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
