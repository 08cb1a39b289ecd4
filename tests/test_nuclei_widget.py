"""The Nuclei dock in a real viewer: regions, tissue-only, Stop keeps tiles, units, models, placement."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from napari_pathoseg.errors import PathosegError

pytestmark = pytest.mark.gui

NUCLEI = "CMU-1-Small-Region.svs nuclei"


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


def _rect(layer, r0, c0, r1, c1):
    """A rectangle over level-0 rows r0..r1, cols c0..c1, in world (µm) coordinates, as drawn."""
    sy, sx = layer.scale
    return np.array([[r0 * sy, c0 * sx], [r0 * sy, c1 * sx], [r1 * sy, c1 * sx], [r1 * sy, c0 * sx]])


def test_drawn_rectangle_labels_sit_over_the_slide_in_the_slides_units(viewer_with_slide, sync_jobs):
    viewer = viewer_with_slide
    slide_layer = viewer.layers[0]
    w = _widget(viewer)
    # a Shapes layer added as napari's button adds it: in pixels
    roi = viewer.add_shapes([_rect(slide_layer, 1920, 768, 2176, 1024)], shape_type="rectangle", name="roi")
    # the plugin gives it the slide's units: the scale bar keeps µm ("Inconsistent units" before)
    assert str(roi.units[0]) == "micrometer" and viewer.layers.extent.units is not None
    w.region_combo.setCurrentText("Drawn rectangle")
    w.shapes_combo.setCurrentText("roi")
    assert w.run_btn.isEnabled()
    w.run_btn.click()  # synchronous: done when click() returns
    lab = viewer.layers[NUCLEI]
    assert not lab.multiscale and lab.data.shape == (256, 256)
    assert int(lab.data.max()) > 10
    assert viewer.layers.extent.units is not None and str(lab.units[0]) == "micrometer"
    # the labels cover exactly the drawn rectangle in world coordinates
    sy, sx = slide_layer.scale
    r0, c0, r1, c1 = 1920 * sy, 768 * sx, 2176 * sy, 1024 * sx
    ext = lab.extent.world
    assert ext[0][0] == pytest.approx(r0 - 0.5 * sy, abs=sy) and ext[0][1] == pytest.approx(c0 - 0.5 * sx, abs=sx)
    assert ext[1][0] == pytest.approx(r1 - 0.5 * sy, abs=sy) and ext[1][1] == pytest.approx(c1 - 0.5 * sx, abs=sx)
    # a nucleus pixel of the labels is dark (haematoxylin) on the slide below it
    slide = slide_layer.metadata["pathoseg_slide"]
    region = slide.read_region(level=0, row=1920, col=768, height=256, width=256).astype(float).mean(axis=2)
    assert region[lab.data > 0].mean() < region[lab.data == 0].mean() - 20
    # re-running replaces the layer instead of adding another
    w.run_btn.click()
    assert sum(ly.name.endswith("nuclei") for ly in viewer.layers) == 1


def test_draw_button_adds_a_rectangle_layer_in_micrometres(viewer_with_slide):
    viewer = viewer_with_slide
    w = _widget(viewer)
    w.draw_btn.click()
    shapes = viewer.layers["nuclei region"]
    assert shapes.mode == "add_rectangle" and str(shapes.units[0]) == "micrometer"
    assert viewer.layers.extent.units is not None
    assert w.region_combo.currentText() == "Drawn rectangle" and w.shapes_combo.currentText() == shapes.name


def test_a_rectangle_over_background_runs_no_network(viewer_with_slide, sync_jobs, monkeypatch):
    """Tissue-only in every mode: a drawn box over glass skips all its tiles."""
    from napari_pathoseg._widgets import nuclei as mod
    from napari_pathoseg.models import registry

    viewer = viewer_with_slide
    slide_layer = viewer.layers[0]
    w = _widget(viewer)
    calls = {"batches": 0, "kwargs": None}
    real_load, real_iter = registry.load_model, mod.iter_segment_nuclei

    def counting_load(*a, **k):
        model = real_load(*a, **k)
        predict = model.predict

        def counted(batch, *pa, **pk):
            calls["batches"] += 1
            return predict(batch, *pa, **pk)

        model.predict = counted
        return model

    def spy(*a, **k):
        calls["kwargs"] = k
        yield from real_iter(*a, **k)

    monkeypatch.setattr(registry, "load_model", counting_load)
    monkeypatch.setattr(mod, "iter_segment_nuclei", spy)
    # the top-left 512 x 512 level-0 pixels of the sample are glass
    viewer.add_shapes([_rect(slide_layer, 0, 0, 512, 512)], shape_type="rectangle", name="glass")
    w.region_combo.setCurrentText("Drawn rectangle")
    w.shapes_combo.setCurrentText("glass")
    w.run_btn.click()
    assert calls["kwargs"]["tissue_only"] is True
    assert calls["batches"] == 0
    assert int(np.asarray(viewer.layers[NUCLEI].data).max()) == 0


def test_stop_keeps_the_finished_tiles(viewer_with_slide, sync_jobs, monkeypatch):
    """Stop after the first batch of a whole-slide run: the nuclei found so far are added, not thrown away."""
    viewer = viewer_with_slide
    w = _widget(viewer)
    w.region_combo.setCurrentText("Whole slide")
    real = w._on_progress

    def press_stop_after_first_batch(ev):
        real(ev)
        if ev.total and ev.done >= 1:
            w.stop_btn.click()

    monkeypatch.setattr(w, "_on_progress", press_stop_after_first_batch)
    w.run_btn.click()
    lab = viewer.layers[NUCLEI]
    assert lab.metadata["cancelled"] is True
    data = np.asarray(lab.data[0] if lab.multiscale else lab.data)
    n = len(np.unique(data)) - 1
    assert n > 5 and len(lab.metadata["table"]) == n
    assert "stopped" in w.status.text() and "kept" in w.status.text()
    assert w.run_btn.isEnabled() and not w.stop_btn.isEnabled()


def test_whole_slide_in_a_worker_thread_gives_a_multiscale_layer(viewer_with_slide, qtbot, monkeypatch):
    """Threaded run; the large result arrives as a pyramid prepared off the GUI thread."""
    from napari_pathoseg._widgets import nuclei as mod

    viewer = viewer_with_slide
    w = _widget(viewer)
    w.region_combo.setCurrentText("Whole slide")
    threads = {}
    real_levels = mod.display_levels

    def spy(array, **k):
        threads["levels"] = threading.get_ident()
        return real_levels(array, **k)

    monkeypatch.setattr(mod, "display_levels", spy)
    w.run_btn.click()
    assert w.jobs.running and not w.run_btn.isEnabled() and w.stop_btn.isEnabled()
    qtbot.waitUntil(lambda: w.progress.value() >= 2, timeout=120_000)
    w.stop_btn.click()  # stop early: the test stays short; the finished tiles come back
    qtbot.waitUntil(lambda: not w.jobs.running, timeout=120_000)
    assert threads["levels"] != threading.get_ident()
    lab = viewer.layers[NUCLEI]
    assert lab.multiscale and len(lab.data) >= 2
    assert max(lab.data[-1].shape) <= 1024
    # every level covers the same world extent
    np.testing.assert_allclose(lab.extent.world, viewer.layers[0].extent.world, atol=2 * float(lab.scale[0]))
    assert not w.stop_btn.isEnabled() and w.run_btn.isEnabled()


def test_model_combo_lists_the_models_of_the_nuclei_task(make_napari_viewer, monkeypatch):
    from napari_pathoseg._widgets.nuclei import NucleiWidget
    from napari_pathoseg.models import registry

    cards = [
        {"name": "nuclei-lite", "path": "a.safetensors", "task": "nuclei"},
        {"name": "my-nuclei", "path": "b.safetensors", "task": "nuclei"},
        {"name": "tissue-classifier", "path": "c.safetensors", "task": "tissue"},
    ]
    asked = []

    def list_models(task=None):
        asked.append(task)
        return [c for c in cards if task is None or c["task"] == task]

    monkeypatch.setattr(registry, "list_models", list_models)
    w = NucleiWidget(make_napari_viewer())
    assert [w.model_combo.itemText(i) for i in range(w.model_combo.count())] == ["nuclei-lite", "my-nuclei"]
    assert asked[-1] == "nuclei"


def test_current_view_region(viewer_with_slide, qtbot):
    from napari_pathoseg._widgets._region import view_region

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


def test_run_disabled_without_slide(make_napari_viewer):
    from napari_pathoseg._widgets.nuclei import NucleiWidget

    viewer = make_napari_viewer()
    w = NucleiWidget(viewer)
    assert not w.run_btn.isEnabled()
    assert "Open a slide" in w.run_btn.toolTip()


def test_nuclei_layer_exports_to_geojson_at_level0(viewer_with_slide, sync_jobs, tmp_path):
    """The Nuclei dock's output saves through File > Save as QuPath GeoJSON in level-0 pixels."""
    import json

    viewer = viewer_with_slide
    w = _widget(viewer)
    viewer.add_shapes([_rect(viewer.layers[0], 1920, 768, 2048, 896)], shape_type="rectangle", name="roi")
    w.region_combo.setCurrentText("Drawn rectangle")
    w.run_btn.click()
    lab = viewer.layers[NUCLEI]
    assert w.layer_combo.count() == 1  # the labels layer is not offered as a slide
    out = tmp_path / "nuclei.geojson"
    lab.save(str(out), plugin="napari-pathoseg")
    fc = json.loads(out.read_text())
    assert fc["type"] == "FeatureCollection"
    assert len(fc["features"]) == len(np.unique(lab.data)) - 1
    xs = [p[0] for f in fc["features"] for p in f["geometry"]["coordinates"][0]]
    ys = [p[1] for f in fc["features"] for p in f["geometry"]["coordinates"][0]]
    assert 767 <= min(xs) and max(xs) <= 897 and 1919 <= min(ys) and max(ys) <= 2049


def test_small_labels_keep_their_ids_in_uint16_and_large_or_wide_ids_stay():
    from napari_pathoseg._widgets import nuclei

    lab = np.zeros((64, 48), np.uint32)
    lab[3:9, 4:10], lab[20:30, 5:9] = 7, 65535
    small = nuclei.small_labels(lab)
    assert small.dtype == np.uint16 and np.array_equal(small, lab)  # napari draws uint16 ids as they are
    lab[0, 0] = 70_000  # an id beyond uint16: unchanged
    assert nuclei.small_labels(lab) is lab
    assert nuclei.small_labels(np.zeros((4, 4), np.uint8)).dtype == np.uint8
    big = np.lib.stride_tricks.as_strided(np.zeros(1, np.uint32), shape=(nuclei.SMALL_LABELS_PIXELS + 1, 1), strides=(0, 0))
    assert nuclei.small_labels(big) is big  # a slide-sized result is not copied
