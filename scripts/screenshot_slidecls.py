"""Take the Slide classification dock screenshot on the bundled sample (or ``--slide``), headless under Xvfb.

The dock classifies the whole sample slide with ``--model`` (default the shipped
``slidecls-crc-lite``) exactly as a user would (Classify slide, whole slide), shows the call,
the heat map over the slide and the tile table, selects the strongest tile row, and the window
is saved as a JPEG. Run from the repository root::

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshot_slidecls.py \
        [--model NAME_OR_CHECKPOINT] [--slide SLIDE] [--out docs/images/slidecls_dock.jpg]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _settle(n: int = 30, pause: float = 0.02) -> None:
    from qtpy.QtWidgets import QApplication

    for _ in range(n):
        QApplication.processEvents()
        time.sleep(pause)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="slidecls-crc-lite")
    ap.add_argument("--slide", default=None, help="slide to open (default: the bundled sample)")
    ap.add_argument("--out", default=str(REPO / "docs" / "images" / "slidecls_dock.jpg"))
    ap.add_argument("--width", type=int, default=1400)
    args = ap.parse_args()

    import napari
    import torch
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QApplication, QDockWidget

    torch.set_num_threads(1)
    from napari_pathoseg._widgets import _jobs
    from napari_pathoseg._widgets.slidecls import SlideClassificationWidget
    from napari_pathoseg.wsi.slide import sample_slide_path

    _jobs.SYNC = True  # the run finishes inside the click: nothing to wait for
    viewer = napari.Viewer(title="napari-pathoseg", show=True)
    viewer.window._qt_window.resize(1600, 1000)
    dock = SlideClassificationWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Slide classification", area="right")
    viewer.open(str(args.slide or sample_slide_path()), plugin="napari-pathoseg")
    if args.model not in dock._models:
        dock._models[Path(args.model).stem] = args.model
        dock.model_combo.addItem(Path(args.model).stem)
    dock.model_combo.setCurrentText(Path(args.model).stem if args.model.endswith(".safetensors") else args.model)
    dock.region_combo.setCurrentText("Whole slide")
    dock.run_btn.click()
    if dock.result is None:
        raise SystemExit(f"the dock did not classify the slide: {dock.status.text()}")
    dock.table.selectRow(0)
    win = viewer.window._qt_window
    docks = [d for d in win.findChildren(QDockWidget) if d.isVisible() and win.dockWidgetArea(d) == Qt.RightDockWidgetArea]
    win.resizeDocks(docks, [420] * len(docks), Qt.Horizontal)
    viewer.reset_view()
    _settle()
    for w in QApplication.allWidgets():  # toasts would cover the canvas
        if "Notification" in type(w).__name__:
            w.close()
    _settle()
    img = np.asarray(viewer.screenshot(canvas_only=False, flash=False))[..., :3]
    im = Image.fromarray(img).convert("RGB")
    im.thumbnail((args.width, args.width))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}.", suffix=".jpg")
    os.close(fd)
    try:
        im.save(tmp, format="JPEG", quality=85, optimize=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    res = dock.result
    print(f"{out}: {im.width}x{im.height}; {res.label} p={res.probability:.3f}, {res.n_tiles} tiles, "
          f"top tile {res.top_tile_probability:.3f}")
    viewer.close()


if __name__ == "__main__":
    main()
