"""The Nuclei dock in a real viewer: region choices, background run, Stop, placement."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from napari_pathoseg.errors import PathosegError

pytestmark = pytest.mark.gui


@pytest.fixture
def viewer_with_slide(make_napari_viewer, sample_svs):
    viewer = make_napari_viewer()
    viewer.open(str(sample_svs), plugin="napari-pathoseg")
    return viewer


def _widget(viewer):
    from napari_pathoseg._widgets.nuclei import NucleiWidget

    w = NucleiWidget(viewer)
    viewer.window.add_dock_widget(w)
    assert w.model_combo.currentText() == "nuclei-lite", "the shipped model must be listed"
    return w


def test_drawn_rectangle_labels_sit_over_the_slide(viewer_with_slide, qtbot):
    viewer = viewer_with_slide
    slide_layer = viewer.layers[0]
    w = _widget(viewer)
    # a rectangle in world (µm) coordinates, like one drawn with the mouse
    sy, sx = slide_layer.scale
    r0, c0, r1, c1 = 1920 * sy, 768 * sx, 2176 * sy, 1024 * sx
    viewer.add_shapes([np.array([[r0, c0], [r0, c1], [r1, c1], [r1, c0]])], shape_type="rectangle", name="roi")
    w.region_combo.setCurrentText("Drawn rectangle")
    w.shapes_combo.setCurrentText("roi")
    assert w.run_btn.isEnabled()
    w.run_btn.click()
    qtbot.waitUntil(lambda: "CMU-1-Small-Region.svs nuclei" in viewer.layers, timeout=120000)
    lab = viewer.layers["CMU-1-Small-Region.svs nuclei"]
    assert lab.data.shape == (256, 256)
    assert int(lab.data.max()) > 10
    # the labels cover exactly the drawn rectangle in world coordinates
    ext = lab.extent.world
    assert ext[0][0] == pytest.approx(r0 - 0.5 * sy, abs=sy) and ext[0][1] == pytest.approx(c0 - 0.5 * sx, abs=sx)
    assert ext[1][0] == pytest.approx(r1 - 0.5 * sy, abs=sy) and ext[1][1] == pytest.approx(c1 - 0.5 * sx, abs=sx)
    # a nucleus pixel of the labels is dark (haematoxylin) on the slide below it
    slide = slide_layer.metadata["pathoseg_slide"]
    region = slide.read_region(level=0, row=1920, col=768, height=256, width=256).astype(float).mean(axis=2)
    assert region[lab.data > 0].mean() < region[lab.data == 0].mean() - 20
    # re-running replaces the layer instead of adding another
    qtbot.waitUntil(w.run_btn.isEnabled, timeout=10000)
    w.run_btn.click()
    qtbot.waitUntil(w.run_btn.isEnabled, timeout=120000)
    assert sum(ly.name.endswith("nuclei") for ly in viewer.layers) == 1


def test_current_view_region(viewer_with_slide, qtbot):
    from napari_pathoseg._widgets.nuclei import view_region

    viewer = viewer_with_slide
    viewer.window.show()
    layer = viewer.layers[0]
    cam = viewer.scene.camera
    cam.center = (1000 * layer.scale[0], 800 * layer.scale[1])
    cam.zoom = 8.0
    qtbot.waitUntil(lambda: view_region(layer, viewer)[2] < 2000, timeout=5000)
    x, y, w, h = view_region(layer, viewer)
    # exactly the canvas at that zoom (not the file tiles napari loaded around it)
    canvas_h, canvas_w = (float(v) / 8.0 / float(s) for v, s in zip(viewer.canvas.size, layer.scale[-2:]))
    assert abs(w - canvas_w) <= 2 and abs(h - canvas_h) <= 2
    assert abs(x + w / 2 - 800) <= 2 and abs(y + h / 2 - 1000) <= 2
    # panned off the slide: a clear error, not an empty region
    cam.center = (-5000 * layer.scale[0], -5000 * layer.scale[1])
    with pytest.raises(PathosegError, match="not in view"):
        view_region(layer, viewer)


def test_stop_cancels_whole_slide_run(viewer_with_slide, qtbot, monkeypatch):
    from napari_pathoseg._widgets import nuclei as mod

    infos = []
    monkeypatch.setattr(mod, "show_info", infos.append)
    viewer = viewer_with_slide
    w = _widget(viewer)
    w.region_combo.setCurrentText("Whole slide")
    threads = []
    orig = mod.iter_segment_nuclei

    def spy(*a, **k):
        threads.append(threading.get_ident())
        yield from orig(*a, **k)

    monkeypatch.setattr(mod, "iter_segment_nuclei", spy)
    w.run_btn.click()
    qtbot.waitUntil(lambda: w.progress.value() >= 1, timeout=120000)
    assert threads and threads[0] != threading.get_ident()  # ran on a worker thread
    w.stop_btn.click()
    qtbot.waitUntil(lambda: w.stop_btn.isEnabled() is False, timeout=60000)
    assert "stopped" in w.status.text()
    assert not any(ly.name.endswith("nuclei") for ly in viewer.layers)
    assert any("stopped" in m for m in infos)


def test_run_disabled_without_slide(make_napari_viewer):
    from napari_pathoseg._widgets.nuclei import NucleiWidget

    viewer = make_napari_viewer()
    w = NucleiWidget(viewer)
    assert not w.run_btn.isEnabled()
    assert "Open a slide" in w.run_btn.toolTip()


def test_nuclei_layer_exports_to_geojson_at_level0(viewer_with_slide, qtbot, tmp_path):
    """The Nuclei dock's output saves through File > Save as QuPath GeoJSON in level-0 pixels."""
    import json

    viewer = viewer_with_slide
    w = _widget(viewer)
    slide_layer = viewer.layers[0]
    sy, sx = slide_layer.scale
    r0, c0, r1, c1 = 1920 * sy, 768 * sx, 2048 * sy, 896 * sx
    viewer.add_shapes([np.array([[r0, c0], [r0, c1], [r1, c1], [r1, c0]])], shape_type="rectangle", name="roi")
    w.region_combo.setCurrentText("Drawn rectangle")
    w.run_btn.click()
    qtbot.waitUntil(lambda: "CMU-1-Small-Region.svs nuclei" in viewer.layers, timeout=120000)
    lab = viewer.layers["CMU-1-Small-Region.svs nuclei"]
    assert w.layer_combo.count() == 1  # the labels layer is not offered as a slide
    out = tmp_path / "nuclei.geojson"
    lab.save(str(out), plugin="napari-pathoseg")
    fc = json.loads(out.read_text())
    assert fc["type"] == "FeatureCollection"
    assert len(fc["features"]) == len(np.unique(lab.data)) - 1
    xs = [p[0] for f in fc["features"] for p in f["geometry"]["coordinates"][0]]
    ys = [p[1] for f in fc["features"] for p in f["geometry"]["coordinates"][0]]
    assert 767 <= min(xs) and max(xs) <= 897 and 1919 <= min(ys) and max(ys) <= 2049
