"""Benchmark: QuPath GeoJSON export of many synthetic nuclei (objects/s, peak memory).

The label image (ellipses of 3-7 px radius on a jittered 20 px grid; export chunks of
1024 px cut across them) is written once to a zarr store and exported from a lazy dask
view of it, as a whole-slide result would be, so the input costs no memory: the peak
memory measured with :mod:`tracemalloc` is that of the export.
The naive baseline, for comparison, traces one object at a time with
:func:`skimage.measure.find_contours` and keeps every feature in a list before one
``json.dump`` (run on a subset and reported per object).

Usage::

    python benchmarks/bench_export.py                   # 200,000 nuclei
    python benchmarks/bench_export.py --n 20000 --baseline 2000

Prints one JSON object. ``objects_per_s`` is wall-clock throughput; on a shared machine
``objects_per_cpu_s`` (process CPU time, the export is single-threaded) is the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

import dask.array as da
import numpy as np

from napari_pathoseg.export.geojson import run_export_labels

BLOCK = 1000
SPACING = 20  # one nucleus per 20 x 20 pixels


def _block(block_info=None) -> np.ndarray:
    """One block of nuclei: an ellipse per 20 x 20 cell (radii 3-7 px, jittered, rotated)."""
    info = block_info[None]
    (r0, r1), (c0, c1) = info["array-location"]
    bi, bj = info["chunk-location"]
    nb_cols = info["num-chunks"][1]
    rng = np.random.default_rng(1000 + bi * nb_cols + bj)
    cells = BLOCK // SPACING
    jr, jc = rng.integers(-2, 3, size=(2, cells, cells))
    a, b = rng.uniform(3.0, 7.0, size=(2, cells, cells))
    theta = rng.uniform(0.0, math.pi, size=(cells, cells))
    rr, cc = np.indices((r1 - r0, c1 - c0))
    gr, gc = rr // SPACING, cc // SPACING
    dy = rr - (gr * SPACING + SPACING // 2 + jr[gr, gc])
    dx = cc - (gc * SPACING + SPACING // 2 + jc[gr, gc])
    ct, st = np.cos(theta[gr, gc]), np.sin(theta[gr, gc])
    u = (dx * ct + dy * st) / a[gr, gc]
    v = (-dx * st + dy * ct) / b[gr, gc]
    base = (bi * nb_cols + bj) * cells * cells
    return np.where(u * u + v * v <= 1.0, base + gr * cells + gc + 1, 0).astype(np.int32)


def synthetic_labels(n: int) -> da.Array:
    """Lazy (rows, cols) int32 label image with about ``n`` nuclei (``BLOCK`` x ``BLOCK`` blocks)."""
    per_block = (BLOCK // SPACING) ** 2
    blocks = max(1, math.ceil(n / per_block))
    nb_rows = int(math.floor(math.sqrt(blocks)))
    nb_cols = math.ceil(blocks / nb_rows)
    return da.map_blocks(_block, dtype=np.int32, chunks=((BLOCK,) * nb_rows, (BLOCK,) * nb_cols))


def stored_labels(n: int, folder: Path) -> da.Array:
    """The synthetic labels written once to a zarr store (as a whole-slide result would be), read lazily."""
    import zarr

    lazy = synthetic_labels(n)
    store = zarr.open(str(folder / "labels.zarr"), mode="w", shape=lazy.shape, chunks=(BLOCK, BLOCK), dtype=np.int32)
    da.store(lazy, store, lock=False, scheduler="sync")
    return da.from_zarr(str(folder / "labels.zarr"))


def naive_export(path: Path, labels: np.ndarray) -> int:
    """Baseline: find_contours per object, all features in memory, one json.dump."""
    from scipy import ndimage as ndi
    from skimage.measure import find_contours

    feats = []
    for i, sl in enumerate(ndi.find_objects(labels)):
        if sl is None:
            continue
        sub = np.pad(labels[sl] == i + 1, 1).astype(np.float64)
        for contour in find_contours(sub, 0.5)[:1]:
            xy = contour[:, ::-1] + np.array([sl[1].start - 0.5, sl[0].start - 0.5])
            feats.append({
                "type": "Feature",
                "id": str(uuid.uuid4()),
                "geometry": {"type": "Polygon", "coordinates": [np.round(xy, 2).tolist()]},
                "properties": {"objectType": "detection", "classification": {"name": "Nucleus", "color": [200, 0, 0]}},
            })
    with open(path, "w") as fh:
        json.dump({"type": "FeatureCollection", "features": feats}, fh)
    return len(feats)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200_000, help="approximate number of nuclei")
    p.add_argument("--baseline", type=int, default=5000, help="nuclei for the naive baseline (0: skip)")
    p.add_argument("--chunk", type=int, default=1024)
    args = p.parse_args(argv)

    out: dict = {"n_requested": args.n}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        labels = stored_labels(args.n, Path(tmp))
        out["shape"] = list(labels.shape)
        out["input"] = f"zarr, {BLOCK}x{BLOCK} int32 chunks, written in {time.perf_counter() - t0:.1f} s (not timed)"
        for name, measure in (("geometry_only", []), ("with_shape_measurements", None)):
            path = Path(tmp) / f"{name}.geojson"
            kwargs = dict(measure=measure, chunk_size=args.chunk, measurements_path=measure != [])
            t0, c0 = time.perf_counter(), time.process_time()
            res = run_export_labels(path, labels, **kwargs)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            # memory in a second run: tracemalloc slows allocation-heavy code, so it is not timed
            tracemalloc.start()
            run_export_labels(path, labels, **kwargs)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            out[name] = {
                "objects": res.n_objects,
                "seconds": round(dt, 2),
                "objects_per_s": round(res.n_objects / dt),
                "cpu_seconds": round(cpu, 2),
                "objects_per_cpu_s": round(res.n_objects / cpu),
                "peak_traced_MiB": round(peak / 2**20, 1),
                "file_MiB": round(path.stat().st_size / 2**20, 1),
            }
        if args.baseline:
            side = int(math.ceil(math.sqrt(args.baseline / ((BLOCK // SPACING) ** 2)))) * BLOCK
            small = np.asarray(synthetic_labels(args.baseline)[:side, :side].compute())
            t0 = time.perf_counter()
            nb = naive_export(Path(tmp) / "naive.geojson", small)
            dt_naive = time.perf_counter() - t0
            t0 = time.perf_counter()
            ours = run_export_labels(Path(tmp) / "ours.geojson", small, measure=[], measurements_path=False)
            dt_ours = time.perf_counter() - t0
            out["baseline_naive"] = {
                "objects": nb,
                "objects_per_s": round(nb / dt_naive),
                "ours_same_input_objects_per_s": round(ours.n_objects / dt_ours),
                "speedup": round((ours.n_objects / dt_ours) / (nb / dt_naive), 2),
            }
    out["max_rss_MiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["load_average_1min"] = round(os.getloadavg()[0], 2)  # the machine is shared: see objects_per_cpu_s
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
