"""Nucleus inference speed: MPix/s end to end, and overhead over the bare network.

Runs the shipped model (or ``--model``) on a region of the bundled sample slide:

* ``end_to_end``: :func:`napari_pathoseg.methods.nuclei.segment.segment_nuclei` (read, resample, network,
  instances, stitching, normalised image);
* ``network_only``: ``model.predict`` on exactly the same tiles (read beforehand), same batch
  size, same run.

``overhead = end_to_end / network_only - 1`` (target ≤ 0.25). Prints JSON.

Usage: ``python benchmarks/bench_nuclei_speed.py [--model nuclei-lite] [--region x,y,w,h]``
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="nuclei-lite")
    ap.add_argument("--region", default="512,1400,1536,1536")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from napari_pathoseg.models.registry import load_model
    from napari_pathoseg.inference import read_window
    from napari_pathoseg.methods.nuclei.segment import segment_nuclei
    from napari_pathoseg.wsi.slide import open_slide, sample_slide_path

    model = load_model(args.model)
    region = tuple(int(v) for v in args.region.split(","))
    slide = open_slide(sample_slide_path())
    # warm-up (first-call allocations)
    segment_nuclei(slide, model, region=(region[0], region[1], 256, 256), batch_size=args.batch)
    e2e, net = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        res = segment_nuclei(slide, model, region=region, batch_size=args.batch, tissue_only=False)
        e2e.append(time.perf_counter() - t)
        # the same tiles, network only
        tile = max(256, int(model.tile_size))
        overlap = 64
        step = tile - overlap
        rows, cols = res.labels.shape
        starts_r = list(range(0, max(1, rows - overlap), step)) if rows > tile else [0]
        starts_c = list(range(0, max(1, cols - overlap), step)) if cols > tile else [0]
        grid = [(r, c) for r in starts_r for c in starts_c]
        lv = slide.best_level_for_downsample(res.scale)
        x0, y0, f = res.region[0], res.region[1], res.scale
        tiles = np.stack([
            read_window(slide, level=lv, x0=x0 + c * f, y0=y0 + r * f, scale=f, size=tile) for r, c in grid
        ])
        t = time.perf_counter()
        for b in range(0, len(tiles), args.batch):
            model.predict(tiles[b : b + args.batch])
        net.append(time.perf_counter() - t)
    e, n = min(e2e), min(net)
    mpix = region[2] * region[3] / 1e6
    print(json.dumps({
        "model": model.name,
        "device": str(model.device),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "region_xywh": list(region),
        "megapixels_level0": round(mpix, 3),
        "tiles": len(grid),
        "nuclei": res.n_nuclei,
        "end_to_end_s": round(e, 3),
        "network_only_s": round(n, 3),
        "mpix_per_s": round(mpix / e, 4),
        "overhead": round(e / n - 1.0, 4),
        "breakdown_last_run": res.timings,
        "target_overhead_max": 0.25,
    }, indent=2))


if __name__ == "__main__":
    main()
