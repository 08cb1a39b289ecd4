"""The Lesions dock on whole slides: peak memory and GUI-thread steps. Prints JSON.

For every slide given, a child process opens a headless napari viewer (under a virtual X
display, Xvfb), opens the slide with the napari-pathoseg reader, docks the Lesions widget, picks
``lesion-lite`` (or ``--model``) and "Whole slide" and presses **Detect lesions**; the dock job
runs to its end in the child (the controller's synchronous mode: the same job, no thread) and
the result's layers are added. Then the threshold moves to 0.6: the live preview on a display
level (``preview_threshold``, GUI thread) and the full-resolution re-threshold (the dock's
background job) run. With ``--export`` the regions are also written as GeoJSON. Reported:

* ``peak_rss_mb``: the child's peak resident memory (``VmHWM``) over the whole session;
* ``detect_s``: the run (model, stain, network, mask, display levels, layers added);
* ``add_layers_s``: the GUI-thread part of the result (``_on_done``: layers removed / added, table;
  in the dock each layer addition runs in its own turn of the event loop, here all in one call);
* ``preview_s``: one live-preview step of the threshold slider (GUI thread);
* ``rethreshold_s``: the full-resolution re-threshold job, ``apply_rethreshold_s`` its GUI-thread part;
* ``export_s``, ``n_exported``: the GeoJSON export (``--export``).

``--widget FILE`` runs another version of ``_widgets/lesion.py`` (e.g. the dock before the work
folder, ``git show <commit>:src/napari_pathoseg/_widgets/lesion.py > /tmp/lesion_old.py``) to
measure "before".

Usage: ``python benchmarks/bench_lesion_dock.py SLIDE [SLIDE ...] [--model lesion-lite]
[--threads 1] [--widget FILE] [--export] [--out JSON]``
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


def _status(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _widget_module(path: str | None):
    import importlib
    import importlib.util

    if not path:
        return importlib.import_module("napari_pathoseg._widgets.lesion")
    spec = importlib.util.spec_from_file_location("lesion_dock_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _timed(obj, name: str, into: dict, key: str) -> None:
    """Wrap ``obj.name`` so that its time is added to ``into[key]``."""
    fn = getattr(obj, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            into[key] = into.get(key, 0.0) + time.perf_counter() - t

    setattr(obj, name, wrapper)


def _child(path: str, args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_pathoseg._widgets import _jobs

    _jobs.SYNC = True  # the dock job runs to its end inside start(): the same work, measured in one thread
    mod = _widget_module(args.widget)
    viewer = napari.Viewer(show=False)
    viewer.open(path, plugin="napari-pathoseg")
    w = mod.LesionWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.model_combo.setCurrentText(args.model)
    w.region_combo.setCurrentText("Whole slide")
    times: dict[str, float] = {}
    _timed(w, "_on_done", times, "add_layers_s")
    _timed(w, "_on_rethreshold", times, "apply_rethreshold_s")
    t = time.perf_counter()
    w.run_btn.click()
    times["detect_s"] = time.perf_counter() - t
    QApplication.processEvents()
    res = w.result
    if res is None:
        raise SystemExit("the dock produced no result: " + w.status.text())
    lab = viewer.layers[f"{viewer.layers[0].name} lesions"]
    out = {"slide": os.path.basename(path), "widget": args.widget or "current", "map_shape": list(res.prob.shape[:2]),
           "streamed": res.stores is not None, "multiscale": bool(lab.multiscale),
           "levels": len(lab.data) if lab.multiscale else 1, "n_regions": len(res.regions),
           "lesion_fraction_of_tissue": res.summary()["lesion_fraction_of_tissue"],
           "rss_after_detect_mb": round(_status("VmRSS"), 1)}
    w.threshold.blockSignals(True)
    w.threshold.setValue(60)
    w.threshold.blockSignals(False)
    if hasattr(w, "preview_threshold") and getattr(w, "_preview", None) is not None:
        t = time.perf_counter()
        w.preview_threshold()
        times["preview_s"] = time.perf_counter() - t
    t = time.perf_counter()
    w.apply_threshold()
    times["rethreshold_s"] = time.perf_counter() - t - times.get("preview_s", 0.0)
    out["n_regions_at_0.6"] = len(w.result.regions)
    if args.export:
        with tempfile.TemporaryDirectory(prefix="bench-lesion-dock-") as tmp:
            t = time.perf_counter()
            out["n_exported"] = w.export_geojson(str(Path(tmp) / "lesions.geojson"))
            times["export_s"] = time.perf_counter() - t
    out.update({k: round(v, 3) for k, v in times.items()})
    out["peak_rss_mb"] = round(_status("VmHWM"), 1)
    out["threads"] = args.threads
    w.close()
    viewer.close()
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("slides", nargs="+")
    ap.add_argument("--model", default="lesion-lite")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--widget", default=None, help="another _widgets/lesion.py to measure (e.g. the old dock)")
    ap.add_argument("--export", action="store_true", help="also export the regions as GeoJSON")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.slides[0], args)
        return
    from pyvirtualdisplay import Display

    rows = []
    with Display(visible=False, size=(1280, 1024)):
        for s in args.slides:
            cmd = [sys.executable, __file__, s, "--model", args.model, "--threads", str(args.threads), "--child"]
            cmd += (["--widget", args.widget] if args.widget else []) + (["--export"] if args.export else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"{s}: the dock run failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    text = json.dumps({"runs": rows}, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
