"""M1's A -> B -> C schedule on the training engine: one resumable run in ``run_dir/{A,B,C}``.

* **A** (:class:`ClassifierTask`, stage ``"A"``): the U-Net-encoder classifier on every
  image label (N1 + N2; masked images are malignant examples), class-balanced batches (half
  benign, half malignant), cross-entropy.
* **B** (:class:`SegmenterTask`): the full U-Net on the few masks (N2): binary cross-entropy
  plus ``dice_weight`` x soft Dice. Its encoder starts from A's best checkpoint
  (``b_init="A"``; every ``classifier.encoder.*`` tensor goes to ``segmenter.encoder.*``;
  ``"scratch"``: random, for the ablation). **Our addition beyond M1's text**
  (``b_negatives``, default :data:`DEFAULT_B_NEGATIVES`): that share of B's crops is drawn
  from *benign* training images with an all-background mask, since a benign image label
  means "no malignant region". Without it B only ever sees malignant images, where every
  gland is malignant, and outlines benign glands too. ``b_negatives=0`` is M1 as described.
* **C** (:class:`ClassifierTask`, stage ``"C"``): A's architecture with the encoder from B's
  best checkpoint (the head fresh), trained again on every image label.

Each stage is its own engine run (``last`` / ``best`` / ``history.json``, lock, Stop), so a
resumed command continues the stage it was in; finished stages are passed through. Crops of
``tile_size`` px at the model's µm/px (smaller images reflect-padded), random 90° rotations,
flips and a light colour jitter (per-channel gain 0.92-1.08, brightness ±10). Adam, cosine
schedule. Validation: ROC AUC / accuracy of whole held-out images (A, C; the best epoch by AUC)
and Dice of held-out masks (B).

At the end C's and B's best weights are written together as ``run_dir/malignancy.safetensors``
(a loadable :class:`~napari_pathoseg.methods.malignancy.model.MalignancyModel`, with its card),
optionally registered under ``register_as``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.events import Progress
from napari_pathoseg.methods.malignancy.data import (
    LabelTable,
    Sample,
    load_samples,
    shared_table,
    user_table,
)
from napari_pathoseg.methods.malignancy.evaluate import (
    benign_scores,
    classify_scores,
    dice_scores,
    mask_counts,
    net_classifier,
    net_segmenter,
    predict_mask,
)
from napari_pathoseg.methods.malignancy.model import WHOLE_IMAGE_FACTOR, pad_to_multiple
from napari_pathoseg.methods.malignancy.network import (
    M1Config,
    MalignancyClassifier,
    MalignancySegmenter,
    get_preset,
    to_input,
)
from napari_pathoseg.training.task import InitReport, TrainTask, copy_matching

__all__ = [
    "DEFAULT_B_NEGATIVES",
    "DEFAULT_EPOCHS",
    "DEFAULT_STEPS",
    "PAIR_NAME",
    "ClassifierTask",
    "MalignancyTrainResult",
    "SegmenterTask",
    "StageEvent",
    "check_negatives",
    "train_malignancy",
]

logger = logging.getLogger(__name__)

#: Epochs per stage and steps per epoch of the lite preset (the shipped run; see the model card).
DEFAULT_EPOCHS = {"A": 8, "B": 8, "C": 6}
DEFAULT_STEPS = 40
#: Share of B's crops drawn from benign images with empty masks (our addition; 0 = M1 as described).
DEFAULT_B_NEGATIVES = 0.5
#: The released pair a run writes into its folder.
PAIR_NAME = "malignancy.safetensors"
_STAGES = ("A", "B", "C")


def _augment(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    img = np.rot90(img, k)
    mask = None if mask is None else np.rot90(mask, k)
    if flip:
        img, mask = img[:, ::-1], (None if mask is None else mask[:, ::-1])
    gain = rng.uniform(0.92, 1.08, size=3).astype(np.float32)
    shift = np.float32(rng.uniform(-10, 10))
    img = np.clip(img.astype(np.float32) * gain + shift, 0, 255)
    return img, (None if mask is None else np.ascontiguousarray(mask))


def _crop(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray | None, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """A random ``size`` x ``size`` crop (images smaller than that are reflect-padded first)."""
    if img.shape[0] < size or img.shape[1] < size:
        img = pad_to_multiple(img[None], multiple=1, minimum=size)[0]
        mask = None if mask is None else pad_to_multiple(mask[None], multiple=1, minimum=size)[0]
    h, w = img.shape[:2]
    y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return img[y:y + size, x:x + size], (None if mask is None else mask[y:y + size, x:x + size])


@dataclass
class StageEvent:
    """A stage of the A -> B -> C run starts (``index`` of ``total``)."""

    stage: str
    index: int
    total: int
    init: str | None

    @property
    def message(self) -> str:
        what = {"A": "classifier A (image labels)", "B": "segmenter B (masks)", "C": "classifier C (image labels)"}
        src = f", encoder from {self.init}" if self.init else ""
        return f"stage {self.stage} ({self.index + 1}/{self.total}): {what[self.stage]}{src}"


@dataclass
class MalignancyTrainResult:
    """The end of :func:`train_malignancy`.

    Attributes
    ----------
    run_dir : Path
    model_path : Path or None
        The released C + B pair (``None`` when the run stopped or did not train both).
    scores : dict
        Per stage, the best validation metrics.
    card : dict or None
    cancelled : bool
    registered : str or None
    """

    run_dir: Path
    model_path: Path | None
    scores: dict[str, Any]
    card: dict[str, Any] | None = None
    cancelled: bool = False
    registered: str | None = None
    stages: dict[str, Any] = field(default_factory=dict)


class _Base(TrainTask):
    kind = "m1"
    best_mode = "max"
    stage = "A"

    def __init__(self, cfg: M1Config, train: list[Sample], val: list[Sample], *, data_meta: dict[str, Any] | None = None):
        self.cfg = cfg.replace(stage=self.stage)
        self.train_samples, self.val_samples = train, val
        self._meta = data_meta or {}

    def config(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    def meta(self) -> dict[str, Any]:
        return {"stage": self.stage, **self._meta}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"adam": self.opt}

    def _init_rename(self, source: Any, src_module: str, dst_module: str) -> InitReport:
        from safetensors.torch import load_file

        from napari_pathoseg.models.checkpoint import read_header, split_state

        read_header(source)
        state = split_state(load_file(str(source), device="cpu"))
        if src_module not in state:
            raise PathosegError(f"{source} has no {src_module} weights to take the encoder from; "
                                "it is not the checkpoint of the previous stage.")
        enc = {f"{src_module}": {k: v for k, v in state[src_module].items() if k.startswith("encoder.")}}
        return copy_matching(self.modules(), enc, rename={f"{src_module}.encoder.": f"{dst_module}.encoder."},
                             source_name=str(source))


class ClassifierTask(_Base):
    """Classifier A (``stage="A"``) or C (``stage="C"``): encoder + global pooling + FC(2)."""

    best_metric = "auc"

    def __init__(self, cfg: M1Config, train: list[Sample], val: list[Sample], *, stage: str = "A",
                 data_meta: dict[str, Any] | None = None) -> None:
        self.stage = stage
        super().__init__(cfg, train, val, data_meta=data_meta)
        labels = {s.label for s in train}
        if labels != {0, 1}:
            raise PathosegError(f"classifier {stage} needs benign and malignant training images.")

    def build(self, *, device: torch.device, rng: np.random.Generator) -> None:
        self.device, self.rng = device, rng
        self.net = MalignancyClassifier(self.cfg).to(device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self._by_class = [[i for i, s in enumerate(self.train_samples) if s.label == c] for c in (0, 1)]

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"classifier": self.net}

    def init_from(self, source: Any) -> InitReport:
        """C from B: B's encoder (``segmenter.encoder.*``) into ``classifier.encoder.*``; the head stays fresh."""
        return self._init_rename(source, "segmenter", "classifier")

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        n, size = self.cfg.batch_size, self.cfg.tile_size
        while True:
            imgs, labels = [], []
            for j in range(n):
                c = j % 2  # class-balanced: half benign, half malignant
                pool = self._by_class[c]
                s = self.train_samples[pool[int(self.rng.integers(len(pool)))]]
                img, _ = _crop(self.rng, s.image, None, size)
                img, _ = _augment(self.rng, img, None)
                imgs.append(img)
                labels.append(c)
            yield {"x": to_input(np.stack(imgs)), "y": torch.tensor(labels, dtype=torch.long)}

    def train_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        self.opt.zero_grad(set_to_none=True)
        logits = self.net(batch["x"].to(self.device))
        loss = F.cross_entropy(logits, batch["y"].to(self.device))
        loss.backward()
        self.opt.step()
        acc = (logits.argmax(1).cpu() == batch["y"]).float().mean()
        return {"loss": float(loss.detach()), "acc": float(acc)}

    def validate(self) -> dict[str, float]:
        res = classify_scores(net_classifier(self.net, device=self.device), self.val_samples,
                              side=WHOLE_IMAGE_FACTOR * self.cfg.tile_size, threshold=self.cfg.threshold,
                              min_size=self.cfg.min_size)
        auc = res.get("auc", float("nan"))
        return {"auc": auc if np.isfinite(auc) else res.get("accuracy", 0.0), "accuracy": res.get("accuracy", 0.0),
                "images": res.get("images", 0)}


def check_negatives(value: Any) -> float:
    """``b_negatives`` as a float in [0, 0.9], or a :class:`PathosegError` saying what to give."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not np.isfinite(value) or not 0.0 <= float(value) <= 0.9:
        raise PathosegError(f"b_negatives must be a share between 0 and 0.9 (0 = M1 as described), got {value!r}.")
    return float(value)


class SegmenterTask(_Base):
    """Segmenter B: the full U-Net on the few masks (BCE + soft Dice).

    With ``negatives`` > 0 that share of each batch's crops comes from benign training images
    with an all-zero mask (our addition beyond M1's text; 0 = M1 as described), and the best
    epoch is chosen by ``dice_all``: the pooled Dice over the held-out masks *and* the held-out
    benign images as empty truths (so marking benign tissue counts against an epoch).
    """

    best_metric = "dice"
    stage = "B"

    def __init__(self, cfg: M1Config, train: list[Sample], val: list[Sample], *, negatives: float = 0.0,
                 data_meta: dict[str, Any] | None = None) -> None:
        self.negatives = check_negatives(negatives)
        super().__init__(cfg, [s for s in train if s.mask is not None], [s for s in val if s.mask is not None],
                         data_meta=data_meta)
        if not self.train_samples:
            raise PathosegError("segmenter B needs training images with masks: give --masks (a folder of masks).")
        if not self.val_samples:
            raise PathosegError("segmenter B needs a held-out image with a mask: give at least 2 masked images.")
        # benign images only: their label says "no malignant region"; unmasked malignant images say nothing
        self.benign_samples = [Sample(s.key, s.dataset, 0, s.image, np.zeros(s.image.shape[:2], np.uint8))
                               for s in train if s.label == 0] if self.negatives > 0 else []
        if self.negatives > 0 and not self.benign_samples:
            raise PathosegError("b_negatives needs benign training images; add some or give --b-negatives 0.")
        self.val_benign = [s for s in val if s.label == 0] if self.negatives > 0 else []
        if self.val_benign:
            self.best_metric = "dice_all"

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "b_negatives": self.negatives, "b_negative_images": len(self.benign_samples)}

    def _pick(self) -> Sample:
        if self.benign_samples and self.rng.random() < self.negatives:
            return self.benign_samples[int(self.rng.integers(len(self.benign_samples)))]
        return self.train_samples[int(self.rng.integers(len(self.train_samples)))]

    def build(self, *, device: torch.device, rng: np.random.Generator) -> None:
        self.device, self.rng = device, rng
        self.net = MalignancySegmenter(self.cfg).to(device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"segmenter": self.net}

    def init_from(self, source: Any) -> InitReport:
        """B from A: A's encoder (``classifier.encoder.*``) into ``segmenter.encoder.*``."""
        return self._init_rename(source, "classifier", "segmenter")

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        n, size = self.cfg.batch_size, self.cfg.tile_size
        while True:
            imgs, masks = [], []
            for _ in range(n):
                s = self._pick()
                img, m = _crop(self.rng, s.image, s.mask, size)
                img, m = _augment(self.rng, img, m)
                imgs.append(img)
                masks.append(m)
            yield {"x": to_input(np.stack(imgs)), "m": torch.from_numpy(np.stack(masks).astype(np.float32))[:, None]}

    def train_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        self.opt.zero_grad(set_to_none=True)
        logits = self.net(batch["x"].to(self.device))
        m = batch["m"].to(self.device)
        bce = F.binary_cross_entropy_with_logits(logits, m)
        p = torch.sigmoid(logits)
        dice = 1 - (2 * (p * m).sum() + 1) / (p.sum() + m.sum() + 1)
        loss = bce + self.cfg.dice_weight * dice
        loss.backward()
        self.opt.step()
        return {"loss": float(loss.detach()), "bce": float(bce.detach())}

    def validate(self) -> dict[str, float]:
        segment = net_segmenter(self.net, device=self.device)
        counts = [mask_counts(segment, s, threshold=self.cfg.mask_threshold) for s in self.val_samples]
        res = dice_scores(counts)
        out = {"dice": res.get("dice", 0.0), "dice_mean": res.get("dice_mean", 0.0),
               "images": res.get("masked_images", 0)}
        if self.val_benign:
            marked = [(float(predict_mask(segment, s.image, threshold=self.cfg.mask_threshold).sum()),
                       float(s.image.shape[0] * s.image.shape[1])) for s in self.val_benign]
            inter, total = sum(c[0] for c in counts), sum(c[1] for c in counts) + sum(m[0] for m in marked)
            out.update(benign_scores(marked), dice_all=2 * inter / total if total else 1.0)
        return out


def _per_stage(value: Any, default: Any, what: str) -> dict[str, int]:
    if value is None:
        value = default
    if isinstance(value, dict):
        bad = sorted(set(value) - set(_STAGES))
        if bad:
            raise PathosegError(f"{what}: unknown stage(s) {bad}; use A, B and C.")
        out = {s: value.get(s, default[s] if isinstance(default, dict) else default) for s in _STAGES}
    else:
        out = {s: value for s in _STAGES}
    for s, v in out.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise PathosegError(f"{what} of stage {s} must be a positive integer, got {v!r}.")
    return {s: int(v) for s, v in out.items()}


def train_malignancy(*, labels: Any = None, masks: str | os.PathLike | None = None,
                     data_root: str | os.PathLike | None = None, run_dir: str | os.PathLike, preset: str = "lite",
                     stages: tuple[str, ...] = _STAGES, epochs: int | dict[str, int] | None = None,
                     steps_per_epoch: int | dict[str, int] | None = None, b_init: str = "A", c_init: str = "B",
                     seed: int = 0, resume: bool = False, force: bool = False, threads: Any = None,
                     device: Any = None, cancel: Any = None, register_as: str | None = None,
                     val_fraction: float = 0.2, image_mpp: float | None = None, split_seed: int = 0,
                     config: dict[str, Any] | None = None, command: str | None = None,
                     b_negatives: float = DEFAULT_B_NEGATIVES) -> Iterator[Any]:
    """Train M1's A -> B -> C in ``run_dir/{A,B,C}``; a generator of events ending in a :class:`MalignancyTrainResult`.

    Parameters
    ----------
    labels : path or LabelTable, optional
        The user's labels (CSV or ``benign/`` + ``malignant/`` folder, :func:`data.user_table`)
        or a ready table; exactly one of ``labels`` and ``data_root``.
    masks : path, optional
        Folder of malignant-region masks named like their images.
    data_root : path, optional
        The shared data folder: train on the built-in table (:func:`data.shared_table`).
    run_dir : path
        The run folder (``A/``, ``B/``, ``C/``, ``malignancy.safetensors``).
    preset : str
        ``"lite"`` or ``"m1"``.
    stages : tuple of str
        Stages to run, in order (``("A", "B", "C")``; the ablation trains ``("B",)`` alone).
    epochs, steps_per_epoch : int or dict, optional
        Per stage (``{"A": 8, ...}``) or one value for all (default :data:`DEFAULT_EPOCHS`,
        :data:`DEFAULT_STEPS`).
    b_init : {"A", "scratch"}
        B's encoder from A's best checkpoint (M1) or random.
    c_init : {"B", "scratch"}
        C's encoder from B's best checkpoint (M1) or random.
    seed : int
        Seed of every stage (weights, sampling).
    resume, force : bool
        Continue the run (each stage where it was; finished stages pass) / start over.
    threads, device, cancel
        As :func:`napari_pathoseg.training.engine.iter_train`.
    register_as : str, optional
        Register the released pair in the user registry under this name.
    val_fraction : float
        Held-out share of the user's images (per class).
    image_mpp : float, optional
        µm/px of user images whose CSV row gives none (default: the model's).
    split_seed : int
        Seed of the built-in table's split and mask choice.
    config : dict, optional
        Overrides of the preset's :class:`M1Config` fields (batch size, tile size...).
    command : str, optional
        The command line, stored in the checkpoints and the card.
    b_negatives : float
        Share of B's crops drawn from benign training images with an empty mask, in [0, 0.9]
        (:data:`DEFAULT_B_NEGATIVES`; our addition, 0 = M1 as described).

    Yields
    ------
    StageEvent, then the engine's events of each stage (with a ``stage`` attribute), then one
    :class:`MalignancyTrainResult`.

    Raises
    ------
    PathosegError
        Bad labels or masks (checked before anything is written), an occupied run folder
        without ``resume`` / ``force``, a stage whose initialisation checkpoint is missing.
    """
    from napari_pathoseg.training.engine import DoneEvent, check_run_folder, iter_train

    stages = tuple(stages)
    if not stages or any(s not in _STAGES for s in stages) or list(stages) != sorted(set(stages)):
        raise PathosegError(f"stages must be a non-empty ordered subset of A, B, C, got {stages}.")
    if b_init not in ("A", "scratch") or c_init not in ("B", "scratch"):
        raise PathosegError(f"b_init must be 'A' or 'scratch' and c_init 'B' or 'scratch' (got {b_init!r}, {c_init!r}).")
    if (labels is None) == (data_root is None):
        raise PathosegError("give either labels (a CSV or a benign/ malignant/ folder) or data_root (the shared data).")
    b_negatives = check_negatives(b_negatives)
    cfg = get_preset(preset)
    if config:
        try:
            cfg = cfg.replace(**config)
        except TypeError as exc:
            raise PathosegError(f"unknown M1 config option: {exc}.") from None
    n_epochs = _per_stage(epochs, DEFAULT_EPOCHS, "epochs")
    n_steps = _per_stage(steps_per_epoch, DEFAULT_STEPS, "steps per epoch")
    run_dir = Path(run_dir).expanduser()
    for s in stages:  # refuse an occupied folder before reading any data
        check_run_folder(run_dir / s, resume=resume, force=force)
    for s, needs, init in (("B", "A", b_init), ("C", "B", c_init)):
        if s in stages and init == needs and needs not in stages and not (run_dir / needs / "best.safetensors").is_file():
            raise PathosegError(f"stage {s} starts from stage {needs}'s best checkpoint, but {run_dir / needs} has none; "
                                f"run stage {needs} first (or start {s} from scratch).")
    if isinstance(labels, LabelTable):
        table = labels
    elif labels is not None:
        table = user_table(labels, masks=masks, image_mpp=image_mpp, model_mpp=cfg.mpp, val_fraction=val_fraction,
                           seed=split_seed)
    else:
        table = shared_table(data_root, seed=split_seed)
    train = load_samples(table.part("train"), mpp=cfg.mpp)
    val = load_samples(table.part("val"), mpp=cfg.mpp)
    data_meta = {"data": table.describe(), "data_counts": table.summary(), "b_init": b_init, "c_init": c_init}
    meta = {"command": command or "train_malignancy(...)", "preset": cfg.preset}
    done_events: dict[str, Any] = {}
    for index, s in enumerate(stages):
        if s == "B":
            task: TrainTask = SegmenterTask(cfg, train, val, negatives=b_negatives, data_meta=data_meta)
            init = run_dir / "A" / "best.safetensors" if b_init == "A" else None
        else:
            task = ClassifierTask(cfg, train, val, stage=s, data_meta=data_meta)
            init = run_dir / "B" / "best.safetensors" if (s == "C" and c_init == "B") else None
        yield StageEvent(s, index, len(stages), None if init is None else f"stage {init.parent.name}")
        for ev in iter_train(task, out_dir=run_dir / s, epochs=n_epochs[s], steps_per_epoch=n_steps[s],
                             resume=resume, force=force, cancel=cancel, threads=threads, seed=seed,
                             schedule="cosine", device=device, init_from=init, meta=dict(meta, stage=s)):
            if not isinstance(ev, Progress):  # the engine's events get the stage; Progress is frozen
                ev.stage = s
            if isinstance(ev, DoneEvent):
                done_events[s] = ev
                if ev.cancelled:
                    yield ev
                    yield MalignancyTrainResult(run_dir, None, _scores(done_events), cancelled=True,
                                                stages=done_events)
                    return
            yield ev
    scores = _scores(done_events)
    pair = run_dir / PAIR_NAME
    have = {s: run_dir / s / "best.safetensors" for s in ("B", "C")}
    if not all(p.is_file() for p in have.values()):
        yield MalignancyTrainResult(run_dir, None, scores, stages=done_events)
        return
    card = _write_run_pair(pair, have["C"], have["B"], cfg=cfg, table=table, scores=scores, name=register_as,
                           command=meta["command"], seed=seed, b_negatives=b_negatives)
    registered = None
    if register_as:
        from napari_pathoseg.models.registry import register_model

        register_model(pair, name=register_as, task="malignancy", data=table.describe(),
                       scores=card["scores"], command=meta["command"])
        registered = register_as
    yield MalignancyTrainResult(run_dir, pair, scores, card=card, registered=registered, stages=done_events)


def _scores(done: dict[str, Any]) -> dict[str, Any]:
    return {s: dict(ev.best_metrics) for s, ev in done.items()}


def _write_run_pair(path: Path, c_best: Path, b_best: Path, *, cfg: M1Config, table: LabelTable,
                    scores: dict[str, Any], name: str | None, command: str, seed: int = 0,
                    b_negatives: float = 0.0) -> dict[str, Any]:
    from napari_pathoseg.methods.malignancy.release import write_pair
    from napari_pathoseg.models.checkpoint import load_checkpoint

    c_t, c_cfg, _ = load_checkpoint(c_best, expected_kind="m1")
    b_t, b_cfg, _ = load_checkpoint(b_best, expected_kind="m1")
    if {k: v for k, v in c_cfg.items() if k != "stage"} != {k: v for k, v in b_cfg.items() if k != "stage"}:
        raise PathosegError(f"{c_best} and {b_best} were trained with different configs; train B and C in one run.")
    c_val, b_val = scores.get("C", {}), scores.get("B", {})
    headline = {k: float(v) for k, v in (("val_auc", c_val.get("auc")), ("val_accuracy", c_val.get("accuracy")),
                                        ("val_dice", b_val.get("dice"))) if isinstance(v, (int, float))}
    card = {
        "name": name or path.parent.name or "malignancy",
        "task": "malignancy",
        "classes": ["benign", "malignant"],
        "kind": "m1",
        "preset": cfg.preset,
        "mpp": cfg.mpp,
        "tile_size": cfg.tile_size,
        "description": f"M1 A -> B -> C ({cfg.preset}): C for the call, B for the malignant region"
                       + (f" (B also saw benign images as empty masks, {b_negatives:.0%} of its crops)"
                          if b_negatives else ""),
        "b_negatives": b_negatives,
        "data": table.describe(),
        "command": command,
        "scores": headline,
        "val": {s: {k: v for k, v in m.items() if isinstance(v, (int, float))} for s, m in scores.items()},
        "created": date.today().isoformat(),
    }
    write_pair(path, classifier=c_t["classifier"], segmenter=b_t["segmenter"], config=cfg, card=card,
               meta={"command": command, "seed": seed, "data_counts": table.summary()}, card_json=False)
    return card
