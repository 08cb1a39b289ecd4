"""The Lesions dock in a real viewer: run on a drawn rectangle, heat map + labels placed, live threshold, export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gui


@pytest.fixture
def tiny_lesion_model(tmp_path):
    from napari_pathoseg.methods.lesion.data import stain_normalizer
    from napari_pathoseg.methods.lesion.network import LesionFPN, get_preset
    from napari_pathoseg.models.checkpoint import save_checkpoint
    from napari_pathoseg.wsi.slide import open_slide, sample_slide_path

    with open_slide(sample_slide_path()) as s:  # reference stain: a real crop of the sample
        ref = s.read_region(level=0, row=1920, col=768, height=256, width=256)
    cfg = get_preset("lesion-lite", blocks=[1, 1, 1, 1], base_width=4, stem_channels=8, fpn_channels=8,
                     head_channels=8, block_size=32, tile_size=128)
    cfg.stain = stain_normalizer().fit(ref).to_dict()
    torch.manual_seed(0)
    net = LesionFPN(cfg)
    with torch.no_grad():
        net.head[-1].bias.fill_(0.0)  # probabilities around 0.5: both sides of the threshold occur
    path = tmp_path / "tiny-lesion.safetensors"
    save_checkpoint(path, {"net": net.state_dict()}, cfg.to_dict(), {"command": "test"}, kind="m3")
    return path


def test_lesion_dock_rectangle_threshold_export(make_napari_viewer, sample_svs, tiny_lesion_model, sync_jobs, tmp_path):
    from napari_pathoseg._widgets.lesion import LesionWidget
    from napari_pathoseg.methods.lesion.detect import lesion_mask

    viewer = make_napari_viewer()
    w = LesionWidget(viewer)
    viewer.window.add_dock_widget(w)
    assert not w.run_btn.isEnabled() and "Open a slide" in w.run_btn.toolTip()
    viewer.open(str(sample_svs), plugin="napari-pathoseg")
    slide_layer = viewer.layers[0]
    w._models["tiny"] = str(tiny_lesion_model)
    w.model_combo.addItem("tiny")
    w.model_combo.setCurrentText("tiny")
    sy, sx = slide_layer.scale
    r0, c0, r1, c1 = 1024, 512, 1536, 1024  # level-0 pixels; 128 px at 2 µm/px
    viewer.add_shapes([np.array([[r0 * sy, c0 * sx], [r0 * sy, c1 * sx], [r1 * sy, c1 * sx], [r1 * sy, c0 * sx]])],
                      shape_type="rectangle", name="roi")
    w.region_combo.setCurrentText("Drawn rectangle")
    w.shapes_combo.setCurrentText("roi")
    assert w.run_btn.isEnabled()
    w.run_btn.click()
    heat = viewer.layers["CMU-1-Small-Region.svs lesion probability"]
    lab = viewer.layers["CMU-1-Small-Region.svs lesions"]
    res = w.result
    assert heat.data.shape == lab.data.shape == res.prob.shape and abs(res.prob.shape[0] - 128) <= 2
    assert str(lab.units[0]) == "micrometer"
    ext = lab.extent.world  # the outline sits over the rectangle
    assert ext[0][0] == pytest.approx(r0 * sy, abs=3 * res.scale * sy) and ext[1][1] == pytest.approx(c1 * sx, abs=3 * res.scale * sx)
    n_regions = w.table.rowCount()
    assert n_regions == len(res.regions)
    # live threshold: a new mask from the stored map, no network
    w.threshold.setValue(30)
    w.apply_threshold()
    np.testing.assert_array_equal(lab.data > 0, lesion_mask(res.prob, threshold=0.3, fill_holes=True))
    assert w.result.threshold == pytest.approx(0.3) and "threshold 0.30" in w.status.text()
    # a correction with the label tools is what gets exported
    lab.data = np.zeros_like(lab.data)
    lab.data[10:40, 10:40] = 1
    out = tmp_path / "lesions.geojson"
    assert w.export_geojson(str(out)) == 1
    feats = json.loads(out.read_text())["features"]
    assert len(feats) == 1 and feats[0]["properties"]["classification"]["name"] == "Tumor"
    xs = [p[0] for p in feats[0]["geometry"]["coordinates"][0]]
    assert min(xs) == pytest.approx(c0 + 10 * res.scale, abs=res.scale)  # level-0 coordinates
