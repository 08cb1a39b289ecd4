"""The Fine-tune dock: background training, Stop, registration and the comparison overlay."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setenv("PATHOSEG_HOME", str(tmp_path / "home"))


@pytest.fixture
def strong_folder(make_strong_folder):
    return make_strong_folder(128)


@pytest.fixture
def dock(make_napari_viewer, qtbot, he_image):
    from napari_pathoseg._widgets.finetune import FinetuneWidget
    from napari_pathoseg.wsi.slide import Slide

    viewer = make_napari_viewer()
    slide = Slide.from_array(he_image[:256, :256], mpp=0.5, name="crop")
    viewer.add_image(he_image[:256, :256], rgb=True, name="crop", scale=(2.0, 2.0), translate=(10.0, 20.0),
                     metadata={"pathoseg_slide": slide})
    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Fine-tune")
    yield widget
    widget.shutdown(timeout=60)
    qtbot.waitUntil(lambda: widget.worker is None and (widget.overlay_worker is None
                                                       or not widget.overlay_worker.is_running), timeout=60_000)


def _fill(widget, strong_folder, tmp_path, *, epochs, steps, name="dock-student"):
    widget.base_combo.setCurrentText("(none: fresh student)")
    widget.preset_combo.setCurrentText("transcycle-lite")
    widget.strong_edit.setText(str(strong_folder))
    widget.epochs_spin.setValue(epochs)
    widget.steps_spin.setValue(steps)
    widget.lr_spin.setValue(1e-4)
    widget.name_edit.setText(name)
    widget.out_edit.setText(str(tmp_path / "run"))


def test_start_button_needs_strong_labels(dock):
    dock.strong_edit.setText("")
    assert not dock.start_btn.isEnabled() and "strong-label" in dock.start_btn.toolTip()
    dock.strong_edit.setText("/some/folder")
    assert dock.start_btn.isEnabled()


def test_train_in_background_register_and_overlay(dock, qtbot, strong_folder, tmp_path):
    from napari_pathoseg.models.registry import list_models

    _fill(dock, strong_folder, tmp_path, epochs=1, steps=2)
    dock.start_btn.click()
    assert dock.worker is not None and not dock.start_btn.isEnabled() and dock.stop_btn.isEnabled()
    qtbot.waitUntil(lambda: dock.worker is None, timeout=120_000)
    assert dock.worker_thread_id is not None and dock.worker_thread_id != threading.get_ident()
    done = dock.last_done
    assert done is not None and not done.cancelled and done.registered["name"] == "dock-student"
    assert any(m["name"] == "dock-student" for m in list_models())
    assert dock.progress.value() == 2 and len(dock.plot.steps) == 2 and len(dock.plot.epochs) == 1
    assert dock.base_combo.findText("dock-student") >= 0
    # the new model's labels of the view appear over the slide layer
    qtbot.waitUntil(lambda: "dock-student nuclei" in dock.viewer.layers, timeout=60_000)
    labels = dock.viewer.layers["dock-student nuclei"]
    slide_layer = dock.viewer.layers["crop"]
    assert labels.data.shape == (256, 256)
    np.testing.assert_allclose(labels.scale, slide_layer.scale)
    np.testing.assert_allclose(labels.translate, slide_layer.translate)
    # the overlay is the registered model, and the status keeps the run's result beside the counts
    assert labels.metadata["model"] == "dock-student"
    text = dock.status.text()
    assert text.startswith("done: best val AJI") and "registered as 'dock-student'" in text
    n_nuclei = len(np.unique(labels.data[labels.data > 0]))
    assert f"dock-student nuclei: {n_nuclei} nuclei" in text


def test_stop_leaves_a_checkpoint_and_start_resumes(dock, qtbot, strong_folder, tmp_path):
    from napari_pathoseg.models.checkpoint import read_header

    _fill(dock, strong_folder, tmp_path, epochs=2, steps=50, name="stopped")
    dock.start_btn.click()
    qtbot.waitUntil(lambda: dock.progress.value() >= 1, timeout=60_000)  # GUI got a step while training
    dock.stop_btn.click()
    qtbot.waitUntil(lambda: dock.worker is None, timeout=60_000)
    done = dock.last_done
    assert done.cancelled and done.registered is None
    last = tmp_path / "run" / "last.safetensors"
    assert last.is_file()
    meta = read_header(last)["meta"]
    assert meta["epoch"] == 0 and 1 <= meta["step"] < 50
    assert "Start resumes" in dock.status.text() and dock.start_btn.isEnabled()
    # Start again resumes from the saved step; shutting down (as on closing napari) stops it
    dock.start_btn.click()
    qtbot.waitUntil(lambda: dock.progress.value() > meta["step"], timeout=60_000)
    assert dock.shutdown(timeout=60)
    qtbot.waitUntil(lambda: dock.worker is None, timeout=60_000)
    assert dock.last_done.cancelled
    assert read_header(last)["meta"]["step"] > meta["step"]


def test_bad_input_is_shown_not_raised(dock, qtbot, tmp_path, monkeypatch):
    import napari_pathoseg._widgets.finetune as mod

    shown = []
    monkeypatch.setattr(mod, "show_error", shown.append)
    monkeypatch.setattr("napari_pathoseg._widgets._common.show_error", shown.append)
    dock.strong_edit.setText(str(tmp_path / "missing"))
    dock.out_edit.setText(str(tmp_path / "run"))
    dock.base_combo.setCurrentText("(none: fresh student)")
    dock.start_btn.click()
    qtbot.waitUntil(lambda: dock.worker is None, timeout=60_000)
    assert shown and "does not exist" in shown[-1]
    dock.name_edit.setText("a/b")
    assert dock.start() is None and "slash" in shown[-1]


def test_closing_napari_stops_training_cleanly(dock, qtbot, strong_folder, tmp_path):
    from napari_pathoseg.models.checkpoint import read_header

    _fill(dock, strong_folder, tmp_path, epochs=2, steps=50, name="closed")
    dock.start_btn.click()
    qtbot.waitUntil(lambda: dock.progress.value() >= 1, timeout=60_000)
    ended = dock._ended
    dock.viewer.window._qt_window.close()  # what the napari window's close button does
    assert ended.is_set()  # the close waited for the worker to save and end
    meta = read_header(tmp_path / "run" / "last.safetensors")["meta"]
    assert meta["epoch"] == 0 and meta["step"] >= 1


def test_compare_region_is_the_centre_of_a_large_view():
    from napari_pathoseg._widgets.finetune import compare_region

    assert compare_region((10, 20, 300, 200)) == (10, 20, 300, 200)
    assert compare_region((0, 0, 10000, 3000), max_side=4096) == (2952, 0, 4096, 3000)


def test_uses_the_project_open_in_the_review_dock(dock, tmp_path, monkeypatch):
    import napari_pathoseg._widgets.finetune as mod
    from napari_pathoseg._widgets.review import ReviewWidget
    from napari_pathoseg.review.project import ReviewProject

    shown = []
    monkeypatch.setattr(mod, "show_error", shown.append)
    monkeypatch.setattr("napari_pathoseg._widgets._common.show_error", shown.append)
    dock.review_btn.click()
    assert shown and "Review dock" in shown[-1] and dock.project_edit.text() == ""
    proj = ReviewProject.create(tmp_path / "proj", source=tmp_path, source_kind="folder", model="t",
                                tile_size=8, mpp=0.5)
    proj.add_tile(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 0.9, np.float32),
                  np.ones((8, 8), np.int32), x=0, y=0)
    review = ReviewWidget(dock.viewer)
    dock.viewer.window.add_dock_widget(review, name="Review")
    review.open_project(proj.root)
    dock.review_btn.click()
    assert dock.project_edit.text() == str(proj.root)
    review.close()
