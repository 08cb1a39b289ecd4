"""M5 tissue segmentation: labels, split, networks, Grad-CAM++, ONS loss, both stages, inference."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from napari_pathoseg.methods.tissue.data import (
    TissueData,
    TissueImage,
    load_rgb,
    wsss4luad_split,
)
from napari_pathoseg.methods.tissue.labels import (
    PatchLabelError,
    parse_vector,
    parse_wsss_name,
    read_label_csv,
    read_label_folder,
)
from napari_pathoseg.methods.tissue.network import (
    TissueClassifier,
    TissuePSPNet,
    get_preset,
)

WSSS = "wsss4luad_tissue_masks"
CLASSES = ["tumour epithelium", "stroma", "normal"]


def tiny_cfg(**kw):
    """The lite structure at test size (windows of 64 px)."""
    return get_preset("tissue-lite", widths=[4, 8, 8, 8, 8, 8, 8], ppm_channels=4, tile_size=64, batch1=2, batch2=2,
                      **kw)


def small_patches(shared_data, names, *, masks=True, size=96):
    """Real WSSS4LUAD patches cropped to ``size`` px (labels from their cropped masks)."""
    from skimage.io import imread

    out = []
    for n in names:
        img = load_rgb(shared_data / WSSS / "images" / f"{n}.png")[:size, :size]
        m = np.asarray(imread(str(shared_data / WSSS / "masks" / f"{n}.png")))[:size, :size].astype(np.uint8)
        vec = tuple(int((m == c).any()) for c in (1, 2, 3))
        out.append(TissueImage(n, img, vec if any(vec) else (0, 1, 0), m if masks else None))
    return out


def test_wsss_names_csv_and_folders(shared_data, tmp_path):
    folder = shared_data / WSSS / "training_examples_image_level_labels"
    labels = read_label_folder(folder, CLASSES)
    assert len(labels) == 4 and all(any(p.labels) for p in labels)
    assert parse_wsss_name("436219-9328-56427-[1, 1, 0].png", 3) == (1, 1, 0)
    for bad in ("[1, 0]", "[1, 2, 0]", "[0, 0, 0]", "[a, b, c]"):
        with pytest.raises(PatchLabelError):
            parse_vector(bad, 3, where="x")
    rows = read_label_csv(shared_data / WSSS / "index.csv", CLASSES)  # WSSS4LUAD's own column
    assert len(rows) == 67 and rows[0].labels == (1, 1, 0)
    img = shared_data / WSSS / "images" / "test_00.png"
    (tmp_path / "a.csv").write_text(f"image,classes\n{img},stroma;tumour epithelium\n")
    assert read_label_csv(tmp_path / "a.csv", CLASSES)[0].labels == (1, 1, 0)
    (tmp_path / "b.csv").write_text(f"image,classes\n{img},stroma;necrosis\n")
    with pytest.raises(PatchLabelError, match="unknown class 'necrosis'"):
        read_label_csv(tmp_path / "b.csv", CLASSES)
    (tmp_path / "c.csv").write_text(f"image,tumour epithelium,stroma,normal\n{img},1,0,1\n")
    assert read_label_csv(tmp_path / "c.csv", CLASSES)[0].labels == (1, 0, 1)
    sub = tmp_path / "tiles" / "Stroma"
    sub.mkdir(parents=True)
    (sub / "t.png").write_bytes(img.read_bytes())
    assert read_label_folder(tmp_path / "tiles", CLASSES)[0].labels == (0, 1, 0)
    (tmp_path / "tiles" / "fat").mkdir()
    with pytest.raises(PatchLabelError, match="not a class"):
        read_label_folder(tmp_path / "tiles", CLASSES)


def test_held_out_split(shared_data):
    s = wsss4luad_split(shared_data / WSSS)
    assert [len(s[k]) for k in ("train", "val", "test")] == [41, 9, 17]
    assert not (set(s["train"]) & set(s["test"])) and not (set(s["train"]) & set(s["val"]))
    assert {"test_01", "test_68"} <= set(s["train"]) and "test_03" in s["test"]  # normal tissue on both sides
    assert s == wsss4luad_split(shared_data / WSSS)


def _forward_backward(cfg, batch=2, size=32):
    for cls in (TissueClassifier, TissuePSPNet):
        net = cls(cfg)
        x = torch.randn(batch, 3, size, size)
        out = net(x, pda_threshold=0.8) if cls is TissueClassifier else net(x)
        assert tuple(out.shape) == ((batch, 3) if cls is TissueClassifier else (batch, 3, size, size))
        out.float().pow(2).mean().backward()
        assert all(p.grad is not None for p in net.parameters())


def test_lite_forward_backward(one_torch_thread):
    _forward_backward(get_preset("tissue-lite"))


@pytest.mark.slow
def test_m5_method_sized_forward_backward():
    """ResNet-38 widths and depth (37 backbone + 1 class layer); on the meta device (1.6e8 / 1.9e8 parameters)."""
    cfg = get_preset("m5")
    assert cfg.widths == [64, 128, 256, 512, 1024, 2048, 4096] and cfg.blocks == [3, 3, 6, 3]
    with torch.device("meta"):
        bb = TissueClassifier(cfg).backbone
        main = [m for name, m in bb.named_modules() if isinstance(m, torch.nn.Conv2d) and "short" not in name]
        assert len(main) + 1 == 1 + 2 * sum(cfg.blocks) + 3 + 3 + 1 == 38  # + the classifier's 1x1 layer
        _forward_backward(cfg)


def test_ons_loss_suppresses_confident_disagreement():
    from napari_pathoseg.methods.tissue.train import ce_loss, ons_loss

    logits = torch.zeros(1, 2, 4, 4)
    logits[0, 0] = 3.0  # the network says class 0 everywhere
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 0, 0] = 1  # one noisy pixel disagrees confidently
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    assert ons_loss(logits, target, valid) < 0.5 * ce_loss(logits, target, valid)
    same = torch.zeros(1, 4, 4, dtype=torch.long)
    assert torch.allclose(ons_loss(logits, same, valid), ce_loss(logits, same, valid))  # equal losses: weights 1
    valid[0, 1:] = False
    assert torch.isfinite(ons_loss(logits, target, valid))


def test_gradcam_pp_and_pseudo_mask(shared_data, one_torch_thread):
    from napari_pathoseg.methods.tissue.cam import gradcam_pp, pseudo_mask
    from napari_pathoseg.methods.tissue.data import background_mask

    torch.manual_seed(0)
    net = TissueClassifier(tiny_cfg())
    (item,) = small_patches(shared_data, ["test_00"], size=120)
    cams = gradcam_pp(net, item.image, classes=[0, 1])
    assert cams.shape == (3, 120, 120) and cams.min() >= 0 and cams.max() <= 1.0 + 1e-6
    assert not cams[2].any() and cams[:2].max() > 0
    m = pseudo_mask(cams, [0, 1], item.image)
    bg = background_mask(item.image)
    assert (m[bg] == 0).all() and set(np.unique(m[~bg])) <= {1, 2}
    assert (pseudo_mask(cams, [1], item.image)[~bg] == 2).all()


def test_two_stages_resume_and_ablation(shared_data, tmp_path, one_torch_thread):
    from napari_pathoseg.events import run_to_end
    from napari_pathoseg.methods.tissue.pipeline import M5Done, PseudoEvent, iter_m5

    train = small_patches(shared_data, ["test_00", "test_05", "test_01", "test_04"], masks=False)
    val = small_patches(shared_data, ["test_06"])
    test = small_patches(shared_data, ["test_02"])
    data = TissueData(CLASSES, train, val, test, source="wsss4luad (cropped)")
    cfg = tiny_cfg()
    kw = dict(epochs1=1, steps1=1, epochs2=1, steps2=1, threads=1)
    events = list(iter_m5(cfg, data, out_dir=tmp_path / "run", **kw))
    done = events[-1]
    assert isinstance(done, M5Done) and not done.cancelled
    assert sum(isinstance(e, PseudoEvent) for e in events) == 4
    manifest = json.loads((tmp_path / "run" / "pseudo" / "manifest.json").read_text())
    assert sorted(manifest["masks"]) == sorted(t.name for t in train)
    assert set(done.test) >= {"window", "whole", "window_whole_agreement", "pseudo_masks"}
    assert 0 <= done.test["window"]["miou"] <= 1
    # resuming a finished run trains nothing more and reuses the pseudo masks
    again = list(iter_m5(cfg, data, out_dir=tmp_path / "run", resume=True, **kw))
    assert not any(isinstance(e, PseudoEvent) and e.name == "__" for e in again)
    assert again[-1].best_checkpoint == done.best_checkpoint
    # the CE ablation on the same pseudo masks
    ce = run_to_end(iter_m5(replace(cfg, loss="ce"), data, out_dir=tmp_path / "ce", pseudo_from=tmp_path / "run",
                            **kw), M5Done)
    assert ce.stage1 == {"pseudo_from": str(tmp_path / "run")} and ce.best_checkpoint.is_file()
    # the model loads from the registry's loader, validated
    from napari_pathoseg.methods.tissue.model import load_tissue_model

    model = load_tissue_model(done.best_checkpoint)
    assert model.classes == tuple(CLASSES) and model.predict(np.zeros((1, 64, 64, 3), np.uint8)).shape == (1, 3, 64, 64)
    # released with its card: the registry loads it for the tissue task, scores from the held-out test
    from napari_pathoseg.methods.tissue.release import release_tissue_model
    from napari_pathoseg.models.registry import load_model

    result = tmp_path / "result.json"
    result.write_text(json.dumps({"best_checkpoint": str(done.best_checkpoint), "stage1": done.stage1,
                                  "stage2": done.stage2, "test": done.test}, default=float))
    shipped = release_tissue_model(tmp_path / "run", result, name="tiny-luad", out_dir=tmp_path / "rel",
                                   description="test", data="4 cropped patches")
    m = load_model(str(shipped), task="tissue")
    assert m.card.classes == tuple(CLASSES) and m.card.scores["miou"] == pytest.approx(done.test["window"]["miou"])
    assert json.loads((tmp_path / "rel" / "tiny-luad.json").read_text())["task"] == "tissue"


def test_engine_literal_mode_is_the_method(shared_data, one_torch_thread):
    """On the engine, literal mode = M5's windows averaged on the whole patch; fast mode close."""
    from napari_pathoseg.events import run_to_end
    from napari_pathoseg.methods.tissue.evaluate import tissue_map, window_probs
    from napari_pathoseg.methods.tissue.model import TissueModel
    from napari_pathoseg.methods.tissue.segment import TissueResult, iter_tissue

    torch.manual_seed(1)
    cfg = tiny_cfg()
    model = TissueModel(TissuePSPNet(cfg).eval(), cfg, name="tiny")
    img = load_rgb(shared_data / WSSS / "images" / "test_02.png")[:160, :224]  # 32 k + 64 on both sides
    res = run_to_end(iter_tissue(img, model, mode="literal", mpp=1.0, weights="box"), TissueResult)
    ref = window_probs(model.net, img, tile=64)
    probs = np.asarray(res.probs.array, np.float32) / 255.0
    assert np.abs(np.moveaxis(probs[..., :3], -1, 0) - ref).max() < 0.01
    ref_ids = tissue_map(ref, img)
    assert (res.ids == ref_ids).mean() > 0.99
    assert sum(v["pixels"] for v in res.areas.values()) == img.shape[0] * img.shape[1]
    fast = run_to_end(iter_tissue(img, model, mode="fast", mpp=1.0), TissueResult)
    assert fast.ids.shape == res.ids.shape and (fast.ids == 0).sum() == (res.ids == 0).sum()


class _WindowContextModel:
    """A stand-in for a context-heavy network: each window's class-"a" probability is its mean red / 255, everywhere."""

    mpp, tile_size, classes, background_grey, name, task = 1.0, 64, ("a", "b"), 210.0, "window-context", "tissue"

    def predict(self, batch):
        a = np.asarray(batch, np.float32)[..., 0].mean(axis=(1, 2)) / 255.0
        p = np.broadcast_to(a[:, None, None], (len(a),) + batch.shape[1:3])
        return np.stack([p, 1.0 - p], axis=1).astype(np.float32)


def _grid_share(ids, grid):
    """Share of the class changes between horizontal neighbours that sit on the window grid lines."""
    flip = (ids[:, 1:] != ids[:, :-1]).sum(axis=0)
    on = (np.arange(1, ids.shape[1]) % grid) == 0
    return flip[on].sum() / max(1, flip.sum())


def test_literal_windows_leave_no_straight_edges_on_the_window_grid(tmp_path, monkeypatch):
    """The whole-slide map's straight edges: M5's plain window mean jumps on every half-window grid line.

    With a network whose output follows each window's content as a whole (PSPNet's pyramid
    pooling), the plain mean is piecewise constant on the 32 px grid (windows of 64 px here), so
    class boundaries run along grid lines; the raised-cosine weighted mean (the default) is
    continuous. Also: a streamed run (work folder) gives the same ids, areas and files.
    """
    import tifffile

    from napari_pathoseg.events import run_to_end
    from napari_pathoseg.inference import bands
    from napari_pathoseg.methods.tissue.predictor import window_weight
    from napari_pathoseg.methods.tissue.segment import (
        TissueResult,
        iter_tissue,
        write_labels_tiff,
        write_probs_tiff,
    )

    rr, cc = np.mgrid[0:352, 0:448]  # 160 + 96 k: the engine's tiles end on the image's edges (no padding)
    red = (20 + 180 * (cc + 0.6 * rr) / (447 + 0.6 * 351)).astype(np.uint8)  # a diagonal ramp, all tissue
    img = np.stack([red, np.full_like(red, 90), np.full_like(red, 150)], axis=-1)
    model = _WindowContextModel()
    run = {w: run_to_end(iter_tissue(img, model, mode="literal", mpp=1.0, weights=w), TissueResult) for w in ("box", "hann")}
    jump = {w: np.abs(np.diff(np.asarray(r.probs.array[..., 0], np.int16), axis=1)).max() for w, r in run.items()}
    assert jump["box"] >= 8 and jump["hann"] <= 2  # (uint8 probabilities: 1 = 1/255)
    assert _grid_share(run["box"].ids, 32) > 0.9  # the old map: every class edge on the grid
    assert _grid_share(run["hann"].ids, 32) < 0.2
    assert (run["hann"].ids == 0).sum() == 0 and set(np.unique(run["hann"].ids)) == {1, 2}
    w = window_weight(64)
    assert np.allclose(w[:32, :32] + w[32:, :32] + w[:32, 32:] + w[32:, 32:], 1.0)  # 4 windows at 50 % overlap: sum 1
    # streamed (work folder, bands of 8 rows) == in memory: ids, areas, files
    monkeypatch.setattr(bands, "BAND_PIXELS", 1000)
    work = tmp_path / "work"
    work.mkdir()
    st = run_to_end(iter_tissue(img, model, mode="literal", mpp=1.0, work_dir=work), TissueResult)
    mem = run["hann"]
    assert isinstance(st.ids, np.memmap) and st.ids_store is not None
    np.testing.assert_array_equal(np.asarray(st.ids), mem.ids)
    assert st.areas == mem.areas
    for res, tag in ((mem, "m"), (st, "s")):
        write_labels_tiff(res, tmp_path / f"l_{tag}.tif", tile=64)
        write_probs_tiff(res, tmp_path / f"p_{tag}.tif", tile=64)
    for name in ("l", "p"):
        np.testing.assert_array_equal(tifffile.imread(tmp_path / f"{name}_s.tif"), tifffile.imread(tmp_path / f"{name}_m.tif"))
    assert tifffile.imread(tmp_path / "p_s.tif").shape == (3, 352, 448)


def test_windows_past_the_edge_see_the_mirrored_image_not_glass():
    """A patch smaller than the engine tile: windows hanging over its edge must not see white padding.

    With white padding (the old behaviour) every window past the patch's right and bottom edges
    averages in glass, so a uniform patch gets a gradient towards its edges (held-out WSSS4LUAD
    patches: mIoU 0.42 instead of 0.74); mirrored, a uniform patch stays uniform.
    """
    from napari_pathoseg.events import run_to_end
    from napari_pathoseg.methods.tissue.segment import TissueResult, iter_tissue

    img = np.zeros((200, 150, 3), np.uint8)
    img[...] = (100, 90, 150)
    spread = {}
    for edge in ("white", "reflect"):
        p = np.asarray(run_to_end(iter_tissue(img, _WindowContextModel(), mpp=1.0, edge=edge), TissueResult)
                       .probs.array[..., 0], np.int16)
        spread[edge] = int(p.max() - p.min())
    assert spread["reflect"] <= 1 and spread["white"] >= 20
