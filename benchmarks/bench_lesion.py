"""Lesion detection (M3) on whole slides: time, engine overhead and peak memory. Prints JSON.

For every slide given, a child process runs :func:`napari_pathoseg.methods.lesion.detect.run_detect_lesions`
with the shipped ``lesion-lite`` (or ``--model``) over the whole slide (tissue tiles, 512 px at
the model's 2 µm/px, batches of 4, probability streamed to a work folder) and reports:

* ``total_s``: the whole run (stain estimate, reading, network, stitching, mask, regions);
* ``network_s``: the predictor's time (stain normalisation of the tiles + the FPN), the
  engine's own accounting; ``engine_overhead = inference_s / network_s - 1`` (target <= 0.15);
* ``peak_rss_mb``: peak resident memory of the child (``VmHWM``);
* ``mask_s``: the one-off work around the engine (stain estimate, tissue mask, and the mask
  steps, streamed a band of rows at a time by :func:`napari_pathoseg.inference.bands.clean_mask`:
  threshold, fill holes, minimum area, labels, areas, tissue fraction).

With several slides the JSON ends with ``peak_rss_ratio`` (largest slide / smallest): memory
is flat when it stays near 1 while the map grows (4x pixels from 25,000² to 50,000²).

Slides: e.g. the synthetic 8,000² / 25,000² / 50,000² slides of ``bench_inference.py``
(``wsi.synth.make_large_slide``, real H&E pixels mirrored, 0.5 µm/px).

Usage: ``python benchmarks/bench_lesion.py SLIDE [SLIDE ...] [--model lesion-lite] [--threads 1] [--out JSON]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child(path: str, model_name: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from napari_pathoseg.methods.lesion.detect import run_detect_lesions
    from napari_pathoseg.models.registry import load_model
    from napari_pathoseg.wsi.slide import open_slide

    model = load_model(model_name, task="lesion")
    with open_slide(path) as slide, tempfile.TemporaryDirectory(prefix="bench-lesion-", dir=Path(path).parent) as wd:
        t = time.perf_counter()
        res = run_detect_lesions(slide, model, batch_size=4, work_dir=wd)
        total = time.perf_counter() - t
        w, h = slide.metadata.level_dimensions[0]
        tm = res.timings
        print(json.dumps({
            "slide": os.path.basename(path), "level0": [w, h], "slide_mpp": slide.mpp, "model_mpp": res.mpp,
            "map_shape": list(res.prob.shape), "tiles": res.tiles, "total_s": round(total, 1),
            "inference_s": tm.get("total_s"), "network_s": tm.get("network_s"), "read_s": tm.get("read_s"),
            "engine_overhead": round(tm["total_s"] / tm["network_s"] - 1, 3) if tm.get("network_s") else None,
            "mask_s": round(total - tm.get("total_s", 0.0), 1),
            "lesion_fraction_of_tissue": res.summary()["lesion_fraction_of_tissue"],
            "n_regions": len(res.regions),
            "peak_rss_mb": round(_peak_rss_mb(), 1), "threads": threads,
        }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("slides", nargs="+")
    ap.add_argument("--model", default="lesion-lite")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.slides[0], args.model, args.threads)
        return
    rows = []
    for s in args.slides:
        cmd = [sys.executable, __file__, s, "--model", args.model, "--threads", str(args.threads), "--child"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    doc: dict = {"runs": rows}
    if len(rows) > 1:
        doc["peak_rss_ratio"] = round(rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"], 3)
        doc["map_pixels_ratio"] = round((rows[-1]["map_shape"][0] * rows[-1]["map_shape"][1])
                                        / (rows[0]["map_shape"][0] * rows[0]["map_shape"][1]), 3)
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
