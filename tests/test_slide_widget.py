"""The Slide dock and the napari reader / sample data, in a real viewer."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def test_reader_opens_multiscale_with_scale(make_napari_viewer, sample_svs):
    viewer = make_napari_viewer()
    layers = viewer.open(str(sample_svs), plugin="napari-pathoseg")
    layer = layers[0]
    assert layer.multiscale and layer.rgb
    assert tuple(layer.scale) == pytest.approx((0.499, 0.499))
    assert tuple(layer.contrast_limits) == (0, 255)
    assert layer.metadata["slide"]["format"] == "aperio"


def test_reader_declines_other_files():
    from napari_pathoseg._reader import get_reader

    assert get_reader("table.csv") is None
    assert get_reader("objects.geojson") is None
    assert get_reader("slide.svs") is not None


def test_sample_data(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-pathoseg", "cmu-1-small-region")
    assert viewer.layers[0].data[0].shape == (2967, 2220, 3)


def test_slide_widget_open_and_mask(make_napari_viewer, sync_jobs, sample_svs):
    from napari_pathoseg._widgets.slide import SlideWidget

    viewer = make_napari_viewer()
    w = SlideWidget(viewer)
    viewer.window.add_dock_widget(w)
    assert not w.open_btn.isEnabled() and "Choose a slide" in w.open_btn.toolTip()
    w.path_edit.setText(str(sample_svs))
    assert w.open_btn.isEnabled()
    w.open_btn.click()
    assert len(viewer.layers) == 1
    assert "aperio" in w.meta_text.toPlainText()
    assert w.thumb.pixmap() is not None and not w.thumb.pixmap().isNull()
    # the coarse levels napari draws first were read in the job, the full resolution stays lazy
    data = viewer.layers[0].data
    assert isinstance(data[-1], np.ndarray) and hasattr(data[0], "chunks")
    w.mask_check.setChecked(True)
    name = f"{viewer.layers[0].name} tissue"
    assert name in viewer.layers
    mask_layer = viewer.layers[name]
    assert 0.2 < (np.asarray(mask_layer.data) > 0).mean() < 0.6
    assert str(mask_layer.units[0]) == "micrometer" and viewer.layers.extent.units is not None
    # the mask covers the slide in world coordinates
    ext = mask_layer.extent.world[1] - mask_layer.extent.world[0]
    assert ext == pytest.approx(viewer.layers[0].extent.world[1] - viewer.layers[0].extent.world[0], rel=0.01)
    w.mask_check.setChecked(False)
    assert not mask_layer.visible


def test_thumbnail_is_read_once_not_on_every_layer_change(make_napari_viewer, sync_jobs, sample_svs, monkeypatch):
    """Adding any layer used to re-read the thumbnail on the GUI thread (~0.2-0.5 s each time)."""
    from napari_pathoseg._widgets.slide import SlideWidget
    from napari_pathoseg.wsi.slide import Slide

    calls = []
    real = Slide.thumbnail
    monkeypatch.setattr(Slide, "thumbnail", lambda self, **k: (calls.append(1), real(self, **k))[1])
    viewer = make_napari_viewer()
    viewer.open(str(sample_svs), plugin="napari-pathoseg")  # File > Open: no thumbnail yet
    w = SlideWidget(viewer)
    assert len(calls) == 1 and not w.thumb.pixmap().isNull()
    for i in range(3):
        viewer.add_points(np.zeros((1, 2)), name=f"p{i}")
    assert len(calls) == 1


def test_open_and_mask_run_in_a_worker_thread(make_napari_viewer, qtbot, sample_svs, monkeypatch):
    import threading

    from napari_pathoseg._widgets import slide as slide_mod

    threads = []
    real_mask = slide_mod._mask_job
    monkeypatch.setattr(slide_mod, "_mask_job", lambda s: (threads.append(threading.get_ident()), real_mask(s))[1])
    viewer = make_napari_viewer()
    w = slide_mod.SlideWidget(viewer)
    w.path_edit.setText(str(sample_svs))
    w.open_btn.click()
    qtbot.waitUntil(lambda: len(viewer.layers) == 1 and not w.jobs.running, timeout=30_000)
    w.mask_check.setChecked(True)
    qtbot.waitUntil(lambda: len(viewer.layers) == 2, timeout=30_000)
    assert threads and threads[0] != threading.get_ident()


def test_slide_widget_bad_file_notifies(make_napari_viewer, sync_jobs, tmp_path, monkeypatch):
    from napari_pathoseg._widgets import slide as slide_mod

    errors = []
    monkeypatch.setattr("napari_pathoseg._widgets._common.show_error", errors.append)
    p = tmp_path / "broken.svs"
    p.write_text("not a slide")
    viewer = make_napari_viewer()
    w = slide_mod.SlideWidget(viewer)
    w.path_edit.setText(str(p))
    w.open_btn.click()
    assert len(errors) == 1 and "broken.svs" in errors[0]
    assert "broken.svs" in w.status.text()
    assert len(viewer.layers) == 0
    assert w.open_btn.isEnabled()


def test_demo_gui_opens_slide_with_all_docks(qtbot, sample_svs):
    """`pathoseg demo` with a display: napari with the sample slide and every dock."""
    from napari_pathoseg._widgets.launch import launch_viewer

    viewer = launch_viewer(sample_svs, run=False)
    try:
        assert viewer.layers[0].metadata["slide"]["format"] == "aperio"
        docks = set(viewer.window.dock_widgets)
        for name in ("Slide", "Stain", "Nuclei", "Lesions", "Tissue", "Review", "Fine-tune", "Export", "Cohort"):
            assert any(name in d for d in docks), (name, docks)
    finally:
        viewer.close()


def test_file_open_of_a_corrupt_slide_reports_the_problem(make_napari_viewer, tmp_path, sample_svs):
    """File > Open on a truncated slide: napari gets our message (it shows it), no layer, no crash."""
    data = sample_svs.read_bytes()
    p = tmp_path / "cut.svs"
    p.write_bytes(data[: len(data) // 3])
    viewer = make_napari_viewer()
    with pytest.raises(Exception, match="cut.svs"):
        viewer.open(str(p), plugin="napari-pathoseg")
    assert len(viewer.layers) == 0
