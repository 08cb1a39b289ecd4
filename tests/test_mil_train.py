"""M4 core: Sinkhorn, entropy filter, cohort CSV, networks, training (resume, EMA), loader bounds."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from napari_pathoseg.errors import CheckpointError
from napari_pathoseg.methods.mil.cohort_csv import CohortError, read_cohort
from napari_pathoseg.methods.mil.entropy import DEFAULT_ENTROPY_THRESHOLD, tile_entropy
from napari_pathoseg.methods.mil.network import MilNet, get_preset
from napari_pathoseg.methods.mil.pooling import pool
from napari_pathoseg.methods.mil.sinkhorn import hard_labels, pseudo_labels, sinkhorn


def test_sinkhorn_meets_the_share_constraint_on_random_predictions():
    gen = torch.Generator().manual_seed(0)
    for k in (0.05, 0.2, 0.5):
        p = torch.rand(1000, generator=gen) ** 3  # skewed: far fewer than k would be positive by arg-max
        q = sinkhorn(p, k=k, iters=200)
        assert torch.allclose(q.sum(1), torch.ones(1000, dtype=q.dtype), atol=1e-6)
        assert q[:, 1].sum().item() == pytest.approx(k * 1000, rel=1e-3)
        y = hard_labels(q, k=k)
        assert int(y.sum()) == round(k * 1000)
        # the positives are the tiles the predictions rank highest
        assert p[y == 1].min() >= p[y == 0].max() - 1e-6
    assert int(pseudo_labels(torch.full((10,), 0.01), k=0.3).sum()) == 3


def test_pooling_methods():
    p = np.array([0.1, 0.2, 0.9, 0.8, 0.3])
    assert pool(p, method="max") == pytest.approx(0.9)
    assert pool(p, method="topk_mean", k=2) == pytest.approx(0.85)
    assert pool(p, method="topk_mean", k=0.4) == pytest.approx(0.85)
    assert pool(p, method="share", k=0.4) == pytest.approx(1.0)
    assert pool(p, method="share", k=2) == pytest.approx(0.4)
    with pytest.raises(Exception, match="No tissue tiles"):
        pool([], method="max")


def _tile(path: Path, mpp: float) -> np.ndarray:
    im = Image.open(path).convert("RGB")
    im = im.resize((round(im.width * mpp), round(im.height * mpp)), Image.BILINEAR)
    return np.asarray(im)[:64, :64]


def test_entropy_drops_glass_keeps_tissue(shared_data):
    kather = shared_data / "kather2016_texture_tiles"
    with open(kather / "index.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    glass = [_tile(kather / r["file"], 0.495) for r in rows if r["class"] == "08_empty"][:10]
    tissue = [_tile(kather / r["file"], 0.495) for r in rows if r["class"] in ("01_tumor", "02_stroma", "04_lympho")][:15]
    assert sum(tile_entropy(t) < DEFAULT_ENTROPY_THRESHOLD for t in glass) >= 9
    assert all(tile_entropy(t) >= DEFAULT_ENTROPY_THRESHOLD for t in tissue)
    assert tile_entropy(np.full((64, 64, 3), 242, np.uint8)) == 0.0


def _write_csv(path: Path, rows: list[tuple]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide", "label", "mpp"][: len(rows[0])] if rows else ["slide", "label"])
        w.writerows(rows)
    return path


def test_cohort_csv_errors(tmp_path, make_pyramid_tiff):
    img = np.full((64, 64, 3), 200, np.uint8)
    make_pyramid_tiff(tmp_path / "a.tif", img, levels=1, tile=64, mpp=0.5)
    make_pyramid_tiff(tmp_path / "b.tif", img, levels=1, tile=64, mpp=0.5)
    Image.fromarray(img).save(tmp_path / "c.png")
    ok = read_cohort(_write_csv(tmp_path / "ok.csv", [("a.tif", "Positive"), ("b.tif", " 0 ")]))
    assert [s.label for s in ok] == [1, 0] and ok[0].mpp == pytest.approx(0.5) and ok[0].slide.is_absolute()
    with pytest.raises(CohortError, match="does not exist"):
        read_cohort(_write_csv(tmp_path / "m.csv", [("a.tif", "positive"), ("gone.tif", "negative")]))
    with pytest.raises(CohortError, match="unknown label 'maybe'"):
        read_cohort(_write_csv(tmp_path / "u.csv", [("a.tif", "positive"), ("b.tif", "maybe")]))
    with pytest.raises(CohortError, match="every slide is positive"):
        read_cohort(_write_csv(tmp_path / "s.csv", [("a.tif", "positive"), ("b.tif", "1")]))
    with pytest.raises(CohortError, match="no µm/px"):
        read_cohort(_write_csv(tmp_path / "n.csv", [("a.tif", "positive"), ("c.png", "negative")]))
    assert read_cohort(tmp_path / "n.csv", default_mpp=1.0)[1].mpp == 1.0
    with pytest.raises(CohortError, match="mpp"):
        read_cohort(_write_csv(tmp_path / "b.csv", [("a.tif", "positive", "-1"), ("b.tif", "negative", "")]))
    with pytest.raises(CohortError, match="does not exist"):
        read_cohort(tmp_path / "nothere.csv")


@pytest.mark.parametrize("preset,size", [("lite", 64), ("m4", 64)])
def test_networks_forward_backward(preset, size, one_torch_thread):
    cfg = get_preset(preset)
    net = MilNet(cfg)
    n_params = sum(p.numel() for p in net.parameters())
    assert (n_params > 11e6) if preset == "m4" else (n_params < 1e6)
    out = net(torch.randn(2, 3, size, size))
    assert out.shape == (2, 2)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory, shared_data):
    from napari_pathoseg.wsi.mosaic import make_mosaic

    d = tmp_path_factory.mktemp("milcohort")
    for name, share in (("pos", 0.3), ("neg", 0.0)):
        make_mosaic(shared_data / "kather2016_texture_tiles", d / f"{name}.tif", size=384, mpp=1.0, seed=3,
                    tumour_fraction=share, cell_um=64.0, tile=128)
    return _write_csv(d / "cohort.csv", [("pos.tif", "positive"), ("neg.tif", "negative")])


def _run(cohort, run_dir, **kw):
    from napari_pathoseg.methods.mil.train import MilTrainResult, train_mil
    from napari_pathoseg.training.engine import TrainStart

    events = list(train_mil(cohort=cohort, val_cohort=cohort, run_dir=run_dir, steps_per_epoch=2, threads=1,
                            overrides={"batch": 8, "bank_refresh": 3}, **kw))
    assert isinstance(events[-1], MilTrainResult)
    start = next(e for e in events if isinstance(e, TrainStart))
    return events[-1], start


def test_two_step_training_resumes(tiny_cohort, tmp_path, one_torch_thread):
    from safetensors.torch import load_file

    from napari_pathoseg.models.registry import load_model

    res, start = _run(tiny_cohort, tmp_path / "a", epochs=1)
    assert not start.resumed and res.model_path.is_file() and "slide_auc" in res.scores
    res2, start2 = _run(tiny_cohort, tmp_path / "a", epochs=2, resume=True)
    assert start2.resumed and start2.epoch == 1 and len(res2.done.history) == 2
    last = load_file(str(tmp_path / "a" / "last.safetensors"))
    assert last["state.bank"].shape == (len(res2.done.history) and last["state.bank"].shape[0],)
    assert not torch.equal(last["net.head.weight"], last["state.teacher__head.weight"])  # teacher != student
    model = load_model(res2.model_path, task="slide")
    probs = model.predict_tiles(np.zeros((3, 64, 64, 3), np.uint8))
    assert probs.shape == (3,) and np.all((probs >= 0) & (probs <= 1))
    with pytest.raises(Exception, match="--resume|--force"):
        _run(tiny_cohort, tmp_path / "a", epochs=3)


def test_ema_moves_teacher_toward_student(one_torch_thread):
    from napari_pathoseg.methods.mil.data import TilePools
    from napari_pathoseg.methods.mil.train import MilTask

    tiles = np.random.default_rng(0).integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)
    pools = TilePools(tiles, tiles, np.zeros(8, np.int64), np.ones(8, np.int64))
    task = MilTask(get_preset("lite", momentum=0.9), pools, pools)
    task.build(device=torch.device("cpu"), rng=np.random.default_rng(0))
    with torch.no_grad():
        for p in task.net.parameters():
            p.add_(0.5)

    def dist():
        return sum(float((t - s).detach().abs().sum()) for t, s in zip(task.teacher.parameters(), task.net.parameters()))

    before = dist()
    task.after_step(0)
    assert dist() == pytest.approx(0.9 * before, rel=1e-4)


def test_loader_refuses_out_of_bounds_config(tmp_path):
    from napari_pathoseg.methods.mil.release import build_untrained
    from napari_pathoseg.models.checkpoint import load_checkpoint, save_checkpoint
    from napari_pathoseg.models.registry import load_model

    card = build_untrained(tmp_path / "u.safetensors", preset="lite", seed=0)
    assert card["task"] == "slide" and card["tile_size"] == 64
    model = load_model(tmp_path / "u.safetensors", task="slide")
    assert model.classes == ("negative", "positive") and model.pool([0.2, 0.9]) == pytest.approx(0.55)
    tensors, config, meta = load_checkpoint(tmp_path / "u.safetensors", expected_kind="m4")
    for key, bad in (("tile_size", 10**6), ("k", 1.5), ("widths", [16, 32, 64, 10**5]), ("pooling", "median")):
        save_checkpoint(tmp_path / "bad.safetensors", tensors, dict(config, **{key: bad}), meta, kind="m4")
        with pytest.raises(CheckpointError, match=key):
            load_model(tmp_path / "bad.safetensors", task="slide")


@pytest.mark.parametrize("variant", ["negguide", "selfdistill", "meanpool"])
def test_each_variant_takes_a_step(variant, one_torch_thread):
    from napari_pathoseg.methods.mil.data import TilePools
    from napari_pathoseg.methods.mil.train import MilTask

    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 255, (12, 64, 64, 3), dtype=np.uint8)
    pools = TilePools(tiles[:6], tiles[6:], np.array([0, 0, 0, 1, 1, 1]), np.array([2, 2, 2, 3, 3, 3]))
    task = MilTask(get_preset("lite", variant=variant, batch=4, bag_tiles=2, k=0.5), pools, pools)
    task.build(device=torch.device("cpu"), rng=rng)
    before = task.net.head.weight.detach().clone()
    losses = task.train_step(next(task.batches()), 1)
    task.after_step(1)
    assert np.isfinite(losses["loss"]) and not torch.equal(before, task.net.head.weight)
    if variant == "negguide":
        assert "neg" in losses and losses["pseudo_pos"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert (task.teacher is None) == (variant == "meanpool")


def test_mil_train_cli_refuses_bad_cohorts_before_training(tmp_path, make_pyramid_tiff, capsys):
    from napari_pathoseg.cli.main import main

    img = np.full((64, 64, 3), 200, np.uint8)
    make_pyramid_tiff(tmp_path / "a.tif", img, levels=1, tile=64, mpp=0.5)
    cases = {
        "gone.csv": ([("a.tif", "positive"), ("gone.tif", "negative")], "does not exist"),
        "one.csv": ([("a.tif", "positive"), ("a.tif", "positive")], "both positive and negative"),
        "label.csv": ([("a.tif", "positive"), ("a.tif", "benign?")], "unknown label"),
    }
    for name, (rows, message) in cases.items():
        code = main(["mil-train", str(_write_csv(tmp_path / name, rows)), "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err
        assert not (tmp_path / "run").exists()


def test_cli_choices_match_the_network_presets():
    """The CLI spells its choices so that building the parser imports no torch; they must not drift."""
    from napari_pathoseg.cli import mil_train
    from napari_pathoseg.methods.mil.network import VARIANTS, preset_names

    assert set(mil_train.PRESETS) == set(preset_names())
    assert tuple(mil_train.VARIANTS) == tuple(VARIANTS)
