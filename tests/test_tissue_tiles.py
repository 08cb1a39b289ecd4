"""M5 on tiles: tile labels from masks, tiled pseudo masks, balancing, tag training, class-region GeoJSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.methods.tissue.data import (
    TissueImage,
    load_rgb,
    load_wsss4luad,
    make_tiles,
    tile_grid,
    tile_labels,
)
from napari_pathoseg.methods.tissue.labels import PatchLabelError, parse_class_names
from napari_pathoseg.methods.tissue.network import TissueClassifier, get_preset

WSSS = "wsss4luad_tissue_masks"
CLASSES = ["tumour epithelium", "stroma", "normal"]


def tiny_cfg(**kw):
    return get_preset("tissue-lite", widths=[4, 8, 8, 8, 8, 8, 8], ppm_channels=4, tile_size=64, batch1=2, batch2=2,
                      **kw)


def test_tile_grid_covers_every_pixel():
    assert tile_grid(50, 40, 96) == [(0, 0)]
    g = tile_grid(250, 200, 96)
    assert [y for y, _ in g][::3] == [0, 96, 154] and sorted({x for _, x in g}) == [0, 96, 104]
    cover = np.zeros((250, 200), int)
    for y, x in g:
        cover[y:y + 96, x:x + 96] += 1
    assert cover.min() == 1


def test_tile_labels_from_mask_shares():
    m = np.zeros((96, 192), np.uint8)
    m[:, :96] = 1            # left tile: tumour only
    m[:, 96:] = 2            # right tile: stroma ...
    m[:4, 96:] = 3           # ... and 4 rows of normal (4 % of its tissue: under 5 %)
    assert tile_labels(m, 96, n_classes=3) == [(0, 0, (1, 0, 0)), (0, 96, (0, 1, 0))]
    assert tile_labels(m, 96, n_classes=3, min_share=0.04)[1][2] == (0, 1, 1)
    m[:, :96] = 0            # a background tile is left out
    assert [t[1] for t in tile_labels(m, 96, n_classes=3)] == [96]
    with pytest.raises(PathosegError):
        tile_labels(m, 96, n_classes=3, min_share=1.5)


def test_wsss_tiles_vary_and_keep_no_mask(shared_data):
    data = load_wsss4luad(shared_data, parts=("train",), tile=112)
    assert all(t.mask is None for t in data.train) and all(t.mask is None for t in data.tiles)
    vectors = {t.labels for t in data.tiles}
    assert {(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0)} <= vectors  # far from the patches' 37/41 [1, 1, 0]
    t = data.tiles[0]
    parent = next(p for p in data.train if p.name == t.parent)
    y, x = t.origin
    assert np.array_equal(t.image, parent.image[y:y + 112, x:x + 112])
    assert data.summary()["tiles"] == len(data.tiles)


def test_tiled_pseudo_mask_single_class_tiles_are_exact(shared_data):
    from napari_pathoseg.methods.tissue.cam import tiled_pseudo_mask
    from napari_pathoseg.methods.tissue.data import background_mask

    img = load_rgb(shared_data / WSSS / "images" / "test_00.png")[:128, :128]
    torch.manual_seed(0)
    net = TissueClassifier(tiny_cfg())
    tiles = [(0, 0, (1, 0, 0)), (0, 64, (0, 1, 0)), (64, 0, (1, 1, 0))]
    m = tiled_pseudo_mask(net, img, tiles, 64)
    bg = background_mask(img)
    assert set(np.unique(m[:64, :64][~bg[:64, :64]])) == {1}
    assert set(np.unique(m[:64, 64:][~bg[:64, 64:]])) == {2}
    assert set(np.unique(m[64:, :64][~bg[64:, :64]])) <= {1, 2}
    assert (m[64:, 64:] == 0).all()  # no tile there: no label


def test_class_weights_and_balanced_sampling():
    from napari_pathoseg.methods.tissue.train import (
        _sampler,
        ce_loss,
        class_weights,
        ons_loss,
    )

    masks = [np.array([[1] * 90 + [2] * 9 + [3]])]
    w = class_weights(masks, 3)
    assert w[0] < 1 < w[1] < w[2] <= 5.0
    share = np.array([0.9, 0.09, 0.01])
    assert float((w.numpy() * share).sum()) == pytest.approx(1.0, abs=0.06)
    items = [TissueImage(str(i), np.zeros((4, 4, 3), np.uint8), (1, 1, 0)) for i in range(9)]
    items.append(TissueImage("n", np.zeros((4, 4, 3), np.uint8), (0, 0, 1)))
    p = _sampler(items, True)
    assert p[-1] == pytest.approx(3 * p[0]) and p.sum() == pytest.approx(1.0)
    assert np.allclose(_sampler(items, False), 0.1)
    logits = torch.randn(1, 3, 4, 4)
    t = torch.zeros(1, 4, 4, dtype=torch.long)
    t[0, 0] = 2
    v = torch.ones(1, 4, 4, dtype=torch.bool)
    cw = torch.tensor([1.0, 1.0, 3.0])
    assert float(ce_loss(logits, t, v, class_weight=cw)) > float(ce_loss(logits, t, v))
    assert torch.isfinite(ons_loss(logits, t, v, class_weight=cw))


def test_class_names_of_a_tag():
    assert parse_class_names("Tumour epithelium; stroma", CLASSES, where="tag 1") == (1, 1, 0)
    with pytest.raises(PatchLabelError, match="unknown class 'fat'"):
        parse_class_names("stroma; fat", CLASSES, where="tag 2")
    with pytest.raises(PatchLabelError, match="names no class"):
        parse_class_names(" ; ", CLASSES, where="tag 3")


def test_stage1_on_tiles_and_stage1_only(shared_data, tmp_path, one_torch_thread):
    from dataclasses import replace

    from skimage.io import imread

    from napari_pathoseg.methods.tissue.data import TissueData
    from napari_pathoseg.methods.tissue.pipeline import (
        M5Done,
        PseudoEvent,
        StageStart,
        iter_m5,
    )

    items, masks = [], []
    for n in ("test_00", "test_05"):
        items.append(TissueImage(n, load_rgb(shared_data / WSSS / "images" / f"{n}.png")[:128, :128], (1, 1, 0)))
        masks.append(np.asarray(imread(str(shared_data / WSSS / "masks" / f"{n}.png")))[:128, :128].astype(np.uint8))
    tiles = make_tiles(items, masks, 64, n_classes=3)
    test = [replace(items[1], mask=masks[1])]
    data = TissueData(CLASSES, items, test, test, tiles=tiles, tile=64)
    kw = {"epochs1": 1, "steps1": 1, "epochs2": 1, "steps2": 1, "threads": 1}
    events = list(iter_m5(tiny_cfg(balance=True), data, out_dir=tmp_path / "run", **kw))
    starts = [e.message for e in events if isinstance(e, StageStart)]
    assert f"{len(tiles)} labelled 64 px tiles" in starts[0]
    assert sum(isinstance(e, PseudoEvent) for e in events) == 2
    manifest = json.loads((tmp_path / "run" / "pseudo" / "manifest.json").read_text())
    assert manifest["checkpoint"].endswith(":tile64")
    assert 0 <= events[-1].test["pseudo_masks"]["miou"] <= 1
    # stage 1 only (the PDA ablation): no pseudo masks of the training patches, no stage 2
    events = list(iter_m5(tiny_cfg(), data, out_dir=tmp_path / "s1", stage1_only=True, **kw))
    done = events[-1]
    assert isinstance(done, M5Done) and not done.cancelled and done.best_checkpoint is None
    assert not any(isinstance(e, PseudoEvent) for e in events)
    assert 0 <= done.test["pseudo_masks"]["miou"] <= 1 and not (tmp_path / "s1" / "stage2").exists()
    # stage 2 on those pseudo masks with the least confident one replaced by its true mask (a simulated review)
    from napari_pathoseg.events import run_to_end

    data2 = TissueData(CLASSES, [replace(i, mask=m) for i, m in zip(items, masks)], test, test, tiles=tiles, tile=64)
    fixed = run_to_end(iter_m5(tiny_cfg(), data2, out_dir=tmp_path / "fix", pseudo_from=tmp_path / "run", correct=1,
                               **kw), M5Done)
    record = json.loads((tmp_path / "fix" / "corrected.json").read_text())
    assert record["n"] == 1 and fixed.stage1["corrected"] == record["corrected"]
    assert record["corrected"][0] == min(record["confidence"], key=record["confidence"].get)
    assert all(0 <= v <= 1 for v in record["confidence"].values())
    with pytest.raises(PathosegError, match="training masks"):
        list(iter_m5(tiny_cfg(), data, out_dir=tmp_path / "nofix", pseudo_from=tmp_path / "run", correct=1, **kw))


def test_train_from_tags_registers_a_model(sample_svs, tmp_path, monkeypatch, one_torch_thread):
    from napari_pathoseg.events import run_to_end
    from napari_pathoseg.methods.tissue.tags import (
        TagTrainDone,
        iter_train_tags,
        read_tagged_patches,
    )
    from napari_pathoseg.models.registry import list_models, load_model
    from napari_pathoseg.wsi.slide import open_slide

    monkeypatch.setenv("PATHOSEG_HOME", str(tmp_path / "home"))
    rects = [(200, 300, 128, 128), (600, 900, 128, 128), (1000, 1200, 160, 96)]
    with open_slide(sample_svs) as slide:
        patches = read_tagged_patches(slide, rects, [(1, 0), (0, 1), (1, 1)], mpp=2 * slide.mpp)
        assert [p.image.shape[:2] for p in patches] == [(64, 64), (64, 64), (48, 80)]
        with pytest.raises(PathosegError, match="outside the slide"):
            read_tagged_patches(slide, [(10 ** 6, 0, 50, 50)], [(1, 0)], mpp=1.0)
        with pytest.raises(PatchLabelError):
            read_tagged_patches(slide, rects[:1], [(0, 0)], mpp=1.0)
    cfg_kw = {"widths": [4, 8, 8, 8, 8, 8, 8], "ppm_channels": 4, "tile_size": 64, "batch1": 2, "batch2": 2}
    from napari_pathoseg.methods.tissue import network

    monkeypatch.setitem(network.PRESETS, "tiny", network.get_preset("tissue-lite", preset="tiny", **cfg_kw))
    done = run_to_end(iter_train_tags(patches, ["tumour", "stroma"], out_dir=tmp_path / "run", register_as="my-tissue",
                                      mpp=1.0, preset="tiny", epochs1=1, steps1=1, epochs2=1, steps2=1, threads=1),
                      TagTrainDone)
    assert done.model_name == "my-tissue" and done.checkpoint.is_file()
    assert "my-tissue" in [m["name"] for m in list_models(task="tissue")]
    assert load_model("my-tissue", task="tissue").classes == ("tumour", "stroma")
    with pytest.raises(PathosegError, match="at least 2"):
        run_to_end(iter_train_tags(patches[:1], ["tumour", "stroma"], out_dir=tmp_path / "r2", register_as="x",
                                   mpp=1.0), TagTrainDone)


def test_class_regions_to_qupath_geojson(tmp_path):
    from napari_pathoseg.methods.tissue.regions import (
        class_regions,
        export_tissue_geojson,
    )

    ids = np.zeros((60, 80), np.uint8)
    ids[5:30, 5:40] = 1
    ids[30:55, 10:70] = 2
    ids[40:50, 72:78] = 1
    ids[0:2, 0:2] = 3  # a speck under min_pixels
    lab, cls = class_regions(ids, 3)
    assert sorted(cls.values()) == [1, 1, 2] and lab.max() == 3
    out = tmp_path / "tissue.geojson"
    counts = export_tissue_geojson(ids, CLASSES, out, region_xy=(100, 200), scale=2.0)
    assert counts == {"tumour epithelium": 2, "stroma": 1, "total": 3}
    feats = json.loads(out.read_text())["features"]
    assert {f["properties"]["objectType"] for f in feats} == {"annotation"}
    assert sorted(f["properties"]["classification"]["name"] for f in feats) == ["stroma", "tumour epithelium",
                                                                                   "tumour epithelium"]
    xy = np.array([c for f in feats for c in f["geometry"]["coordinates"][0]])
    assert xy[:, 0].min() == 110 and xy[:, 1].min() == 210 and xy[:, 0].max() == 256  # level-0 pixels
    with pytest.raises(PathosegError, match="no class region"):
        export_tissue_geojson(np.zeros((8, 8), np.uint8), CLASSES, tmp_path / "none.geojson")
    assert not (tmp_path / "none.geojson").exists()
