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
    first = sorted((labels / "malignant").iterdir())[0]
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
    ben = sorted((labels / "benign").iterdir())[0]
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
    from napari_pathoseg.methods.malignancy.train import MalignancyTrainResult, StageEvent, train_malignancy
    from napari_pathoseg.training.engine import StepEvent, TrainStart

    labels, masks = tiny_labels
    run = tmp_path / "run"
    opts = dict(labels=labels, masks=masks, run_dir=run, epochs=1, steps_per_epoch=2, threads=1,
                config={"batch_size": 2, "tile_size": 64, "widths": [4, 8, 8, 16, 16]})
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
    assert len(json.loads((run / "B" / "history.json").read_text())) == 1
    model = load_malignancy_model(result.model_path, device="cpu")
    assert model.input_size == 64 and set(result.scores) == {"A", "B", "C"}
    assert model.segment(np.zeros((1, 64, 80, 3), np.uint8)).shape == (1, 64, 80)


# ------------------------------------------------------------------------------------------ loader
def test_loader_refuses_out_of_bounds_config_and_stage_checkpoints(tmp_path):
    from napari_pathoseg.methods.malignancy.model import MalignancyInputError, load_malignancy_model
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
