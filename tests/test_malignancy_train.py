"""M1 core: networks (both presets), encoder transfer A -> B -> C, the resumable run, bad labels, the loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from napari_pathoseg.errors import CheckpointError, PathosegError
from napari_pathoseg.methods.malignancy.data import LabelError, shared_table, user_table
from napari_pathoseg.methods.malignancy.network import (
    MalignancyClassifier,
    MalignancySegmenter,
    get_preset,
)

EBHI = "ebhi_seg_crc"


# ------------------------------------------------------------------------------------------ networks
@pytest.mark.parametrize("preset", ["lite", "m1"])
def test_presets_forward_backward_on_tiny_inputs(preset, one_torch_thread):
    cfg = get_preset(preset)
    torch.manual_seed(0)
    clf, seg = MalignancyClassifier(cfg), MalignancySegmenter(cfg)
    convs = [m for m in clf.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 10  # 5 double-conv blocks
    x = torch.randn(1, 3, 32, 48)
    logits, mask = clf(x), seg(x)
    assert logits.shape == (1, 2) and mask.shape == (1, 1, 32, 48)
    (logits.sum() + mask.mean()).backward()
    for net in (clf, seg):
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


def test_method_preset_bottom_map_is_28x28x1024_for_448(one_torch_thread):
    from napari_pathoseg.methods.malignancy.network import UNetEncoder

    m1 = get_preset("m1")
    assert m1.widths == [64, 128, 256, 512, 1024] and m1.tile_size == 448
    # the presets differ only in widths: the spatial path is measured on the narrow encoder
    enc = UNetEncoder([2, 2, 2, 2, 3]).eval()
    with torch.inference_mode():
        bottom = enc(torch.zeros(1, 3, 448, 448))[-1]
    assert tuple(bottom.shape[2:]) == (28, 28)
    assert UNetEncoder(m1.widths).blocks[-1][3].out_channels == 1024


# ------------------------------------------------------------------------------------------ transfer
def _save(path, module_name, net, cfg, stage):
    from napari_pathoseg.models.checkpoint import save_checkpoint

    save_checkpoint(path, {module_name: net.state_dict()}, cfg.replace(stage=stage).to_dict(), {}, kind="m1")
    return path


def test_transfer_copies_the_encoder_and_not_the_head(tmp_path, one_torch_thread):
    from napari_pathoseg.methods.malignancy.train import ClassifierTask, SegmenterTask

    cfg = get_preset("lite").replace(widths=[4, 8, 8, 16, 16])
    torch.manual_seed(1)
    a = MalignancyClassifier(cfg)
    for p in a.parameters():  # distinctive values
        p.data.normal_()
    a_path = _save(tmp_path / "A.safetensors", "classifier", a, cfg, "A")
    blank = np.zeros((64, 64, 3), np.uint8)
    from napari_pathoseg.methods.malignancy.data import Sample

    samples = [Sample("m", "t", 1, blank, np.ones((64, 64), np.uint8)), Sample("b", "t", 0, blank, None)]
    b_task = SegmenterTask(cfg, samples, samples)
    b_task.build(device=torch.device("cpu"), rng=np.random.default_rng(0))
    report = b_task.init_from(a_path)
    assert report.n_copied == len(a.encoder.state_dict()) and not report.shape_mismatch
    assert all(n.startswith("segmenter.encoder.") for n in report.copied)
    assert all(not n.startswith("segmenter.encoder.") for n in report.missing)  # decoder / out stay fresh
    for k, t in a.encoder.state_dict().items():
        assert torch.equal(b_task.net.encoder.state_dict()[k], t)
    b_path = _save(tmp_path / "B.safetensors", "segmenter", b_task.net, cfg, "B")

    c_task = ClassifierTask(cfg, samples, samples, stage="C")
    c_task.build(device=torch.device("cpu"), rng=np.random.default_rng(0))
    head_before = {k: v.clone() for k, v in c_task.net.head.state_dict().items()}
    report = c_task.init_from(b_path)
    assert sorted(report.missing) == ["classifier.head.bias", "classifier.head.weight"]
    for k, t in b_task.net.encoder.state_dict().items():
        assert torch.equal(c_task.net.encoder.state_dict()[k], t)
    for k, t in c_task.net.head.state_dict().items():
        assert torch.equal(t, head_before[k]) and not torch.equal(t, a.head.state_dict()[k])


# ------------------------------------------------------------------------------------------ B's negatives
def _level(x: torch.Tensor) -> np.ndarray:
    """Mean 0-255 grey level of each crop of a network input batch (undoing ``to_input``)."""
    return ((x * 0.25 + 0.5) * 255.0).mean(dim=(1, 2, 3)).numpy()


def test_b_negatives_are_benign_images_with_empty_masks_only(one_torch_thread):
    from napari_pathoseg.methods.malignancy.data import Sample
    from napari_pathoseg.methods.malignancy.train import SegmenterTask

    cfg = get_preset("lite").replace(widths=[4, 8, 8, 16, 16], batch_size=8, tile_size=32)
    # grey levels tell the sources apart after the colour jitter (gain 0.92-1.08, shift +-10)
    masked = Sample("m", "t", 1, np.full((48, 48, 3), 200, np.uint8), np.ones((48, 48), np.uint8))
    unmasked = Sample("u", "t", 1, np.full((48, 48, 3), 120, np.uint8), None)
    benign = Sample("b", "t", 0, np.full((40, 40, 3), 50, np.uint8), None)
    samples = [masked, unmasked, benign]
    seen = {}
    for share in (0.0, 0.5):
        task = SegmenterTask(cfg, samples, [masked], negatives=share)
        task.build(device=torch.device("cpu"), rng=np.random.default_rng(0))
        assert [b.key for b in task.benign_samples] == (["b"] if share else [])
        assert task.meta()["b_negatives"] == share
        levels, masks = [], []
        it = task.batches()
        for _ in range(6):
            batch = next(it)
            levels.append(_level(batch["x"]))
            masks.append(batch["m"].numpy().reshape(len(batch["m"]), -1))
        lv, mk = np.concatenate(levels), np.concatenate(masks)
        neg = lv < 85
        assert not np.any((lv > 85) & (lv < 160))  # an unmasked malignant image is never a negative
        assert np.all(mk[neg] == 0) and np.all(mk[~neg] == 1)  # empty masks exactly for the benign crops
        seen[share] = neg.mean()
    assert seen[0.0] == 0.0 and 0.3 < seen[0.5] < 0.7


def test_bad_b_negatives_are_refused(tmp_path, shared_data):
    from napari_pathoseg.cli.main import main
    from napari_pathoseg.methods.malignancy.data import Sample
    from napari_pathoseg.methods.malignancy.train import (
        SegmenterTask,
        check_negatives,
        train_malignancy,
    )

    for bad in (-0.1, 0.95, 1, float("nan"), "0.2", True, None):
        with pytest.raises(PathosegError, match="between 0 and 0.9"):
            check_negatives(bad)
    assert check_negatives(0) == 0.0 and check_negatives(0.9) == 0.9
    run = tmp_path / "run"
    with pytest.raises(PathosegError, match="b_negatives"):
        list(train_malignancy(data_root=shared_data, run_dir=run, b_negatives=1.5))
    assert not run.exists()
    for text in ("1.5", "-1", "nan", "lots"):
        assert main(["malignancy-train", "--data-root", str(shared_data), "--out", str(run),
                     "--b-negatives", text]) == 2
    assert not run.exists()
    cfg = get_preset("lite").replace(widths=[4, 8, 8, 16, 16])
    m = Sample("m", "t", 1, np.zeros((32, 32, 3), np.uint8), np.ones((32, 32), np.uint8))
    with pytest.raises(PathosegError, match="--b-negatives 0"):
        SegmenterTask(cfg, [m], [m], negatives=0.25)  # no benign image to draw negatives from
    assert SegmenterTask(cfg, [m], [m], negatives=0.0).benign_samples == []


def test_region_and_benign_scores():
    from napari_pathoseg.methods.malignancy.evaluate import benign_scores, region_scores

    labels = np.zeros((4, 10), np.uint8)
    labels[0], labels[1], labels[2] = 5, 2, 1  # tumour row, normal-gland row, other tissue
    region = np.zeros((4, 10), bool)
    region[0, :8] = True  # 8 of 10 tumour px
    region[1, :2] = True  # 2 normal px
    r = region_scores(region, labels, tumour_ids=[5, 7], names={1: "other", 2: "normal", 5: "hgin"})
    assert r["precision"] == pytest.approx(0.8) and r["recall"] == pytest.approx(0.8)
    assert r["dice"] == pytest.approx(2 * 8 / (10 + 10))
    assert r["covered"] == {"0": 0.0, "other": 0.0, "normal": pytest.approx(0.2), "hgin": pytest.approx(0.8)}
    b = benign_scores([(0.0, 100.0), (10.0, 100.0), (3.0, 100.0)])
    assert b["benign_fp_area"] == pytest.approx(13 / 300) and b["benign_fp_images"] == pytest.approx(1 / 3)
    assert benign_scores([]) == {}


# ------------------------------------------------------------------------------------------ data
def _crop_copy(src: Path, dst: Path, size: int = 64) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        Image.fromarray(np.asarray(im)[:size, :size]).save(dst)


@pytest.fixture
def tiny_labels(tmp_path, shared_data):
    """3 malignant (EBHI adenocarcinoma, with masks) + 3 benign (EBHI normal) real crops of 64 px."""
    root = shared_data / EBHI
    mal = sorted((root / "images" / "adenocarcinoma").iterdir())[:3]
    ben = sorted((root / "images" / "normal").iterdir())[:3]
    for p in mal:
        _crop_copy(p, tmp_path / "labels" / "malignant" / p.name)
        _crop_copy(root / "masks" / "adenocarcinoma" / p.name, tmp_path / "masks" / p.name)
    for p in ben:
        _crop_copy(p, tmp_path / "labels" / "benign" / p.name)
    return tmp_path / "labels", tmp_path / "masks"


def test_user_table_from_folder_and_csv(tiny_labels, tmp_path):
    labels, masks = tiny_labels
    t = user_table(labels, masks=masks)
    s = t.summary()
    assert s["train"]["images"] + s["val"]["images"] == 6
    assert s["val"]["malignant"] >= 1 and s["val"]["benign"] >= 1 and s["val"]["masks"] >= 1
    rows = ["image,label,mpp"] + [f"{p.relative_to(labels)},{'malignant' if p.parent.name == 'malignant' else 0},0.5"
                                  for p in sorted(labels.rglob("*.png"))]
    (labels / "labels.csv").write_text("\n".join(rows) + "\n")
    t2 = user_table(labels / "labels.csv", masks=masks)
    assert {it.mpp for it in t2.items} == {0.5} and sum(it.mask is not None for it in t2.items) == 3


def _expect(match, labels, masks=None):
    with pytest.raises(LabelError, match=match):
        user_table(labels, masks=masks)


def test_bad_labels_are_refused_before_anything_is_written(tiny_labels, tmp_path):
    from napari_pathoseg.methods.malignancy.train import train_malignancy

    labels, masks = tiny_labels
    csv = tmp_path / "bad.csv"
    csv.write_text("image,label\nlabels/malignant/nope.png,malignant\nlabels/benign/x.png,benign\n")
    _expect("do not exist", csv)
    first = min((labels / "malignant").iterdir())
    csv.write_text(f"image,label\nlabels/malignant/{first.name},maybe\n")
    _expect("not benign, malignant", csv)
    # a mask of another size
    bad_masks = tmp_path / "bad_masks"
    shutil.copytree(masks, bad_masks)
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(bad_masks / first.name)
    _expect("must have their image's size", labels, bad_masks)
    # a mask for an image labelled benign
    benign_masks = tmp_path / "benign_masks"
    benign_masks.mkdir()
    ben = min((labels / "benign").iterdir())
    Image.fromarray(np.ones((64, 64), np.uint8)).save(benign_masks / ben.name)
    _expect("labelled benign", labels, benign_masks)
    # a mask naming no image
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    Image.fromarray(np.ones((64, 64), np.uint8)).save(orphan / "nobody.png")
    _expect("name no labelled image", labels, orphan)
    # one class only
    one = tmp_path / "one"
    shutil.copytree(labels / "malignant", one / "malignant")
    _expect("only malignant", one)
    # an unreadable image
    broken = tmp_path / "broken"
    shutil.copytree(labels, broken)
    (broken / "benign" / ben.name).write_bytes(b"not an image")
    _expect("cannot be read", broken)
    run = tmp_path / "run"
    with pytest.raises(PathosegError):
        list(train_malignancy(labels=broken, run_dir=run))
    assert not run.exists()


def test_shared_table_split_by_group_with_few_masks(shared_data):
    t = shared_table(shared_data, seed=0)
    parts: dict[str, set] = {}
    for it in t.items:
        parts.setdefault(it.group, set()).add(it.part)
    assert all(len(p) == 1 for p in parts.values())  # no specimen / patient in two parts
    train = t.part("train")
    n_masks = sum(it.use_mask for it in train)
    assert 0 < n_masks <= 0.13 * len(train) < sum(it.mask is not None for it in train)
    assert all(it.part == "train" for it in t.items if it.dataset == "ocdc")
    assert {"ebhi", "glas", "kather", "nct", "wsss"} <= {it.dataset for it in t.part("test")}
    assert all(it.label == 1 for it in t.items if it.mask is not None)
    kather = {it.key.split("/")[1]: it.label for it in t.items if it.dataset == "kather"}
    assert {lab for k, lab in kather.items() if k == "01_tumor"} == {1}
    assert {lab for k, lab in kather.items() if k != "01_tumor"} == {0}


# ------------------------------------------------------------------------------------------ the run
def test_a_b_c_run_resumes_after_a_stop(tiny_labels, tmp_path, one_torch_thread):
    from napari_pathoseg.events import CancelToken
    from napari_pathoseg.methods.malignancy.model import load_malignancy_model
    from napari_pathoseg.methods.malignancy.train import (
        MalignancyTrainResult,
        StageEvent,
        train_malignancy,
    )
    from napari_pathoseg.training.engine import StepEvent, TrainStart

    labels, masks = tiny_labels
    run = tmp_path / "run"
    # the benign images have no masks: with b_negatives they are B's empty-mask crops
    opts = {"labels": labels, "masks": masks, "run_dir": run, "epochs": 1, "steps_per_epoch": 2, "threads": 1,
            "b_negatives": 0.5, "config": {"batch_size": 2, "tile_size": 64, "widths": [4, 8, 8, 16, 16]}}
    token = CancelToken()
    seen = []
    for ev in train_malignancy(cancel=token, **opts):
        seen.append(ev)
        if isinstance(ev, StepEvent) and ev.stage == "B":
            token.set()  # Stop in stage B after its first step
    result = seen[-1]
    assert isinstance(result, MalignancyTrainResult) and result.cancelled and result.model_path is None
    assert [e.stage for e in seen if isinstance(e, StageEvent)] == ["A", "B"]
    assert (run / "A" / "best.safetensors").is_file() and (run / "B" / "last.safetensors").is_file()
    a_weights = (run / "A" / "best.safetensors").read_bytes()
    with pytest.raises(PathosegError, match="--resume"):
        list(train_malignancy(**opts))
    events = list(train_malignancy(resume=True, **opts))
    result = events[-1]
    assert not result.cancelled and result.model_path == run / "malignancy.safetensors"
    starts = {e.stage: e for e in events if isinstance(e, TrainStart)}
    assert starts["B"].resumed and (starts["B"].epoch, starts["B"].step) == (0, 1)
    assert starts["C"].init is not None and starts["C"].init.n_copied > 0
    assert (run / "A" / "best.safetensors").read_bytes() == a_weights  # A was not trained again
    b_hist = json.loads((run / "B" / "history.json").read_text())
    assert len(b_hist) == 1
    val = b_hist[0]["val"]  # with negatives the best epoch counts marked benign pixels against it
    assert val["benign_images"] >= 1 and 0.0 <= val["benign_fp_area"] <= 1.0 and val["dice_all"] <= val["dice"]
    from napari_pathoseg.models.checkpoint import read_header

    b_meta = read_header(run / "B" / "last.safetensors")["meta"]
    assert b_meta["b_negatives"] == 0.5 and b_meta["b_negative_images"] >= 1
    assert result.card["b_negatives"] == 0.5
    model = load_malignancy_model(result.model_path, device="cpu")
    assert model.input_size == 64 and set(result.scores) == {"A", "B", "C"}
    assert model.segment(np.zeros((1, 64, 80, 3), np.uint8)).shape == (1, 64, 80)


# ------------------------------------------------------------------------------------------ loader
def test_loader_refuses_out_of_bounds_config_and_stage_checkpoints(tmp_path):
    from napari_pathoseg.methods.malignancy.model import (
        MalignancyInputError,
        load_malignancy_model,
    )
    from napari_pathoseg.methods.malignancy.release import build_untrained
    from napari_pathoseg.models.checkpoint import load_checkpoint, save_checkpoint

    path = build_untrained(tmp_path / "m.safetensors")
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["task"] == "malignancy" and card["mpp"] == 1.0
    model = load_malignancy_model(path, device="cpu")
    kather = np.random.default_rng(0).integers(0, 255, (150, 150, 3), dtype=np.uint8)
    assert 0.0 <= model.classify_image(kather, mpp=0.495) <= 1.0  # a 150 px Kather tile: 74 px at 1 µm/px
    with pytest.raises(MalignancyInputError, match="minimum 64"):
        model.classify_image(kather[:100, :100], mpp=0.5)
    tensors, config, meta = load_checkpoint(path, expected_kind="m1")
    for key, value in (("widths", [16, 32, 64, 128, 100000]), ("tile_size", 10**6), ("mpp", -1.0),
                       ("threshold", 2.0), ("surprise", 1)):
        bad = tmp_path / f"bad_{key}.safetensors"
        tiny = {"classifier": {"head.bias": tensors["classifier"]["head.bias"]}}  # refused before weights matter
        save_checkpoint(bad, tiny, dict(config, **{key: value}), meta, kind="m1")
        with pytest.raises(CheckpointError, match=key):
            load_malignancy_model(bad)
    stage = tmp_path / "stage.safetensors"
    save_checkpoint(stage, {"classifier": tensors["classifier"]}, dict(config, stage="C"), {}, kind="m1")
    with pytest.raises(CheckpointError, match="no segmenter"):
        load_malignancy_model(stage)
