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


def test_slide_widget_open_and_mask(make_napari_viewer, qtbot, sample_svs):
    from napari_pathoseg._widgets.slide import SlideWidget

    viewer = make_napari_viewer()
    w = SlideWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.path_edit.setText(str(sample_svs))
    w.open_btn.click()
    qtbot.waitUntil(lambda: len(viewer.layers) == 1, timeout=20000)
    assert "aperio" in w.meta_text.toPlainText()
    assert w.thumb.pixmap() is not None and not w.thumb.pixmap().isNull()
    w.mask_check.setChecked(True)
    name = f"{viewer.layers[0].name} tissue"
    assert name in viewer.layers
    mask_layer = viewer.layers[name]
    assert 0.2 < (np.asarray(mask_layer.data) > 0).mean() < 0.6
    # the mask covers the slide in world coordinates
    ext = mask_layer.extent.world[1] - mask_layer.extent.world[0]
    assert ext == pytest.approx(viewer.layers[0].extent.world[1] - viewer.layers[0].extent.world[0], rel=0.01)
    w.mask_check.setChecked(False)
    assert not mask_layer.visible


def test_slide_widget_bad_file_notifies(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    from napari_pathoseg._widgets import slide as slide_mod

    errors = []
    monkeypatch.setattr(slide_mod, "show_error", errors.append)
    monkeypatch.setattr("napari_pathoseg._widgets._common.show_error", errors.append)
    p = tmp_path / "broken.svs"
    p.write_text("not a slide")
    viewer = make_napari_viewer()
    w = slide_mod.SlideWidget(viewer)
    w.path_edit.setText(str(p))
    w.open_btn.click()
    qtbot.waitUntil(lambda: bool(errors), timeout=10000)
    assert "broken.svs" in errors[0]
    assert len(viewer.layers) == 0
    qtbot.waitUntil(w.open_btn.isEnabled, timeout=5000)


def test_demo_gui_opens_slide_with_all_docks(qtbot, sample_svs):
    """`pathoseg demo` with a display: napari with the sample slide and every dock."""
    from napari_pathoseg._widgets.launch import launch_viewer

    viewer = launch_viewer(sample_svs, run=False)
    try:
        assert viewer.layers[0].metadata["slide"]["format"] == "aperio"
        docks = set(viewer.window.dock_widgets)
        for name in ("Slide", "Stain", "Nuclei", "Review", "Fine-tune", "Export"):
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
