"""M3 lesion detection: network, focal loss, multi-scale step, data rules, checkpoints, detection, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_pathoseg.errors import CheckpointError, PathosegError
from napari_pathoseg.methods.lesion.network import LesionFPN, M3Config, get_preset
from napari_pathoseg.training.losses import focal_loss

TINY = dict(blocks=[1, 1, 1, 1], base_width=4, stem_channels=8, fpn_channels=8, head_channels=8,
            block_size=32, tile_size=64, batch_blocks=2)


def tiny_cfg(**kw) -> M3Config:
    return get_preset("lesion-lite", **{**TINY, **kw})


@pytest.mark.parametrize("name", ["lesion-lite", "m3"])
def test_presets_forward_backward(name, one_torch_thread):
    cfg = get_preset(name)
    net = LesionFPN(cfg)
    x = torch.randn(1 if name == "m3" else 2, 3, 64, 96)
    y = net(x)
    assert y.shape == (x.shape[0], 1, 64, 96)
    y.mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    n = sum(p.numel() for p in net.parameters())
    if name == "m3":  # ResNet-50 bottom-up (~23.5 M) + FPN + head
        assert 24e6 < n < 30e6 and cfg.blocks == [3, 4, 6, 3] and cfg.hires_factor == 8
        assert sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and m.stride == (2, 2)
                   for m in net.stages.modules()) == 3  # stride-2 3x3 in stages C3..C5
    with pytest.raises(PathosegError, match="valid presets"):
        get_preset("resnet50")


def test_focal_loss():
    logits = torch.tensor([3.0, -3.0, 0.2, -0.1])
    target = torch.tensor([1.0, 0.0, 1.0, 1.0])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert torch.allclose(focal_loss(logits, target, alpha=0.5, gamma=0.0), 0.5 * bce)
    # focusing down-weights the easy pixels (first two) far more than the hard ones
    easy = focal_loss(logits[:2], target[:2], gamma=2.0) / focal_loss(logits[:2], target[:2], gamma=0.0)
    hard = focal_loss(logits[2:], target[2:], gamma=2.0) / focal_loss(logits[2:], target[2:], gamma=0.0)
    assert easy < 0.01 < 0.2 < hard
    w = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert torch.allclose(focal_loss(logits, target, weight=w), focal_loss(logits[:2], target[:2]))


def test_split_and_lesion_rules(shared_data):
    from napari_pathoseg.methods.lesion import data as D

    split = D.make_split(shared_data, seed=0)
    parts = split["parts"]
    assert set(parts["train"]).isdisjoint(parts["test"]) and set(parts["val"]).isdisjoint(parts["test"])
    assert f"{D.REFERENCE[0]}/{D.REFERENCE[1]}" in parts["train"]
    groups = {}
    for ds, img, _m, g in D._records(shared_data):
        groups.setdefault((ds, g), set()).add(next(p for p in parts if f"{ds}/{img}" in parts[p]))
    assert all(len(v) == 1 for v in groups.values())  # a specimen / patient never spans two parts
    for ds in D.DATASETS:
        assert any(k.startswith(ds + "/") for k in parts["test"]), ds
    raw = np.array([[0, 1], [2, 3]], np.uint8)
    assert D._lesion_mask("ebhi", "images/normal/x.png", raw, {}).sum() == 0
    assert D._lesion_mask("ebhi", "images/polyp/x.png", raw, {}).sum() == 3
    assert D._lesion_mask("glas", "images/a.jpg", raw, {"images/a.jpg": "benign"}).sum() == 0
    assert D._lesion_mask("glas", "images/a.jpg", raw, {"images/a.jpg": "malignant"}).sum() == 3
    assert D._lesion_mask("wsss", "images/t.png", raw, {}).tolist() == [[0, 1], [0, 0]]


@pytest.fixture(scope="module")
def small_data(shared_data):
    from napari_pathoseg.methods.lesion import data as D

    split = D.make_split(shared_data, seed=0)
    keep = [k for k in split["parts"]["train"] if k.startswith(("ebhi/images/polyp", "ebhi/images/normal", "ocdc"))]
    sub = {"parts": {"train": keep[:2] + [k for k in keep if k.startswith("ocdc")][:1],
                     "val": [k for k in split["parts"]["val"] if k.startswith("ebhi")][:2], "test": []}}
    norm = D.fit_reference(shared_data)
    return D.load_lesion_data(shared_data, split=sub, mpp=4.0, hires_factor=2, normalizer=norm, parts=("train", "val")), norm


def test_data_scales_align(small_data):
    data, _ = small_data
    ocdc = next(x for x in data.train if x.dataset == "ocdc")
    assert ocdc.image.shape[:2] == (160, 160)  # 640 px at 0.5 µm/px -> 2 µm/px
    assert ocdc.image.dtype == np.uint8 and set(np.unique(ocdc.mask)) <= {0, 1}


def test_multiscale_stitching_matches_full_resolution(small_data, one_torch_thread):
    """A pixel-wise network: stitched high-resolution tiles == the full block, pooled (tile order is right)."""
    from napari_pathoseg.methods.lesion.train import M3Task

    data, _ = small_data
    task = M3Task(tiny_cfg(hires_factor=2), data)
    task.build(device=torch.device("cpu"), rng=np.random.default_rng(0))
    conv = torch.nn.Conv2d(3, 1, 1)
    task.net = conv
    hi = torch.randn(2, 3, 64, 64)
    expect = torch.nn.functional.avg_pool2d(conv(hi), 2)
    torch.testing.assert_close(task._hires_logits(hi), expect)


@pytest.mark.parametrize("multiscale,loss", [(True, "focal"), (False, "bce")])
def test_train_steps_and_checkpoint(small_data, tmp_path, multiscale, loss, one_torch_thread):
    from napari_pathoseg.methods.lesion.model import load_lesion_model
    from napari_pathoseg.methods.lesion.train import M3Task
    from napari_pathoseg.training.engine import run_train

    data, norm = small_data
    cfg = tiny_cfg(multiscale=multiscale, loss=loss, stain=norm.to_dict(), mpp=4.0)
    done = run_train(M3Task(cfg, data), out_dir=tmp_path / "run", epochs=1, steps_per_epoch=2, threads=1,
                     schedule=f"inverse:{cfg.lr_decay}")
    h = done.history[0]
    assert np.isfinite(h["losses"]["loss"]) and ("fused" in h["losses"]) == multiscale
    assert 0.0 <= h["val"]["auc"] <= 1.0 and 0.0 <= h["val"]["dice"] <= 1.0
    model = load_lesion_model(done.best_checkpoint)
    assert model.normalizer is not None and model.mpp == 4.0
    p = model.predict(np.full((1, 64, 64, 3), 200, np.uint8))
    assert p.shape == (1, 64, 64) and p.dtype == np.float32 and 0 <= p.min() <= p.max() <= 1


def _tiny_checkpoint(path, norm=None, **kw):
    from napari_pathoseg.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    cfg = tiny_cfg(mpp=2.0, **kw)
    if norm is not None:
        cfg.stain = norm.to_dict()
    save_checkpoint(path, {"net": LesionFPN(cfg).state_dict()}, cfg.to_dict(), {"command": "test"}, kind="m3")
    return path


def test_checkpoint_schema_refusals(tmp_path, small_data):
    from napari_pathoseg.methods.lesion.model import load_lesion_model
    from napari_pathoseg.models.checkpoint import save_checkpoint

    _, norm = small_data
    good = _tiny_checkpoint(tmp_path / "good.safetensors", norm)
    assert load_lesion_model(good).config.blocks == [1, 1, 1, 1]
    cfg = tiny_cfg().to_dict()
    for key, value, msg in [("blocks", [1, 1, 1], "blocks has 3 entries"), ("mpp", -1.0, "mpp"),
                            ("stain", {"format": "x"}, "not a napari-pathoseg stain normaliser"),
                            ("fpn_channels", 10**6, "fpn_channels")]:
        bad = tmp_path / f"bad_{key}.safetensors"
        save_checkpoint(bad, {"net": {"w": torch.zeros(1)}}, {**cfg, key: value}, {}, kind="m3")
        with pytest.raises(CheckpointError, match=msg):
            load_lesion_model(bad)
    wrong = tmp_path / "wrong.safetensors"
    save_checkpoint(wrong, {"net": {"w": torch.zeros(1)}}, cfg, {}, kind="m3")
    with pytest.raises(CheckpointError):
        load_lesion_model(wrong)


def test_detect_on_real_image_and_bad_input(tmp_path, shared_data, small_data, one_torch_thread):
    from PIL import Image

    from napari_pathoseg.methods.lesion.detect import lesion_mask, run_detect_lesions
    from napari_pathoseg.methods.lesion.model import load_lesion_model

    _, norm = small_data
    model = load_lesion_model(_tiny_checkpoint(tmp_path / "m.safetensors", norm))
    img = np.asarray(Image.open(next((shared_data / "ebhi_seg_crc/images/polyp").glob("*.png"))).convert("RGB"))
    res = run_detect_lesions(img, model, mpp=1.0, threshold=0.5, min_area_um2=40.0)
    assert res.prob.shape == (112, 112) and res.stain_normalized and res.mpp == 2.0
    s = res.summary()
    assert s["lesion_area_um2"] == pytest.approx(res.mask.sum() * 4.0) and s["n_regions"] == len(res.regions)
    assert all(r["area_um2"] >= 40.0 for r in res.regions)
    again = res.rethreshold(0.3)
    np.testing.assert_array_equal(again.mask, lesion_mask(res.prob, threshold=0.3, min_area_px=10))
    with pytest.raises(PathosegError, match="µm per pixel is unknown"):
        run_detect_lesions(img, model)
    with pytest.raises(PathosegError, match="between 0 and 1"):
        run_detect_lesions(img, model, mpp=1.0, threshold=1.5)
    with pytest.raises(PathosegError, match="at least 64 px"):
        run_detect_lesions(img[:100, :100], model, mpp=1.0)
    with pytest.raises(PathosegError, match="outside|beyond|region"):
        run_detect_lesions(img, model, mpp=1.0, region=(1000, 1000, 200, 200))
    nuclei_like = type("M", (), {"task": "nuclei", "name": "nuclei-lite", "mpp": 0.5, "tile_size": 256})()
    with pytest.raises(PathosegError, match="not a lesion model"):
        run_detect_lesions(img, nuclei_like, mpp=1.0)


def test_cli_lesion(tmp_path, shared_data, small_data, capsys):
    import tifffile

    from napari_pathoseg.cli.main import main

    _, norm = small_data
    ckpt = _tiny_checkpoint(tmp_path / "m.safetensors", norm)
    img = next((shared_data / "ebhi_seg_crc/images/adenocarcinoma").glob("*.png"))  # 224 px at ~1 µm/px
    out, mask, gj = tmp_path / "p.tif", tmp_path / "m.tif", tmp_path / "r.geojson"
    assert main(["lesion", str(img), "--out", str(out), "--mask", str(mask), "--geojson", str(gj), "--model", str(ckpt),
                 "--mpp", "1.0", "--float"]) == 0
    d = json.loads(capsys.readouterr().out)
    p = tifffile.imread(out)
    assert p.shape == (224, 224) and p.dtype == np.float32 and 0 <= p.min() <= p.max() <= 1  # the input's grid
    assert tifffile.imread(mask).shape == (224, 224) and d["shape"] == [112, 112] and d["mpp"] == 2.0
    assert d["n_regions"] == d["geojson_regions"] == len(json.loads(gj.read_text())["features"])
    assert 0.0 <= d["lesion_fraction_of_tissue"] <= 1.0
    # bad input: one line, exit 2
    assert main(["lesion", str(img), "--out", str(tmp_path / "q.tif"), "--model", str(ckpt)]) == 2
    assert "unknown" in capsys.readouterr().err
    assert main(["lesion", str(img), "--out", str(tmp_path / "q.tif"), "--model", str(ckpt), "--threshold", "2"]) == 2
    assert main(["lesion", str(img), "--out", str(img), "--model", str(ckpt), "--mpp", "1.0"]) == 2
    assert main(["lesion", str(img), "--out", str(tmp_path / "q.tif"), "--model", "nuclei-lite", "--mpp", "1.0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "lesion" in err.splitlines()[-1]


def test_streamed_detection_equals_in_memory(tmp_path, make_pyramid_tiff, he_image, small_data, monkeypatch,
                                             one_torch_thread):
    """With a work folder the mask steps run band by band: same map, mask, regions, figures and files."""
    import tifffile

    from napari_pathoseg.inference import bands
    from napari_pathoseg.methods.lesion.detect import (
        run_detect_lesions,
        write_mask_tiff,
        write_probability_tiff,
    )
    from napari_pathoseg.methods.lesion.model import load_lesion_model
    from napari_pathoseg.wsi.slide import open_slide

    monkeypatch.setattr(bands, "BAND_PIXELS", 2000)  # bands of 8 rows: dozens of seams on a 256² map
    _, norm = small_data
    model = load_lesion_model(_tiny_checkpoint(tmp_path / "m.safetensors", norm))
    work = tmp_path / "work"
    work.mkdir()
    with open_slide(make_pyramid_tiff("s.tif", he_image, mpp=0.5)) as slide:
        kw = dict(min_area_um2=60.0, tile=128, overlap=16, tissue_only=False)
        mem0 = run_detect_lesions(slide, model, **kw)
        st0 = run_detect_lesions(slide, model, work_dir=work, **kw)
        assert isinstance(st0.mask, np.memmap) and st0.stores is not None and mem0.stores is None
        np.testing.assert_array_equal(np.asarray(st0.prob), mem0.prob)
        np.testing.assert_array_equal(np.asarray(st0.mask), mem0.mask)
        t = float(np.quantile(mem0.prob, 0.55))  # the untrained net's map is flat: a threshold inside it
        mem, st = mem0.rethreshold(t), st0.rethreshold(t)  # (the dock's slider: no network)
        assert isinstance(st.mask, np.memmap)
        np.testing.assert_array_equal(np.asarray(st.mask), mem.mask)
        assert 0 < mem.mask.sum() < mem.mask.size and len(mem.regions) > 3  # a real test: several regions
        drop = {"timings"}
        assert {k: v for k, v in st.summary().items() if k not in drop} == \
               {k: v for k, v in mem.summary().items() if k not in drop}
        for a, b in zip(st.regions, mem.regions, strict=True):
            assert a["id"] == b["id"] and a["bbox"] == b["bbox"] and a["area_um2"] == b["area_um2"]
            assert a["centroid_row"] == pytest.approx(b["centroid_row"]) and a["centroid_col"] == pytest.approx(b["centroid_col"])
        np.testing.assert_array_equal(st.labels(), mem.labels())
        for res, tag in ((mem, "m"), (st, "s")):
            write_mask_tiff(res, tmp_path / f"mask_{tag}.tif")
            write_probability_tiff(res, tmp_path / f"prob_{tag}.tif")
        for name in ("mask", "prob"):
            np.testing.assert_array_equal(tifffile.imread(tmp_path / f"{name}_s.tif"), tifffile.imread(tmp_path / f"{name}_m.tif"))
