"""M1 on slides and images: ``pathoseg malignancy``, the slide pooling, bad input, Stop, the batch task.

An untrained model pair (``release.build_untrained``, lite preset) checks the plumbing: outputs
are compared with what the model itself computes, never with fixed numbers.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import tifffile

from napari_pathoseg.errors import PathosegError


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    from napari_pathoseg.methods.malignancy.release import build_untrained

    return build_untrained(tmp_path_factory.mktemp("m1") / "untrained-m1.safetensors", preset="lite", seed=0)


@pytest.fixture(scope="module")
def model(untrained):
    from napari_pathoseg.models.registry import load_model

    return load_model(str(untrained), task="malignancy", device="cpu")


def test_pooling_rules():
    from napari_pathoseg.methods.malignancy.slide import pool_tile_probabilities

    p = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.05, 0.0])
    assert pool_tile_probabilities(p, pooling="max") == pytest.approx(0.95)
    assert pool_tile_probabilities(p, pooling="mean") == pytest.approx(p.mean())
    assert pool_tile_probabilities(p, pooling="topk", top_fraction=0.1) == pytest.approx((0.95 + 0.9) / 2)  # ceil(1.2)
    assert pool_tile_probabilities(p[:3], pooling="topk") == pytest.approx(0.3)  # at least one tile
    assert np.isnan(pool_tile_probabilities(np.zeros(0)))
    with pytest.raises(PathosegError, match="pooling must be one of"):
        pool_tile_probabilities(p, pooling="median")


def test_cli_on_a_pyramidal_slide(tmp_path, he_image, make_pyramid_tiff, model, untrained, capsys, one_torch_thread):
    from napari_pathoseg.cli.main import main
    from napari_pathoseg.methods.malignancy.slide import pool_tile_probabilities

    slide = make_pyramid_tiff("slide.tif", he_image[:512, :768], levels=3, tile=256, mpp=0.5)
    out, mask, heat = tmp_path / "r.json", tmp_path / "m.tif", tmp_path / "h.tif"
    assert main(["malignancy", str(slide), "--json", str(out), "--mask", str(mask), "--heatmap", str(heat),
                 "--model", str(untrained), "--region", "0,0,768,384"]) == 0
    printed = json.loads(capsys.readouterr().out)
    d = json.loads(out.read_text())
    assert d["kind"] == "slide" and d["scale"] == pytest.approx(2.0) and d["mpp"] == 1.0
    assert printed["probability"] == d["probability"] and printed["tiles"] == len(d["tiles"]) == d["tiles_run"] > 0
    probs = np.array([t["probability"] for t in d["tiles"]])
    assert d["probability"] == pytest.approx(pool_tile_probabilities(probs, pooling="topk"), abs=1e-4)
    assert d["label"] == ("malignant" if d["probability"] >= 0.5 else "benign")
    assert all(t["w"] == t["h"] == 256 and 0 <= t["x"] < 768 and 0 <= t["y"] < 384 for t in d["tiles"])  # level 0
    m = tifffile.imread(mask)
    with tifffile.TiffFile(mask) as tf:
        meta = tf.shaped_metadata[0]
    assert m.shape == (192, 384) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}  # inference level
    assert meta["scale"] == pytest.approx(2.0) and meta["region_xywh"] == [0, 0, 768, 384]
    assert d["malignant_area_um2"] == pytest.approx(m.sum() * 1.0)
    h = tifffile.imread(heat)
    assert h.dtype == np.float32 and np.count_nonzero(~np.isnan(h)) == len(d["tiles"])
    assert np.nanmax(h) == pytest.approx(probs.max(), abs=1e-4)


def test_cli_on_a_plain_kather_tile(tmp_path, shared_data, model, untrained, capsys, one_torch_thread):
    from PIL import Image

    from napari_pathoseg.cli.main import main

    tile = min((shared_data / "kather2016_texture_tiles" / "01_tumor").glob("*.tif"))  # 150 px, no µm/px tag
    out, mask, heat = tmp_path / "k.json", tmp_path / "km.tif", tmp_path / "kh.tif"
    assert main(["malignancy", str(tile), "--json", str(out), "--model", str(untrained)]) == 2
    assert "µm per pixel is unknown" in capsys.readouterr().err  # no mpp, no --mpp
    assert main(["malignancy", str(tile), "--json", str(out), "--mask", str(mask), "--heatmap", str(heat),
                 "--model", str(untrained), "--mpp", "0.495"]) == 0
    capsys.readouterr()
    d = json.loads(out.read_text())
    img = np.asarray(Image.open(tile).convert("RGB"))
    assert d["kind"] == "plain image" and d["probability_from"] == "C on the whole image"
    assert d["probability"] == pytest.approx(model.classify_image(img, mpp=0.495), abs=1e-4)
    assert tifffile.imread(mask).shape == tifffile.imread(heat).shape == (150, 150)  # the input's own grid
    m = tifffile.imread(mask)
    expect = model.segment_image(img, mpp=0.495) >= 0.5
    assert np.mean(m.astype(bool) == expect) > 0.95  # B's region on the input's pixels (uint8-stored map)


def test_bad_input_is_one_line(tmp_path, he_image, make_pyramid_tiff, untrained, capsys):
    from PIL import Image

    from napari_pathoseg.cli.main import main

    slide = make_pyramid_tiff("s.tif", he_image[:256, :256], levels=2, tile=128, mpp=0.5)
    small = tmp_path / "small.png"
    Image.fromarray(he_image[:100, :100]).save(small)  # 50 px at the model's 1 µm/px
    out = str(tmp_path / "o.json")
    cases = [
        (["malignancy", str(slide), "--json", out, "--model", str(untrained), "--region", "5000,5000,100,100"], "outside"),
        (["malignancy", str(small), "--json", out, "--model", str(untrained), "--mpp", "0.5"], "at least 64 px"),
        (["malignancy", str(slide), "--json", out, "--model", "nuclei-lite"], "nuclei model"),
        (["malignancy", str(slide), "--json", str(slide), "--model", str(untrained)], "input"),
        (["malignancy", str(slide), "--json", out, "--mask", out, "--model", str(untrained)], "same file"),
        (["malignancy", str(slide), "--json", out, "--model", str(untrained), "--threshold", "1.5"], "between|<= 1"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert re.search(msg, err), (msg, err)
    assert not (tmp_path / "o.json").exists()


def test_stop_keeps_the_finished_tiles(he_image, model, one_torch_thread):
    from dataclasses import replace

    from napari_pathoseg.events import CancelToken, Progress
    from napari_pathoseg.methods.malignancy.slide import (
        MalignancyResult,
        iter_malignancy,
    )
    from napari_pathoseg.wsi.slide import Slide

    slide = Slide.from_array(he_image[:512, :1024], mpp=0.5, name="crop")
    token = CancelToken()
    result = None
    for ev in iter_malignancy(slide, model=model, whole_image=False, tissue_only=False, batch_size=2, cancel=token):
        if isinstance(ev, Progress) and ev.stage == "inference" and ev.done >= 2:
            token.set()
        if isinstance(ev, MalignancyResult):
            result = ev
    assert result.cancelled and 0 < result.tiles < result.tiles_total
    assert len(result.tile_table()) == result.tiles and np.count_nonzero(~np.isnan(result.heatmap)) == result.tiles
    # gating: B's region only inside the squares whose tile C calls malignant (no network)
    for t in (0.0, float(np.nanmedian(result.heatmap)), 1.01):
        res_t = replace(result, threshold=t, gate=True, mask_threshold=0.3)
        called = res_t.called_rows(0, res_t.shape[0])
        np.testing.assert_array_equal(res_t.mask, replace(res_t, gate=False).mask & called)
        assert called.any() == bool((np.nan_to_num(result.heatmap) >= t).any())
    with pytest.raises(PathosegError, match="not a malignancy model"):
        next(iter_malignancy(slide, model=type("M", (), {"task": "lesion", "name": "x"})()))


def test_batch_task_on_two_slides(tmp_path, he_image, make_pyramid_tiff, untrained, one_torch_thread):
    from test_cohort import make_cohort

    from napari_pathoseg.cohort.manifest import read_manifest
    from napari_pathoseg.cohort.results import slide_results
    from napari_pathoseg.cohort.runner import run_cohort
    from napari_pathoseg.cohort.summary import read_summary

    slides = read_manifest(make_cohort(tmp_path / "slides", he_image, make_pyramid_tiff, good=2, corrupt=False))
    res = run_cohort(slides, task="malignancy", out_dir=tmp_path / "out", model=str(untrained), workers=1,
                     processes=False, dashboard=None)
    assert res.n_ok == 2
    for row in read_summary(tmp_path / "out" / "summary.csv"):
        assert row["status"] == "ok", row["error"]
        assert row["call"] in ("malignant", "benign") and 0.0 <= float(row["probability"]) <= 1.0
        assert 0.0 <= float(row["malignant_fraction"]) <= 1.0 and float(row["malignant_area_mm2"]) >= 0.0
        tiles = (tmp_path / "out" / row["stem"] / "malignancy_tiles.csv").read_text().splitlines()
        assert tiles[0] == "x,y,w,h,probability" and len(tiles) - 1 == int(row["tiles"]) > 0
    opened = slide_results(tmp_path / "out", "slide0")
    kinds = sorted(ly.kind for ly in opened.layers)
    assert kinds == ["image", "labels"]
    heat = next(ly for ly in opened.layers if ly.kind == "image")
    assert heat.levels[0].shape[1] * heat.downsample <= 256 + 1  # the heat map lies over the 256-px slide


def test_shipped_model_separates_held_out_images(shared_data, one_torch_thread):
    """The shipped malignancy-lite through iter_malignancy's plain-image path on held-out images.

    WSSS4LUAD tumour patches and Kather 2016 tiles of the held-out patient (all benign classes),
    the model card's test split (``shared_table``, seed 0).
    """
    from PIL import Image

    from napari_pathoseg.methods.malignancy.data import shared_table
    from napari_pathoseg.methods.malignancy.evaluate import roc_auc
    from napari_pathoseg.methods.malignancy.slide import run_malignancy
    from napari_pathoseg.models.registry import list_models, load_model

    if not any(c.name == "malignancy-lite" for c in list_models(task="malignancy")):
        pytest.skip("malignancy-lite is not shipped in this checkout")
    model = load_model("malignancy-lite", task="malignancy", device="cpu")
    test = [it for it in shared_table(shared_data, seed=0).items if it.part == "test"]
    chosen = [it for it in test if it.dataset == "wsss"][:6] + [it for it in test if it.dataset == "kather"][:6]
    assert {it.label for it in chosen} == {0, 1}
    probs, labels = [], []
    for it in chosen:
        img = np.asarray(Image.open(it.image).convert("RGB"))
        res = run_malignancy(img, model=model, mpp=it.mpp, with_mask=False)
        assert res.whole_image and res.label == ("malignant" if res.probability >= model.threshold else "benign")
        probs.append(res.probability)
        labels.append(it.label)
    probs, labels = np.array(probs), np.array(labels)
    assert roc_auc(probs, labels) >= 0.8  # the card reports 0.92 on the whole test split
    assert probs[labels == 1].mean() > probs[labels == 0].mean() + 0.2
