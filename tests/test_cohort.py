"""Cohorts: manifest, task table, completeness records, the runner on an in-process cluster, the CLI."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from napari_pathoseg.cohort import outputs
from napari_pathoseg.cohort.manifest import ManifestError, read_manifest
from napari_pathoseg.cohort.progress import TerminalProgress
from napari_pathoseg.cohort.runner import CohortError, run_cohort
from napari_pathoseg.cohort.summary import read_summary
from napari_pathoseg.cohort.tasks import BatchTaskError, available_tasks, get_batch_task


def make_cohort(folder: Path, he_image: np.ndarray, make_pyramid_tiff, *, good: int = 2, corrupt: bool = True) -> Path:
    """``good`` small real H&E slides (256², 0.5 µm/px) and a corrupt one in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(good):
        crop = he_image[i * 256 : (i + 1) * 256, 256 + i * 128 : 512 + i * 128]
        make_pyramid_tiff(folder / f"slide{i}.tif", crop, levels=1, tile=128, mpp=0.5)
    if corrupt:
        (folder / "broken.tif").write_bytes(b"II*\x00" + b"\x07" * 300)
    return folder


# ----------------------------------------------------------------------------- manifest


def test_manifest_csv_relative_paths_values_and_extra_columns(tmp_path):
    (tmp_path / "s").mkdir()
    for n in ("a.svs", "b.ome.tiff"):
        (tmp_path / "s" / n).write_bytes(b"x")
    man = tmp_path / "cohort.csv"
    man.write_text('slide,mpp,label,region,patient\ns/a.svs,0.25,tumour,"10,20,300,400",P1\ns/b.ome.tiff,,normal,,P2\n\n')
    a, b = read_manifest(man)
    assert a.path == (tmp_path / "s" / "a.svs").resolve() and a.stem == "a"
    assert (a.mpp, a.label, a.region, a.extra) == (0.25, "tumour", (10, 20, 300, 400), {"patient": "P1"})
    assert (b.stem, b.mpp, b.region, b.line) == ("b", None, None, 3)


@pytest.mark.parametrize(
    "text, match",
    [
        ("path,label\na.svs,x\n", "needs a 'slide' column.*columns found: 'path', 'label'"),
        ("slide\na.svs\nmissing.svs\n", r"1 slide file\(s\) not found \(line 3: missing.svs\)"),
        ("slide,mpp\na.svs,-1\n", "line 2: mpp must be in"),
        ("slide,region\na.svs,1;2;3\n", "line 2: region must be"),
        ("slide\na.svs\n./a.svs\n", "listed more than once"),
        ("slide\n", "lists no slides"),
    ],
)
def test_manifest_errors_name_the_problem(tmp_path, text, match):
    (tmp_path / "a.svs").write_bytes(b"x")
    man = tmp_path / "m.csv"
    man.write_text(text)
    with pytest.raises(ManifestError, match=match):
        read_manifest(man)


def test_folder_manifest_and_name_clash(tmp_path):
    (tmp_path / "b.tif").write_bytes(b"x")
    (tmp_path / "a.svs").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.tif").write_bytes(b"x")
    assert [s.stem for s in read_manifest(tmp_path)] == ["a", "b"]
    (tmp_path / "a.tif").write_bytes(b"x")
    with pytest.raises(ManifestError, match="named 'a'.*same output folder"):
        read_manifest(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="holds no slide files"):
        read_manifest(tmp_path / "empty")


# ----------------------------------------------------------------------------- tasks


def test_task_table_lists_what_runs():
    assert "nuclei" in available_tasks()
    assert get_batch_task("nuclei").runner.endswith(":run_nuclei_slide")
    with pytest.raises(BatchTaskError, match="unknown task 'nucleus'; tasks that run: .*nuclei"):
        get_batch_task("nucleus")
    for name in ("lesion", "tissue", "malignancy", "mil"):
        if name not in available_tasks():
            with pytest.raises(BatchTaskError, match=f"the {name} analysis is not available yet.*tasks that run: .*nuclei"):
                get_batch_task(name)


# ----------------------------------------------------------------------------- records


def test_verify_slide_detects_every_kind_of_incompleteness(tmp_path):
    src = tmp_path / "s.tif"
    src.write_bytes(b"slide")
    folder = tmp_path / "out" / "s"
    folder.mkdir(parents=True)
    (folder / "a.csv").write_text("id\n1\n")
    params = {"task": "nuclei", "model": "m"}
    assert outputs.verify_slide(folder, params=params, source=src)[:2] == (False, "no finished result")
    outputs.write_record(folder, {"status": "ok", "params": params, "source": outputs.source_record(src),
                                  "outputs": [outputs.file_record(folder / "a.csv", folder=folder)]})
    assert outputs.verify_slide(folder, params=params, source=src)[:2] == (True, "")
    assert "other settings (model)" in outputs.verify_slide(folder, params={**params, "model": "x"}, source=src)[1]
    (folder / "a.csv").write_text("id\n2\n")  # same size, other content
    assert outputs.verify_slide(folder, params=params, source=src)[1] == "a.csv changed (sha256)"
    (folder / "a.csv").unlink()
    assert outputs.verify_slide(folder, params=params, source=src)[1] == "a.csv is missing"
    os.utime(src, ns=(1, 1))
    assert outputs.verify_slide(folder, params=params, source=src)[1] == "the slide file changed"


# ----------------------------------------------------------------------------- runner


@pytest.fixture
def cohort(tmp_path, he_image, make_pyramid_tiff):
    return make_cohort(tmp_path / "slides", he_image, make_pyramid_tiff)


def test_in_process_run_isolates_the_corrupt_slide_then_resumes_without_recomputing(tmp_path, cohort, one_torch_thread):
    slides = read_manifest(cohort)
    out = tmp_path / "out"
    events = []
    res = run_cohort(slides, task="nuclei", out_dir=out, workers=2, processes=False, dashboard=None, progress=events.append)
    assert (res.n_ok, res.n_failed, res.n_skipped, res.n_pending) == (2, 1, 0, 0)
    rows = {r["stem"]: r for r in read_summary(out / "summary.csv")}
    assert rows["broken"]["status"] == "failed" and "broken.tif" in rows["broken"]["error"]
    assert "\n" not in rows["broken"]["error"]
    for stem in ("slide0", "slide1"):
        assert rows[stem]["status"] == "ok" and int(rows[stem]["n_nuclei"]) > 20
        assert float(rows[stem]["nuclei_per_mm2"]) == pytest.approx(
            int(rows[stem]["n_nuclei"]) / float(rows[stem]["tissue_mm2"]), rel=1e-3)
        rec = json.loads((out / stem / "summary.json").read_text())
        assert rec["figures"]["n_nuclei"] == int(rows[stem]["n_nuclei"])
        assert {o["path"] for o in rec["outputs"]} == {"nuclei_labels.tif", "nuclei.csv"}
        table = (out / stem / "nuclei.csv").read_text().splitlines()
        assert len(table) == int(rows[stem]["n_nuclei"]) + 1
        assert not list((out / stem).glob(".work-*"))
    # one model load in the (single) worker process, shared by both worker threads
    loads = [r.get("model_loads") for r in res.rows if r["status"] == "ok"]
    assert loads == [1, 1]
    assert sum(type(e).__name__ == "SlideFinished" for e in events) == 3

    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("slide*/*")}
    res2 = run_cohort(slides, task="nuclei", out_dir=out, workers=1, processes=False, dashboard=None)
    assert (res2.n_ok, res2.n_failed, res2.n_skipped) == (0, 1, 2)
    assert {p: p.stat().st_mtime_ns for p in out.glob("slide*/*")} == mtimes  # nothing recomputed
    rows2 = {r["stem"]: r for r in read_summary(out / "summary.csv")}
    assert rows2["slide0"]["n_nuclei"] == rows["slide0"]["n_nuclei"]  # skipped rows keep their figures

    # an edited output makes that slide (only) run again; --force runs all
    (out / "slide1" / "nuclei.csv").write_text("tampered\n")
    res3 = run_cohort([s for s in slides if s.stem != "broken"], task="nuclei", out_dir=out, workers=1,
                      processes=False, dashboard=None)
    assert [(r["stem"], r["status"]) for r in res3.rows] == [("slide0", "skipped"), ("slide1", "ok")]
    assert (out / "slide1" / "nuclei.csv").read_text() != "tampered\n"


def test_runner_refuses_bad_settings_and_a_busy_folder(tmp_path, cohort):
    slides = read_manifest(cohort)
    with pytest.raises(BatchTaskError):
        run_cohort(slides, task="tissue-types", out_dir=tmp_path / "o")
    with pytest.raises(CohortError, match="workers must be at least 1"):
        run_cohort(slides, task="nuclei", out_dir=tmp_path / "o", workers=0)
    (tmp_path / "o").mkdir(exist_ok=True)
    (tmp_path / "o" / ".pathoseg-batch.lock").write_text(f"{os.getppid()} \n")  # a live process
    with pytest.raises(CohortError, match="in use by another batch run"):
        run_cohort(slides, task="nuclei", out_dir=tmp_path / "o", workers=1, processes=False)


def test_progress_bar_lines_without_a_terminal():
    from napari_pathoseg.cohort.runner import CohortStarted, SlideFinished

    buf = io.StringIO()
    bar = TerminalProgress(buf)
    bar(CohortStarted(3, 2, 1, 2, 1, "tcp://127.0.0.1:1", "http://127.0.0.1:8787/status", "/o", done=1))
    bar(SlideFinished({"stem": "a", "status": "failed", "error": "bad file"}, 2, 3, 0, 1, 1, 1, 4.0, 4.0))
    text = buf.getvalue()
    assert "3 slides, 2 to run, 1 complete" in text and "dashboard at http://127.0.0.1:8787/status" in text
    assert "failed: a: bad file" in text
    assert TerminalProgress(buf, width=10).bar(1, 4) == "[##........]"


# ----------------------------------------------------------------------------- CLI


def test_cli_exit_codes_and_failed_count(tmp_path, cohort, capsys, one_torch_thread, monkeypatch):
    from napari_pathoseg.cli.main import main
    from napari_pathoseg.cohort.tasks import BATCH_TASKS, BatchTask

    # a task declared for a later version (no runner yet) is refused with the tasks that run
    monkeypatch.setitem(BATCH_TASKS, "later", BatchTask("later", "an analysis of a later version"))
    assert main(["batch", str(cohort), "--task", "later", "--out", str(tmp_path / "o")]) == 2
    assert "not available yet" in capsys.readouterr().err
    man = tmp_path / "m.csv"
    man.write_text("slide,label\nslides/slide0.tif,a\nslides/broken.tif,b\n")
    code = main(["batch", str(man), "--task", "nuclei", "--out", str(tmp_path / "o"), "--in-process",
                 "--workers", "1", "--no-dashboard"])
    cap = capsys.readouterr()
    assert code == 1
    assert "1 of 2 slides failed" in cap.err and "failed: broken:" in cap.err
    info = json.loads(cap.out)
    assert (info["ok"], info["failed"]) == (1, 1) and info["failures"][0]["slide"].endswith("broken.tif")
    assert read_summary(tmp_path / "o" / "summary.csv")[0]["label"] == "a"


def test_stop_leaves_unfinished_slides_pending_and_a_rerun_finishes_them(tmp_path, cohort, one_torch_thread):
    from napari_pathoseg.cohort.runner import CohortResult, CohortStarted, iter_cohort
    from napari_pathoseg.events import CancelToken

    slides = [s for s in read_manifest(cohort) if s.stem != "broken"]
    token = CancelToken()
    result = None
    for ev in iter_cohort(slides, task="nuclei", out_dir=tmp_path / "out", workers=1, processes=False,
                          dashboard=None, cancel=token):
        if isinstance(ev, CohortStarted):
            token.set()  # Stop as soon as the slides are submitted
        if isinstance(ev, CohortResult):
            result = ev
    assert result is not None and result.cancelled and result.n_pending >= 1
    assert {r["status"] for r in read_summary(tmp_path / "out" / "summary.csv")} <= {"pending", "ok"}
    again = run_cohort(slides, task="nuclei", out_dir=tmp_path / "out", workers=1, processes=False, dashboard=None)
    assert again.n_pending == 0 and again.n_ok + again.n_skipped == 2
