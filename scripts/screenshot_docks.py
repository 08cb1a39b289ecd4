"""Retake the Review and Fine-tune dock screenshots with the shipped ``nuclei-lite`` teacher.

Everything shown is computed for real, headless under Xvfb:

1. the shipped teacher pseudo-labels the bundled sample slide (``run_pseudolabels``, the
   path ``pathoseg pseudolabel`` takes) into a review project; the Review dock opens it over
   the slide, keeps the tiles above a score threshold, accepts three tiles, rejects one and
   shows the most crowded kept tile's labels over the tissue -> ``review_dock.png``;
2. the Fine-tune dock trains an ``attcycle-lite`` student from ``nuclei-lite`` (so it
   fine-tunes the teacher's weights) on a few MoNuSeg crops plus the project's accepted
   tiles, waits for the live plot and the new-vs-base overlay -> ``finetune_dock.png``.

The fine-tuned model is registered in a private registry (``PATHOSEG_HOME`` set to a folder
inside ``--work``), never in the user's.  Run from the repository root::

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshot_docks.py

(``--epochs`` / ``--steps`` change the run; ``--work DIR`` keeps the project, checkpoints and
private registry, otherwise they go to a temporary folder removed at the end.)
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
STUDENT_NAME = "screenshot-student"
#: MoNuSeg training images (with polygon masks, in nuclei-lite's training split) cropped as strong labels.
STRONG_STEMS = (
    "TCGA-21-5784-01Z-00-DX1",
    "TCGA-A7-A13E-01Z-00-DX1",
    "TCGA-AR-A1AK-01Z-00-DX1",
    "TCGA-B0-5698-01Z-00-DX1",
    "TCGA-E2-A1B5-01Z-00-DX1",
    "TCGA-G9-6362-01Z-00-DX1",
)
STRONG_MPP = 0.25  # MoNuSeg is 40x
CROP = 512  # level-0 pixels of a crop (256 px at the student's 0.5 µm/px)
#: Level-0 (x, y, w, h) of the slide shown in the Fine-tune picture (dense nuclei).
COMPARE_VIEW = (940, 1760, 520, 640)

logger = logging.getLogger("screenshot_docks")


# ------------------------------------------------------------------------------------------
# Qt helpers


def _settle(n: int = 30, pause: float = 0.01) -> None:
    from qtpy.QtWidgets import QApplication

    for _ in range(n):
        QApplication.processEvents()
        time.sleep(pause)


def _wait_until(cond: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Process Qt events until ``cond()`` holds (qtbot.waitUntil without pytest)."""
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        QApplication.processEvents()
        time.sleep(0.05)


def _close_notifications() -> None:
    from qtpy.QtWidgets import QApplication

    for w in QApplication.allWidgets():  # toasts would cover the canvas
        if "Notification" in type(w).__name__:
            w.close()


def _grab(viewer: Any, path: Path, *, max_width: int) -> None:
    _settle()
    _close_notifications()
    _settle()
    img = viewer.screenshot(canvas_only=False, flash=False)
    im = Image.fromarray(np.asarray(img)[..., :3]).convert("RGB")
    im.thumbnail((max_width, max_width))
    # full colour: a 256-colour palette would save half the bytes but mutes the label colours
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        im.save(tmp, format="PNG", optimize=True)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("saved %s (%dx%d, %d kB)", path, im.width, im.height, path.stat().st_size // 1024)


def _dock_width(viewer: Any, width: int) -> None:
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QDockWidget

    win = viewer.window._qt_window
    right = Qt.RightDockWidgetArea
    docks = [d for d in win.findChildren(QDockWidget) if d.isVisible() and win.dockWidgetArea(d) == right]
    if docks:
        win.resizeDocks(docks, [width] * len(docks), Qt.Horizontal)


def _show_view(viewer: Any, layer: Any, region: tuple[int, int, int, int]) -> None:
    """Centre the camera on a level-0 (x, y, w, h) region and zoom so it fills the canvas."""
    x, y, w, h = region
    sy, sx = (float(v) for v in layer.scale[-2:])
    camera = viewer.scene.camera
    camera.center = ((y + h / 2) * sy, (x + w / 2) * sx)
    ch, cw = viewer.canvas.size  # (rows, cols) of screen pixels
    camera.zoom = min(cw / (w * sx), ch / (h * sy))


# ------------------------------------------------------------------------------------------
# data


def make_strong_folder(root: Path, *, monuseg: Path, size: int = CROP) -> Path:
    """Crop ``size``² windows of a few MoNuSeg training images into ``root/images`` + ``instance_masks``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "instance_masks").mkdir(exist_ok=True)
    for stem in STRONG_STEMS:
        img = np.asarray(Image.open(monuseg / "images" / f"{stem}.png").convert("RGB"))
        lab = np.asarray(Image.open(monuseg / "instance_masks" / f"{stem}.png"))
        r0, c0 = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
        Image.fromarray(img[r0 : r0 + size, c0 : c0 + size]).save(root / "images" / f"{stem}.png")
        crop = lab[r0 : r0 + size, c0 : c0 + size].astype(np.uint16)
        Image.fromarray(crop).save(root / "instance_masks" / f"{stem}.png")
    return root


def make_review_project(out: Path) -> Any:
    """Pseudo-label the bundled sample slide with the shipped teacher (as ``pathoseg pseudolabel``)."""
    from napari_pathoseg.models.registry import load_model
    from napari_pathoseg.review.project import run_pseudolabels
    from napari_pathoseg.wsi.slide import sample_slide_path

    model = load_model("nuclei-lite")
    project = run_pseudolabels(
        sample_slide_path(), out, predict=model.predict, to_instances=model.to_instances,
        model_name="nuclei-lite", tile_size=int(model.tile_size), mpp=model.mpp,
        progress=lambda ev: logger.debug("pseudo-labels %d/%d", ev.done, ev.total),
    )
    logger.info("review project %s: %d tiles", project.root, len(project))
    return project


# ------------------------------------------------------------------------------------------
# the two pictures


def review_picture(viewer: Any, project_root: Path, out_png: Path, *, threshold: float, max_width: int) -> Any:
    """Open the project in the Review dock, accept three tiles, reject one, show a crowded one.

    The tiles are picked from the rows around the most crowded kept tile (the table is
    sorted by score), so the accepted and rejected rows are on screen next to the shown one.
    """
    from napari_pathoseg._widgets.review import ReviewWidget
    from qtpy.QtWidgets import QAbstractItemView

    review = ReviewWidget(viewer)
    viewer.window.add_dock_widget(review, name="Review", area="right")
    review.project_edit.setText(str(project_root))
    review.open_btn.click()
    if review.project is None:
        raise SystemExit(f"the Review dock could not open {project_root}: {review.status.text()}")
    review.threshold_slider.setValue(int(round((threshold - 0.5) / 0.5 * review.threshold_slider.maximum())))
    _settle(40)  # the threshold is saved 300 ms after the slider moves
    rows = review.visible_tiles()  # kept tiles, highest score first
    if len(rows) < 8:
        raise SystemExit(f"only {len(rows)} tiles score at least {threshold}; lower --threshold")
    project = review.project
    nuclei = {tid: project.record(tid).n_nuclei for tid in rows}
    shown_row = max(range(4, len(rows)), key=lambda r: (nuclei[rows[r]], -r))
    window = rows[max(0, shown_row - 7) : shown_row]  # the rows just above the shown one
    accept = sorted(window, key=lambda t: (-nuclei[t], t))[:3]
    reject = min((t for t in window if t not in accept), key=lambda t: (nuclei[t], t))
    for tile_id, button in [(t, review.accept_btn) for t in accept] + [(reject, review.reject_btn)]:
        review.select_tile(tile_id)
        _settle(5)
        button.click()
        _settle(5)
    shown = rows[shown_row]
    review.select_tile(shown)
    _settle(10)
    _dock_width(viewer, 470)
    _settle(20)
    review.show_tile(shown)  # re-centre the camera on the tile after the dock resize
    viewer.scene.camera.zoom *= 0.6  # zoom out a little: the tile with its surroundings
    review.table.scrollToItem(review.table.item(max(0, shown_row - 8), 0), QAbstractItemView.PositionAtTop)
    viewer.canvas.overlays.scale_bar.visible = True  # the review mask carries the slide's µm
    _grab(viewer, out_png, max_width=max_width)
    logger.info("Review dock: %s; shown %s (%d nuclei)", review.counts_label.text(), shown, nuclei[shown])
    return review


def finetune_picture(viewer: Any, work: Path, out_png: Path, *, epochs: int, steps: int, max_width: int,
                     timeout: float) -> dict[str, Any]:
    """Fine-tune from nuclei-lite in the Fine-tune dock, wait for the plot and the overlay."""
    from napari_pathoseg._widgets.finetune import FinetuneWidget
    from napari_pathoseg._widgets.review import MASK_LAYER
    from napari_pathoseg._widgets.slide import slide_layers

    strong = make_strong_folder(work / "strong", monuseg=SHARED / "monuseg_train")
    dock = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Fine-tune", area="right", tabify=True)
    dock.base_combo.setCurrentText("nuclei-lite")
    dock.preset_combo.setCurrentText("attcycle-lite")
    dock.strong_edit.setText(str(strong))
    dock.strong_mpp.setValue(STRONG_MPP)
    dock.review_btn.click()  # the project open in the Review dock (its accepted tiles)
    dock.epochs_spin.setValue(epochs)
    dock.steps_spin.setValue(steps)
    dock.lr_spin.setValue(1e-4)
    dock.name_edit.setText(STUDENT_NAME)
    dock.out_edit.setText(str(work / "run"))
    if not dock.project_edit.text():
        raise SystemExit("the Fine-tune dock did not take the Review dock's project")
    if MASK_LAYER in viewer.layers:
        viewer.layers.remove(MASK_LAYER)
    slide_layer = slide_layers(viewer)[0]
    viewer.layers.selection.active = slide_layer
    dock.parent().raise_()
    _dock_width(viewer, 470)
    _settle(20)
    _show_view(viewer, slide_layer, COMPARE_VIEW)  # compared after training: the view at the end
    _settle(20)

    t0 = time.monotonic()
    if not dock.start_btn.isEnabled():
        raise SystemExit(f"Start is disabled: {dock.start_btn.toolTip()}")
    dock.start_btn.click()
    _wait_until(lambda: not dock.jobs.running, timeout=timeout, what="the fine-tune run")
    done = dock.last_done
    if done is None or done.cancelled or done.registered is None:
        raise SystemExit(f"the fine-tune run did not finish: {dock.status.text()}")
    train_s = time.monotonic() - t0
    logger.info("fine-tune: %s (%.0f s)", dock.status.text(), train_s)
    _wait_until(lambda: bool(dock.compare_models) and not dock.compare_jobs.running
                and all(name in viewer.layers for name in dock.compare_models),
                timeout=timeout, what="the new-vs-base overlay")
    _settle(20)  # the last yielded result is delivered after the worker ends
    missing = [name for name in dock.compare_models if name not in viewer.layers]
    if not dock.compare_models or missing:
        raise SystemExit(f"the overlay did not show {missing or 'any model'}: {dock.status.text()}")
    _settle(20)
    overlay = {name: {"nuclei": int(len(np.unique(np.asarray(viewer.layers[name].data))) - 1),
                      "region_xywh": viewer.layers[name].metadata.get("region_xywh")}
               for name in dock.compare_models}
    logger.info("overlay: %s", overlay)
    _grab(viewer, out_png, max_width=max_width)
    return {"seconds": train_s, "best": dict(done.best_metrics), "overlay": overlay,
            "history": len(done.history), "status": dock.status.text()}


# ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "images",
                    help="folder of the PNGs (default docs/images)")
    ap.add_argument("--work", type=Path, default=None, help="work folder kept afterwards (default: a temporary one)")
    ap.add_argument("--epochs", type=int, default=3, help="fine-tune epochs")
    ap.add_argument("--steps", type=int, default=8, help="steps per epoch")
    ap.add_argument("--threshold", type=float, default=0.95, help="score threshold set in the Review dock")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--width", type=int, default=1600, help="window width (the PNGs are at most this wide)")
    ap.add_argument("--height", type=int, default=1000, help="window height")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the fine-tune run")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if args.work is not None and args.work.exists() and any(args.work.iterdir()):
        ap.error(f"--work {args.work} is not empty (a kept run would be resumed, not retaken); choose a new folder")
    work = args.work or Path(tempfile.mkdtemp(prefix="pathoseg-shots-"))
    work.mkdir(parents=True, exist_ok=True)
    # a private registry: the fine-tuned model never reaches the user's models.json
    os.environ["PATHOSEG_HOME"] = str((work / "home").resolve())
    import napari
    import torch

    from napari_pathoseg.wsi.slide import sample_slide_path

    torch.set_num_threads(args.threads)
    t_start = time.monotonic()
    try:
        project = make_review_project(work / "review")
        viewer = napari.Viewer(title="napari-pathoseg")
        viewer.open(str(sample_slide_path()), plugin="napari-pathoseg")
        win = viewer.window._qt_window
        viewer.window.show()
        win.showNormal()
        win.setGeometry(0, 0, args.width, args.height)
        _settle(20)
        review_picture(viewer, project.root, args.out / "review_dock.png", threshold=args.threshold,
                       max_width=args.width)
        summary = finetune_picture(viewer, work, args.out / "finetune_dock.png", epochs=args.epochs,
                                   steps=args.steps, max_width=args.width, timeout=args.timeout)
        logger.info("fine-tune summary: %s", summary)
        viewer.close()
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    logger.info("done in %.0f s", time.monotonic() - t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
