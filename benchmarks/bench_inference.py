"""The inference engine: overhead over the bare network, and peak memory on huge slides. Prints JSON.

* ``overhead`` (part ``a``): the shipped nucleus model over the bundled sample slide's tissue,
  measured side by side in one run: the network alone on exactly the engine's tiles (read
  beforehand, same batches) and the whole engine run (reading, resampling, network, instance
  post-processing, ownership stitching, normalised image), with prefetching on and off.
  ``overhead = engine / network_only - 1`` (target <= 0.15), in wall time and in CPU time (all
  threads; steadier on a busy shared machine), and inside the engine run itself (time outside
  the network over time in it).
* ``memory`` (part ``b``): a :class:`~napari_pathoseg.inference.ProbabilityMap` of stain
  densities (:class:`~napari_pathoseg.inference.StainDensityPredictor`, a real colour
  deconvolution at 2 µm/px) over synthetic 25,000² and 50,000² slides
  (:func:`napari_pathoseg.wsi.synth.make_large_slide`, cached), streamed to a work folder and
  then to a pyramidal TIFF; peak resident memory (``VmHWM``) of a child process per slide
  (target < 1.5 GB and flat in slide size); the smaller slide again without prefetching.

Usage: ``python benchmarks/bench_inference.py [--parts a,b] [--quick] [--cache DIR]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (MB): ``VmHWM`` on Linux (fresh at exec)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- (a) overhead


def overhead(*, model_name: str, region: tuple[int, int, int, int] | None, batch: int, repeats: int) -> dict:
    import numpy as np
    import torch

    from napari_pathoseg.inference import plan_tiles, read_window
    from napari_pathoseg.methods.nuclei.predictor import NucleusPredictor
    from napari_pathoseg.methods.nuclei.segment import segment_nuclei
    from napari_pathoseg.models.registry import load_model
    from napari_pathoseg.wsi.slide import open_slide, sample_slide_path

    model = load_model(model_name)
    pred = NucleusPredictor(model)
    slide = open_slide(sample_slide_path())
    plan = plan_tiles(slide, mpp=pred.mpp, slide_mpp=slide.mpp, region=region, tile=pred.tile_size, overlap=64,
                      tissue_only=True)
    x, y = plan.region[:2]
    f = plan.scale
    tiles = np.stack([
        read_window(slide, level=plan.level, x0=x + c * f, y0=y + r * f, scale=f, size=plan.tile) for r, c in plan.tiles
    ])
    model.predict(tiles[:batch])  # warm-up (first-call allocations)
    runs: dict[str, list[float]] = {"network_only": [], "engine_prefetch": [], "engine_no_prefetch": []}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    last = {}
    for k in range(repeats):
        order = ["network_only", "engine_prefetch", "engine_no_prefetch"]
        if k % 2:
            order.reverse()  # alternate so that drifting load on a shared machine hits all alike
        for what in order:
            t, c = time.perf_counter(), time.process_time()
            if what == "network_only":
                for b in range(0, len(tiles), batch):
                    model.predict(tiles[b : b + batch])
            else:
                with tempfile.TemporaryDirectory(prefix="bench-inference-") as wd:
                    res = segment_nuclei(slide, model, region=region, batch_size=batch, work_dir=wd,
                                         prefetch=what == "engine_prefetch")
                    last[what] = {"nuclei": res.n_nuclei, "tiles": res.tiles, "timings": res.timings}
            runs[what].append(time.perf_counter() - t)
            cpu[what].append(time.process_time() - c)
    best = {k: min(v) for k, v in runs.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}
    n = best["network_only"]
    eng = last["engine_prefetch"]["timings"]
    return {
        "model": model.name,
        "device": str(model.device),
        "torch_threads": torch.get_num_threads(),
        "region_xywh": list(plan.region),
        "tiles": len(plan.tiles),
        "tile": plan.tile,
        "batch": batch,
        "repeats": repeats,
        "seconds_best": {k: round(v, 2) for k, v in best.items()},
        "seconds_all": {k: [round(s, 2) for s in v] for k, v in runs.items()},
        "cpu_seconds_best": {k: round(v, 2) for k, v in best_cpu.items()},
        "overhead": round(best["engine_prefetch"] / n - 1.0, 4),
        "overhead_no_prefetch": round(best["engine_no_prefetch"] / n - 1.0, 4),
        # CPU time (all threads) is steadier than wall time on a shared, busy machine
        "overhead_cpu": round(best_cpu["engine_prefetch"] / best_cpu["network_only"] - 1.0, 4),
        "overhead_cpu_no_prefetch": round(best_cpu["engine_no_prefetch"] / best_cpu["network_only"] - 1.0, 4),
        # inside one engine run: everything but the network, over the network
        "overhead_in_run": round((eng["total_s"] - eng["network_s"]) / eng["network_s"], 4),
        "runs": last,
        "target_overhead_max": 0.15,
    }


# ----------------------------------------------------------------------------- (b) memory


def _memory_child(path: str, *, mpp: float, prefetch: bool) -> None:
    from napari_pathoseg.inference import ProbabilityMap, StainDensityPredictor, run_predict
    from napari_pathoseg.wsi.slide import open_slide

    base = _peak_rss_mb()
    with open_slide(path) as slide, tempfile.TemporaryDirectory(prefix="bench-inference-", dir=Path(path).parent) as wd:
        t = time.perf_counter()
        res = run_predict(slide, StainDensityPredictor(mpp=mpp), [ProbabilityMap("density", dtype="uint8")],
                          overlap=32, batch_size=4, work_dir=wd, prefetch=prefetch)
        t_run = time.perf_counter() - t
        peak_run = _peak_rss_mb()
        m = res.outputs["density"]
        t = time.perf_counter()
        out = m.write_pyramid(Path(wd) / "density.tif", channel=0)
        t_pyr = time.perf_counter() - t
        size = out.stat().st_size
    print(json.dumps({
        "slide": os.path.basename(path),
        "prefetch": prefetch,
        "level0": list(res.plan.region[2:]),
        "map_shape": list(m.shape),
        "tiles": res.tiles,
        "grid_tiles": res.plan.grid_size,
        "infer_s": round(t_run, 1),
        "pyramid_s": round(t_pyr, 1),
        "timings": res.timings,
        "peak_rows_in_memory": m.peak_rows,
        "map_mb": round(math.prod(m.shape) * m.store.dtype.itemsize / 2**20, 1),
        "pyramid_mb": round(size / 2**20, 1),
        "rss_at_start_mb": round(base, 1),
        "peak_rss_after_inference_mb": round(peak_run, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }))


def memory(path: str, *, mpp: float, prefetch: bool = True) -> dict:
    cmd = [sys.executable, __file__, "--child-memory", path, "--mpp", str(mpp)] + ([] if prefetch else ["--no-prefetch"])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="a,b", help="a: overhead on the sample slide; b: memory on synthetic slides")
    ap.add_argument("--model", default="nuclei-lite")
    ap.add_argument("--region", default=None, help="x,y,w,h for part a (default: the sample's whole tissue)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sizes", default="25000,50000", help="synthetic slide sides for part b")
    ap.add_argument("--mpp", type=float, default=2.0, help="µm/px of the stain-density map (part b)")
    ap.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "pathoseg-bench"))
    ap.add_argument("--quick", action="store_true", help="smoke run: a small region, 4000² and 8000² slides")
    ap.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-prefetch", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_memory:
        _memory_child(args.child_memory, mpp=args.mpp, prefetch=not args.no_prefetch)
        return
    parts = set(args.parts.split(","))
    result: dict = {"machine": {"cpus": os.cpu_count(), "load_avg_1min_at_start": round(os.getloadavg()[0], 2)}}
    if "a" in parts:
        region = tuple(int(v) for v in args.region.split(",")) if args.region else ((768, 1920, 768, 768) if args.quick else None)
        result["overhead"] = overhead(model_name=args.model, region=region, batch=args.batch, repeats=args.repeats)
    if "b" in parts:
        from napari_pathoseg.wsi.synth import make_large_slide

        cache = Path(args.cache)
        cache.mkdir(parents=True, exist_ok=True)
        sizes = (4000, 8000) if args.quick else tuple(int(s) for s in args.sizes.split(","))
        result["memory"] = {}
        for sz in sizes:
            p = cache / f"synthetic_{sz}.tif"
            if not p.exists():
                make_large_slide(p, size=sz)
            result["memory"][str(sz)] = memory(str(p), mpp=args.mpp)
            if sz == sizes[0]:  # the same run without prefetching, for its effect on time
                result["memory"][f"{sz}_no_prefetch"] = memory(str(p), mpp=args.mpp, prefetch=False)
        result["memory_target_peak_rss_mb_max"] = 1536
    result["machine"]["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
