"""The "Stain" dock: targets, preview, lazy normalised layer, H/E layers, save, export, Stop."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.gui


@pytest.fixture
def slide_viewer(make_napari_viewer, he_image):
    """A viewer with a 1024 x 1024 real H&E slide layer (0.5 µm/px) and the Stain dock."""
    from napari_pathoseg._reader import slide_layer_data
    from napari_pathoseg._widgets.stain import StainWidget
    from napari_pathoseg.wsi.slide import Slide

    viewer = make_napari_viewer()
    slide = Slide.from_array(he_image, mpp=0.5, name="he.png")
    data, kwargs, _ = slide_layer_data(slide, name="he")
    viewer.add_image(data, **kwargs)
    widget = StainWidget(viewer)
    return viewer, widget, slide


@pytest.fixture
def errors(monkeypatch):
    import napari_pathoseg._widgets.stain as mod

    shown: list[str] = []
    monkeypatch.setattr(mod, "show_error", lambda msg: shown.append(str(msg)))
    monkeypatch.setattr("napari_pathoseg._widgets._common.show_error", lambda msg: shown.append(str(msg)))
    monkeypatch.setattr(mod, "show_info", lambda msg: None)
    return shown


def _wait(qtbot, widget, timeout=60_000):
    qtbot.waitUntil(lambda: not widget.jobs.running, timeout=timeout)


def _look_at(viewer, *, row, col, size):
    """Centre the camera on level-0 pixel (row, col) showing about ``size`` pixels (0.5 µm/px)."""
    viewer.camera.center = (row * 0.5, col * 0.5)
    viewer.camera.zoom = min(viewer.canvas.size) / (size * 0.5)


def test_fit_from_view_preview_and_normalised_layer(qtbot, slide_viewer, errors, sync_jobs):
    from napari_pathoseg._widgets.stain import TARGET_VIEW, view_rect

    viewer, widget, slide = slide_viewer
    assert widget.layer_combo.currentText() == "he"
    assert not widget.add_btn.isEnabled()  # nothing fitted yet
    _look_at(viewer, row=512, col=512, size=400)
    r, c, h, w = view_rect(viewer, viewer.layers["he"])
    assert abs(r + h / 2 - 512) < 2 and abs(c + w / 2 - 512) < 2
    assert min(h, w) == pytest.approx(400, rel=0.02)

    widget.target_combo.setCurrentText(TARGET_VIEW)
    widget.fit_btn.click()
    _wait(qtbot, widget)
    assert errors == []
    assert widget.normalizer is not None and widget.normalizer.name == "macenko"
    assert "view" in widget.normalizer.reference
    assert widget.add_btn.isEnabled() and widget.save_btn.isEnabled()

    widget.preview_btn.click()
    _wait(qtbot, widget)
    preview = viewer.layers["he [macenko preview]"]
    assert preview.data.dtype == np.uint8 and preview.rgb
    # the preview covers the viewed region of the slide
    lo, hi = preview.extent.world[:, -2:]
    assert np.allclose(lo, [max(r, 0) * 0.5, max(c, 0) * 0.5], atol=1.0)

    widget.add_btn.click()
    _wait(qtbot, widget)
    layer = viewer.layers["he [macenko]"]
    assert not layer.multiscale and slide.level_count == 1  # 1024 px: a single level
    # a small level is normalised in the job, so napari's first draw computes nothing on the GUI thread
    assert layer.data.shape == slide.pyramid[0].shape and isinstance(layer.data, np.ndarray)
    src = next(iter(widget._sources.values()))
    block = np.asarray(layer.data[100:300, 200:400])
    raw = slide.read_region(level=0, row=100, col=200, height=200, width=200)
    np.testing.assert_array_equal(block, widget.normalizer.transform(raw, source=src))
    np.testing.assert_allclose(layer.scale, viewer.layers["he"].scale)


def test_fit_from_rectangle_and_deconvolution_layers(qtbot, slide_viewer, errors, sync_jobs):
    from napari_pathoseg._widgets.stain import TARGET_RECT, shape_rect

    viewer, widget, _ = slide_viewer
    widget.target_combo.setCurrentText(TARGET_RECT)
    widget.fit_btn.click()  # no Shapes layer yet: an error is shown, nothing crashes
    assert len(errors) == 1 and "Shapes layer" in errors[-1]
    # a rectangle over level-0 rows 200..600, cols 300..700 (world units: µm at 0.5 µm/px)
    # drawn in a Shapes layer added in pixels (napari's default): the dock gives it the slide's µm
    viewer.add_shapes([np.array([[100, 150], [100, 350], [300, 350], [300, 150]])], shape_type="rectangle", name="roi")
    assert str(viewer.layers["roi"].units[0]) == "micrometer" and viewer.layers.extent.units is not None
    r, c, h, w = shape_rect(viewer.layers["roi"], viewer.layers["he"])
    assert (r, c, h, w) == pytest.approx((200, 300, 400, 400), abs=1e-6)
    widget.shapes_combo.setCurrentText("roi")
    widget.method_combo.setCurrentText("vahadane")
    widget.fit_btn.click()
    _wait(qtbot, widget)
    assert widget.normalizer.name == "vahadane" and "rectangle" in widget.normalizer.reference
    widget.deconv_btn.click()
    _wait(qtbot, widget)
    for stain in ("hematoxylin", "eosin"):
        layer = viewer.layers[f"he [{stain}]"]
        assert layer.data.dtype == np.float32 and layer.data.shape == (1024, 1024)
        assert isinstance(layer.data, np.ndarray)  # computed in the job, not at napari's first draw
        assert layer.contrast_limits[1] > 0
    assert len(errors) == 1


def test_reference_file_save_and_load_normaliser(qtbot, slide_viewer, errors, tmp_path, shared_data, sync_jobs):
    from napari_pathoseg._widgets.stain import TARGET_FILE, TARGET_JSON

    viewer, widget, _ = slide_viewer
    ref = sorted((shared_data / "monuseg_train" / "images").glob("*.png"))[0]
    widget.target_combo.setCurrentText(TARGET_FILE)
    widget.method_combo.setCurrentText("reinhard")
    widget.path_edit.setText(str(ref))
    widget.fit_btn.click()
    _wait(qtbot, widget)
    assert widget.normalizer.name == "reinhard" and widget.normalizer.reference == ref.name
    saved = widget.save_normalizer_to(tmp_path / "lab.json")
    assert saved is not None and json.loads(saved.read_text())["method"] == "reinhard"

    # load it back while another method is selected: the method follows the file
    widget.method_combo.setCurrentText("macenko")
    assert widget.normalizer is None
    widget.target_combo.setCurrentText(TARGET_JSON)
    widget.path_edit.setText(str(saved))
    widget.fit_btn.click()
    _wait(qtbot, widget)
    assert widget.normalizer.name == "reinhard" and widget.method_combo.currentText() == "reinhard"

    # a corrupted file: an error message, the dock keeps working
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "napari-pathoseg-stain-normalizer", "version": 1, "method"')
    widget.path_edit.setText(str(bad))
    widget.fit_btn.click()
    _wait(qtbot, widget)
    assert "invalid JSON" in errors[-1] and "bad.json" in errors[-1]
    assert widget.fit_btn.isEnabled()


def test_export_progress_and_stop(qtbot, slide_viewer, errors, tmp_path, monkeypatch):
    import napari_pathoseg._widgets.stain as mod
    from napari_pathoseg.wsi.slide import open_slide

    viewer, widget, slide = slide_viewer
    widget.target_combo.setCurrentText(mod.TARGET_VIEW)
    widget.fit_btn.click()
    _wait(qtbot, widget)
    out = tmp_path / "norm.tif"
    widget.export_to(out, compression="zlib")
    _wait(qtbot, widget)
    assert errors == []
    with open_slide(out) as written:
        assert written.shape == slide.shape

    # Stop: the writer is slowed down, Stop is pressed after the first tiles
    real = mod.write_normalized_tiff

    def slow(*args, **kwargs):
        user_progress = kwargs["progress"]

        def progress(p):
            user_progress(p)
            import time

            time.sleep(0.05)

        kwargs["progress"] = progress
        kwargs["tile_size"] = 128
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, "write_normalized_tiff", slow)
    stopped = tmp_path / "stopped.tif"
    widget.export_to(stopped, compression="zlib")
    qtbot.waitUntil(lambda: widget.progress.value() >= 2, timeout=30_000)
    assert widget.stop_btn.isEnabled()
    widget.stop_btn.click()
    assert widget.status.text() == "stopping…" and not widget.stop_btn.isEnabled()
    # the writer notices at its next tile and removes its temporary files; then the dock is free
    _wait(qtbot, widget)
    assert widget.fit_btn.isEnabled() and widget.status.text().startswith("stopped")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["norm.tif"]
    assert errors == []


def test_plain_rgb_layer_and_errors(qtbot, make_napari_viewer, errors, he_image, sync_jobs):
    from napari_pathoseg._widgets.stain import TARGET_FILE, TARGET_VIEW, StainWidget

    viewer = make_napari_viewer()
    widget = StainWidget(viewer)
    assert widget.layer_combo.count() == 0
    widget.target_combo.setCurrentText(TARGET_VIEW)
    assert not widget.fit_btn.isEnabled()  # no slide layer to read the view from
    widget.target_combo.setCurrentText(TARGET_FILE)
    widget.fit_btn.click()
    assert "reference image file" in errors[-1]
    viewer.add_image(he_image[:512, :512], name="plain", rgb=True)  # not opened by the plugin
    assert widget.layer_combo.currentText() == "plain"
    widget.target_combo.setCurrentText(TARGET_VIEW)
    viewer.reset_view()
    widget.fit_btn.click()
    _wait(qtbot, widget)
    assert widget.normalizer is not None
    widget.add_btn.click()
    _wait(qtbot, widget)
    assert "plain [macenko]" in viewer.layers
    # a blank view cannot be fitted: the error is shown, nothing raised
    viewer.add_image(np.full((300, 300, 3), 250, np.uint8), name="blank", rgb=True)
    widget.layer_combo.setCurrentText("blank")
    widget.fit_btn.click()
    _wait(qtbot, widget)
    assert "too little tissue" in errors[-1]
