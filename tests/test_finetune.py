"""Fine-tuning a student on strong labels + review-project pseudo-labels (real, tiny runs)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from napari_pathoseg.errors import CheckpointError, PathosegError
from napari_pathoseg.methods.nuclei.finetune import (
    FinetuneConfig,
    FinetuneDone,
    FinetuneError,
    FinetuneStage,
    build_finetune_data,
    iter_finetune,
    load_pseudo_items,
    load_strong_folder,
    run_finetune,
)
from napari_pathoseg.models.checkpoint import load_checkpoint, read_header, save_checkpoint
from napari_pathoseg.methods.nuclei.train import EpochEvent, StepEvent

UNLABELLED_SOURCE = "TCGA-21-5784-01Z-00-DX1"  # a MoNuSeg image, used here as an unlabelled tile source


@pytest.fixture(autouse=True)
def _registry_home(tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setenv("PATHOSEG_HOME", str(tmp_path / "home"))


@pytest.fixture
def strong_folder(make_strong_folder):
    """Three real 144x144 MoNuSeg crops (declared 0.5 µm/px)."""
    return make_strong_folder(144)


@pytest.fixture
def project(tmp_path, shared_data):
    """A review project with 3 tiles: one accepted, one rejected, one pending."""
    from napari_pathoseg.review.project import ReviewProject

    src = shared_data / "monuseg_train" / "images" / f"{UNLABELLED_SOURCE}.png"
    img = np.asarray(Image.open(src).convert("RGB"))
    proj = ReviewProject.create(tmp_path / "review", source=src.parent, source_kind="folder",
                                model="teacher", tile_size=128, mpp=0.5)
    rng = np.random.default_rng(0)
    ids = []
    for k in range(3):
        tile = img[600 + 128 * (k // 2): 728 + 128 * (k // 2), 128 * k: 128 * k + 128]
        prob = rng.uniform(0.6, 1.0, (128, 128)).astype(np.float32)
        labels = np.zeros((128, 128), np.int32)
        labels[20:40, 20:40], labels[70:90, 50:75] = 1, 2
        norm = np.clip(tile.astype(int) + 10, 0, 255).astype(np.uint8)
        ids.append(proj.add_tile(tile, norm, prob, labels, x=128 * k, y=600).tile_id)
    proj.set_state(ids[0], "accepted")
    proj.set_state(ids[1], "rejected")
    return proj


def _config(tmp_path, strong_folder, project=None, **kw):
    opts = dict(out_dir=str(tmp_path / "run"), name="ft-test", base=None, preset="transcycle-lite",
                strong=(str(strong_folder),), projects=(str(project.root),) if project else (),
                epochs=2, steps_per_epoch=2, batch_size=1, lr=1e-4, seed=0, device="cpu", threads=1, min_aji=0.0)
    opts.update(kw)
    return FinetuneConfig(**opts)


def test_config_validates(tmp_path):
    with pytest.raises(FinetuneError, match="learning rate"):
        FinetuneConfig(out_dir=str(tmp_path), lr=0)
    with pytest.raises(FinetuneError, match="epochs"):
        FinetuneConfig(out_dir=str(tmp_path), epochs=0)
    with pytest.raises(FinetuneError, match="name"):
        FinetuneConfig(out_dir=str(tmp_path), name="a/b")
    cfg = FinetuneConfig(out_dir=str(tmp_path), strong=["a", "b"], epochs=3)
    assert FinetuneConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(FinetuneError, match="Unknown fine-tune options"):
        FinetuneConfig.from_dict({"out_dir": "x", "epoch": 3})
    with pytest.raises(FinetuneError, match="valid presets"):
        next(iter_finetune(FinetuneConfig(out_dir=str(tmp_path), preset="nope", strong=("x",))))


def test_strong_folder_and_errors(tmp_path, strong_folder):
    items = load_strong_folder(strong_folder, mpp=0.5)
    assert [it.name for it in items] == ["strong/crop0", "strong/crop1", "strong/crop2"]
    assert items[0].image.shape == (144, 144, 3) and items[0].labels.max() > 0
    # declared at 0.25 µm/px: resampled to half the size
    half = load_strong_folder(strong_folder, mpp=0.5, src_mpp=0.25)
    assert half[0].image.shape == (72, 72, 3) and half[0].labels.shape == (72, 72)
    with pytest.raises(FinetuneError, match="images/ and instance_masks/"):
        load_strong_folder(tmp_path, mpp=0.5)
    with pytest.raises(FinetuneError, match="does not exist"):
        load_strong_folder(tmp_path / "missing", mpp=0.5)


def test_shared_dataset_folder_uses_split_names(shared_data):
    items = load_strong_folder(shared_data / "cpm15_nuclei", mpp=0.5)
    assert len(items) == 15 and all(it.name.startswith("cpm15/") for it in items)


def test_pseudo_items_use_accepted_tiles_with_pseudo_y(project):
    x, y = load_pseudo_items(project.root, mpp=0.5)
    assert len(x) == len(y) == 1  # only the accepted tile
    tid = project.tiles(states=["accepted"])[0].tile_id
    np.testing.assert_array_equal(x[0].image, project.read_image(tid))
    np.testing.assert_array_equal(y[0].image, project.read_normalized(tid))
    np.testing.assert_array_equal(x[0].labels, y[0].labels)
    assert x[0].weight.shape == (128, 128) and 0.5 <= x[0].weight.min() <= x[0].weight.max() <= 1.0
    # pending tiles above the threshold join on request; rejected never
    x2, _ = load_pseudo_items(project, mpp=0.5, include_pending=True, min_score=0.0, weight="uniform")
    assert len(x2) == 2 and x2[0].weight == 1.0


def test_data_assembly(tmp_path, strong_folder, project):
    cfg = _config(tmp_path, strong_folder, project)
    data = build_finetune_data(cfg, mpp=0.5)
    assert data.n_pseudo == 1 and len(data.m2.val) == 1
    names_x = [it.name for it in data.m2.x_train]
    names_y = [it.name for it in data.m2.y_train]
    assert any(n.startswith("pseudo:") for n in names_x)
    assert any(n.endswith(":normalized") for n in names_y)
    assert not set(it.name for it in data.m2.val) & set(names_x + names_y)
    # a split file: test images are left out, its val images validate
    split = {"seed": 0, "train": ["strong/crop0"], "val": ["strong/crop1"], "test": ["strong/crop2"],
             "x": ["strong/crop0"], "y": []}
    (tmp_path / "split.json").write_text(json.dumps(split))
    d2 = build_finetune_data(_config(tmp_path, strong_folder, project, split=str(tmp_path / "split.json")), mpp=0.5)
    every = [it.name for it in d2.m2.x_train + d2.m2.y_train + d2.m2.val]
    assert "strong/crop2" not in every and [it.name for it in d2.m2.val] == ["strong/crop1"]
    with pytest.raises(FinetuneError, match="strong labels"):
        build_finetune_data(_config(tmp_path, strong_folder, project, strong=()), mpp=0.5)


def test_run_stop_resume_register(tmp_path, strong_folder, project):
    """Stop after 3 steps leaves a resumable checkpoint; resuming finishes and registers."""
    from napari_pathoseg.models.registry import list_models, load_model

    cfg = _config(tmp_path, strong_folder, project)
    cancel = threading.Event()
    steps = []
    done = None
    for ev in iter_finetune(cfg, cancel=cancel):
        if isinstance(ev, StepEvent):
            steps.append((ev.epoch, ev.step))
            if len(steps) == 3:
                cancel.set()
        if isinstance(ev, FinetuneDone):
            done = ev
    assert done.cancelled and done.registered is None
    assert steps == [(0, 0), (0, 1), (1, 0)]
    state = read_header(done.last_checkpoint)["meta"]
    assert (state["epoch"], state["step"]) == (1, 1)
    assert (tmp_path / "run" / "best.safetensors").is_file()  # epoch 0 finished
    assert not any(m["name"] == "ft-test" for m in list_models())

    events = []
    done = run_finetune(cfg, progress=events.append)
    resumed_steps = [(e.epoch, e.step) for e in events if isinstance(e, StepEvent)]
    assert resumed_steps == [(1, 1)]
    assert any(isinstance(e, FinetuneStage) and e.stage == "init" and "resuming" in e.message for e in events)
    assert [e.epoch for e in events if isinstance(e, EpochEvent)] == [1]
    assert not done.cancelled and len(done.history) == 2
    assert {"aji", "f1", "dice"} <= set(done.best_metrics)
    entry = next(m for m in list_models() if m["name"] == "ft-test")
    assert entry["preset"] == "transcycle-lite" and "pseudo-labelled" in entry["data"]
    assert entry["scores"]["aji"] == pytest.approx(done.best_metrics["aji"])
    model = load_model("ft-test", device="cpu")
    out = model.predict(np.full((1, 64, 64, 3), 200, np.uint8))
    assert out["prob"].shape == (1, 64, 64)
    saved = json.loads((tmp_path / "run" / "finetune.json").read_text())
    assert saved["name"] == "ft-test" and saved["projects"] == [str(project.root)]


def test_student_starts_from_matching_base(tmp_path, strong_folder):
    """A base of the student's architecture initialises it; another preset refuses to resume."""
    from napari_pathoseg.methods.nuclei.attcycle import M2Model, get_preset

    cfg_m2 = get_preset("attcycle-lite")
    torch.manual_seed(123)
    base = M2Model(cfg_m2)
    base_path = save_checkpoint(
        tmp_path / "base.safetensors",
        {n: getattr(base, n).state_dict() for n in ("G_X2Y", "G_Y2X", "D_X", "D_Y")},
        cfg_m2.to_dict(), {"instance_method": "distance"},
    )
    cfg = _config(tmp_path, strong_folder, None, preset="attcycle-lite", base=str(base_path),
                  epochs=1, steps_per_epoch=1, lr=1e-9, register=False)
    done = run_finetune(cfg)
    assert done.initialised_from == str(base_path)
    tensors, _, _ = load_checkpoint(done.last_checkpoint)
    key = next(k for k in tensors["G_X2Y"] if k.endswith("weight") and tensors["G_X2Y"][k].ndim == 4)
    trained = tensors["G_X2Y"][key]
    assert torch.allclose(trained, base.G_X2Y.state_dict()[key], atol=1e-5)
    assert not torch.allclose(trained, M2Model(cfg_m2).G_X2Y.state_dict()[key], atol=1e-3)
    # the same out_dir with another preset is refused with a clear message
    with pytest.raises(FinetuneError, match="attcycle-lite"):
        run_finetune(_config(tmp_path, strong_folder, None, preset="transcycle-lite"))
    # a base of another architecture: only its matching weights (the discriminators), said so
    cfg2 = _config(tmp_path, strong_folder, None, out_dir=str(tmp_path / "run2"), base=str(base_path),
                   preset="transcycle-lite", epochs=1, steps_per_epoch=1, register=False)
    events = list(iter_finetune(cfg2))
    stages = [e.message for e in events if isinstance(e, FinetuneStage) and e.stage == "init"]
    assert len(stages) == 1 and "matching weights only" in stages[0]
    done2 = events[-1]
    assert done2.init["copied"] > 0 and done2.init["missing"] > 0
    assert any("matching weights only" in w for w in done2.warnings)


def _random_base(tmp_path, preset="attcycle-lite", seed=123):
    from napari_pathoseg.methods.nuclei.attcycle import M2Model, get_preset

    cfg = get_preset(preset)
    torch.manual_seed(seed)
    base = M2Model(cfg)
    path = save_checkpoint(tmp_path / f"base-{preset}.safetensors",
                           {n: getattr(base, n).state_dict() for n in ("G_X2Y", "G_Y2X", "D_X", "D_Y")},
                           cfg.to_dict(), {"instance_method": "distance"})
    return base, path


def test_default_student_is_the_base_and_is_compared_with_it(tmp_path, strong_folder):
    """No preset: the student has the base's architecture, starts from all its weights, and the
    Done event holds the base's metrics on the same validation images beside the new model's."""
    from napari_pathoseg.methods.nuclei.finetune import evaluate_base
    from napari_pathoseg.methods.nuclei.finetune_data import build_finetune_data as build

    _, base_path = _random_base(tmp_path)
    cfg = _config(tmp_path, strong_folder, None, preset=None, base=str(base_path), epochs=1, steps_per_epoch=1,
                  register=False)
    assert cfg.preset is None and FinetuneConfig(out_dir="x", preset="base").preset is None
    events = list(iter_finetune(cfg))
    done = events[-1]
    assert isinstance(done, FinetuneDone) and not done.cancelled
    assert done.initialised_from == str(base_path)
    assert done.init["missing"] == 0 and done.init["shape_mismatch"] == [] and done.init["copied"] > 100
    assert [e.stage for e in events if isinstance(e, FinetuneStage)] == ["data", "init", "base", "train"]
    assert {"aji", "best_aji", "f1", "dice"} <= set(done.base_metrics)
    assert {"aji", "best_aji", "f1", "dice"} <= set(done.best_metrics)
    assert read_header(done.best_checkpoint)["config"]["preset"] == "attcycle-lite"
    # the base metrics are exactly the base scored on the run's validation images
    val = build(cfg, mpp=0.5).m2.val
    again = evaluate_base(base_path, val, mpp=0.5, device="cpu")
    assert again["best_aji"] == pytest.approx(done.base_metrics["best_aji"])
    saved = json.loads((tmp_path / "run" / "finetune.json").read_text())
    assert saved["base_metrics"]["best_aji"] == pytest.approx(done.base_metrics["best_aji"])


def test_registration_floor(tmp_path, strong_folder):
    """A run below the AJI floor is not registered (a warning says why) unless forced."""
    from napari_pathoseg.models.registry import list_models

    cfg = _config(tmp_path, strong_folder, None, epochs=1, steps_per_epoch=1, min_aji=1.0)
    done = run_finetune(cfg)
    assert done.registered is None and done.best_checkpoint.is_file()
    assert any("below the floor" in w for w in done.warnings)
    assert not any(m["name"] == "ft-test" for m in list_models())
    # the same (finished) run again, resumed, with force_register: registered, nothing retrained
    events = []
    done2 = run_finetune(FinetuneConfig.from_dict(dict(cfg.to_dict(), force_register=True)), progress=events.append)
    assert not any(isinstance(e, StepEvent) for e in events)
    assert done2.registered["name"] == "ft-test"
    assert any(m["name"] == "ft-test" for m in list_models())


def test_bad_base_is_refused(tmp_path, strong_folder):
    (tmp_path / "evil.safetensors").write_bytes(b"\x80\x04junk")
    with pytest.raises(CheckpointError, match="pickle"):
        run_finetune(_config(tmp_path, strong_folder, None, base=str(tmp_path / "evil.safetensors")))
    with pytest.raises(PathosegError, match="valid names"):
        run_finetune(_config(tmp_path, strong_folder, None, base="no-such-model"))


def test_cli_finetune(tmp_path, strong_folder, capsys):
    from napari_pathoseg.cli.main import main

    argv = ["finetune", "--out", str(tmp_path / "cli"), "--name", "cli-student", "--base", "none",
            "--strong", str(strong_folder), "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "1",
            "--device", "cpu", "--threads", "1", "--min-aji", "0"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["registered"]["name"] == "cli-student" and not result["cancelled"]
    assert result["epochs"][0]["epoch"] == 0 and "aji" in result["epochs"][0]["val"]
    assert "epoch 1/1" in captured.err and "Traceback" not in captured.err
    bad = ["finetune", "--out", str(tmp_path / "x"), "--name", "x", "--base", "none",
           "--strong", str(tmp_path / "nope")]
    assert main(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pathoseg finetune: error:") and "does not exist" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_cli_finetune_ctrl_c_exits_130_naming_the_checkpoint(tmp_path, strong_folder, capsys, monkeypatch):
    """Ctrl-C during a step: the step finishes, last.safetensors is saved, exit 130, one line says where."""
    import os
    import signal

    import napari_pathoseg.cli.train as cli_train
    from napari_pathoseg.cli.main import main

    real = cli_train.training_progress

    def interrupting(prog, epochs):
        inner = real(prog, epochs)

        def on_event(ev):
            inner(ev)
            if isinstance(ev, StepEvent):
                os.kill(os.getpid(), signal.SIGINT)  # what a user's Ctrl-C does

        return on_event

    monkeypatch.setattr(cli_train, "training_progress", interrupting)
    out = tmp_path / "ctrlc"
    code = main(["finetune", "--out", str(out), "--name", "c", "--base", "none", "--strong", str(strong_folder),
                 "--epochs", "2", "--steps-per-epoch", "3", "--batch-size", "1", "--device", "cpu",
                 "--threads", "1"])
    captured = capsys.readouterr()
    assert code == 130
    last_line = captured.err.strip().splitlines()[-1]
    assert str(out / "last.safetensors") in last_line and "again" in last_line
    assert captured.out == ""
    state = read_header(out / "last.safetensors")["meta"]
    assert (state["epoch"], state["step"]) == (0, 1)
