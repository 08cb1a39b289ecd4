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


@pytest.fixture
def small_levels(monkeypatch):
    """Display levels for maps above 32 px a side (the tiny slide's 128 px map becomes multiscale)."""
    from napari_pathoseg._widgets import lesion

    monkeypatch.setattr(lesion, "DISPLAY_MAX_SIDE", 32)
    monkeypatch.setattr(lesion, "DISPLAY_MIN_SIDE", 16)
    monkeypatch.setattr(lesion, "PREVIEW_MAX_SIDE", 32)
    monkeypatch.setattr(lesion, "BAND_ROWS", 12)  # several bands
    return lesion


def _whole_slide_dock(make_napari_viewer, make_pyramid_tiff, he_image, model_path):
    from napari_pathoseg._widgets.lesion import LesionWidget

    path = make_pyramid_tiff("tiny.tif", he_image[:512, :512], levels=2, tile=256, mpp=0.5)  # a 128² map at 2 µm/px
    viewer = make_napari_viewer()
    w = LesionWidget(viewer)
    viewer.open(str(path), plugin="napari-pathoseg")
    w._models["tiny"] = str(model_path)
    w.model_combo.addItem("tiny")
    w.model_combo.setCurrentText("tiny")
    w.region_combo.setCurrentText("Whole slide")
    return viewer, w, viewer.layers[0]


def _in_memory_run(slide_layer, model_path, **kw):
    from napari_pathoseg._widgets.slide import slide_of_layer
    from napari_pathoseg.methods.lesion.detect import run_detect_lesions
    from napari_pathoseg.models.registry import load_model

    model = load_model(str(model_path), task="lesion")
    return run_detect_lesions(slide_of_layer(slide_layer), model, tissue_only=True, **kw)  # the dock's old path


def test_lesion_dock_whole_slide_work_folder_threshold_export(make_napari_viewer, make_pyramid_tiff, he_image,
                                                             tiny_lesion_model, sync_jobs, small_levels, tmp_path):
    from pathlib import Path

    from scipy import ndimage as ndi

    from napari_pathoseg.methods.lesion.detect import lesion_mask

    viewer, w, slide_layer = _whole_slide_dock(make_napari_viewer, make_pyramid_tiff, he_image, tiny_lesion_model)
    w.run_btn.click()
    res, work = w.result, Path(w.work_dir)
    assert res.stores is not None and work.is_dir() and Path(res.stores["prob"].path).parent == work
    heat = viewer.layers["tiny.tif lesion probability"]
    lab = viewer.layers["tiny.tif lesions"]
    assert heat.multiscale and lab.multiscale and len(lab.data) == 4  # 128, 64, 32, 16
    assert isinstance(lab.data[0], np.memmap) and isinstance(heat.data[0], np.memmap)
    np.testing.assert_array_equal(np.asarray(lab.data[2]), np.asarray(lab.data[0])[::4, ::4])
    np.testing.assert_array_equal(np.asarray(heat.data[1]), np.asarray(heat.data[0])[::2, ::2])
    assert str(lab.units[0]) == "micrometer"
    assert lab.extent.world[1][0] == pytest.approx(512 * slide_layer.scale[0], rel=0.02)
    # the same mask, regions and areas as the dock's former in-memory run
    before = _in_memory_run(slide_layer, tiny_lesion_model)
    assert before.stores is None and 0 < before.mask.sum() < before.mask.size
    first = np.array(lab.data[0])
    np.testing.assert_array_equal(first > 0, before.mask)
    assert [r["area_um2"] for r in res.regions] == [r["area_um2"] for r in before.regions]
    assert w.table.rowCount() == len(before.regions)
    assert res.summary()["lesion_fraction_of_tissue"] == before.summary()["lesion_fraction_of_tissue"]

    # threshold slider dragged: a preview on the 32 px display level, the full-resolution labels untouched
    old_files, prob = list(w._files), np.asarray(res.prob)
    assert not viewer.layers["tiny.tif lesions (preview)"].visible
    w.threshold.setSliderDown(True)
    w.threshold.setValue(35)
    w.apply_threshold()
    preview = viewer.layers["tiny.tif lesions (preview)"]  # made hidden with the result, shown while dragging
    assert preview.visible
    np.testing.assert_array_equal(preview.data, ndi.label(lesion_mask(prob[::4, ::4], threshold=0.35))[0])
    assert preview.scale[0] == pytest.approx(4 * lab.scale[0])
    np.testing.assert_array_equal(np.asarray(lab.data[0]), first)
    # released: the full-resolution mask streamed again in the background, the replaced mask's files removed
    w.threshold.setSliderDown(False)
    w.apply_threshold()
    expected = lesion_mask(prob, threshold=0.35, fill_holes=True)
    assert not np.array_equal(expected, first > 0)
    np.testing.assert_array_equal(np.asarray(lab.data[0]) > 0, expected)
    np.testing.assert_array_equal(np.asarray(lab.data[1]), np.asarray(lab.data[0])[::2, ::2])
    assert w.result.threshold == pytest.approx(0.35) and "threshold 0.35" in w.status.text()
    assert not preview.visible and all(not f.exists() for f in old_files) and all(f.exists() for f in w._files)
    assert w.table.rowCount() == len(w.result.regions) == ndi.label(expected)[1]

    # the whole-slide regions export through the work folder's label map, in the background
    out = tmp_path / "lesions.geojson"
    w.start_export(str(out))
    assert len(json.loads(out.read_text())["features"]) == len(w.result.regions) and str(out) in w.status.text()

    # a new run replaces the layers and removes the old folder; closing the dock removes the new one
    w.run_btn.click()
    assert not work.exists() and Path(w.work_dir).is_dir()
    assert sorted(ly.name for ly in viewer.layers) == ["tiny.tif", "tiny.tif lesion probability", "tiny.tif lesions",
                                                        "tiny.tif lesions (preview)"]
    work2 = Path(w.work_dir)
    w.close()
    assert not work2.exists()


def test_streamed_levels_equal_display_levels(tmp_path, small_levels):
    from napari_pathoseg._widgets._common import display_levels

    arr = np.random.default_rng(0).integers(0, 50, (101, 67)).astype(np.int32)
    levels = small_levels.streamed_levels(lambda a, b: arr[a:b], arr.shape, np.int32, tmp_path, "lab")
    expected = display_levels(arr, max_side=32, min_side=16)[1:]
    assert len(levels) == len(expected) == 3 and all(isinstance(lv, np.memmap) for lv in levels)
    for got, want in zip(levels, expected):
        np.testing.assert_array_equal(got, want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lab-level1.npy", "lab-level2.npy", "lab-level3.npy"]
    assert small_levels.streamed_levels(lambda a, b: arr[a:b], (30, 20), np.int32, tmp_path, "small") == []
