"""The Slide classification dock in a real viewer: run, heat map over the slide, tile table, Stop, training panel."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui


@pytest.fixture
def untrained(tmp_path):
    from napari_pathoseg.methods.mil.release import build_untrained

    path = tmp_path / "mil-untrained.safetensors"
    build_untrained(path, preset="lite", seed=0)
    return path


@pytest.fixture
def dock_on_slide(make_napari_viewer, he_image, make_pyramid_tiff, untrained):
    """The dock over a 512 x 768 slide at 1 µm/px (H&E left, glass right) with the untrained model chosen."""
    from napari_pathoseg._widgets.slidecls import SlideClassificationWidget

    viewer = make_napari_viewer()
    w = SlideClassificationWidget(viewer)
    viewer.window.add_dock_widget(w)
    assert not w.run_btn.isEnabled() and "Open a slide" in w.run_btn.toolTip()
    img = np.full((512, 768, 3), 245, np.uint8)
    img[:, :512] = he_image[256:768, 256:768]
    path = make_pyramid_tiff("slide.tif", img, levels=2, tile=256, mpp=1.0)
    viewer.open(str(path), plugin="napari-pathoseg")
    w._models["untrained"] = str(untrained)
    w.model_combo.addItem("untrained")
    w.model_combo.setCurrentText("untrained")
    w.region_combo.setCurrentText("Whole slide")
    assert w.run_btn.isEnabled()
    return viewer, w


def test_dock_call_heatmap_placement_and_tile_table(dock_on_slide, sync_jobs, one_torch_thread):
    from napari_pathoseg._widgets._common import camera
    from napari_pathoseg._widgets.slidecls import OFF

    viewer, w = dock_on_slide
    slide = viewer.layers[0]
    w.run_btn.click()
    res = w.result
    assert res is not None and not res.cancelled and res.n_tiles > 40
    heat = viewer.layers[w.heat_name()]
    assert heat.data.shape == (8, 12) and str(heat.units[-1]) == str(slide.units[-1]) == "micrometer"
    t = res.tile_size
    # heat-map pixel (i, j) sits on the centre of tile (i, j) of the slide
    for i, j in ((0, 0), (5, 3), (7, 11)):
        np.testing.assert_allclose(heat.data_to_world((i, j)), slide.data_to_world((i * t + (t - 1) / 2, j * t + (t - 1) / 2)))
    assert (heat.data[:, 8:] == OFF).all() and (np.asarray(heat.data) >= 0).sum() == res.n_tiles  # glass: no tile
    assert res.label in w.call_label.text() and f"{res.probability:.3f}" in w.call_label.text()
    # the table: strongest tiles first; a click centres and zooms the camera on that tile
    n = w.table.rowCount()
    probs = [float(w.table.item(r, 0).text()) for r in range(n)]
    assert n == res.n_tiles and probs == sorted(probs, reverse=True)
    x, y = int(w.table.item(2, 1).text()), int(w.table.item(2, 2).text())
    zoom0 = camera(viewer).zoom
    w.table.cellClicked.emit(2, 0)
    centre = np.asarray(camera(viewer).center)[-2:]
    np.testing.assert_allclose(centre, slide.data_to_world((y + (t - 1) / 2, x + (t - 1) / 2))[-2:], atol=1e-6)
    assert camera(viewer).zoom != pytest.approx(zoom0)
    # colormap and opacity act on the heat layer
    w.opacity.setValue(25)
    w.cmap_combo.setCurrentText("viridis")
    assert heat.opacity == pytest.approx(0.25) and "viridis" in heat.colormap.name
    # a second run (a drawn rectangle) updates the same layer, placed on the rectangle's tiles
    r0, c0, r1, c1 = 128, 64, 384, 320  # level-0 pixels
    sy, sx = slide.scale
    viewer.add_shapes([np.array([[r0 * sy, c0 * sx], [r0 * sy, c1 * sx], [r1 * sy, c1 * sx], [r1 * sy, c0 * sx]])],
                      shape_type="rectangle", name="roi")
    w.region_combo.setCurrentText("Drawn rectangle")
    w.shapes_combo.setCurrentText("roi")
    n_layers = len(viewer.layers)
    w.run_btn.click()
    assert len(viewer.layers) == n_layers and viewer.layers[w.heat_name()] is heat
    assert heat.data.shape == (4, 4) and w.result.region == (c0, r0, c1 - c0, r1 - r0)
    np.testing.assert_allclose(heat.data_to_world((0, 0)), slide.data_to_world((r0 + (t - 1) / 2, c0 + (t - 1) / 2)))


def test_dock_stop_keeps_the_finished_tiles(dock_on_slide, sync_jobs, one_torch_thread):
    _, w = dock_on_slide
    real = w._on_progress

    def stop_after_first_batch(ev):
        real(ev)
        if getattr(ev, "stage", "") == "inference" and ev.done > 0:
            w.stop_btn.click()

    w._on_progress = stop_after_first_batch
    w.run_btn.click()
    res = w.result
    assert res.cancelled and 0 < res.tiles_run < res.tiles_total
    assert w.table.rowCount() == res.n_tiles and "stopped early" in w.call_label.text()
    assert w.run_btn.isEnabled() and not w.stop_btn.isEnabled()
    assert np.isfinite(res.heatmap).sum() == res.n_tiles


def test_heat_colormap_hides_cells_without_a_tile():
    from napari_pathoseg._widgets.slidecls import OFF, heat_colormap, heat_display

    cmap = heat_colormap("inferno")
    lo, hi = OFF, 1.0
    rgba = cmap.map(np.array([(OFF - lo) / (hi - lo), (0.0 - lo) / (hi - lo), 1.0]))
    assert rgba[0, 3] == 0.0 and rgba[1, 3] == pytest.approx(1.0) and rgba[2, 3] == pytest.approx(1.0)
    np.testing.assert_array_equal(heat_display(np.array([[np.nan, 0.5]], np.float32)), [[OFF, 0.5]])


def test_training_panel_needs_a_cohort_and_a_folder(make_napari_viewer, tmp_path):
    from napari_pathoseg._widgets.slidecls import SlideClassificationWidget

    w = SlideClassificationWidget(make_napari_viewer())
    assert not w.train_btn.isEnabled() and "cohort CSV" in w.train_btn.toolTip()
    w.cohort_edit.setText(str(tmp_path / "cohort.csv"))
    assert not w.train_btn.isEnabled() and "run folder" in w.train_btn.toolTip()
    w.run_edit.setText(str(tmp_path / "run"))
    assert w.train_btn.isEnabled()


@pytest.mark.slow
def test_training_panel_stop_resume_and_register(make_napari_viewer, he_image, make_pyramid_tiff, tmp_path, monkeypatch,
                                                 sync_jobs, one_torch_thread):
    """Dock -> train_mil: Stop after one step keeps last.safetensors; resume finishes and registers the model."""
    from napari_pathoseg._widgets.slidecls import SlideClassificationWidget
    from napari_pathoseg.methods.mil import train

    monkeypatch.setenv("PATHOSEG_HOME", str(tmp_path / "home"))  # a private registry
    monkeypatch.setitem(train.DEFAULT_BUDGET, "lite", (1, 2))  # one epoch of two steps: the test stays short
    rows = []
    for i, label in enumerate(("negative", "positive")):
        make_pyramid_tiff(tmp_path / f"s{i}.tif", he_image[i * 512:(i + 1) * 512, :512], levels=1, tile=256, mpp=1.0)
        rows.append(f"s{i}.tif,{label}")
    (tmp_path / "cohort.csv").write_text("slide,label\n" + "\n".join(rows) + "\n")
    w = SlideClassificationWidget(make_napari_viewer())
    w.cohort_edit.setText(str(tmp_path / "cohort.csv"))
    w.run_edit.setText(str(tmp_path / "run"))
    w.register_edit.setText("my-slide-model")
    seen, stop_at_step = [], [True]

    def on_event(ev):
        seen.append(ev)
        if getattr(ev, "stage", "") == "train" and stop_at_step[0]:
            w.train_stop_btn.click()  # Stop after the first training step

    real_start = w.train_jobs.start
    w.train_jobs.start = lambda job, **kw: real_start(job, **{**kw, "on_event": on_event})
    w.train_btn.click()
    steps = [ev for ev in seen if getattr(ev, "stage", "") == "train"]
    assert steps and steps[0].done == 1 and steps[0].total == 2 and "epoch 1" in steps[0].message
    assert "stopped" in w.train_status.text() and "resume" in w.train_status.text()
    assert (tmp_path / "run" / "last.safetensors").is_file() and "my-slide-model" not in w._models
    assert w.train_btn.isEnabled() and not w.train_stop_btn.isEnabled()
    # resume: the second step runs, then validation, best.safetensors and the registration
    stop_at_step[0] = False
    seen.clear()
    w.resume_check.setChecked(True)
    w.train_btn.click()
    steps = [ev for ev in seen if getattr(ev, "stage", "") == "train"]
    assert [ev.done for ev in steps] == [2]
    assert "done" in w.train_status.text() and (tmp_path / "run" / "best.safetensors").is_file()
    assert w.model_combo.currentText() == "my-slide-model" and "my-slide-model" in w._models
