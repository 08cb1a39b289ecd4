"""The one job runner: the dock controller (_widgets/_jobs.py) and the CLI driver (cli/_driver.py)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass

import pytest

from napari_pathoseg.cli import _driver
from napari_pathoseg.errors import CancelledError, PathosegError, SlideError
from napari_pathoseg.events import Progress


@dataclass
class Done:
    value: int
    cancelled: bool = False


def counting_job(n, *, fail_at=None, exc=None):
    """A job over ``n`` steps that keeps the steps done when stopped."""

    def job(token):
        for i in range(n):
            if token.is_set():
                yield Done(i, cancelled=True)
                return
            if fail_at == i:
                raise exc
            yield Progress(i + 1, n, message=f"step {i + 1}")
        yield Done(n)

    return job


# ----------------------------------------------------------------------------- dock controller


@pytest.fixture
def dock(qtbot, monkeypatch):
    """A bare dock with a progress bar, status, Run and Stop, and the notifications it shows."""
    from qtpy.QtWidgets import QLabel, QProgressBar, QPushButton, QWidget

    from napari_pathoseg._widgets import _common, _jobs

    shown = {"error": [], "info": []}
    monkeypatch.setattr(_common, "show_error", shown["error"].append)
    monkeypatch.setattr(_jobs, "show_info", shown["info"].append)
    w = QWidget()
    qtbot.addWidget(w)
    w.bar, w.status, w.run, w.stop = QProgressBar(), QLabel(), QPushButton("Run"), QPushButton("Stop")
    w.inputs_ok = True
    w.jobs = _jobs.JobController(
        w, progress=w.bar, status=w.status, stop_button=w.stop, run_buttons=[w.run],
        why_not=lambda: "" if w.inputs_ok else "Open a slide first.", action="Counting",
    )
    w.shown = shown
    return w


@pytest.mark.gui
def test_sync_job_runs_inside_start_with_progress_and_button_states(dock, sync_jobs):
    seen = []

    def on_event(ev):
        # while it runs: Run disabled, Stop enabled, the bar shows done/total
        seen.append((ev.done, dock.bar.value(), dock.bar.maximum(), dock.run.isEnabled(), dock.stop.isEnabled()))

    got = []
    job = dock.jobs.start(counting_job(3), done_type=Done, on_event=on_event, on_done=got.append)
    assert got == [Done(3)] and job.result == Done(3) and job.ended and not job.cancelled
    assert seen == [(1, 1, 3, False, True), (2, 2, 3, False, True), (3, 3, 3, False, True)]
    assert dock.run.isEnabled() and not dock.stop.isEnabled()
    assert (dock.bar.value(), dock.bar.maximum()) == (1, 1)  # full when done
    assert dock.shown == {"error": [], "info": []}


@pytest.mark.gui
def test_run_buttons_follow_the_inputs(dock):
    assert dock.run.isEnabled()
    dock.inputs_ok = False
    dock.jobs.refresh()
    assert not dock.run.isEnabled() and dock.run.toolTip() == "Open a slide first."
    assert not dock.stop.isEnabled()


@pytest.mark.gui
def test_stop_delivers_the_partial_result(dock, sync_jobs):
    got = []

    def on_event(ev):
        if ev.done == 2:
            dock.stop.click()  # the user presses Stop after two steps

    job = dock.jobs.start(counting_job(10), done_type=Done, on_event=on_event, on_done=got.append)
    assert got == [Done(2, cancelled=True)] and job.cancelled
    assert "stopped" in dock.status.text()
    assert dock.run.isEnabled() and not dock.stop.isEnabled()
    assert dock.shown["error"] == []


@pytest.mark.gui
def test_a_job_that_keeps_nothing_is_reported_stopped(dock, sync_jobs):
    def job(token):
        yield Progress(1, 2)
        token.set()
        raise CancelledError("nothing written")

    got = []
    run = dock.jobs.start(job, done_type=Done, on_done=got.append)
    assert got == [] and run.cancelled
    assert dock.status.text() == "stopped: nothing written"
    assert dock.shown["error"] == [] and dock.shown["info"] == ["Counting stopped."]


@pytest.mark.gui
def test_errors_are_shown_once(dock, sync_jobs, caplog):
    failed = []
    dock.jobs.start(counting_job(5, fail_at=2, exc=SlideError("slide.svs is truncated: copy it again")),
                    done_type=Done, on_error=failed.append)
    assert dock.shown["error"] == ["slide.svs is truncated: copy it again"]
    assert dock.status.text() == "slide.svs is truncated: copy it again"
    assert len(failed) == 1 and isinstance(failed[0], SlideError)
    assert (dock.bar.value(), dock.bar.maximum()) == (0, 1)
    assert dock.run.isEnabled() and not dock.stop.isEnabled()

    # a bug: logged with its traceback, shown once with the job's name
    dock.jobs.start(counting_job(5, fail_at=0, exc=ValueError("boom")), done_type=Done)
    assert dock.shown["error"][1:] == ["Counting failed: ValueError: boom"]
    assert any(r.exc_info for r in caplog.records)

    # a failing on_done is reported the same way
    def bad_done(result):
        raise PathosegError("cannot add the layer")

    dock.jobs.start(counting_job(1), done_type=Done, on_done=bad_done)
    assert dock.shown["error"][2:] == ["cannot add the layer"]


@pytest.mark.gui
def test_short_jobs_return_their_result_and_generators_their_return_value(dock, sync_jobs):
    got = []
    dock.jobs.start(lambda token: [1, 2, 3], on_done=got.append)  # a list is a result, not events

    def gen(token):
        yield Progress(1, 1)
        return "value"

    dock.jobs.start(gen, on_done=got.append)
    assert got == [[1, 2, 3], "value"]


@pytest.mark.gui
def test_callback_style_progress_is_posted(dock, qtbot):
    """Core functions that report through a callback use jobs.post, from the worker thread."""
    seen = []

    def job(token):
        for i in range(1, 5):
            dock.jobs.post(Progress(i, 4, message=f"tile {i}"))
        return "written"

    got = []
    dock.jobs.start(job, on_event=seen.append, on_done=got.append)
    qtbot.waitUntil(lambda: not dock.jobs.running, timeout=20_000)
    qtbot.waitUntil(lambda: len(seen) == 4, timeout=5_000)
    assert [e.done for e in seen] == [1, 2, 3, 4] and got == ["written"]


@pytest.mark.gui
def test_job_runs_on_a_worker_thread_and_stop_keeps_finished_steps(dock, qtbot):
    import time

    threads, got = [], []

    def job(token):
        threads.append(threading.get_ident())
        for i in range(2000):
            if token.is_set():
                yield Done(i, cancelled=True)
                return
            time.sleep(0.005)
            yield Progress(i + 1, 2000)
        yield Done(2000)

    run = dock.jobs.start(job, done_type=Done, on_done=got.append)
    assert run.worker is not None and dock.jobs.running
    assert dock.jobs.start(job, done_type=Done) is None  # one job at a time
    assert dock.shown["info"] and "still running" in dock.shown["info"][-1]
    qtbot.waitUntil(lambda: dock.bar.value() >= 3, timeout=20_000)
    assert not dock.run.isEnabled() and dock.stop.isEnabled()
    dock.stop.click()
    assert not dock.stop.isEnabled()  # not pressed twice
    qtbot.waitUntil(lambda: not dock.jobs.running, timeout=20_000)
    assert threads and threads[0] != threading.get_ident()
    assert len(got) == 1 and got[0].cancelled and 3 <= got[0].value < 2000
    assert dock.run.isEnabled() and dock.shown["error"] == []


@pytest.mark.gui
def test_abandon_on_stop_drops_a_short_job(dock, qtbot):
    release = threading.Event()
    got = []

    def slow(token):
        release.wait(20)
        return "late"

    run = dock.jobs.start(slow, on_done=got.append, abandon_on_stop=True)
    dock.stop.click()
    assert not dock.jobs.running and dock.run.isEnabled() and dock.status.text() == "stopped"
    release.set()
    qtbot.waitUntil(lambda: run.worker.is_running is False, timeout=20_000)
    qtbot.wait(50)
    assert got == []


@pytest.mark.gui
def test_shutdown_stops_the_job_and_drops_its_result(dock, qtbot):
    import time

    got, stopped_at = [], []

    def job(token):
        for i in range(2000):
            if token.is_set():
                stopped_at.append(i)
                yield Done(i, cancelled=True)
                return
            time.sleep(0.005)
            yield Progress(i + 1, 2000)
        yield Done(2000)

    run = dock.jobs.start(job, done_type=Done, on_done=got.append)
    qtbot.waitUntil(lambda: dock.bar.value() >= 2, timeout=20_000)
    dock.jobs.shutdown()
    assert not dock.jobs.running and run.token.is_set()
    qtbot.waitUntil(lambda: not run.worker.is_running, timeout=20_000)
    qtbot.wait(50)
    assert got == [] and len(stopped_at) <= 1


@pytest.mark.gui
def test_a_prepared_layer_is_added_hidden_then_shown_then_the_slide_selected(make_napari_viewer, qtbot, monkeypatch):
    import numpy as np
    from napari.layers import Labels

    from napari_pathoseg._widgets import _jobs

    monkeypatch.setattr(_jobs, "SYNC", False)
    viewer = make_napari_viewer()
    slide = viewer.add_image(np.zeros((64, 64), np.uint8), name="slide")
    mask = Labels(np.ones((8, 8), np.uint8), name="mask", scale=(8, 8))
    ended = []
    _jobs.add_layer_in_turns(viewer, mask, select=slide, then=lambda: ended.append(mask.visible))
    # first turn: the layer is there but hidden (napari builds its visual and controls, draws nothing)
    assert "mask" in viewer.layers and not mask.visible and not ended
    qtbot.waitUntil(lambda: ended == [True], timeout=5_000)
    assert viewer.layers.selection.active is slide
    # a layer the user asked hidden stays hidden
    hidden = Labels(np.ones((8, 8), np.uint8), name="hidden", visible=False)
    monkeypatch.setattr(_jobs, "SYNC", True)
    _jobs.add_layer_in_turns(viewer, hidden)
    assert "hidden" in viewer.layers and not hidden.visible


@pytest.mark.gui
def test_in_turns_adds_one_step_per_event_loop_turn(dock, qtbot, monkeypatch):
    from napari_pathoseg._widgets import _jobs

    monkeypatch.setattr(_jobs, "SYNC", False)
    done = []
    _jobs.in_turns(lambda: done.append(1), lambda: done.append(2), lambda: done.append(3))
    assert done == [1]  # the rest waits for the event loop
    qtbot.waitUntil(lambda: done == [1, 2, 3], timeout=5_000)

    def boom():
        raise PathosegError("the layer cannot be added")

    _jobs.in_turns(boom, lambda: done.append(4))
    qtbot.wait(50)
    assert dock.shown["error"] == ["the layer cannot be added"] and done == [1, 2, 3]
    monkeypatch.setattr(_jobs, "SYNC", True)
    _jobs.in_turns(lambda: done.append(5), lambda: done.append(6))
    assert done[-2:] == [5, 6]


@pytest.mark.gui
def test_env_switch(monkeypatch):
    from napari_pathoseg._widgets import _jobs

    monkeypatch.setattr(_jobs, "SYNC", None)
    monkeypatch.setenv("PATHOSEG_SYNC_JOBS", "1")
    assert _jobs.sync_mode()
    monkeypatch.setenv("PATHOSEG_SYNC_JOBS", "0")
    assert not _jobs.sync_mode()


# ----------------------------------------------------------------------------- CLI driver


def _ns():
    return argparse.Namespace()


@pytest.mark.parametrize(
    "raise_, code, line",
    [
        (None, 0, None),
        (SlideError("a.svs is empty: copy the slide again"), 2, "pathoseg x: error: a.svs is empty: copy the slide again"),
        (PathosegError("two\nlines"), 2, "pathoseg x: error: two lines"),
        (_driver.JobCancelled("labels of 3 tiles saved to out.tif"), 130, "pathoseg x: stopped: labels of 3 tiles saved to out.tif"),
        (CancelledError("nothing was saved"), 130, "pathoseg x: stopped: nothing was saved"),
        (KeyboardInterrupt(), 130, "pathoseg x: interrupted"),
    ],
)
def test_call_command_exit_codes_and_one_line(raise_, code, line, capsys):
    def cmd(args):
        if raise_ is not None:
            raise raise_
        _driver.print_json({"ok": True})
        return 0

    assert _driver.call_command(cmd, _ns(), prog="pathoseg x") == code
    cap = capsys.readouterr()
    if line is None:
        assert json.loads(cap.out) == {"ok": True} and cap.err == ""
    else:
        assert cap.err.splitlines() == [line] and "Traceback" not in cap.err


def test_drive_returns_the_result_and_reports_events():
    seen = []
    assert _driver.drive(lambda token: counting_job(3)(token), Done, on_event=seen.append) == Done(3)
    assert [e.done for e in seen if isinstance(e, Progress)] == [1, 2, 3]


def test_first_ctrl_c_cancels_and_the_partial_result_is_saved(capsys):
    """SIGINT sets the token; the job yields what it finished; on_cancelled saves it."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    before = signal.getsignal(signal.SIGINT)
    saved = []

    def job(token):
        for i in range(100):
            if token.is_set():
                yield Done(i, cancelled=True)
                return
            if i == 3:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during step 3
            yield Progress(i + 1, 100)
        yield Done(100)

    def on_cancelled(result):
        saved.append(result.value)
        return f"{result.value} steps saved"

    with pytest.raises(_driver.JobCancelled, match="^4 steps saved$"):
        _driver.drive(job, Done, on_cancelled=on_cancelled)
    assert saved == [4]
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored

    with pytest.raises(_driver.JobCancelled, match="nothing was saved"):
        _driver.drive(job, Done)

    def never_checks(token):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C aborts at once
        yield Done(1)

    with pytest.raises(KeyboardInterrupt):
        _driver.drive(never_checks, Done)
    assert signal.getsignal(signal.SIGINT) is before


SCRIPT = textwrap.dedent(
    """
    import sys, time
    from dataclasses import dataclass
    from napari_pathoseg.cli._driver import ArgumentParser, call_command, drive, print_json
    from napari_pathoseg.events import Progress

    @dataclass
    class Done:
        n: int
        cancelled: bool = False

    def job(token):
        for i in range(3000):
            if token.is_set():
                yield Done(i, cancelled=True)
                return
            if i == 1:
                print("running", flush=True)
            time.sleep(0.01)
            yield Progress(i, 3000)
        yield Done(3000)

    def cmd(args):
        done = drive(job, Done, on_cancelled=lambda r: f"{r.n} tiles saved to out.tif")
        print_json({"n": done.n})
        return 0

    sys.exit(call_command(cmd, ArgumentParser().parse_args([]), prog="pathoseg fake"))
    """
)


def test_ctrl_c_in_a_real_process_exits_130_with_one_line():
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "running"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pathoseg fake: stopped: ") and lines[0].endswith(" tiles saved to out.tif")
    assert out == ""


def test_argument_types():
    assert _driver.positive_float(high=10)("2.5") == 2.5
    for bad in ("0", "-1", "11", "inf", "nan", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            _driver.positive_float(high=10)(bad)
    assert _driver.fraction("1") == 1.0 and _driver.positive_int("3") == 3 and _driver.nonnegative_int("0") == 0
    for f, bad in ((_driver.positive_int, "0"), (_driver.positive_int, "2.5"), (_driver.nonnegative_int, "-1"),
                   (_driver.int_range(1, 4), "5"), (_driver.fraction, "-0.1")):
        with pytest.raises(argparse.ArgumentTypeError):
            f(bad)
    assert _driver.device("CPU") == "cpu"
    for bad in ("gpu", "cuda:x", "cpu:0"):
        with pytest.raises(argparse.ArgumentTypeError, match="cpu, cuda"):
            _driver.device(bad)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(argparse.ArgumentTypeError, match="no CUDA device"):
            _driver.device("cuda")


def test_existing_paths(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("x")
    assert _driver.existing_file(str(f)) == f and _driver.existing_dir(str(tmp_path)) == tmp_path
    with pytest.raises(argparse.ArgumentTypeError, match="is not a file"):
        _driver.existing_file(str(tmp_path))
    with pytest.raises(argparse.ArgumentTypeError, match="is not a folder"):
        _driver.existing_dir(str(f))
    with pytest.raises(argparse.ArgumentTypeError, match="does not exist"):
        _driver.existing_path(str(tmp_path / "nope"))


def test_parser_errors_are_one_line(capsys):
    p = _driver.ArgumentParser(prog="pathoseg t")
    p.add_argument("--batch", type=_driver.positive_int, default=4)
    with pytest.raises(SystemExit) as exc:
        p.parse_args(["--batch", "0"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "pathoseg t: error: argument --batch: must be an integer >= 1, got '0' (see pathoseg t --help)"
    ]
