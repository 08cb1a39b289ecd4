"""The Malignancy dock in a real viewer: run on a drawn rectangle, heat map + region placed with the slide's units,
live region threshold, Stop keeping the finished tiles."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    from napari_pathoseg.methods.malignancy.release import build_untrained

    return build_untrained(tmp_path_factory.mktemp("m1w") / "untrained-m1.safetensors", preset="lite", seed=1)


def _dock(make_napari_viewer, sample_svs, untrained):
    from napari_pathoseg._widgets.malignancy import MalignancyWidget

    viewer = make_napari_viewer()
    w = MalignancyWidget(viewer)
    viewer.window.add_dock_widget(w)
    assert not w.run_btn.isEnabled() and "Open a slide" in w.run_btn.toolTip()
    viewer.open(str(sample_svs), plugin="napari-pathoseg")
    w._models["tiny"] = str(untrained)
    w.model_combo.addItem("tiny")
    w.model_combo.setCurrentText("tiny")
    return viewer, w


def _rectangle(viewer, r0, c0, r1, c1):
    sy, sx = viewer.layers[0].scale
    return viewer.add_shapes([np.array([[r0 * sy, c0 * sx], [r0 * sy, c1 * sx], [r1 * sy, c1 * sx], [r1 * sy, c0 * sx]])],
                             shape_type="rectangle", name="roi")


def test_dock_rectangle_layers_threshold_stop(make_napari_viewer, sample_svs, untrained, sync_jobs, one_torch_thread):
    from napari_pathoseg.events import Progress

    viewer, w = _dock(make_napari_viewer, sample_svs, untrained)
    slide_layer = viewer.layers[0]
    r0, c0, r1, c1 = 1024, 512, 1408, 1024  # level-0 pixels: 192 x 256 px at the model's 1 µm/px, 6 tiles
    _rectangle(viewer, r0, c0, r1, c1)
    w.region_combo.setCurrentText("Drawn rectangle")
    w.shapes_combo.setCurrentText("roi")
    assert w.run_btn.isEnabled()
    w.run_btn.click()
    res = w.result
    assert res is not None and not res.cancelled and res.tiles == res.tiles_total > 0
    heat_name, region_name = w.layer_names()
    heat, region = viewer.layers[heat_name], viewer.layers[region_name]
    assert region.data.shape == res.region_prob.shape and heat.data.shape[0] <= res.heatmap.shape[0] * 8
    assert str(heat.units[0]) == str(region.units[0]) == "micrometer"
    sy, sx = slide_layer.scale
    ext = region.extent.world  # the region layer sits over the rectangle
    assert ext[0][0] == pytest.approx(r0 * sy, abs=2 * res.scale * sy) and ext[1][1] == pytest.approx(c1 * sx, abs=2 * res.scale * sx)
    hext = heat.extent.world  # the heat map lies over the rectangle, cut at its edge
    assert hext[0][1] >= c0 * sx - 1 and hext[1][1] <= c1 * sx + res.cell / 8 * sx + 1
    assert np.nanmax(heat.data) == pytest.approx(np.nanmax(res.heatmap))
    assert heat.opacity == pytest.approx(0.5) and heat.colormap.name == "inferno"
    assert f"{res.probability:.3f}" in w.call_label.text() and res.label.capitalize() in w.call_label.text()
    # the region threshold re-makes the mask from the stored probabilities (no network)
    w.mask_threshold.setValue(30)
    expect = (res.region_prob >= round(0.3 * 255)) & res.tissue
    np.testing.assert_array_equal(region.data.astype(bool), expect)
    assert w.result.mask_threshold == pytest.approx(0.3) and "region threshold 0.30" in w.call_label.text()
    w.gate_check.setChecked(True)  # B's region only in the tiles C calls malignant
    np.testing.assert_array_equal(region.data.astype(bool), expect & w.result.called_rows(0, res.shape[0]))
    assert "only in tiles C calls malignant" in w.call_label.text()
    w.gate_check.setChecked(False)
    w.opacity.setValue(80)
    assert heat.opacity == pytest.approx(0.8)

    # Stop after the first batch: the finished tiles are kept and shown
    seen = []

    def stop_after_first(ev):
        if isinstance(ev, Progress) and ev.stage == "inference" and ev.done > 0:
            seen.append(ev.done)
            w.jobs.stop()

    w._on_progress = stop_after_first
    w.run_btn.click()
    part = w.result
    assert seen and part.cancelled and 0 < part.tiles < part.tiles_total
    assert "stopped" in w.call_label.text()
    assert np.count_nonzero(~np.isnan(part.heatmap)) == part.tiles and np.isnan(viewer.layers[heat_name].data).any()


def test_training_panel_stop_resume_register(make_napari_viewer, shared_data, tmp_path, monkeypatch, sync_jobs,
                                             one_torch_thread):
    from PIL import Image

    from napari_pathoseg._widgets.malignancy import MalignancyWidget
    from napari_pathoseg.training.engine import StepEvent

    monkeypatch.setenv("PATHOSEG_HOME", str(tmp_path / "home"))  # a private registry
    root = shared_data / "ebhi_seg_crc"
    for kind, label in (("adenocarcinoma", "malignant"), ("normal", "benign")):
        for p in sorted((root / "images" / kind).iterdir())[:3]:  # real 64-px crops, masks for the malignant ones
            (tmp_path / "labels" / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(Image.open(p))[:64, :64]).save(tmp_path / "labels" / label / p.name)
            if label == "malignant":
                (tmp_path / "masks").mkdir(exist_ok=True)
                Image.fromarray(np.asarray(Image.open(root / "masks" / kind / p.name))[:64, :64]).save(tmp_path / "masks" / p.name)
    w = MalignancyWidget(make_napari_viewer())
    assert not w.train_btn.isEnabled() and "labels" in w.train_btn.toolTip()
    w.labels_edit.setText(str(tmp_path / "labels"))
    w.masks_edit.setText(str(tmp_path / "masks"))
    w.run_dir_edit.setText(str(tmp_path / "run"))
    w.epochs_spin.setValue(1)
    w.steps_spin.setValue(2)
    w.register_edit.setText("my-m1")
    w.train_options = {"threads": 1, "config": {"batch_size": 2, "tile_size": 64, "widths": [4, 8, 8, 16, 16]}}
    assert w.train_btn.isEnabled()
    show = w.on_train_event
    stages = []

    def stop_in_b(ev):
        show(ev)
        if isinstance(ev, StepEvent):
            stages.append(ev.stage)
            if ev.stage == "B":
                w.train_jobs.stop()

    w.on_train_event = stop_in_b
    w.train_btn.click()
    assert stages[-1] == "B" and "A" in stages
    assert w.resume_check.isChecked() and "Stopped" in w.train_status.text() and w.model_combo.findText("my-m1") < 0
    w.on_train_event = show
    w.train_btn.click()  # resumes: A is not trained again
    assert w.model_combo.currentText() == "my-m1" and "Registered 'my-m1'" in w.train_status.text()
    assert (tmp_path / "run" / "malignancy.safetensors").is_file()
