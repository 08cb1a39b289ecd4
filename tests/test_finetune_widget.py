"""The Fine-tune dock: background training, Stop, registration, the base comparison and its overlay."""

from __future__ import annotations

import os
import threading
import time

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
                     units=("µm", "µm"), metadata={"pathoseg_slide": slide})
    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Fine-tune")
    yield widget
    widget.shutdown(timeout=60)
    qtbot.waitUntil(lambda: not widget.jobs.running and not widget.compare_jobs.running, timeout=60_000)


def _fill(widget, strong_folder, tmp_path, *, epochs, steps, name="dock-student", fresh=True):
    if fresh:
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


def test_defaults_fine_tune_the_teacher_and_base_list_holds_nucleus_models_only(dock, tmp_path, monkeypatch):
    # the defaults fine-tune the shipped teacher itself (its architecture and all its weights),
    # not a fresh student of another architecture
    dock.strong_edit.setText(str(tmp_path))
    cfg = dock.make_config()
    assert cfg.base == "nuclei-lite" and cfg.preset is None
    assert cfg.threads == max(1, len(os.sched_getaffinity(0)) - 1)  # a core stays with napari
    assert "fine-tunes nuclei-lite" in dock.start_btn.toolTip()
    # the base list offers models of task "nuclei" only, then the fresh-student choice
    import napari_pathoseg.models.registry as registry

    entries = [{"name": "nuclei-lite", "task": "nuclei", "preset": "attcycle-lite"},
               {"name": "tumour-fpn", "task": "lesion"}]
    monkeypatch.setattr(registry, "list_models", lambda task=None: entries)
    dock.refresh_models()
    items = [dock.base_combo.itemText(i) for i in range(dock.base_combo.count())]
    assert items == ["nuclei-lite", "(none: fresh student)"]


def test_fine_tune_the_base_compare_register_and_overlay(dock, qtbot, strong_folder, tmp_path):
    from napari_pathoseg._widgets.finetune_compare import prepare_labels
    from napari_pathoseg.models.registry import list_models

    _fill(dock, strong_folder, tmp_path, epochs=1, steps=2, fresh=False)
    notes = []
    dock.plot.set_note = lambda text, _orig=dock.plot.set_note: (notes.append(text), _orig(text))
    job = dock.start()
    assert job is not None and not dock.start_btn.isEnabled() and dock.stop_btn.isEnabled()
    assert not dock.base_combo.isEnabled()
    qtbot.waitUntil(lambda: job.ended, timeout=120_000)
    assert job.error is None
    assert dock.worker_thread_id is not None and dock.worker_thread_id != threading.get_ident()
    assert "validating…" in notes  # scoring the base and each validation are shown
    done = dock.last_done
    assert done is not None and not done.cancelled
    assert done.initialised_from and done.initialised_from.endswith("nuclei-lite.safetensors")
    assert done.base_metrics is not None and dock.plot.base_aji is not None
    assert len(dock.plot.steps) == 2 and len(dock.plot.epochs) == 1
    new, base = dock.plot.best_aji, dock.plot.base_aji
    assert new > 0.05  # a fine-tuned teacher, not a fresh student
    text = dock.status.text()
    assert f"val AJI {new:.3f} vs base nuclei-lite {base:.3f}" in text
    assert done.registered is not None and "registered as 'dock-student'" in text
    assert any(m["name"] == "dock-student" for m in list_models())
    assert dock.base_combo.findText("dock-student") >= 0
    # the new model's labels (filled) and its base's (outlines) appear over the slide layer
    qtbot.waitUntil(lambda: not dock.compare_jobs.running, timeout=60_000)
    labels = dock.viewer.layers["dock-student nuclei"]
    base_layer = dock.viewer.layers["nuclei-lite nuclei (base)"]
    slide_layer = dock.viewer.layers["crop"]
    assert labels.data.shape == base_layer.data.shape == (256, 256)
    for layer in (labels, base_layer):
        np.testing.assert_allclose(layer.scale, slide_layer.scale)
        np.testing.assert_allclose(layer.translate, slide_layer.translate)
        assert tuple(layer.units) == tuple(slide_layer.units)  # the scale bar keeps reading µm
        assert layer.data.dtype in (np.uint8, np.uint16)  # drawn without napari's uint32 remapping
        assert layer.contour == 0 and len(layer.metadata["table"]) > 0
    assert labels.metadata["model"] == "dock-student"
    # outlines prepared in the worker: every outline pixel lies on a base nucleus' border
    assert base_layer.metadata["outline"] and base_layer.data.any()
    assert text.startswith("done: val AJI") and "dock-student nuclei: " in dock.status.text()
    n_nuclei = len(np.unique(labels.data[labels.data > 0]))
    assert f"dock-student nuclei: {n_nuclei} nuclei" in dock.status.text()
    assert prepare_labels(labels.data).dtype == labels.data.dtype


def test_a_run_below_the_floor_is_not_registered_and_says_so(dock, tmp_path, monkeypatch):
    """A run scoring AJI 0 was registered with no warning; the core now refuses it (below its
    floor) and the dock must say so loudly rather than report "done"."""
    import napari_pathoseg._widgets.finetune as mod
    from napari_pathoseg.methods.nuclei.finetune import FinetuneConfig, FinetuneDone

    warned, infos = [], []
    monkeypatch.setattr(mod, "show_warning", warned.append)
    monkeypatch.setattr(mod, "show_info", infos.append)
    dock._config = FinetuneConfig(out_dir=str(tmp_path / "run"), name="weak", base="nuclei-lite")
    floor = ("not registered: the best validation AJI 0.000 is below the floor 0.05; train longer or on "
             "more labels, or register anyway (force_register / --force-register)")
    worse = "the fine-tuned model (validation AJI 0.000) does not beat its base (0.300) on the same validation images"
    dock._on_done(FinetuneDone(best_checkpoint=None, last_checkpoint=tmp_path / "run" / "last.safetensors",
                               best_metrics={"aji": 0.0, "best_aji": 0.0}, base_metrics={"aji": 0.28, "best_aji": 0.3},
                               warnings=[worse, floor]))
    assert [w.split(": ", 1)[1] for w in warned] == [worse, floor] and not infos
    text = dock.status.text()
    assert text.startswith("done: val AJI 0.000 vs base nuclei-lite 0.300 (-0.300); NOT registered")
    assert "below the floor" in text and dock.plot.base_aji == pytest.approx(0.3)
    assert dock.compare_jobs.job is None  # nothing to compare: no best checkpoint


def test_stop_leaves_a_checkpoint_and_start_resumes(dock, qtbot, strong_folder, tmp_path):
    from napari_pathoseg.models.checkpoint import read_header

    _fill(dock, strong_folder, tmp_path, epochs=2, steps=50, name="stopped")
    dock.start_btn.click()
    qtbot.waitUntil(lambda: dock.progress.value() >= 1, timeout=60_000)  # GUI got a step while training
    dock.stop_btn.click()
    qtbot.waitUntil(lambda: not dock.jobs.running, timeout=60_000)
    done = dock.last_done
    assert done.cancelled and done.registered is None
    last = tmp_path / "run" / "last.safetensors"
    assert last.is_file()
    meta = read_header(last)["meta"]
    assert meta["epoch"] == 0 and 1 <= meta["step"] < 50
    assert "Start resumes" in dock.status.text() and dock.start_btn.isEnabled()
    # Start again resumes from the saved step; closing napari stops it and waits for the checkpoint
    dock.start_btn.click()
    qtbot.waitUntil(lambda: dock.progress.value() > meta["step"], timeout=60_000)
    ended = dock._ended
    dock.viewer.window._qt_window.close()  # what the napari window's close button does
    assert ended.is_set()  # the close waited for the worker to save and end
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
    qtbot.waitUntil(lambda: not dock.jobs.running, timeout=60_000)
    assert shown and "does not exist" in shown[-1]
    dock.name_edit.setText("a/b")
    assert dock.start() is None and "slash" in shown[-1]


def test_compare_region_is_the_centre_of_a_large_view():
    from napari_pathoseg._widgets.finetune import compare_region

    assert compare_region((10, 20, 300, 200)) == (10, 20, 300, 200)
    assert compare_region((0, 0, 10000, 3000), max_side=4096) == (2952, 0, 4096, 3000)


def test_overlay_data_is_prepared_off_the_gui_thread_and_added_quickly(make_napari_viewer, qtbot):
    """Adding a 4096² comparison layer froze napari 1-2 s (uint32 ids remapped per pixel,
    outlines computed by napari's contour on the GUI thread)."""
    from types import SimpleNamespace

    from skimage.segmentation import find_boundaries

    from napari_pathoseg._widgets.finetune import FinetuneWidget
    from napari_pathoseg._widgets.finetune_compare import OverlayLayer, prepare_labels

    rng = np.random.default_rng(0)
    n = 4096
    lab = np.zeros((n, n), np.uint32)
    k = 0
    for r in range(0, n - 16, 24):
        for c in range(0, n - 16, 24):
            k += 1
            dr, dc = rng.integers(0, 6, 2)
            lab[r + dr : r + dr + 12, c + dc : c + dc + 12] = k
    assert prepare_labels(np.array([[0, 200]])).dtype == np.uint8
    assert prepare_labels(np.array([[0, 70_000]])).dtype == np.uint32
    filled = prepare_labels(lab)
    outline = prepare_labels(lab, outline=True)
    assert filled.dtype == np.uint16 and np.array_equal(filled, lab)
    np.testing.assert_array_equal(outline > 0, find_boundaries(lab, mode="inner"))
    np.testing.assert_array_equal(outline[outline > 0], lab[outline > 0])

    viewer = make_napari_viewer()
    slide = viewer.add_image(np.zeros((64, 64, 3), np.uint8), rgb=True, name="slide", scale=(64.0, 64.0))
    dock = FinetuneWidget(viewer)
    qtbot.addWidget(dock)
    result = SimpleNamespace(model="m", region=(0, 0, n, n), scale=1.0, mpp=0.5, table=[{"id": 1}], n_nuclei=k)
    viewer.add_labels(np.zeros((8, 8), np.uint16), name="warm-up")  # napari's one-off imports
    cpu = []
    for layer in (OverlayLayer("new nuclei", filled, result), OverlayLayer("base nuclei (base)", outline, result, True)):
        t = time.thread_time()  # CPU time of the GUI thread: not inflated by other processes
        dock._on_overlay(slide, layer)
        cpu.append(time.thread_time() - t)
    assert viewer.layers["new nuclei"].data.dtype == np.uint16
    assert viewer.layers["base nuclei (base)"].contour == 0
    # ~0.2-0.3 s each here (mostly napari's layer controls); uint32 ids with napari's contour took
    # more than 1 s of GUI-thread CPU for the base layer alone
    assert max(cpu) < 0.6, f"adding a 4096² layer took {max(cpu):.2f} s of GUI-thread CPU"


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
