"""The model registry by task: cards, dispatch, a damaged or contended models.json, crafted checkpoints."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import multiprocessing as mp
import subprocess
import sys
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

from napari_pathoseg.errors import CheckpointError, PathosegError
from napari_pathoseg.methods.nuclei.attcycle import PRESETS, M2Model
from napari_pathoseg.methods.nuclei.model import NucleusModel
from napari_pathoseg.models import tasks as tasks_mod
from napari_pathoseg.models.cards import CardError, ModelCard
from napari_pathoseg.models.checkpoint import load_checkpoint, read_header, save_checkpoint
from napari_pathoseg.models.registry import (
    DEFAULT_MODEL,
    WEIGHTS_DIR,
    get_card,
    list_models,
    load_model,
    register_model,
    registry_path,
)
from napari_pathoseg.models.tasks import ModelTaskError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHIPPED = WEIGHTS_DIR / f"{DEFAULT_MODEL}.safetensors"
needs_shipped = pytest.mark.skipif(not SHIPPED.is_file(), reason="shipped weights not present in this checkout")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """A private user registry for every test."""
    monkeypatch.setenv("PATHOSEG_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def tables(monkeypatch):
    """Task and architecture tables restored after the test."""
    monkeypatch.setattr(tasks_mod, "TASKS", dict(tasks_mod.TASKS))
    monkeypatch.setattr(tasks_mod, "ARCHITECTURES", dict(tasks_mod.ARCHITECTURES))
    import napari_pathoseg.models.cards as cards_mod

    monkeypatch.setattr(cards_mod, "TASKS", tasks_mod.TASKS)
    return tasks_mod


def tiny_cfg(**kw):
    base = PRESETS["attcycle-lite"]
    kw.setdefault("widths", (4, 8, 16, 32))
    kw.setdefault("disc_width", 4)
    kw.setdefault("tile_size", 16)
    return dataclasses.replace(base, **kw)


def save_tiny(path, *, meta=None, edit=None):
    """A real (untrained) tiny M2 checkpoint; ``edit(state_dicts)`` may tamper with it first."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = M2Model(cfg)
    sd = {n: dict(getattr(model, n).state_dict()) for n in ("G_X2Y", "G_Y2X", "D_X", "D_Y")}
    if edit:
        edit(sd)
    save_checkpoint(path, sd, cfg.to_dict(), meta or {})
    return path


# ---------------------------------------------------------------------------- cards


@needs_shipped
def test_shipped_card_and_load():
    card = next(c for c in list_models() if c.name == DEFAULT_MODEL)
    assert card.task == "nuclei" and card.classes == ("nucleus",) and card.shipped
    assert card.mpp == 0.5 and card.tile_size == 128 and card.preset == "attcycle-lite"
    assert card.scores["aji"] == pytest.approx(card.test_scores["aji"]) and "distance" in card.val_scores
    assert card["name"] == DEFAULT_MODEL and card["path"] == str(SHIPPED) and dict(card)["shipped"] is True
    assert card.extra["instance_method"] == "distance"
    model = load_model(DEFAULT_MODEL, task="nuclei", device="cpu")
    assert isinstance(model, NucleusModel) and model.card == card and model.name == DEFAULT_MODEL
    assert model.instance_method == "distance" and model.predict(np.full((1, 32, 32, 3), 220, np.uint8))["prob"].shape == (1, 32, 32)


def test_card_validation():
    ok = {"name": "m", "task": "nuclei", "mpp": 0.5, "tile_size": 64, "path": "m.safetensors"}
    card = ModelCard.from_dict(ok)
    assert card.classes == ("nucleus",) and card.scores == {} and card.created is None
    assert ModelCard.from_dict(dict(ok, val={"aji": 0.5})).val_scores == {"aji": 0.5}  # the shipped cards' key
    cases = [
        ({k: v for k, v in ok.items() if k != "mpp"}, "has no mpp"),
        ({k: v for k, v in ok.items() if k != "task"}, "has no task"),
        (dict(ok, task="organ"), "not one of"),
        (dict(ok, task="tissue"), "must name their classes"),
        (dict(ok, classes="nucleus"), "non-empty list"),
        (dict(ok, classes=["a", "a"]), "distinct"),
        (dict(ok, mpp=float("nan")), "finite number > 0"),
        (dict(ok, tile_size=12.5), "positive integer"),
        (dict(ok, scores={"aji": "high"}), "finite number"),
        (dict(ok, name="a/b"), "without slashes"),
        (dict(ok, created="yesterday"), "ISO 8601"),
    ]
    for d, msg in cases:
        with pytest.raises(CardError, match=msg):
            ModelCard.from_dict(d)


def test_card_from_checkpoint_metadata(tmp_path):
    path = save_tiny(tmp_path / "run.safetensors", meta={
        "command": "pathoseg train --preset attcycle-lite", "val_metrics": {"aji": 0.4, "best_aji": -float("inf")},
        "finetune": {"base": "nuclei-lite", "data": "2 strong + 9 pseudo", "started": "2026-01-02T03:04:05+00:00"},
    })
    card = get_card(path)
    assert (card.name, card.task, card.kind, card.preset) == ("run", "nuclei", "m2", "attcycle-lite")
    assert (card.mpp, card.tile_size, card.base, card.data) == (0.5, 16, "nuclei-lite", "2 strong + 9 pseudo")
    assert card.command.startswith("pathoseg train") and card.created.startswith("2026-01-02")
    assert card.val_scores["aji"] == 0.4 and not card.shipped


# ---------------------------------------------------------------------------- dispatch by task


def _fake_tissue_checkpoint(tmp_path, tables, loaded):
    """A 'tst' architecture serving the tissue task, with a loader that reads its tensors."""

    def load(path, *, card, device):
        tensors, config, _ = load_checkpoint(path, expected_kind="tst")
        loaded.append(card.name)
        return {"card": card, "weights": tensors["net"]["w"], "config": config}

    def validate(config, *, where):
        if config.get("depth", 0) > 10:
            raise CheckpointError(f"{where}: depth too large")

    tables.register_architecture("tst", task="tissue", validator=validate)
    tables.register_loader("tissue", load)
    path = tmp_path / "tissue.safetensors"
    save_checkpoint(path, {"net": {"w": torch.arange(6.0)}}, {"depth": 3, "mpp": 1.0, "tile_size": 224},
                    {"classes": ["tumour", "stroma", "necrosis"]}, kind="tst")
    return path


def test_dispatch_by_task_and_mismatch(tmp_path, tables):
    loaded: list[str] = []
    tissue = _fake_tissue_checkpoint(tmp_path, tables, loaded)
    nuclei = save_tiny(tmp_path / "nuc.safetensors")
    register_model(tissue, name="lung-tissue")
    register_model(nuclei, name="my-nuclei", task="nuclei", scores={"aji": 0.3})

    out = load_model("lung-tissue")  # task from the card
    assert loaded == ["lung-tissue"] and out["card"].classes == ("tumour", "stroma", "necrosis")
    torch.testing.assert_close(out["weights"], torch.arange(6.0))
    assert isinstance(load_model("my-nuclei", task="nuclei"), NucleusModel)
    with pytest.raises(ModelTaskError, match=r"'lung-tissue' is a tissue model; the Nuclei dock .* needs a nuclei model \(.*my-nuclei"):
        load_model("lung-tissue", task="nuclei")
    with pytest.raises(ModelTaskError, match="is a nuclei model; the tissue segmentation needs a tissue model"):
        load_model(nuclei, task="tissue")
    with pytest.raises(ModelTaskError, match="valid tasks"):
        load_model("my-nuclei", task="nucleus")

    by_task = {t: [c.name for c in list_models(task=t)] for t in ("tissue", "nuclei", "lesion")}
    assert "lung-tissue" in by_task["tissue"] and "my-nuclei" in by_task["nuclei"]
    assert "my-nuclei" not in by_task["tissue"] and "lung-tissue" not in by_task["nuclei"]
    assert not {"lung-tissue", "my-nuclei"} & set(by_task["lesion"])
    with pytest.raises(PathosegError, match="valid tasks"):
        list_models(task="organ")
    # a task whose method has no loader yet (lesion's loader taken away for the test)
    tables.TASKS["lesion"] = dataclasses.replace(tables.TASKS["lesion"], loader=None)
    tables.register_architecture("m3", task="lesion")
    lesion = tmp_path / "lesion.safetensors"
    save_checkpoint(lesion, {"net": {"w": torch.zeros(2)}}, {"mpp": 2.0, "tile_size": 512}, {}, kind="m3")
    assert get_card(lesion).classes == ("lesion",)
    with pytest.raises(ModelTaskError, match="No loader for lesion models yet"):
        load_model(lesion)
    # the schema of the architecture runs before its loader
    save_checkpoint(tissue, {"net": {"w": torch.zeros(2)}}, {"depth": 99, "mpp": 1.0, "tile_size": 224},
                    {"classes": ["a"]}, kind="tst")
    with pytest.raises(CheckpointError, match="depth too large"):
        load_model("lung-tissue")
    assert loaded == ["lung-tissue"]


def test_register_refusals(tmp_path):
    nuclei = save_tiny(tmp_path / "nuc.safetensors")
    with pytest.raises(ModelTaskError, match="holds a nuclei model"):
        register_model(nuclei, name="x", task="tissue")
    if SHIPPED.is_file():
        with pytest.raises(PathosegError, match="shipped model name"):
            register_model(nuclei, name=DEFAULT_MODEL)
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, {"net": {"w": torch.zeros(2)}}, {}, {}, kind="mystery")
    with pytest.raises(CheckpointError, match="'mystery' model, which no task knows"):
        register_model(other, name="y")
    with pytest.raises(CardError, match="score 'aji'"):
        register_model(nuclei, name="z", scores={"aji": float("nan")})
    assert not registry_path().exists()  # nothing was written by a refused registration


# ---------------------------------------------------------------------------- a damaged models.json


@pytest.mark.parametrize(
    "content",
    ["[]", "{not json", "null", '{"models": {"a": 1}}', '"models"'],
    ids=["list", "bad-json", "null", "models-not-list", "string"],
)
def test_malformed_registry_falls_back(tmp_path, content, caplog):
    reg = registry_path()
    reg.parent.mkdir(parents=True)
    reg.write_text(content)
    with caplog.at_level(logging.WARNING, logger="napari_pathoseg.models"):
        cards = list_models()
    assert all(c.shipped for c in cards) and len(cards) == len(list(WEIGHTS_DIR.glob("*.safetensors")))
    assert any("only the shipped models are listed" in r.getMessage() for r in caplog.records)
    # registering over a damaged file keeps the old one aside and starts a new registry
    register_model(save_tiny(tmp_path / "m.safetensors"), name="fresh")
    assert [c.name for c in list_models() if not c.shipped] == ["fresh"]
    aside = list(reg.parent.glob("models.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == content


def test_bad_entries_skipped_good_ones_kept(tmp_path, caplog):
    good = save_tiny(tmp_path / "good.safetensors")
    reg = registry_path()
    reg.parent.mkdir(parents=True)
    legacy = {"name": "old-style", "path": str(good), "base": None, "data": "x", "scores": {"aji": 0.2},
              "preset": "attcycle-lite"}  # the format before cards: no task, mpp, input size
    reg.write_text(json.dumps({"models": [
        {"name": "no-path"}, {"name": "null-path", "path": None}, 7, {"path": str(good)},
        {"name": "gone", "path": str(tmp_path / "missing.safetensors")},
        {"name": "bad-mpp", "path": str(good), "task": "nuclei", "mpp": -1, "tile_size": 16},
        legacy,
    ]}))
    with caplog.at_level(logging.WARNING, logger="napari_pathoseg.models"):
        user = [c for c in list_models() if not c.shipped]
    assert [c.name for c in user] == ["old-style"]
    card = user[0]
    assert (card.task, card.mpp, card.tile_size, card.scores, card.data) == ("nuclei", 0.5, 16, {"aji": 0.2}, "x")
    text = "\n".join(r.getMessage() for r in caplog.records)
    for name in ("no checkpoint path", "without a name", "not an object", "'gone'", "'bad-mpp'"):
        assert name in text
    # registering keeps the user's other entries, even the malformed ones
    register_model(good, name="new")
    stored = json.loads(reg.read_text())["models"]
    assert len(stored) == 8 and stored[-1]["name"] == "new" and stored[-1]["task"] == "nuclei"
    assert isinstance(load_model("old-style", task="nuclei"), NucleusModel)


def _register_many(home: str, ckpt: str, prefix: str, n: int, barrier) -> None:
    import os

    os.environ["PATHOSEG_HOME"] = home
    from napari_pathoseg.models.registry import register_model as reg

    barrier.wait()
    for k in range(n):
        reg(ckpt, name=f"{prefix}-{k}", scores={"aji": k / n})


def test_concurrent_registration_keeps_all(tmp_path, home):
    ckpt = save_tiny(tmp_path / "m.safetensors")
    ctx = mp.get_context("spawn")
    n_proc, n_each = 2, 20
    barrier = ctx.Barrier(n_proc)
    procs = [ctx.Process(target=_register_many, args=(str(home), str(ckpt), f"p{i}", n_each, barrier))
             for i in range(n_proc)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * n_proc
    names = {c.name for c in list_models() if not c.shipped}
    assert names == {f"p{i}-{k}" for i in range(n_proc) for k in range(n_each)}
    assert not list(home.glob("*tmp-pathoseg"))


# ---------------------------------------------------------------------------- crafted checkpoints


def _crafted(tmp_path, **changes):
    cfg = tiny_cfg().to_dict()
    extra = changes.pop("extra", None)
    cfg.update(changes)
    if extra is not None:
        cfg["extra"] = extra
    path = tmp_path / "crafted.safetensors"
    save_checkpoint(path, {"G_X2Y": {"w": torch.zeros(1)}}, cfg, {})
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"bogus": 1}, r"unknown keys \['bogus'\]"),
        ({"widths": [4, 100_000]}, r"widths\[1\] = 100000 is out of range"),
        ({"widths": [4, True]}, r"widths\[1\] = True must be an integer"),
        ({"widths": [4] * 20}, "widths has 20 entries"),
        ({"widths": [4096] * 8, "tile_size": 128}, "M-parameter model"),
        ({"widths": [4096, 8], "tile_size": 2048}, "GiB feature maps"),
        ({"mpp": float("nan")}, "mpp = nan must be finite"),
        ({"mpp": -0.5}, r"mpp = -0.5 is out of range \(0"),
        ({"tile_size": 0}, "tile_size = 0 is out of range"),
        ({"tile_size": 20}, "not a valid M2 config.*divisible"),
        ({"norm": "layer"}, "norm = 'layer' is not one of"),
        ({"encoder": "exotic"}, "encoder = 'exotic' is not one of"),
        ({"extra": {"transcycle": {"layers": 100_000}}}, r"extra.transcycle.layers = 100000 is out of range"),
        ({"extra": {"plugin": "x"}}, r"extra has unknown keys \['plugin'\]"),
        ({"lambda_seg": float("inf")}, "lambda_seg = inf must be finite"),
    ],
)
def test_crafted_config_refused(tmp_path, changes, message):
    path = _crafted(tmp_path, **changes)
    for call in (lambda: read_header(path), lambda: load_model(path), lambda: register_model(path, name="c")):
        with pytest.raises(CheckpointError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    read_header(path, validate=False)  # listing a card never builds anything


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_refused(tmp_path, bad):
    def poison(sd):
        w = next(v for v in sd["G_X2Y"].values() if v.is_floating_point() and v.ndim == 4)
        w.view(-1)[3] = bad

    path = save_tiny(tmp_path / "nan.safetensors", edit=poison)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_model(path)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_checkpoint(path, expected_kind="m2")


def test_non_float_weights_refused(tmp_path):
    def to_int(sd):
        key = next(k for k, v in sd["G_X2Y"].items() if v.is_floating_point())
        sd["G_X2Y"][key] = sd["G_X2Y"][key].round().to(torch.int64)

    path = save_tiny(tmp_path / "int.safetensors", edit=to_int)
    with pytest.raises(CheckpointError, match="holds int64 values where the model has float32"):
        load_model(path)


def test_registry_never_imports_methods():
    code = (
        "import sys, napari_pathoseg.models.registry as r; "
        "assert not [m for m in sys.modules if m.startswith('napari_pathoseg.methods')], 'imported a method'; "
        "from napari_pathoseg.models.registry import NucleusModel; "
        "from napari_pathoseg.methods.nuclei.model import NucleusModel as N; assert NucleusModel is N"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------- pathoseg models


def _run_cli(argv):
    from napari_pathoseg.cli import models as cli_models

    parser = argparse.ArgumentParser(prog="pathoseg")
    cli_models.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert args.func(args) == 0
    return buf.getvalue()


def test_cli_models(tmp_path):
    register_model(save_tiny(tmp_path / "m.safetensors"), name="mine", scores={"aji": 0.25, "dice": 0.5})
    rows = json.loads(_run_cli(["models", "--json"]))
    mine = next(r for r in rows if r["name"] == "mine")
    assert mine["task"] == "nuclei" and mine["classes"] == ["nucleus"] and mine["tile_size"] == 16
    assert mine["scores"] == {"aji": 0.25, "dice": 0.5} and mine["path"] == str(tmp_path / "m.safetensors")
    if SHIPPED.is_file():
        lite = next(r for r in rows if r["name"] == DEFAULT_MODEL)
        assert lite["task"] == "nuclei" and lite["mpp"] == 0.5 and lite["shipped"] is True
    tissue = json.loads(_run_cli(["models", "--json", "--task", "tissue"]))
    assert tissue and all(m["task"] == "tissue" for m in tissue) and "mine" not in {m["name"] for m in tissue}
    table = _run_cli(["models", "--task", "nuclei"]).splitlines()
    assert table[0].split() == ["NAME", "TASK", "CLASSES", "MPP", "INPUT", "SCORES", "PATH"]
    assert any(line.startswith("mine (user)") and "aji 0.250 dice 0.500" in line and "16px" in line for line in table)
    slide = json.loads(_run_cli(["models", "--json", "--task", "slide"]))
    assert all(m["task"] == "slide" for m in slide) and "mine" not in {m["name"] for m in slide}


def test_cli_models_none_of_a_task(tmp_path, monkeypatch):
    from napari_pathoseg.models import registry

    empty = tmp_path / "weights"
    empty.mkdir()
    monkeypatch.setattr(registry, "WEIGHTS_DIR", empty)
    assert _run_cli(["models", "--task", "slide"]).strip() == "no slide models registered"


def test_shipped_cards_derived_or_skipped(tmp_path, monkeypatch, caplog):
    """A shipped card lacking task/classes/µm/px gets them from its checkpoint; a broken one is skipped."""
    import napari_pathoseg.models.registry as registry

    weights = tmp_path / "weights"
    save_tiny(weights / "old-card.safetensors")
    (weights / "old-card.json").write_text(json.dumps({"description": "before cards had a task", "scores": {"aji": 0.5}}))
    save_tiny(weights / "broken.safetensors")
    (weights / "broken.json").write_text("{")
    save_tiny(weights / "no-card.safetensors")
    monkeypatch.setattr(registry, "WEIGHTS_DIR", weights)
    with caplog.at_level(logging.WARNING, logger="napari_pathoseg.models"):
        cards = {c.name: c for c in list_models()}
    assert sorted(cards) == ["no-card", "old-card"]
    old = cards["old-card"]
    assert (old.task, old.classes, old.mpp, old.tile_size, old.kind) == ("nuclei", ("nucleus",), 0.5, 16, "m2")
    assert old.shipped and old.scores == {"aji": 0.5} and old.description == "before cards had a task"
    assert any("broken.safetensors skipped" in r.getMessage() for r in caplog.records)
