"""Take the Malignancy dock screenshot: the sample slide, C's heat map, B's region and the call.

Everything shown is computed for real: the dock runs the model (``--model``, default the shipped
``malignancy-lite``) over the whole bundled sample slide, as a user would press Run.

    xvfb-run -a -s "-screen 0 1900x1000x24" python scripts/screenshot_malignancy.py \
        [--model malignancy-lite] [--out docs/images/malignancy_dock.jpg]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("PATHOSEG_SYNC_JOBS", "1")  # the dock's job runs to its end inside Run

from PIL import Image
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QApplication, QDockWidget


def _settle(n: int = 30) -> None:
    for _ in range(n):
        QApplication.processEvents()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="malignancy-lite")
    ap.add_argument("--out", default="docs/images/malignancy_dock.jpg")
    args = ap.parse_args()

    import napari

    from napari_pathoseg.wsi.slide import sample_slide_path

    viewer = napari.Viewer(title="napari-pathoseg")
    viewer.open(str(sample_slide_path()), plugin="napari-pathoseg")
    _, dock = viewer.window.add_plugin_dock_widget("napari-pathoseg", "Malignancy")
    win = viewer.window._qt_window
    viewer.window.show()
    win.showNormal()
    win.setGeometry(0, 0, 1900, 1000)
    _settle(20)
    if args.model not in dock._models:
        dock._models[args.model] = args.model
        dock.model_combo.addItem(args.model)
    dock.model_combo.setCurrentText(args.model)
    dock.region_combo.setCurrentText("Whole slide")
    dock.run_btn.click()
    _settle(60)
    layer = viewer.layers[0]
    viewer.layers.selection.active = layer
    viewer.reset_view()
    viewer.scale_bar.visible = True
    for w in QApplication.allWidgets():  # start-up notifications would cover the canvas
        if "Notification" in type(w).__name__:
            w.close()
    docks = win.findChildren(QDockWidget)
    win.resizeDocks([docks[-1]], [470], Qt.Horizontal)
    _settle()
    img = viewer.screenshot(canvas_only=False, flash=False)
    im = Image.fromarray(img[..., :3]).convert("RGB")
    im.thumbnail((1500, 900))
    im.save(args.out, quality=85, optimize=True)
    print(dock.call_label.text())
    viewer.close()


if __name__ == "__main__":
    main()
