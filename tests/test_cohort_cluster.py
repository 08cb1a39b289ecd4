"""Cohorts on real dask clusters: a LocalCluster of two worker processes, and a separately started
``dask scheduler`` + ``dask worker`` on 127.0.0.1 (both slow: they start Python processes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from napari_pathoseg.cohort.manifest import read_manifest
from napari_pathoseg.cohort.runner import run_cohort
from napari_pathoseg.cohort.summary import read_summary
from napari_pathoseg.cohort.tasks import BATCH_TASKS, BatchTask, SlideOutput
from test_cohort import make_cohort

pytestmark = pytest.mark.slow


def thumbnail_or_crash(slide, *, out_dir, **kwargs) -> SlideOutput:
    """A light runner (no torch): the slide's mean grey level; its worker dies on the slide ``crash``."""
    import numpy as np

    from napari_pathoseg._atomic import write_text

    if Path(out_dir).name == "crash":
        os._exit(3)  # what a segfault or the memory limit does to a worker
    grey = float(np.asarray(slide.thumbnail(max_size=64)).mean())
    return SlideOutput(figures={"grey": round(grey, 3)},
                       files={"grey": write_text(Path(out_dir) / "grey.txt", f"{grey:.3f}\n")})


def test_local_cluster_two_worker_processes_nuclei(tmp_path, he_image, make_pyramid_tiff):
    folder = make_cohort(tmp_path / "slides", he_image, make_pyramid_tiff, good=2)
    res = run_cohort(read_manifest(folder), task="nuclei", out_dir=tmp_path / "out", workers=2,
                     threads_per_worker=1, processes=True, retries=1, dashboard=None)
    rows = {r["stem"]: r for r in res.rows}
    assert (res.n_ok, res.n_failed, res.workers) == (2, 1, 2)
    assert rows["broken"]["status"] == "failed" and rows["broken"]["attempts"] == 1  # a file error: not retried
    assert "broken.tif" in rows["broken"]["error"]
    ok = [r for r in res.rows if r["status"] == "ok"]
    assert all(int(r["n_nuclei"]) > 20 for r in ok)
    # the slides ran in worker processes; each process loaded the model once (its warm-up or its
    # first slide did), whatever it ran
    pids = {r["pid"] for r in res.rows}
    assert os.getpid() not in pids
    assert all(r["model_loads"] == 1 for r in res.rows)
    assert sum(not r["model_cached"] for r in res.rows) <= len(pids)
    # the phases of the run are timed; the workers end without finalising torch (fast close)
    assert set(res.timings) >= {"verify_s", "cluster_start_s", "first_result_s", "run_s", "close_s", "total_s"}
    assert res.timings["close_s"] < 2.0


def test_an_unknown_model_is_refused_by_the_worker_before_any_slide_runs(tmp_path, he_image, make_pyramid_tiff):
    from napari_pathoseg.cohort.runner import CohortError

    folder = make_cohort(tmp_path / "slides", he_image, make_pyramid_tiff, good=1, corrupt=False)
    with pytest.raises(CohortError, match="no nuclei model named 'nope'; pass --model"):
        run_cohort(read_manifest(folder), task="nuclei", out_dir=tmp_path / "out", model="nope", workers=1,
                   processes=True, dashboard=None)
    assert not (tmp_path / "out" / "summary.csv").exists() and not (tmp_path / "out" / "slide0").exists()


def test_a_dying_worker_is_retried_then_the_slide_fails(tmp_path, he_image, make_pyramid_tiff, monkeypatch):
    folder = make_cohort(tmp_path / "slides", he_image, make_pyramid_tiff, good=1, corrupt=False)
    shutil.copy(folder / "slide0.tif", folder / "crash.tif")
    monkeypatch.setitem(BATCH_TASKS, "greytest", BatchTask(
        "greytest", "mean grey; the worker dies on 'crash'", runner="test_cohort_cluster:thumbnail_or_crash",
        figures=("grey",)))
    res = run_cohort(read_manifest(folder), task="greytest", out_dir=tmp_path / "out", workers=1,
                     processes=True, retries=1, dashboard=None)
    rows = {r["stem"]: r for r in res.rows}
    assert rows["crash"]["status"] == "failed" and rows["crash"]["attempts"] == 2
    assert "the worker running it died (2 attempt(s);" in rows["crash"]["error"]
    assert rows["slide0"]["status"] == "ok" and 50 < rows["slide0"]["grey"] < 250


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=log.parent)


def test_separate_scheduler_and_worker_processes(tmp_path, he_image, make_pyramid_tiff, capsys):
    from napari_pathoseg.cli.main import main

    make_cohort(tmp_path / "slides", he_image, make_pyramid_tiff, good=1, corrupt=False)
    dask_cli = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    sched_file = tmp_path / "scheduler.json"
    procs = [_start(dask_cli + ["--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file",
                                str(sched_file)], tmp_path / "scheduler.log")]
    try:
        end = time.monotonic() + 60
        while not sched_file.exists() and time.monotonic() < end:
            time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        procs.append(_start([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                             "--nworkers", "1", "--no-dashboard", "--host", "127.0.0.1"], tmp_path / "worker.log"))
        man = tmp_path / "cohort.csv"
        man.write_text("slide,label\nslides/slide0.tif,a\n")
        code = main(["batch", str(man), "--task", "nuclei", "--out", str(tmp_path / "out"), "--scheduler", address])
        cap = capsys.readouterr()
        assert code == 0, cap.err
        info = json.loads(cap.out)
        assert (info["ok"], info["failed"], info["scheduler"]) == (1, 0, address)
        rows = read_summary(tmp_path / "out" / "summary.csv")
        assert [r["status"] for r in rows] == ["ok"] and int(rows[0]["n_nuclei"]) > 20
        assert all(r["worker"].startswith("tcp://127.0.0.1:") for r in rows)
        assert (tmp_path / "out" / "slide0" / "nuclei_labels.tif").stat().st_size > 0
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
