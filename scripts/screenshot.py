"""Take the README screenshot: napari with the sample slide, its nuclei, and the docks.

Run under a display (or Xvfb):

    xvfb-run -a -s "-screen 0 2000x1100x24" python scripts/screenshot.py \
        src/napari_pathoseg/data/CMU-1-Small-Region.svs docs/images/screenshot.jpg
"""

from __future__ import annotations

import sys

from PIL import Image
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QApplication, QDockWidget

from napari_pathoseg._widgets.launch import launch_viewer
from napari_pathoseg._widgets.nuclei import place_result
from napari_pathoseg.models.registry import load_model
from napari_pathoseg.methods.nuclei.segment import segment_nuclei


def _settle(n: int = 30) -> None:
    for _ in range(n):
        QApplication.processEvents()


def main(slide_path: str, out_png: str) -> None:
    viewer = launch_viewer(slide_path, run=False)
    win = viewer.window._qt_window
    viewer.window.show()
    win.showNormal()
    win.setGeometry(0, 0, 1900, 1000)
    _settle(20)
    layer = viewer.layers[0]
    slide = layer.metadata["pathoseg_slide"]
    region = (600, 1700, 900, 700)  # x, y, w, h in level-0 pixels
    res = segment_nuclei(slide, load_model("nuclei-lite"), region=region)
    viewer.add_labels(res.labels, name=f"{layer.name} nuclei", opacity=0.55, **place_result(layer, res))
    sy, sx = layer.scale
    viewer.camera.center = ((region[1] + region[3] / 2) * sy, (region[0] + region[2] / 2) * sx)
    viewer.camera.zoom = 2.4
    viewer.scale_bar.visible = True
    for name, widget in viewer.window.dock_widgets.items():
        if "Nuclei" in name:
            widget.parent().raise_()
    _settle()
    for w in QApplication.allWidgets():  # start-up notifications would cover the canvas
        if "Notification" in type(w).__name__:
            w.close()
    docks = win.findChildren(QDockWidget)
    win.resizeDocks([docks[-1]], [420], Qt.Horizontal)
    _settle()
    img = viewer.screenshot(canvas_only=False, flash=False)
    im = Image.fromarray(img[..., :3]).convert("RGB")
    im.thumbnail((1500, 900))
    im.save(out_png, quality=85, optimize=True)  # .jpg keeps the README light
    viewer.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
