"""Cohort runner (``pathoseg batch``): scaling over workers, overhead over a plain loop, worker memory.

Prints one JSON document. The cohort is ``--slides`` real H&E slides (crops of the bundled
CMU-1-Small-Region sample, ``--size``² pixels at 0.5 µm/px, written as pyramidal TIFFs), analysed
with the shipped ``nuclei-lite`` model (task ``nuclei``).

* ``loop``: the same slides one by one in a plain loop (``run_nuclei_slide``, model loaded once),
  in a fresh Python process, timed from its start (imports and model load included);
  ``loop_fixed_s``: that time minus the slides' own seconds.
* ``runner_1x1``: :func:`~napari_pathoseg.cohort.runner.run_cohort` with one single-threaded
  worker process, also in a fresh Python process timed from its start (imports, cluster start
  and stop included, as ``pathoseg batch`` pays them); ``overhead = runner_1x1 / loop - 1``
  (target <= 0.10), split into ``overhead_fixed_s`` (the runner's fixed seconds beyond the
  loop's) and ``overhead_per_slide_s`` (a slide in the worker against a slide in the loop);
  ``runner_1x1_timings``: the runner's phases (``CohortResult.timings``).
* ``runner_2x1``: two single-threaded worker processes; ``speedup_processes = runner_1x1 / runner_2x1``
  (target >= 1.7 on 2 cores).
* ``runner_1x2``: one worker process with two threads; ``speedup_threads = runner_1x1 / runner_1x2``.
* ``memory``: one worker process per run over one slide of ``--size``² and one of ``--large``²;
  peak resident memory of the worker (``ru_maxrss``, reported by the job) at each size.

Usage: ``python benchmarks/bench_cohort.py [--slides 6] [--size 512] [--large 2048] [--runs 1x1,2x1,1x2]
[--no-memory] [--out DIR]``.
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
    """The baseline: a plain loop over the slides (run in a fresh process by :func:`time_loop`).

    Prints the per-slide seconds as JSON (the fixed cost is the process time minus their sum).
    """
    import tempfile as tf

    import dask
    import torch

    # the same resources as one single-threaded worker: one torch thread, and dask arrays computed
    # in the calling thread (a worker task runs them with the synchronous scheduler, cohort/job.py);
    # dask's default threaded scheduler would give the loop the second core for reading tiles
    torch.set_num_threads(1)
    dask.config.set(scheduler="synchronous")
    from napari_pathoseg.cohort.nuclei import run_nuclei_slide
    from napari_pathoseg.models.registry import load_model
    from napari_pathoseg.wsi.slide import open_slide

    model = load_model("nuclei-lite", task="nuclei", device="cpu")
    seconds = []
    for p in sorted(Path(folder).glob("*.tif")):
        t0 = time.perf_counter()
        d = Path(out) / p.stem
        d.mkdir(parents=True, exist_ok=True)
        with open_slide(p) as slide, tf.TemporaryDirectory(dir=d) as wd:
            run_nuclei_slide(slide, model=model, out_dir=d, work_dir=wd)
        seconds.append(time.perf_counter() - t0)
    print(json.dumps({"slide_s": seconds}))


def runner_main(folder: str, out: str, workers: str, threads: str) -> None:
    """``run_cohort`` in a fresh process, as ``pathoseg batch`` runs it; prints its rows and timings."""
    import logging

    logging.getLogger("distributed").setLevel(logging.ERROR)
    from napari_pathoseg.cohort.manifest import read_manifest
    from napari_pathoseg.cohort.runner import run_cohort

    res = run_cohort(read_manifest(folder), task="nuclei", out_dir=out, workers=int(workers),
                     threads_per_worker=int(threads), processes=True, force=True, dashboard=None)
    rows = [{k: r.get(k) for k in ("status", "error", "seconds", "peak_rss_mb", "n_nuclei")} for r in res.rows]
    print(json.dumps({"rows": rows, "timings": getattr(res, "timings", {})}))


def _fresh(args: list[str]) -> tuple[float, dict]:
    """Run this file with ``args`` in a fresh process (one OpenMP thread); (wall seconds, its JSON)."""
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, *args], check=True, env=env, stdout=subprocess.PIPE, text=True)
    return time.perf_counter() - t0, json.loads(proc.stdout.strip().splitlines()[-1])


def time_loop(folder: Path, out: Path) -> tuple[float, list[float]]:
    seconds, info = _fresh(["--loop", str(folder), str(out)])
    return seconds, info["slide_s"]


def time_runner(folder: Path, out: Path, *, workers: int, threads: int) -> tuple[float, list[dict], dict]:
    seconds, info = _fresh(["--runner", str(folder), str(out), str(workers), str(threads)])
    failed = [r["error"] for r in info["rows"] if r["status"] == "failed"]
    if failed:
        raise SystemExit(f"benchmark run failed: {failed}")
    return seconds, info["rows"], info["timings"]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=6)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--large", type=int, default=2048)
    ap.add_argument("--runs", default="1x1,2x1,1x2", help="runner configurations WORKERSxTHREADS (default 1x1,2x1,1x2)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--loop", nargs=2, metavar=("FOLDER", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--runner", nargs=4, metavar=("FOLDER", "OUT", "W", "T"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.loop:
        loop_main(*args.loop)
        return {}
    if args.runner:
        runner_main(*args.runner)
        return {}
    root = Path(args.out or tempfile.mkdtemp(prefix="bench-cohort-"))
    cohort = root / "cohort"
    make_slides(cohort, n=args.slides, size=args.size)
    report: dict = {"slides": args.slides, "size": args.size, "cores": len(os.sched_getaffinity(0)),
                    "load_average_start": os.getloadavg()}
    loop_s, loop_slides = time_loop(cohort, root / "loop")
    report["loop_s"] = round(loop_s, 2)
    report["loop_slide_s_mean"] = round(sum(loop_slides) / len(loop_slides), 2)
    # what the loop pays besides its slides: Python, imports, the model
    report["loop_fixed_s"] = round(loop_s - sum(loop_slides), 2)
    for cfg in args.runs.split(","):
        w, t = (int(v) for v in cfg.lower().split("x"))
        name = f"runner_{w}x{t}"
        seconds, rows, timings = time_runner(cohort, root / name, workers=w, threads=t)
        slide_s = [float(r["seconds"]) for r in rows]
        report[f"{name}_s"] = round(seconds, 2)
        report[f"{name}_slide_s_mean"] = round(sum(slide_s) / len(slide_s), 2)
        report[f"{name}_timings"] = timings
        if (w, t) == (1, 1):
            # one worker runs the slides one after another: the rest is the runner's fixed cost
            report["runner_1x1_fixed_s"] = round(seconds - sum(slide_s), 2)
    if "runner_1x1_s" in report:
        report["overhead"] = round(report["runner_1x1_s"] / report["loop_s"] - 1, 3)
        report["overhead_fixed_s"] = round(report["runner_1x1_fixed_s"] - report["loop_fixed_s"], 2)
        report["overhead_per_slide_s"] = round(report["runner_1x1_slide_s_mean"] - report["loop_slide_s_mean"], 3)
        for other, key in (("runner_2x1_s", "speedup_processes"), ("runner_1x2_s", "speedup_threads")):
            if other in report:
                report[key] = round(report["runner_1x1_s"] / report[other], 3)
    if not args.no_memory:
        memory = {}
        for size in (args.size, args.large):
            folder = root / f"mem{size}"
            make_slides(folder, n=1, size=size)
            seconds, rows, _ = time_runner(folder, root / f"mem{size}-out", workers=1, threads=1)
            memory[str(size)] = {"worker_peak_rss_mb": rows[0]["peak_rss_mb"], "seconds": round(seconds, 2),
                                 "n_nuclei": rows[0]["n_nuclei"]}
        report["memory"] = memory
    report["load_average_end"] = os.getloadavg()
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
