"""Both M5 stages as one resumable run: ``RUN/stage1``, ``RUN/pseudo``, ``RUN/stage2``.

:func:`iter_m5` yields the training engine's events of stage 1, a :class:`PseudoEvent` per
pseudo mask, the engine's events of stage 2, and ends with one :class:`M5Done`:

1. stage 1 (:class:`~.train.Stage1Task`) in ``RUN/stage1``, on the training patches or, when the
   data carry tiles (``TissueData.tiles``), on those tiles and their own labels;
2. Grad-CAM++ pseudo masks of the training patches from stage 1's best checkpoint (with tiles:
   each patch's mask put together tile by tile, :func:`~.cam.tiled_pseudo_mask`), written as
   PNGs to ``RUN/pseudo/`` (atomically; ``manifest.json`` names the checkpoint they came from,
   so a resumed run reuses them and a retrained stage 1 remakes them);
3. stage 2 (:class:`~.train.Stage2Task`) in ``RUN/stage2`` on those masks;
4. the held-out test patches (when they have masks): stage 2 by M5's sliding windows and by
   one fully convolutional pass, their agreement, and the pseudo masks' own mIoU.

``resume=True`` continues whichever stage was running (a finished stage is kept); ``force``
starts both over. With ``supervised=True`` stage 1 is skipped and stage 2 trains on the true
masks of the training patches with plain cross-entropy in ``RUN/supervised`` (the reference
a weakly supervised model is judged against). With ``pseudo_from=RUN`` stage 1 is skipped and
stage 2 trains on the pseudo masks of another run (the ONS vs plain CE ablation on the same masks).
``correct=N`` (with ``pseudo_from``) replaces the pseudo masks of the N training patches the
stage-1 classifier was least confident about (:func:`~.cam.pseudo_confidence`) by their true
masks: a reviewer correcting N pseudo masks, simulated (the 0 / 5 / 10 corrected-patch
measurement; ``RUN/corrected.json`` lists them). With ``reviewed=PROJECT`` stage 1 is skipped and
stage 2 trains on the masks a pathologist accepted or corrected in a tissue review project
(:mod:`.review`; rejected and pending ones are left out). ``stage1_only=True`` stops after stage 1
and scores its pseudo masks on the test patches (the ablation of progressive dropout
attention, which only acts in stage 1).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.methods.tissue.data import TissueData, TissueImage
from napari_pathoseg.methods.tissue.network import (
    M5Config,
    TissueClassifier,
    TissuePSPNet,
)
from napari_pathoseg.methods.tissue.train import Stage1Task, Stage2Task, cam_scores

__all__ = ["M5Done", "PseudoEvent", "StageStart", "evaluate_test", "iter_m5", "make_pseudo_masks", "read_pseudo_masks"]

logger = logging.getLogger(__name__)


@dataclass
class StageStart:
    """A stage begins (``stage``: ``"stage1"``, ``"pseudo"``, ``"stage2"``, ``"test"``)."""

    stage: str
    message: str = ""


@dataclass
class PseudoEvent:
    """One pseudo mask made (``done`` of ``total``)."""

    done: int
    total: int
    name: str


@dataclass
class M5Done:
    """The end of an M5 run."""

    best_checkpoint: Path | None
    cancelled: bool = False
    stage1: dict[str, Any] = field(default_factory=dict)
    stage2: dict[str, Any] = field(default_factory=dict)
    test: dict[str, Any] = field(default_factory=dict)
    message: str = ""


def _load_net(cls: type, path: Path, kind: str, device: Any) -> tuple[torch.nn.Module, M5Config]:
    from napari_pathoseg.models.checkpoint import load_checkpoint, load_state_strict

    tensors, config, _ = load_checkpoint(path, expected_kind=kind)
    cfg = M5Config.from_dict(config)
    net = cls(cfg)
    load_state_strict(net, tensors["net"], what="net", path=path)
    return net.to(device).eval(), cfg


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"


def make_pseudo_masks(classifier: TissueClassifier, train: list[TissueImage], out_dir: Path, *, stamp: str,
                      threshold: float, device: Any = "cpu", cancel: Any = None,
                      tiles: list[TissueImage] | None = None, tile: int = 0) -> Iterator[Any]:
    """Write (or reuse) the Grad-CAM++ pseudo masks; yields :class:`PseudoEvent`, returns {name: mask}.

    With ``tiles`` (cut from ``train``, ``tile`` px) each patch's mask is made tile by tile from
    the tiles' own labels.
    """
    from napari_pathoseg.methods.tissue.cam import tiled_pseudo_mask

    by_parent: dict[str, list[tuple[int, int, tuple[int, ...]]]] = {}
    for t in tiles or []:
        by_parent.setdefault(t.parent, []).append((t.origin[0], t.origin[1], t.labels))
    if tiles:
        stamp = f"{stamp}:tile{tile}"
    from PIL import Image
    from skimage.io import imread

    from napari_pathoseg._atomic import atomic_path, write_json
    from napari_pathoseg.methods.tissue.cam import gradcam_pp, pseudo_mask

    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "manifest.json"
    done: dict[str, Any] = {}
    if manifest.is_file():
        try:
            done = json.loads(manifest.read_text())
        except (OSError, ValueError):
            done = {}
    if done.get("checkpoint") != stamp:
        done = {"checkpoint": stamp, "masks": []}
    masks: dict[str, np.ndarray] = {}
    for i, item in enumerate(train):
        if cancel is not None and cancel.is_set():
            return None
        path = out_dir / f"{item.name}.png"
        if item.name in done["masks"] and path.is_file():
            masks[item.name] = np.asarray(imread(str(path))).astype(np.uint8)
        else:
            if tiles:
                m = tiled_pseudo_mask(classifier, item.image, by_parent.get(item.name, []), tile,
                                      threshold=threshold, device=device)
            else:
                present = [k for k, v in enumerate(item.labels) if v]
                cams = gradcam_pp(classifier, item.image, classes=present, device=device)
                m = pseudo_mask(cams, present, item.image, threshold=threshold)
            with atomic_path(path) as tmp:
                Image.fromarray(m).save(tmp, format="PNG")
            masks[item.name] = m
            done["masks"].append(item.name)
            write_json(manifest, done)
        yield PseudoEvent(i + 1, len(train), item.name)
    return masks


def read_pseudo_masks(run: str | os.PathLike, train: list[TissueImage]) -> list[np.ndarray]:
    """The pseudo masks another run made for ``train`` (``RUN/pseudo``), for an ablation on the same masks."""
    from skimage.io import imread

    folder = Path(run) / "pseudo"
    try:
        done = set(json.loads((folder / "manifest.json").read_text())["masks"])
    except (OSError, ValueError, KeyError, TypeError):
        raise PathosegError(f"{run} holds no finished pseudo masks (pseudo/manifest.json); run its stage 1 first.") from None
    missing = [t.name for t in train if t.name not in done or not (folder / f"{t.name}.png").is_file()]
    if missing:
        raise PathosegError(f"{run}: no pseudo mask for {missing[:3]}; resume that run to make them.")
    out = []
    for t in train:
        m = np.asarray(imread(str(folder / f"{t.name}.png"))).astype(np.uint8)
        if m.shape != t.image.shape[:2]:
            raise PathosegError(f"{run}: pseudo mask of {t.name} has shape {m.shape}, the patch {t.image.shape[:2]}.")
        out.append(m)
    return out


def evaluate_test(net: TissuePSPNet, cfg: M5Config, test: list[TissueImage], *, device: Any = "cpu") -> dict[str, Any]:
    """Test scores: M5's sliding windows, the fully convolutional pass, and their pixel agreement."""
    from napari_pathoseg.methods.tissue.evaluate import (
        confusion,
        miou,
        tissue_map,
        whole_probs,
        window_probs,
    )

    n = cfg.n_classes
    conf = {"window": np.zeros((n + 1, n + 1), np.int64), "whole": np.zeros((n + 1, n + 1), np.int64)}
    same = total = 0
    for item in test:
        if item.mask is None:
            continue
        a = tissue_map(window_probs(net, item.image, tile=cfg.tile_size, device=device), item.image,
                       threshold=cfg.background_grey)
        b = tissue_map(whole_probs(net, item.image, tile=cfg.tile_size, device=device), item.image,
                       threshold=cfg.background_grey)
        conf["window"] += confusion(a, item.mask, n)
        conf["whole"] += confusion(b, item.mask, n)
        same += int((a == b).sum())
        total += a.size
    res: dict[str, Any] = {k: dict(miou(c, cfg.classes), images=sum(1 for i in test if i.mask is not None))
                           for k, c in conf.items()}
    res["window_whole_agreement"] = same / total if total else float("nan")
    return res


def _correct_least_confident(data: TissueData, train2: list[TissueImage], run: Path, n: int, out: Path,
                             cfg: M5Config, dev: Any) -> Iterator[Any]:
    """The true masks of the ``n`` training patches with the least confident pseudo masks (by ``run``'s stage 1)."""
    from napari_pathoseg._atomic import write_json
    from napari_pathoseg.methods.tissue.cam import pseudo_confidence

    if any(t.mask is None for t in data.train) or not data.tiles:
        raise PathosegError("Correcting pseudo masks needs the WSSS4LUAD training masks and --tiles (as the run had).")
    ckpt = run / "stage1" / "best.safetensors"
    if not ckpt.is_file():
        raise PathosegError(f"{run} has no stage-1 best checkpoint to rank its pseudo masks by.")
    clf, _ = _load_net(TissueClassifier, ckpt, "m5-cls", dev)
    by_parent: dict[str, list[tuple[int, int, tuple[int, ...]]]] = {}
    for t in data.tiles:
        by_parent.setdefault(t.parent, []).append((t.origin[0], t.origin[1], t.labels))
    yield StageStart("correct", f"ranking {len(train2)} pseudo masks by the classifier's confidence")
    conf = {t.name: pseudo_confidence(clf, t.image, by_parent.get(t.name, []), data.tile,
                                      threshold=cfg.background_grey, device=dev) for t in train2}
    order = sorted(conf, key=lambda k: (conf[k], k))[:max(0, int(n))]
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "corrected.json", {"from": str(run), "n": len(order), "corrected": order,
                                        "confidence": {k: round(v, 4) for k, v in sorted(conf.items())}})
    truth = {t.name: t.mask for t in data.train}
    return {k: truth[k] for k in order}


def iter_m5(cfg: M5Config, data: TissueData, *, out_dir: str | os.PathLike, epochs1: int, steps1: int, epochs2: int,
            steps2: int, resume: bool = False, force: bool = False, cancel: Any = None, threads: Any = None,
            seed: int = 0, device: Any = None, supervised: bool = False, pseudo_from: str | os.PathLike | None = None,
            meta: dict[str, Any] | None = None, stage1_only: bool = False, correct: int = 0,
            reviewed: str | os.PathLike | None = None) -> Iterator[Any]:
    """Run M5 (see the module docstring); a generator of events ending in :class:`M5Done`."""
    from napari_pathoseg.training.engine import DoneEvent, iter_train, select_device

    out = Path(out_dir).expanduser()
    summ = data.summary()
    meta = dict(meta or {}, split=summ,
                data=f"{summ['source']}: {summ['train']} train patches (image-level labels), {summ['val']} val")
    dev = select_device(device)
    if list(cfg.classes) != list(data.classes):
        raise PathosegError(f"The model's classes {list(cfg.classes)} differ from the data's {list(data.classes)}; "
                            "train a model for these classes (pass --classes).")
    stage1: dict[str, Any] = {}
    if supervised:
        if any(t.mask is None for t in data.train):
            raise PathosegError("The supervised reference needs masks for the training patches.")
        cfg = replace(cfg, loss="ce")
        train2 = data.train
        folder2 = out / "supervised"
        source = "true masks (fully supervised reference)"
    elif reviewed is not None:
        from napari_pathoseg.methods.tissue.review import reviewed_training

        train2, stage1 = reviewed_training(reviewed, cfg.classes)
        folder2 = out / "stage2"
        source = (f"the reviewed pseudo masks of {reviewed} ({stage1['accepted']} accepted, "
                  f"{stage1['corrected']} corrected; {stage1['rejected']} rejected and {stage1['pending']} pending left out)")
    elif pseudo_from is not None:
        train2 = [replace(t, mask=m) for t, m in zip(data.train, read_pseudo_masks(pseudo_from, data.train))]
        stage1 = {"pseudo_from": str(pseudo_from)}
        folder2 = out / "stage2"
        source = f"the pseudo masks of {pseudo_from}"
        if correct:
            fixed = yield from _correct_least_confident(data, train2, Path(pseudo_from), correct, out, cfg, dev)
            train2 = [replace(t, mask=fixed[t.name]) if t.name in fixed else t for t in train2]
            stage1["corrected"] = sorted(fixed)
            source += f", {len(fixed)} of them replaced by their true masks (least confident first)"
    else:
        train1 = [replace(t, mask=None) for t in data.train]  # image-level labels only
        tiles = [replace(t, mask=None) for t in data.tiles]
        what = f"{len(tiles)} labelled {data.tile} px tiles" if tiles else f"{len(train1)} labelled patches"
        yield StageStart("stage1", f"stage 1: classifier on {what}")
        done1 = None
        task1 = Stage1Task(cfg, tiles or train1, data.val, tile=data.tile if tiles else 0, min_share=data.min_share)
        for ev in iter_train(task1, out_dir=out / "stage1", epochs=epochs1,
                             steps_per_epoch=steps1, resume=resume, force=force, cancel=cancel, threads=threads,
                             seed=seed, device=dev, meta=meta):
            yield ev
            if isinstance(ev, DoneEvent):
                done1 = ev
        if done1 is None or done1.cancelled or done1.best_checkpoint is None:
            yield M5Done(None, cancelled=True, message=f"stopped in stage 1; resumable checkpoint {out / 'stage1'}")
            return
        stage1 = {"best_checkpoint": str(done1.best_checkpoint), "best_metrics": done1.best_metrics}
        clf, _ = _load_net(TissueClassifier, Path(done1.best_checkpoint), "m5-cls", dev)
        if stage1_only:  # PDA acts in stage 1 only: score its pseudo masks on the test patches, no stage 2
            test1: dict[str, Any] = {}
            if any(t.mask is not None for t in data.test):
                yield StageStart("test", f"pseudo masks of {len(data.test)} held-out test patches")
                test1["pseudo_masks"] = cam_scores(clf, data.test, cfg.classes, device=dev,
                                                   threshold=cfg.background_grey, tile=data.tile if tiles else 0,
                                                   min_share=data.min_share)
            yield M5Done(None, stage1=stage1, test=test1, message="stage 1 done (stage 1 only)")
            return
        yield StageStart("pseudo", "Grad-CAM++ pseudo masks")
        masks = yield from make_pseudo_masks(clf, train1, out / "pseudo", stamp=_stamp(Path(done1.best_checkpoint)),
                                             threshold=cfg.background_grey, device=dev, cancel=cancel,
                                             tiles=tiles, tile=data.tile)
        if masks is None:
            yield M5Done(None, cancelled=True, stage1=stage1, message="stopped while making pseudo masks")
            return
        train2 = [replace(t, mask=masks[t.name]) for t in train1]
        folder2 = out / "stage2"
        source = "Grad-CAM++ pseudo masks"
    yield StageStart("stage2", f"stage 2: PSPNet ({cfg.loss}) on {source}")
    done2 = None
    for ev in iter_train(Stage2Task(cfg, train2, data.val, mask_source=source), out_dir=folder2, epochs=epochs2,
                         steps_per_epoch=steps2, resume=resume, force=force, cancel=cancel, threads=threads,
                         seed=seed, device=dev, meta=meta):
        yield ev
        if isinstance(ev, DoneEvent):
            done2 = ev
    if done2 is None or done2.cancelled or done2.best_checkpoint is None:
        yield M5Done(None, cancelled=True, stage1=stage1, message=f"stopped in stage 2; resumable checkpoint {folder2}")
        return
    stage2 = {"best_checkpoint": str(done2.best_checkpoint), "best_metrics": done2.best_metrics,
              "best_epoch": done2.best_epoch}
    test: dict[str, Any] = {}
    if any(t.mask is not None for t in data.test):
        yield StageStart("test", f"held-out test on {len(data.test)} patches")
        net, _ = _load_net(TissuePSPNet, Path(done2.best_checkpoint), "m5", dev)
        with torch.inference_mode():
            test = evaluate_test(net, cfg, data.test, device=dev)
        if not supervised and pseudo_from is None and reviewed is None:
            clf, _ = _load_net(TissueClassifier, Path(stage1["best_checkpoint"]), "m5-cls", dev)
            test["pseudo_masks"] = cam_scores(clf, data.test, cfg.classes, device=dev, threshold=cfg.background_grey,
                                              tile=data.tile if data.tiles else 0, min_share=data.min_share)
    yield M5Done(Path(done2.best_checkpoint), stage1=stage1, stage2=stage2, test=test,
                 message=f"done; best checkpoint {done2.best_checkpoint}")
