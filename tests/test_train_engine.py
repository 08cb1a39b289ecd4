"""The training engine on a small real task: a tiny conv net learning nucleus masks of real MoNuSeg crops."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.models.checkpoint import load_checkpoint, read_header, save_checkpoint
from napari_pathoseg.training.engine import (
    DoneEvent,
    EpochEvent,
    StepEvent,
    ThreadPolicy,
    TrainStart,
    ValidationEvent,
    available_cores,
    iter_train,
    resolve_schedule,
    run_train,
)
from napari_pathoseg.training.rundir import LOCK, RunExistsError, RunLock, RunLockedError, TrainingError
from napari_pathoseg.training.task import TrainTask, copy_matching, ema_update

STEM = "TCGA-18-5592-01Z-00-DX1"


@pytest.fixture(scope="module")
def crops(shared_data):
    """A real MoNuSeg image region and its nucleus mask, split into a train and a val part."""
    mon = shared_data / "monuseg_train"
    img = np.asarray(Image.open(mon / "images" / f"{STEM}.png").convert("RGB"))[200:456, 200:456]
    mpath = mon / "instance_masks" / f"{STEM}.png"
    if not mpath.is_file():
        mpath = mon / "instance_masks_reconstructed" / f"{STEM}.png"
    mask = (np.asarray(Image.open(mpath))[200:456, 200:456] > 0).astype(np.float32)
    assert 0.05 < mask.mean() < 0.7  # a real target: nuclei and background
    return {"train": (img[:, :192], mask[:, :192]), "val": (img[:, 192:], mask[:, 192:])}


def _tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div(127.5).sub(1.0)


class TinySeg(TrainTask):
    """Two 3x3 convolutions and a 1x1 head; BCE against the nucleus mask."""

    kind = "tiny-seg"
    best_metric = "val_loss"
    best_mode = "min"

    def __init__(self, crops, *, width=8, lr=1e-2, crop=48, batch=4, out_channels=1, aux=False):
        self.crops, self.width, self.lr, self.crop, self.batch = crops, width, lr, crop, batch
        self.out_channels, self.aux = out_channels, aux
        self.threads_seen: list[int] = []

    def config(self):
        return {"width": self.width, "lr": self.lr, "crop": self.crop, "batch": self.batch,
                "out_channels": self.out_channels, "aux": self.aux}

    def build(self, *, device, rng):
        w = self.width
        self.net = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(w, self.out_channels, 1)).to(device)
        self.mods = {"net": self.net}
        if self.aux:
            self.mods["aux"] = nn.Conv2d(3, 2, 1).to(device)
        params = [p for m in self.mods.values() for p in m.parameters()]
        self.opt = torch.optim.Adam(params, lr=self.lr)
        self.rng, self.device = rng, device

    def modules(self):
        return self.mods

    def optimizers(self):
        return {"adam": self.opt}

    def batches(self):
        img, mask = self.crops["train"]
        c = self.crop
        while True:
            rows = self.rng.integers(0, img.shape[0] - c, self.batch)
            cols = self.rng.integers(0, img.shape[1] - c, self.batch)
            x = torch.stack([_tensor(img[r:r + c, q:q + c]) for r, q in zip(rows, cols)])
            y = torch.stack([torch.from_numpy(mask[r:r + c, q:q + c]) for r, q in zip(rows, cols)])[:, None]
            yield x, y

    def train_step(self, batch, step):
        self.threads_seen.append(torch.get_num_threads())
        x, y = batch
        self.opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(self.net(x)[:, :1], y)
        loss.backward()
        self.opt.step()
        return {"bce": float(loss.detach())}

    @torch.no_grad()
    def validate(self):
        img, mask = self.crops["val"]
        logits = self.net(_tensor(img)[None])[:, :1]
        y = torch.from_numpy(mask)[None, None]
        p = torch.sigmoid(logits) > 0.5
        dice = 2 * (p & (y > 0)).sum() / (p.sum() + (y > 0).sum()).clamp_min(1)
        return {"val_loss": float(nn.functional.binary_cross_entropy_with_logits(logits, y)), "dice": float(dice)}


class EMASeg(TinySeg):
    """TinySeg with an M4-style momentum teacher and a prediction bank as extra state."""

    kind = "tiny-ema"

    def build(self, *, device, rng):
        super().build(device=device, rng=rng)
        self.teacher = copy.deepcopy(self.net)
        self.bank = torch.zeros(4)

    def after_step(self, step):
        ema_update(self.teacher, self.net, momentum=0.9)
        with torch.no_grad():
            self.bank[step % 4] = float(self.teacher[0].weight.mean())

    def state_tensors(self):
        out = {f"teacher.{k}": v for k, v in self.teacher.state_dict().items()}
        out["bank"] = self.bank
        return out

    def load_state_tensors(self, tensors):
        self.teacher.load_state_dict({k[len("teacher."):]: v for k, v in tensors.items() if k.startswith("teacher.")})
        self.bank = tensors["bank"].clone()


def _train(task, out, **kw):
    kw.setdefault("epochs", 2)
    kw.setdefault("steps_per_epoch", 6)
    kw.setdefault("threads", 1)
    kw.setdefault("device", "cpu")
    return list(iter_train(task, out_dir=out, **kw))


def _net_weights(path):
    return load_checkpoint(path, expected_kind=read_header(path)["kind"])[0]


def test_loss_goes_down_and_last_best_history_written(tmp_path, crops):
    events = _train(TinySeg(crops), tmp_path, epochs=2, steps_per_epoch=15)
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "TrainStart" and kinds[-1] == "DoneEvent"
    assert kinds.count("StepEvent") == 30 and kinds.count("EpochEvent") == 2
    # validation is announced before every epoch event
    for i, k in enumerate(kinds):
        if k == "EpochEvent":
            assert kinds[i - 1] == "ValidationEvent"
    losses = [e.losses["bce"] for e in events if isinstance(e, StepEvent)]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])  # it learns the real target
    epochs = [e for e in events if isinstance(e, EpochEvent)]
    assert epochs[1].losses["bce"] < epochs[0].losses["bce"]
    done: DoneEvent = events[-1]
    assert not done.cancelled and done.best_checkpoint.is_file() and done.last_checkpoint.is_file()
    assert done.best_epoch == min(range(2), key=lambda i: epochs[i].val_metrics["val_loss"])  # "min" mode
    best = read_header(done.best_checkpoint)
    assert best["kind"] == "tiny-seg" and best["meta"]["epoch"] == done.best_epoch
    assert set(best["keys"]) == {k for k in best["keys"] if k.startswith("net.")}  # modules only
    last = read_header(done.last_checkpoint)["meta"]
    assert (last["epoch"], last["step"], last["finished"]) == (2, 0, True)
    hist = json.loads((tmp_path / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [0, 1] and hist[0]["val"]["val_loss"] == epochs[0].val_metrics["val_loss"]
    assert not (tmp_path / LOCK).exists()  # the lock goes with the run


def test_resume_continues_exactly(tmp_path, crops):
    """1 epoch + resume to 2 == 2 epochs at once: weights, optimiser state and RNG all carried over."""
    _train(TinySeg(crops), tmp_path / "a", epochs=2)
    _train(TinySeg(crops), tmp_path / "b", epochs=1)
    events = _train(TinySeg(crops), tmp_path / "b", epochs=2, resume=True)
    start = events[0]
    assert isinstance(start, TrainStart) and start.resumed and (start.epoch, start.step) == (1, 0)
    assert {e.epoch for e in events if isinstance(e, StepEvent)} == {1}
    wa, wb = _net_weights(tmp_path / "a" / "last.safetensors"), _net_weights(tmp_path / "b" / "last.safetensors")
    assert set(wa["opt_adam"]) == set(wb["opt_adam"]) and wa["opt_adam"]
    for group in ("net", "opt_adam"):
        for k in wa[group]:
            torch.testing.assert_close(wa[group][k], wb[group][k], rtol=0, atol=0)
    assert len(events[-1].history) == 2


def test_cancel_mid_epoch_saves_resumable_checkpoint(tmp_path, crops):
    cancel = threading.Event()
    events = []
    for ev in iter_train(TinySeg(crops), out_dir=tmp_path / "c", epochs=2, steps_per_epoch=6, cancel=cancel,
                         threads=1, device="cpu"):
        events.append(ev)
        if isinstance(ev, StepEvent) and ev.step == 2:
            cancel.set()
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.cancelled and done.last_checkpoint.is_file()
    assert done.best_checkpoint is None and done.history == []
    meta = read_header(done.last_checkpoint)["meta"]
    assert (meta["epoch"], meta["step"], meta["finished"]) == (0, 3, False)
    assert not any(isinstance(e, ValidationEvent) for e in events)
    # resuming finishes the run exactly as an uninterrupted one
    rest = _train(TinySeg(crops), tmp_path / "c", resume=True)
    steps = [(e.epoch, e.step) for e in rest if isinstance(e, StepEvent)]
    assert steps[0] == (0, 3) and len(steps) == 9
    epoch0 = next(e for e in rest if isinstance(e, EpochEvent))
    assert set(epoch0.losses) == {"bce"}  # the epoch mean includes the steps before the stop
    _train(TinySeg(crops), tmp_path / "u")
    wa, wb = _net_weights(tmp_path / "u" / "last.safetensors"), _net_weights(tmp_path / "c" / "last.safetensors")
    for k in wa["net"]:
        torch.testing.assert_close(wa["net"][k], wb["net"][k], rtol=0, atol=0)
    hist_u = json.loads((tmp_path / "u" / "history.json").read_text())
    hist_c = json.loads((tmp_path / "c" / "history.json").read_text())
    assert hist_c[0]["losses"]["bce"] == pytest.approx(hist_u[0]["losses"]["bce"])


def test_refuses_an_existing_run_without_resume_or_force(tmp_path, crops):
    _train(TinySeg(crops), tmp_path, epochs=1, steps_per_epoch=2)
    with pytest.raises(RunExistsError, match=r"finished training run.*--resume.*--force"):
        _train(TinySeg(crops), tmp_path, epochs=1, steps_per_epoch=2)
    assert not (tmp_path / LOCK).exists()
    events = _train(TinySeg(crops), tmp_path, epochs=1, steps_per_epoch=2, force=True, seed=5)
    assert not events[0].resumed and events[-1].best_checkpoint.is_file()
    assert read_header(tmp_path / "last.safetensors")["meta"]["seed"] == 5
    # a different config is refused on resume
    with pytest.raises(TrainingError, match="different config .*width"):
        _train(TinySeg(crops, width=4), tmp_path, epochs=2, steps_per_epoch=2, resume=True)


def test_lock_refuses_a_second_process_and_takes_over_a_stale_one(tmp_path, crops, caplog):
    code = (
        "import sys, time; from napari_pathoseg.training.rundir import RunLock; "
        "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"process {proc.pid}"):
            _train(TinySeg(crops), tmp_path, epochs=1, steps_per_epoch=1)
    finally:
        proc.kill()
        proc.wait()
    # the holder died without removing its lock: the next run takes it over
    assert (tmp_path / LOCK).read_text().split()[0] == str(proc.pid)
    with caplog.at_level(logging.WARNING, logger="napari_pathoseg.training.rundir"):
        events = _train(TinySeg(crops), tmp_path, epochs=1, steps_per_epoch=1)
    assert isinstance(events[-1], DoneEvent) and "stale" in caplog.text
    assert not (tmp_path / LOCK).exists()
    # two runs of one process into one folder: the second is refused while the first is open
    first = iter_train(TinySeg(crops), out_dir=tmp_path / "p", epochs=1, steps_per_epoch=1, threads=1)
    assert isinstance(next(first), TrainStart)
    with pytest.raises(RunLockedError, match="this process"):
        next(iter_train(TinySeg(crops), out_dir=tmp_path / "p", epochs=1, steps_per_epoch=1, force=True))
    first.close()
    assert not (tmp_path / "p" / LOCK).exists()
    with RunLock(tmp_path / "p"):
        assert (tmp_path / "p" / LOCK).is_file()


def test_init_from_copies_matching_weights_and_reports_the_rest(tmp_path, crops):
    # source: same trunk, a two-channel head (shape mismatch) and an extra module (unused)
    torch.manual_seed(3)
    src = TinySeg(crops, out_channels=2)
    src.build(device=torch.device("cpu"), rng=np.random.default_rng(0))
    path = save_checkpoint(tmp_path / "src.safetensors",
                           {"net": src.net.state_dict(), "head": nn.Linear(2, 2).state_dict()}, {}, {}, kind="other")
    events = _train(TinySeg(crops, aux=True), tmp_path / "run", epochs=1, steps_per_epoch=1, init_from=path)
    rep = events[0].init
    assert sorted(rep.copied) == ["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"]
    assert sorted(rep.shape_mismatch) == ["net.4.bias", "net.4.weight"]
    assert sorted(rep.missing) == ["aux.bias", "aux.weight"] and rep.unused == ["head.bias", "head.weight"]
    assert not rep.complete and "4 of 8 tensors" in rep.summary()
    # the copied weights are the source's (before the one training step moved them)
    task = TinySeg(crops, aux=True)
    task.build(device=torch.device("cpu"), rng=np.random.default_rng(0))
    task.init_from(path)
    torch.testing.assert_close(task.net[0].weight, src.net[0].weight)
    # a module as source; and a prefix map (M1: classifier A's encoder into segmenter B's)
    rep2 = task.init_from(src.net)
    assert len(rep2.copied) == 4 and len(rep2.shape_mismatch) == 2
    a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    rep3 = copy_matching({"net": task.net}, {"A": {"0.weight": a[0].weight.data, "0.bias": a[0].bias.data}},
                         rename={"A.": "net."})
    assert sorted(rep3.copied) == ["net.0.bias", "net.0.weight"]
    torch.testing.assert_close(task.net[0].weight, a[0].weight)
    # init_from is for fresh runs: a resumed run keeps its own weights
    resumed = _train(TinySeg(crops, aux=True), tmp_path / "run", epochs=2, steps_per_epoch=1, init_from=path,
                     resume=True)
    assert resumed[0].resumed and resumed[0].init is None


def test_ema_hook_and_state_tensors_round_trip(tmp_path, crops):
    t = nn.Linear(2, 1)
    s = nn.Linear(2, 1)
    before = t.weight.detach().clone()
    ema_update(t, s, momentum=0.75)
    torch.testing.assert_close(t.weight, 0.75 * before + 0.25 * s.weight)
    # the teacher follows the student during training
    task = EMASeg(crops)
    _train(task, tmp_path / "full", epochs=2, steps_per_epoch=4)
    assert not torch.equal(task.teacher[0].weight, task.net[0].weight)
    assert float(task.bank.abs().sum()) > 0
    # stop mid-run, resume: the teacher and the bank come back from the checkpoint
    cancel = threading.Event()
    for ev in iter_train(EMASeg(crops), out_dir=tmp_path / "cut", epochs=2, steps_per_epoch=4, threads=1,
                         device="cpu", cancel=cancel):
        if isinstance(ev, StepEvent) and ev.epoch == 1 and ev.step == 1:
            cancel.set()
    assert "state.bank" in read_header(tmp_path / "cut" / "last.safetensors")["keys"]
    resumed = EMASeg(crops)
    _train(resumed, tmp_path / "cut", epochs=2, steps_per_epoch=4, resume=True)
    torch.testing.assert_close(resumed.teacher[0].weight, task.teacher[0].weight, rtol=0, atol=0)
    torch.testing.assert_close(resumed.bank, task.bank, rtol=0, atol=0)


def test_threads_default_to_every_usable_core_and_are_restored(tmp_path, crops, monkeypatch):
    before = torch.get_num_threads()
    task = TinySeg(crops)
    _train(task, tmp_path / "a", epochs=1, steps_per_epoch=2, threads=None)
    assert set(task.threads_seen) == {available_cores()}
    assert torch.get_num_threads() == before
    if hasattr(os, "sched_getaffinity"):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
        task3 = TinySeg(crops)
        events = _train(task3, tmp_path / "b", epochs=1, steps_per_epoch=1, threads=None)
        assert task3.threads_seen == [3] and events[0].threads == 3  # not a fixed number
    task1 = TinySeg(crops)
    _train(task1, tmp_path / "c", epochs=1, steps_per_epoch=1, threads=1)
    assert task1.threads_seen == [1]
    assert torch.get_num_threads() == before
    # "auto": every usable core on a quiet machine, 1 while it is busier than its cores
    monkeypatch.setattr(os, "getloadavg", lambda: (available_cores() + 5.0, 0.0, 0.0))
    busy = TinySeg(crops)
    _train(busy, tmp_path / "d", epochs=1, steps_per_epoch=2, threads="auto")
    assert busy.threads_seen == [1, 1]
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    assert ThreadPolicy("auto").want() == available_cores()
    with pytest.raises(TrainingError, match="'auto'"):
        ThreadPolicy("many")
    assert torch.get_num_threads() == before


def test_schedule_scales_every_group(tmp_path, crops):
    lrs = []

    class Record(TinySeg):
        def train_step(self, batch, step):
            lrs.append(self.opt.param_groups[0]["lr"])
            return super().train_step(batch, step)

    events = _train(Record(crops, lr=0.01), tmp_path, epochs=3, steps_per_epoch=1, schedule="inverse:0.5")
    assert lrs == pytest.approx([0.01, 0.01 / 1.5, 0.01 / 2.0])
    assert [e.lr_factor for e in events if isinstance(e, StepEvent)] == pytest.approx([1, 1 / 1.5, 0.5])
    name, f = resolve_schedule("cyclegan")
    assert [f(e, 4) for e in range(4)] == pytest.approx([1.0, 1.0, 1.0, 0.5])
    with pytest.raises(PathosegError, match="valid: .*constant.*cyclegan"):
        resolve_schedule("linear")


def test_bad_lengths_and_run_train(tmp_path, crops):
    with pytest.raises(TrainingError, match=">= 1"):
        _train(TinySeg(crops), tmp_path, epochs=0)
    seen = []
    done = run_train(TinySeg(crops), out_dir=tmp_path / "r", epochs=1, steps_per_epoch=1, threads=1, progress=seen.append)
    assert isinstance(done, DoneEvent) and seen[-1] is done and seen[1].done == 1 and seen[1].total == 1
