"""Cohort runner (``pathoseg batch``): scaling over workers, overhead over a plain loop, worker memory.

Prints one JSON document. The cohort is ``--slides`` real H&E slides (crops of the bundled
CMU-1-Small-Region sample, ``--size``² pixels at 0.5 µm/px, written as pyramidal TIFFs), analysed
with the shipped ``nuclei-lite`` model (task ``nuclei``).

* ``loop``: the same slides one by one in a plain loop (``run_nuclei_slide``, model loaded once),
  in a fresh Python process, timed from its start (imports and model load included).
* ``runner_1x1``: :func:`~napari_pathoseg.cohort.runner.run_cohort` with one single-threaded
  worker process, timed from the call to its return (cluster start and stop included);
  ``overhead = runner_1x1 / loop - 1`` (target <= 0.10).
* ``runner_2x1``: two single-threaded worker processes; ``speedup_processes = runner_1x1 / runner_2x1``
  (target >= 1.7 on 2 cores).
* ``runner_1x2``: one worker process with two threads; ``speedup_threads = runner_1x1 / runner_1x2``.
* ``memory``: one worker process per run over one slide of ``--size``² and one of ``--large``²;
  peak resident memory of the worker (``ru_maxrss``, reported by the job) at each size.

Usage: ``python benchmarks/bench_cohort.py [--slides 6] [--size 512] [--large 2048] [--out DIR]``.
The numbers depend on what else the machine runs; the load average is reported with them.
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


def make_slides(folder: Path, *, n: int, size: int) -> list[Path]:
    """``n`` real H&E crops of the bundled sample, ``size``² each (wrapping around the sample)."""
    import numpy as np

    from napari_pathoseg.wsi.slide import open_slide, sample_slide_path
    from napari_pathoseg.wsi.synth import make_large_slide, write_pyramid_tiff

    folder.mkdir(parents=True, exist_ok=True)
    if size > 1500:
        return [make_large_slide(folder / f"large{i}.tif", size=size) for i in range(n)]
    with open_slide(sample_slide_path()) as s:
        img = np.asarray(s.pyramid[0].compute())
    rows, cols = img.shape[:2]
    out = []
    for i in range(n):
        r = (600 + i * 331) % (rows - size)
        c = (200 + i * 257) % (cols - size)
        out.append(write_pyramid_tiff(folder / f"s{i:02d}.tif", img[r : r + size, c : c + size], levels=2, tile=256, mpp=0.5))
    return out


def loop_main(folder: str, out: str) -> None:
    """The baseline: a plain loop over the slides (run in a fresh process by :func:`time_loop`)."""
    import tempfile as tf

    import torch

    torch.set_num_threads(1)
    from napari_pathoseg.cohort.nuclei import run_nuclei_slide
    from napari_pathoseg.models.registry import load_model
    from napari_pathoseg.wsi.slide import open_slide

    model = load_model("nuclei-lite", task="nuclei", device="cpu")
    for p in sorted(Path(folder).glob("*.tif")):
        d = Path(out) / p.stem
        d.mkdir(parents=True, exist_ok=True)
        with open_slide(p) as slide, tf.TemporaryDirectory(dir=d) as wd:
            run_nuclei_slide(slide, model=model, out_dir=d, work_dir=wd)


def time_loop(folder: Path, out: Path) -> float:
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, __file__, "--loop", str(folder), str(out)], check=True, env=env)
    return time.perf_counter() - t0


def time_runner(folder: Path, out: Path, *, workers: int, threads: int) -> tuple[float, list[dict]]:
    from napari_pathoseg.cohort.manifest import read_manifest
    from napari_pathoseg.cohort.runner import run_cohort

    slides = read_manifest(folder)
    t0 = time.perf_counter()
    res = run_cohort(slides, task="nuclei", out_dir=out, workers=workers, threads_per_worker=threads,
                     processes=True, force=True, dashboard=None)
    seconds = time.perf_counter() - t0
    if res.n_failed:
        raise SystemExit(f"benchmark run failed: {[r['error'] for r in res.rows if r['status'] == 'failed']}")
    return seconds, res.rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=6)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--large", type=int, default=2048)
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--loop", nargs=2, metavar=("FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.loop:
        loop_main(*args.loop)
        return {}
    import logging

    logging.getLogger("distributed").setLevel(logging.ERROR)
    root = Path(args.out or tempfile.mkdtemp(prefix="bench-cohort-"))
    cohort = root / "cohort"
    make_slides(cohort, n=args.slides, size=args.size)
    report: dict = {"slides": args.slides, "size": args.size, "cores": len(os.sched_getaffinity(0)),
                    "load_average_start": os.getloadavg()}
    report["loop_s"] = round(time_loop(cohort, root / "loop"), 2)
    for name, (w, t) in {"runner_1x1": (1, 1), "runner_2x1": (2, 1), "runner_1x2": (1, 2)}.items():
        seconds, rows = time_runner(cohort, root / name, workers=w, threads=t)
        report[f"{name}_s"] = round(seconds, 2)
        report[f"{name}_slide_s_mean"] = round(sum(float(r["seconds"]) for r in rows) / len(rows), 2)
    report["overhead"] = round(report["runner_1x1_s"] / report["loop_s"] - 1, 3)
    report["speedup_processes"] = round(report["runner_1x1_s"] / report["runner_2x1_s"], 3)
    report["speedup_threads"] = round(report["runner_1x1_s"] / report["runner_1x2_s"], 3)
    memory = {}
    for size in (args.size, args.large):
        folder = root / f"mem{size}"
        make_slides(folder, n=1, size=size)
        seconds, rows = time_runner(folder, root / f"mem{size}-out", workers=1, threads=1)
        memory[str(size)] = {"worker_peak_rss_mb": rows[0]["peak_rss_mb"], "seconds": round(seconds, 2),
                             "n_nuclei": rows[0]["n_nuclei"]}
    report["memory"] = memory
    report["load_average_end"] = os.getloadavg()
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
