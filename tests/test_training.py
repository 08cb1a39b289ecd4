"""Training loop, losses, data handling and instance post-processing on tiny inputs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.methods.nuclei.instances import boundary_watershed, distance_watershed, to_instances
from napari_pathoseg.models.checkpoint import load_checkpoint, read_header
from napari_pathoseg.methods.nuclei.attcycle import PRESETS
from napari_pathoseg.training import losses as L
from napari_pathoseg.training.augment import geometric, hed_perturb
from napari_pathoseg.methods.nuclei.datasets import (
    CropSampler,
    DataError,
    LabelledImage,
    M2Data,
    PseudoLabelDataset,
    read_image,
    resample_pair,
    split_images,
    split_styles,
)
from napari_pathoseg.methods.nuclei.train import DoneEvent, EpochEvent, StepEvent, run_training, train_m2


pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dataclasses.replace(
    PRESETS["attcycle-lite"], widths=(4, 8, 16), disc_width=4, disc_layers=2, tile_size=16, gan_every=2
)


def _blobs(seed: int, size: int = 40, tint: float = 0.0) -> LabelledImage:
    """A synthetic H&E-like image: dark purple discs (nuclei) on pink."""
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.int32)
    for i in range(1, 6):
        r, c = rng.integers(4, size - 4, 2)
        labels[(rr - r) ** 2 + (cc - c) ** 2 <= 9] = i
    img = np.empty((size, size, 3), np.uint8)
    img[:] = (np.array([235, 180, 210]) * (1 - tint)).astype(np.uint8)
    img[labels > 0] = (80, 40, 130)
    img = np.clip(img.astype(int) + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)
    return LabelledImage(f"syn/{seed}", img, labels, 1.0, "syn", 0.5)


def _data() -> M2Data:
    return M2Data(
        x_train=[_blobs(1, tint=0.2), _blobs(2, tint=0.1)],
        y_train=[_blobs(3), _blobs(4)],
        val=[_blobs(5, size=24)],
    )


def _run(out, **kw):
    kw.setdefault("epochs", 1)
    kw.setdefault("steps_per_epoch", 2)
    kw.setdefault("batch_size", 2)
    kw.setdefault("threads", 1)
    return list(train_m2(TINY, _data(), out_dir=out, seed=0, device="cpu", **kw))


def test_two_step_run(tmp_path):
    events = _run(tmp_path)
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["TrainStart", "StepEvent", "StepEvent", "ValidationEvent", "EpochEvent", "DoneEvent"]
    assert not events[0].resumed and events[0].threads >= 1
    gan, seg = events[1].losses, events[2].losses
    assert {"adv", "cyc", "d", "seg"} <= set(gan)  # step 0: full CycleGAN step
    assert "adv" not in seg and "seg" in seg  # step 1: segmentation-only step
    assert (events[2].done, events[2].total) == (2, 2)
    ep: EpochEvent = events[4]
    assert {"aji", "dice", "pq", "f1", "distance_aji"} <= set(ep.val_metrics)
    done: DoneEvent = events[-1]
    assert done.best_checkpoint.is_file() and not done.cancelled
    tensors, config, meta = load_checkpoint(done.best_checkpoint, expected_kind="m2")
    assert set(tensors) == {"G_X2Y", "G_Y2X", "D_X", "D_Y"}
    assert config["widths"] == [4, 8, 16]
    assert meta["instance_method"] in ("boundary", "distance")
    hist = json.loads((tmp_path / "history.json").read_text())
    assert len(hist) == 1 and hist[0]["epoch"] == 0


def _weights(path):
    return load_checkpoint(path, expected_kind="m2")[0]["G_X2Y"]


def test_resume_continues_and_matches_uninterrupted(tmp_path):
    _run(tmp_path / "a", epochs=2)
    _run(tmp_path / "b", epochs=1)
    events = _run(tmp_path / "b", epochs=2, resume=True)
    steps = [e for e in events if isinstance(e, StepEvent)]
    assert [s.epoch for s in steps] == [1, 1]  # continued at epoch 1
    wa, wb = _weights(tmp_path / "a" / "last.safetensors"), _weights(tmp_path / "b" / "last.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k])


def test_resume_of_a_checkpoint_written_before_the_engine(tmp_path):
    """`last.safetensors` of the old loop (opt_g_groups/opt_d_groups, best_aji, no initial_lr) still resumes."""
    from safetensors.torch import load_file, save_file

    _run(tmp_path / "a", epochs=2)
    _run(tmp_path / "b", epochs=1)
    last = tmp_path / "b" / "last.safetensors"
    header = read_header(last)
    meta = header["meta"]
    groups = meta.pop("optimizers")
    for name, g in groups.items():
        for group in g:
            group.pop("initial_lr")
        meta[f"opt_{name.lower()}_groups"] = g
    meta["best_aji"] = meta.pop("best_value")
    for k in ("best_epoch", "finished", "epoch_sums", "epoch_counts", "schedule"):
        meta.pop(k)
    md = {"format": "napari-pathoseg", "format_version": "1", "kind": "m2",
          "config": json.dumps(header["config"], sort_keys=True), "meta": json.dumps(meta, sort_keys=True)}
    save_file(load_file(str(last)), str(last), metadata=md)
    events = _run(tmp_path / "b", epochs=2, resume=True)
    assert events[0].resumed and events[0].epoch == 1
    wa, wb = _weights(tmp_path / "a" / "last.safetensors"), _weights(last)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k])


def test_cancel_saves_and_resumes(tmp_path):
    cancel = threading.Event()
    events = []
    for ev in train_m2(TINY, _data(), out_dir=tmp_path, epochs=1, steps_per_epoch=3, batch_size=2,
                       seed=0, device="cpu", cancel=cancel, threads=1):
        events.append(ev)
        if isinstance(ev, StepEvent):
            cancel.set()
    assert isinstance(events[-1], DoneEvent) and events[-1].cancelled
    assert sum(isinstance(e, StepEvent) for e in events) == 1
    _, _, meta = load_checkpoint(events[-1].last_checkpoint, expected_kind="m2")
    assert (meta["epoch"], meta["step"]) == (0, 1)
    rest = list(train_m2(TINY, _data(), out_dir=tmp_path, epochs=1, steps_per_epoch=3, batch_size=2,
                         seed=0, device="cpu", resume=True, threads=1))
    assert [e.step for e in rest if isinstance(e, StepEvent)] == [1, 2]


def test_resume_refuses_other_config(tmp_path):
    _run(tmp_path)
    other = dataclasses.replace(TINY, widths=(4, 8, 32))
    with pytest.raises(PathosegError, match="different config"):
        list(train_m2(other, _data(), out_dir=tmp_path, epochs=2, steps_per_epoch=1, device="cpu", resume=True, threads=1))


def test_run_training_progress(tmp_path):
    seen = []
    done = run_training(TINY, _data(), out_dir=tmp_path, epochs=1, steps_per_epoch=1, batch_size=1,
                        device="cpu", progress=seen.append, threads=1)
    assert isinstance(done, DoneEvent) and isinstance(seen[-1], DoneEvent)


def test_lsgan_and_cycle_losses():
    ones, zeros = torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    assert float(L.lsgan_d_loss(ones, zeros)) == 0.0  # perfect discriminator
    assert float(L.lsgan_d_loss(zeros, ones)) == pytest.approx(1.0)  # 1/2 * 1 + 1/2 * 1
    assert float(L.lsgan_g_loss(ones)) == 0.0
    assert float(L.lsgan_g_loss(zeros)) == pytest.approx(0.5)
    assert float(L.cycle_loss(torch.full((1, 3, 2, 2), 0.5), zeros.expand(1, 3, 2, 2))) == pytest.approx(0.5)


def test_segmentation_loss():
    tgt = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    logits = torch.zeros(1, 2, 2, 2)
    loss, parts = L.segmentation_loss(logits, tgt, tgt, lambda_dice=0.0, lambda_boundary=0.0)
    assert float(loss) == pytest.approx(np.log(2.0), rel=1e-5)  # BCE of p = 0.5
    good = torch.stack([tgt * 20 - 10, tgt * 20 - 10], 1)
    loss_good, _ = L.segmentation_loss(good, tgt, tgt)
    assert float(loss_good) < 0.01
    w = torch.zeros_like(tgt)
    loss_w, _ = L.segmentation_loss(logits, tgt, tgt, w, lambda_dice=0.0, lambda_boundary=0.0)
    assert float(loss_w) == 0.0  # zero weight: padding does not count


def test_split_images_disjoint_and_seeded():
    names = [f"a/{i}" for i in range(10)] + [f"b/{i}" for i in range(5)]
    s = split_images(names, seed=3)
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (9, 3, 3)
    assert not set(s["test"]) & (set(s["train"]) | set(s["val"]))
    assert any(n.startswith("b/") for n in s["test"])
    assert s == split_images(names, seed=3) and s != split_images(names, seed=4)


def test_split_styles_picks_consistent_group():
    items = [_blobs(i, tint=0.0) for i in range(4)] + [_blobs(10 + i, tint=0.1 * (i + 2)) for i in range(4)]
    st = split_styles(items)
    assert len(st["y"]) == 4 and len(st["x"]) == 4
    assert set(st["y"]) == {f"syn/{i}" for i in range(4)}  # the untinted (one-style) images


def test_crop_sampler_and_pseudo():
    rng = np.random.default_rng(0)
    pseudo = PseudoLabelDataset([(_blobs(7).image, _blobs(7).labels > 0, 0.5)])
    assert pseudo[0].labels.max() >= 1 and pseudo[0].source == "pseudo"
    s = CropSampler([_blobs(1, size=12)] + pseudo.items, crop=16, rng=rng, stain_augment=None)
    b = s.sample(3)
    assert b["image"].shape == (3, 16, 16, 3) and b["nuclei"].shape == (3, 16, 16)
    assert set(np.unique(b["weight"])) <= {0.0, 0.5, 1.0}
    with pytest.raises(DataError, match="mask shape"):
        PseudoLabelDataset([(np.zeros((4, 4, 3), np.uint8), np.zeros((5, 5)), 1.0)])


def test_augmentations():
    rng = np.random.default_rng(0)
    img = _blobs(1).image
    out = hed_perturb(img, rng=rng, alpha=0.3, beta=0.03)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - img).mean() > 1
    lab = _blobs(1).labels
    gi, gl = geometric(img, lab, rng=np.random.default_rng(5))
    assert gi[gl > 0].mean() < gi[gl == 0].mean() - 60  # labels follow the (dark) nuclei
    with pytest.raises(PathosegError, match="RGB"):
        hed_perturb(np.zeros((4, 4, 4), np.uint8), rng=rng)
    from napari_pathoseg.methods.nuclei.datasets import STAIN_AUGMENTATIONS

    for name in ("hed", "stain"):
        a = STAIN_AUGMENTATIONS[name](img, np.random.default_rng(1))
        b = STAIN_AUGMENTATIONS[name](img, np.random.default_rng(1))
        assert a.shape == img.shape and np.array_equal(a, b)  # seeded


def test_resample_pair():
    img = np.zeros((100, 60, 3), np.uint8)
    lab = np.zeros((100, 60), np.int32)
    lab[10:20, 10:20] = 7
    i2, l2 = resample_pair(img, lab, src_mpp=0.25, dst_mpp=0.5)
    assert i2.shape == (50, 30, 3) and l2.shape == (50, 30)
    assert set(np.unique(l2)) == {0, 7}


def test_read_image_refuses_rgba(tmp_path):
    p = tmp_path / "rgba.png"
    Image.fromarray(np.zeros((4, 4, 4), np.uint8)).save(p)
    with pytest.raises(DataError, match="RGBA"):
        read_image(p)


def _touching_pair():
    rr, cc = np.mgrid[:40, :60]
    a = (rr - 20) ** 2 + (cc - 20) ** 2 <= 100
    b = (rr - 20) ** 2 + (cc - 37) ** 2 <= 100
    prob = (a | b).astype(np.float32)
    boundary = np.zeros_like(prob)
    boundary[:, 28:30] = 1.0  # the predicted border between the two nuclei
    return prob, boundary


def test_instances_split_touching_nuclei():
    prob, boundary = _touching_pair()
    for lab in (distance_watershed(prob, mpp=0.5), boundary_watershed(prob, boundary, mpp=0.5),
                to_instances(prob, boundary[None]), to_instances(prob)):
        assert lab.dtype == np.int32
        assert lab.max() == 2
        assert lab[20, 20] != lab[20, 37] and lab[20, 20] > 0
    assert to_instances(np.zeros((8, 8), np.float32)).max() == 0
    with pytest.raises(PathosegError, match="valid"):
        to_instances(prob, method="nope")
    with pytest.raises(PathosegError, match="needs the boundary"):
        to_instances(prob, method="boundary")


def test_cli_parses():
    from napari_pathoseg.cli.train import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="cmd"))
    a = parser.parse_args(["train", "--preset", "attcycle-lite", "--out", "x", "--epochs", "3", "--resume"])
    assert a.epochs == 3 and a.resume and callable(a.func)
    e = parser.parse_args(["evaluate", "nuclei", "--images", "i", "--masks", "m", "--mpp", "0.25"])
    assert e.mpp == 0.25 and e.model == "nuclei-lite"


def test_cli_train_refuses_an_existing_run_and_a_typo(tmp_path, capsys):
    """`pathoseg train --out DIR` on a folder holding a run: exit 2 with one line, before loading data."""
    from napari_pathoseg.cli.main import main

    (tmp_path / "history.json").write_text("[]")
    code = main(["train", "--out", str(tmp_path), "--epochs", "1", "--data", str(tmp_path / "no-data")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--resume" in err[0] and "--force" in err[0]
    assert main(["train", "--out", str(tmp_path / "new"), "--preset", "transcycle-lit"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "transcycle-lite" in err[0]  # the valid presets are listed
    assert main(["train", "--out", str(tmp_path), "--resume", "--force"]) == 2  # one or the other


def test_student_presets_need_no_prior_import():
    """`pathoseg train --preset transcycle-lite` used to fail unless transcycle.py was imported first."""
    import subprocess
    import sys

    code = ("from napari_pathoseg.methods.nuclei.attcycle import get_preset, M2Model; "
            "c = get_preset('transcycle-lite'); m = M2Model(c); print(c.encoder, type(m.G_X2Y.encoder).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["resnet50_transformer", "TransCycleEncoder"]


def test_evaluate_folder(tmp_path):
    from napari_pathoseg.models.checkpoint import save_checkpoint
    from napari_pathoseg.methods.nuclei.attcycle import M2Model
    from napari_pathoseg.methods.nuclei.evaluate import evaluate_folder

    torch.manual_seed(0)
    model = M2Model(TINY)
    ckpt = save_checkpoint(tmp_path / "m.safetensors",
                           {n: getattr(model, n).state_dict() for n in ("G_X2Y", "G_Y2X", "D_X", "D_Y")},
                           TINY.to_dict(), {})
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    it = _blobs(1)
    Image.fromarray(it.image).save(tmp_path / "img" / "a.png")
    Image.fromarray(it.labels.astype(np.uint16)).save(tmp_path / "msk" / "a.png")
    res = evaluate_folder(tmp_path / "img", tmp_path / "msk", model=ckpt, mpp=0.25, per_image=True)
    assert res["n_images"] == 1 and set(res["per_image"]) == {"a"}
    assert 0.0 <= res["metrics"]["aji"] <= 1.0
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "img" / "a.png")  # greyscale
    with pytest.raises(DataError, match="RGB"):
        evaluate_folder(tmp_path / "img", tmp_path / "msk", model=ckpt)


def test_tune_instances_picks_best_setting(tmp_path):
    from napari_pathoseg.models.checkpoint import save_checkpoint
    from napari_pathoseg.methods.nuclei.attcycle import M2Model
    from napari_pathoseg.models.registry import load_model
    from napari_pathoseg.methods.nuclei.release import GRID, tune_instances

    torch.manual_seed(0)
    model = M2Model(TINY)
    ckpt = save_checkpoint(tmp_path / "m.safetensors",
                           {n: getattr(model, n).state_dict() for n in ("G_X2Y", "G_Y2X", "D_X", "D_Y")},
                           TINY.to_dict(), {"instance_method": "distance", "instance_params": {"min_distance_um": 3.0}})
    m = load_model(ckpt)
    assert m.instance_params == {"min_distance_um": 3.0}
    res = tune_instances(m, [_blobs(1, size=24)])
    assert res["method"] in GRID and res["params"] in GRID[res["method"]]
    assert res["aji"] == max(g["aji"] for g in res["grid"])
    assert len(res["grid"]) == sum(len(v) for v in GRID.values())
