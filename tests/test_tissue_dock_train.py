"""The Tissue dock's training panel: tag tiles on the slide, train in the background, register, overlay."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.gui
def test_tag_tiles_train_register_and_overlay(make_napari_viewer, sample_svs, sync_jobs, one_torch_thread, tmp_path,
                                              monkeypatch, qtbot):
    from napari_pathoseg._widgets.tissue import TissueWidget
    from napari_pathoseg._widgets.tissue_train import shape_rects, tag_layer_labels
    from napari_pathoseg.errors import PathosegError
    from napari_pathoseg.methods.tissue import network

    monkeypatch.setenv("PATHOSEG_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(network.PRESETS, "tiny", network.get_preset(
        "tissue-lite", preset="tiny", widths=[4, 8, 8, 8, 8, 8, 8], ppm_channels=4, tile_size=64, batch1=2, batch2=2))
    viewer = make_napari_viewer()
    w = TissueWidget(viewer)
    viewer.open(str(sample_svs), plugin="napari-pathoseg")
    slide_layer = viewer.layers[0]
    panel = w.train_panel
    panel.preset = "tiny"
    panel.classes_edit.setText("tumour, stroma")
    tags = panel.new_tag_layer()
    assert panel.tag_combo.currentText() == tags.name and tags.mode == "add_rectangle"
    sy, sx = slide_layer.scale
    boxes = [(300, 200), (900, 600), (1200, 1000)]  # (row, col) level-0 corners of 128 px tiles
    for r, c in boxes:
        tags.add_rectangles(np.array([[r * sy, c * sx], [(r + 128) * sy, (c + 128) * sx]]))
    assert shape_rects(tags, slide_layer)[1] == (600, 900, 128, 128)
    with pytest.raises(PathosegError, match="tile 1"):  # drawn but not tagged yet
        tag_layer_labels(tags, panel.classes())
    tags.selected_data = {0, 2}
    assert panel.tag_selected("tumour; stroma") == 2
    tags.selected_data = {1}
    with pytest.raises(PathosegError, match="unknown class 'fat'"):
        panel.tag_selected("fat")
    assert panel.tag_selected("Stroma") == 1
    assert tag_layer_labels(tags, panel.classes()) == [(1, 1), (0, 1), (1, 1)]
    # train (1 epoch x 1 step per stage), register, then map the dock's drawn rectangle with the new model
    panel.name_edit.setText("my-tissue")
    panel.mpp_spin.setValue(2.0)
    panel.epochs_spin.setValue(1)
    panel.steps_spin.setValue(1)
    w.mode_combo.setCurrentIndex(1)  # fast
    w.region_combo.setCurrentText("Drawn rectangle")
    w.shapes_combo.setCurrentText(tags.name)
    panel.train_btn.click()
    assert w.model_combo.currentText() == "my-tissue"
    assert (tmp_path / "home" / "runs" / "tissue-my-tissue" / "stage2" / "best.safetensors").is_file()
    qtbot.waitUntil(lambda: "CMU-1-Small-Region.svs tissue" in viewer.layers, timeout=20000)
    lab = viewer.layers["CMU-1-Small-Region.svs tissue"]
    assert lab.metadata["classes"] == ["tumour", "stroma"] and lab.metadata["model"]
