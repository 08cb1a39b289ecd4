"""Slide-reading benchmark: our dask pyramid vs OpenSlide on the same tiles, same run.

Prints one JSON object:

* ``random_tiles``: 500 random 256x256 level-0 tiles, per slide (the bundled sample and a
  generated large slide), read (a) one ``np.asarray(level[window])`` per tile through the dask
  pyramid, chunk-aligned and unaligned, (b) the same windows of a zero-cost dask array of the
  same shape and chunks (``da.zeros``: dask's own per-call floor, no file involved), (c) all
  500 in one threaded ``dask.compute`` (how dask reads many windows), (d) OpenSlide
  ``read_region`` one by one; plus 40 random napari-sized 1024x1024 viewports, one call each
  (what napari's multiscale slicing asks for) through both. ``ratio_*`` = our time / OpenSlide's.
* ``pan_latency_ms``: chunk-fetch latency while panning a 1024x1024 viewport across the
  generated slide at level 0 and level 2 (p50/p95/max per chunk).
* ``memory``: peak RSS while reading every level-0 tile of generated slides of two sizes once,
  each in a fresh process (flat in slide size when memory is bounded by tiles).

Usage: ``python benchmarks/bench_slide.py [--size 50000] [--cache DIR] [--quick] [--parts tiles,pan,memory]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import dask
import numpy as np


def _pct(values, q):
    return float(np.percentile(np.asarray(values), q))


def random_tiles(path: str, n: int = 500, seed: int = 0, view: int = 1024, n_views: int = 40) -> dict:
    import openslide

    from napari_pathoseg.wsi.slide import open_slide

    s = open_slide(path)
    osr = openslide.OpenSlide(path)
    lv = s.pyramid[0]
    rows, cols = lv.shape[:2]
    ch_r, ch_c = lv.chunksize[:2]
    # dask's own floor: the same slices of a dask array with the same shape and chunks whose
    # chunks cost nothing to make (no file at all)
    floor = dask.array.zeros(lv.shape, chunks=lv.chunksize, dtype=np.uint8)
    rng = np.random.default_rng(seed)
    un = [(int(r), int(c)) for r, c in zip(rng.integers(0, rows - 256, n), rng.integers(0, cols - 256, n))]
    al = [
        (int(r) * ch_r, int(c) * ch_c)
        for r, c in zip(rng.integers(0, rows // ch_r, n), rng.integers(0, cols // ch_c, n))
    ]
    view = min(view, rows, cols)
    views = [(int(r), int(c)) for r, c in zip(rng.integers(0, rows - view + 1, n_views), rng.integers(0, cols - view + 1, n_views))]

    def t_dask(coords, arr=lv, size=256):
        t = time.perf_counter()
        for r, c in coords:
            np.asarray(arr[r : r + size, c : c + size])  # what napari does with a slice
        return time.perf_counter() - t

    def t_dask_batch(coords):
        t = time.perf_counter()
        dask.compute(*[lv[r : r + 256, c : c + 256] for r, c in coords], scheduler="threads")
        return time.perf_counter() - t

    def t_dask_batch_aligned(coords):
        t = time.perf_counter()
        dask.compute(*[lv[r : r + 256, c : c + 256] for r, c in coords], scheduler="threads")
        return time.perf_counter() - t

    def t_os(coords, size=256):
        t = time.perf_counter()
        for r, c in coords:
            np.asarray(osr.read_region((c, r), 0, (size, size)))
        return time.perf_counter() - t

    # warm both caches equally, then interleave repeats and keep the best of 3
    t_os(al[:50]), t_dask(al[:50])
    keys = (
        "dask_aligned", "dask_unaligned", "dask_batch_threads", "dask_batch_threads_aligned", "openslide_aligned", "openslide_unaligned",
        "dask_floor_aligned", "dask_floor_unaligned", "dask_view", "openslide_view",
    )
    res = {k: [] for k in keys}
    for _ in range(3):
        res["openslide_aligned"].append(t_os(al))
        res["dask_aligned"].append(t_dask(al))
        res["dask_floor_aligned"].append(t_dask(al, floor))
        res["openslide_unaligned"].append(t_os(un))
        res["dask_unaligned"].append(t_dask(un))
        res["dask_floor_unaligned"].append(t_dask(un, floor))
        res["dask_batch_threads"].append(t_dask_batch(un))
        res["dask_batch_threads_aligned"].append(t_dask_batch_aligned(al))
        res["openslide_view"].append(t_os(views, view))
        res["dask_view"].append(t_dask(views, lv, view))
    best = {k: min(v) for k, v in res.items()}
    per = {k: v / (n_views if k.endswith("_view") else n) * 1000 for k, v in best.items()}
    return {
        "slide": Path(path).name,
        "chunk": [int(ch_r), int(ch_c)],
        "view": view,
        "seconds": {k: round(v, 4) for k, v in best.items()},
        "ms_per_read": {k: round(v, 3) for k, v in per.items()},
        # one np.asarray(level[window]) per 256 px tile, our time / OpenSlide's
        "ratio_aligned": round(best["dask_aligned"] / best["openslide_aligned"], 3),
        "ratio_unaligned": round(best["dask_unaligned"] / best["openslide_unaligned"], 3),
        # the same with a zero-cost dask array: what dask alone costs per call
        "ratio_floor_aligned": round(best["dask_floor_aligned"] / best["openslide_aligned"], 3),
        "ratio_floor_unaligned": round(best["dask_floor_unaligned"] / best["openslide_unaligned"], 3),
        # our per-call time above dask's floor (what reading our slide adds), / OpenSlide's
        "ratio_above_floor_unaligned": round(
            (best["dask_unaligned"] - best["dask_floor_unaligned"]) / best["openslide_unaligned"], 3
        ),
        # all 500 tiles in one threaded dask.compute (how dask is meant to read) vs OpenSlide 1 by 1
        "ratio_batch_threads_vs_openslide": round(best["dask_batch_threads"] / best["openslide_unaligned"], 3),
        "ratio_batch_threads_aligned_vs_openslide": round(best["dask_batch_threads_aligned"] / best["openslide_aligned"], 3),
        # a napari-sized viewport (view x view px) per call, as napari's multiscale slicing reads
        "ratio_view": round(best["dask_view"] / best["openslide_view"], 3),
    }


def pan_latency(path: str, level: int, steps: int = 60) -> dict:
    """Pan a 1024x1024 viewport diagonally; time every newly visible chunk fetch."""
    from napari_pathoseg.wsi.slide import open_slide

    s = open_slide(path)
    lv = s.pyramid[level]
    rows, cols = lv.shape[:2]
    cr, cc = lv.chunksize[:2]
    seen = set()
    lat = []
    view = 1024
    step_r = max(1, (rows - view) // steps)
    step_c = max(1, (cols - view) // steps)
    for k in range(steps):
        r0, c0 = k * step_r, k * step_c
        for i in range(r0 // cr, min(rows - 1, r0 + view) // cr + 1):
            for j in range(c0 // cc, min(cols - 1, c0 + view) // cc + 1):
                if (i, j) in seen:
                    continue
                seen.add((i, j))
                t = time.perf_counter()
                lv.blocks[i, j].compute()
                lat.append((time.perf_counter() - t) * 1000)
    return {
        "level": level,
        "chunks": len(lat),
        "p50": round(_pct(lat, 50), 2),
        "p95": round(_pct(lat, 95), 2),
        "max": round(max(lat), 2),
    }


def _peak_rss_mb() -> float:
    """This process's peak resident memory, MB.

    Linux: ``VmHWM`` from /proc/self/status, which starts afresh at exec. ``ru_maxrss`` does not
    (a child started by a big parent inherits the parent's high-water mark), so it is only the
    fallback elsewhere.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _read_all_child(path: str) -> None:
    from napari_pathoseg.wsi.slide import open_slide

    s = open_slide(path)
    lv = s.pyramid[0]
    base = _peak_rss_mb()
    n = 0
    t = time.perf_counter()
    for i in range(lv.numblocks[0]):
        for j in range(lv.numblocks[1]):
            lv.blocks[i, j].compute(scheduler="sync")
            n += 1
    peak = _peak_rss_mb()
    print(json.dumps({"tiles": n, "seconds": round(time.perf_counter() - t, 1), "peak_rss_mb": round(peak, 1), "rss_before_mb": round(base, 1)}))


def read_all(path: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child-read-all", path], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=50_000)
    ap.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "pathoseg-bench"))
    ap.add_argument("--quick", action="store_true", help="small slides only (smoke run)")
    ap.add_argument("--parts", default="tiles,pan,memory", help="comma-separated subset of tiles,pan,memory")
    ap.add_argument("--child-read-all", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_read_all:
        _read_all_child(args.child_read_all)
        return
    from napari_pathoseg.wsi.slide import sample_slide_path
    from napari_pathoseg.wsi.synth import make_large_slide

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    big = args.size if not args.quick else 8000
    half = big // 2
    paths = {}
    gen_s = {}
    for sz in (half, big):
        p = cache / f"synthetic_{sz}.tif"
        if not p.exists():
            t = time.perf_counter()
            make_large_slide(p, size=sz)
            gen_s[sz] = round(time.perf_counter() - t, 1)
        paths[sz] = str(p)
    result = {
        "machine": {"cpus": os.cpu_count()},
        "generated": {str(k): {"path": v, "bytes": os.path.getsize(v), "write_seconds": gen_s.get(k)} for k, v in paths.items()},
        "targets": {"ratio_max": 1.2, "pan_p95_ms_max": 50, "peak_rss_mb_max": 1024},
    }
    parts = set(args.parts.split(","))
    if "tiles" in parts:
        result["random_tiles"] = [random_tiles(str(sample_slide_path())), random_tiles(paths[big])]
    if "pan" in parts:
        result["pan_latency_ms"] = [pan_latency(paths[big], 0), pan_latency(paths[big], 2)]
    if "memory" in parts:
        result["memory"] = {str(sz): read_all(paths[sz]) for sz in (half, big)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
