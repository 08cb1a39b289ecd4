"""How long the docks block napari's GUI thread: the longest stall of the event loop per action.

A 5 ms heartbeat timer runs on the GUI thread while each dock action is started with its button
and runs to its end (background job, result layers added, then one second of drawing): the
longest gap between two heartbeats is the longest time napari did not respond to the user.
Everything is real: the bundled CMU-1-Small-Region.svs, the shipped nuclei-lite model, the real
docks in a real (Xvfb) window. Run from the repository root::

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/bench_gui.py [--skip-nuclei] [--before OLD.json]

Prints one JSON document: for each action, ``max_gui_cpu_ms`` (the most CPU time the GUI
thread spent between two heartbeats: the cost of one GUI-thread step, what the docks control,
little affected by other load on the machine), ``max_stall_ms`` (the longest wall-clock gap: the
freeze a user feels, which also grows when the machine is busy or a worker holds the GIL), the
count of each over 200 ms, and ``wall_s`` (the action's total time, background work included).
``ok`` is true when no GUI-thread step took more than 200 ms of CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

os.environ.setdefault("PATHOSEG_SYNC_JOBS", "0")

#: One GUI-thread step should stay under this (ms).
BUDGET_MS = 200.0


class Heartbeat:
    """Records the gaps between ticks of a QTimer on the GUI thread.

    With ``why=True`` a sampler thread also records where the GUI thread is while a tick is
    late by more than 100 ms (the innermost frames of its stack), to find what blocks it.
    """

    def __init__(self, period_ms: int = 5, *, why: bool = False) -> None:
        import collections
        import threading

        from qtpy.QtCore import QTimer

        self.timer = QTimer()
        self.timer.setInterval(period_ms)
        self.timer.timeout.connect(self._tick)
        self.last = time.perf_counter()
        self.last_cpu = time.thread_time()
        self.gaps: list[float] = []
        self.cpu_gaps: list[float] = []
        self.samples: collections.Counter = collections.Counter()
        self._gui = threading.get_ident()
        self._sampling = False
        if why:
            self._sampling = True
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        import traceback

        while self._sampling:
            time.sleep(0.02)
            try:
                active = self.timer.isActive()
            except RuntimeError:  # the timer was deleted with the window: the run is over
                return
            if active and (time.perf_counter() - self.last) > 0.1:
                frame = sys._current_frames().get(self._gui)
                if frame is None:
                    continue
                stack = traceback.extract_stack(frame)
                ours = [f for f in stack if any(k in f.filename for k in ("napari_pathoseg", "/napari/", "/vispy/"))]
                key = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}" for f in reversed((ours or stack)[-4:]))
                self.samples[key] += 1

    def _tick(self) -> None:
        now, cpu = time.perf_counter(), time.thread_time()  # thread_time: this (GUI) thread's CPU
        self.gaps.append((now - self.last) * 1000.0)
        self.cpu_gaps.append((cpu - self.last_cpu) * 1000.0)
        self.last, self.last_cpu = now, cpu

    def start(self) -> None:
        self.gaps.clear()
        self.cpu_gaps.clear()
        self.last, self.last_cpu = time.perf_counter(), time.thread_time()
        self.timer.start()

    def stop(self) -> dict[str, Any]:
        self.timer.stop()
        self._tick()
        gaps = self.gaps
        out: dict[str, Any] = {
            "max_gui_cpu_ms": round(max(self.cpu_gaps), 1) if self.cpu_gaps else None,
            # the five costliest GUI-thread steps (ms of CPU), to see the next one in line
            "top_gui_cpu_ms": [round(g, 1) for g in sorted(self.cpu_gaps, reverse=True)[:5]],
            "gui_cpu_steps_over_200ms": sum(g > BUDGET_MS for g in self.cpu_gaps),
            "max_stall_ms": round(max(gaps), 1) if gaps else None,
            "stalls_over_200ms": sum(g > BUDGET_MS for g in gaps),
        }
        if self.samples:
            out["blocked_in"] = {k: v * 20 for k, v in self.samples.most_common(4)}
            self.samples.clear()
        return out


def _busy(dock: Any) -> bool:
    jobs = getattr(dock, "jobs", None)
    if jobs is not None:
        return bool(jobs.running)
    if isinstance(dock, SlideWidget_type()):
        return not dock.open_btn.isEnabled()
    return getattr(dock, "_worker", None) is not None


def SlideWidget_type() -> type:  # noqa: N802
    from napari_pathoseg._widgets.slide import SlideWidget

    return SlideWidget


def measure(app: Any, beat: Heartbeat, action: Callable[[], Any], done: Callable[[], bool], *, timeout_s: float = 300.0) -> dict[str, Any]:
    """Start ``action`` from the event loop, wait until ``done()``, then let it draw for 1 s."""
    from qtpy.QtCore import QTimer

    beat.start()
    t0 = time.perf_counter()
    QTimer.singleShot(0, action)
    for _ in range(3):  # let the action start
        app.processEvents()
        time.sleep(0.01)
    while not done():
        if time.perf_counter() - t0 > timeout_s:
            raise TimeoutError("the action did not end")
        app.processEvents()
        time.sleep(0.002)
    settle = time.perf_counter()
    while time.perf_counter() - settle < 1.0:
        app.processEvents()
        time.sleep(0.002)
    out = beat.stop()
    out["wall_s"] = round(time.perf_counter() - t0 - 1.0, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-nuclei", action="store_true", help="skip the whole-slide nuclei run (about a minute)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--why", action="store_true", help="sample where the GUI thread is blocked (ms per stack)")
    p.add_argument("--before", default=None,
                   help="an earlier JSON of this benchmark: each action also gets its before_max_gui_cpu_ms")
    args = p.parse_args(argv)

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_pathoseg._widgets.nuclei import NucleiWidget
    from napari_pathoseg._widgets.slide import SlideWidget
    from napari_pathoseg._widgets.stain import TARGET_VIEW, StainWidget
    from napari_pathoseg.wsi.slide import sample_slide_path

    viewer = napari.Viewer(title="bench_gui")
    viewer.window.resize(1400, 900)
    viewer.window.show()
    app = QApplication.instance()
    beat = Heartbeat(why=args.why)
    results: dict[str, Any] = {"budget_ms": BUDGET_MS}

    slide_dock = SlideWidget(viewer)
    stain_dock = StainWidget(viewer)
    nuclei_dock = NucleiWidget(viewer)
    for name, w in (("Slide", slide_dock), ("Stain", stain_dock), ("Nuclei", nuclei_dock)):
        viewer.window.add_dock_widget(w, name=name, tabify=name != "Slide")
    app.processEvents()

    def open_slide() -> None:
        slide_dock.path_edit.setText(str(sample_slide_path()))
        slide_dock.open_btn.click()

    results["slide_open"] = measure(app, beat, open_slide, lambda: len(viewer.layers) >= 1 and not _busy(slide_dock))
    slide_name = viewer.layers[0].name
    results["tissue_mask"] = measure(
        app, beat, lambda: slide_dock.mask_check.setChecked(True),
        lambda: f"{slide_name} tissue" in viewer.layers and not _busy(slide_dock),
    )
    viewer.layers[f"{slide_name} tissue"].visible = False

    stain_dock.layer_combo.setCurrentText(slide_name)
    stain_dock.target_combo.setCurrentText(TARGET_VIEW)
    results["stain_fit_view"] = measure(app, beat, stain_dock.fit_btn.click, lambda: stain_dock.normalizer is not None and not _busy(stain_dock))
    results["stain_add_normalised"] = measure(
        app, beat, stain_dock.add_btn.click, lambda: any(ly.name.endswith("[macenko]") for ly in viewer.layers) and not _busy(stain_dock)
    )
    results["stain_add_h_e"] = measure(
        app, beat, stain_dock.deconv_btn.click, lambda: any(ly.name.endswith("[eosin]") for ly in viewer.layers) and not _busy(stain_dock)
    )
    for ly in list(viewer.layers)[1:]:
        ly.visible = False

    if not args.skip_nuclei:
        nuclei_dock.layer_combo.setCurrentText(slide_name)
        nuclei_dock.region_combo.setCurrentText("Whole slide")
        results["nuclei_whole_slide"] = measure(
            app, beat, nuclei_dock.run_btn.click, lambda: f"{slide_name} nuclei" in viewer.layers and not _busy(nuclei_dock)
        )
    if args.before:
        with open(args.before, encoding="utf-8") as fh:
            before = json.load(fh)
        for k, v in results.items():
            if isinstance(v, dict) and isinstance(before.get(k), dict):
                v["before_max_gui_cpu_ms"] = before[k].get("max_gui_cpu_ms")
    results["ok"] = all(
        v["max_gui_cpu_ms"] is not None and v["max_gui_cpu_ms"] <= BUDGET_MS for k, v in results.items() if isinstance(v, dict)
    )
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
