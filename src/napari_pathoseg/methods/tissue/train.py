"""M5 training tasks on the training engine: stage 1 (classifier) and stage 2 (PSPNet).

* :class:`Stage1Task` (kind ``m5-cls``): the multi-label classifier, multi-label soft-margin
  loss, SGD (momentum 0.9, weight decay 5e-4) at ``lr1``; random ``tile_size`` crops of the
  patches (padded with white when smaller) with horizontal flips (p = 0.5); progressive
  dropout attention with a threshold falling linearly from 1.0 (first epoch) to ``pda_final``
  (last epoch). Validation: the soft-margin loss on the val patches and, when they have masks,
  the mIoU of their Grad-CAM++ pseudo masks (``score``; without masks ``score`` = -loss).
* :class:`Stage2Task` (kind ``m5``): PSPNet on pseudo masks (0 = background, ignored), SGD at
  ``lr2``; random crops, flips and 90° rotations; loss :func:`ons_loss` (online noise
  suppression) or plain cross-entropy (``loss="ce"``, the ablation). Validation: mIoU of the
  val patches by whole-patch passes (``score``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.methods.tissue.cam import (
    gradcam_pp,
    pad_to,
    pseudo_mask,
    tiled_pseudo_mask,
    to_input,
)
from napari_pathoseg.methods.tissue.data import TissueImage, tile_labels
from napari_pathoseg.methods.tissue.evaluate import confusion, evaluate_net, miou
from napari_pathoseg.methods.tissue.network import (
    M5Config,
    TissueClassifier,
    TissuePSPNet,
)
from napari_pathoseg.training.task import TrainTask

__all__ = ["Stage1Task", "Stage2Task", "cam_scores", "ce_loss", "ons_loss", "pda_threshold"]

logger = logging.getLogger(__name__)


def _pixel_ce(logits: torch.Tensor, target: torch.Tensor, class_weight: torch.Tensor | None) -> torch.Tensor:
    ce = F.cross_entropy(logits, target.clamp_min(0), reduction="none")  # (B, H, W)
    if class_weight is not None:
        ce = ce * class_weight.to(ce)[target.clamp_min(0)]
    return ce


def ons_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, *,
             class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Online noise suppression: per-pixel CE weighted by softmax(-loss) over each image's pixels, mean 1.

    Parameters
    ----------
    logits : (B, n, H, W)
    target : (B, H, W) int64 class index 0..n-1 (any value where ``valid`` is False)
    valid : (B, H, W) bool, pixels with a pseudo label
    class_weight : (n,) tensor or None
        Class balancing: each pixel's CE times the weight of its (pseudo) class, before the
        suppression weights are computed.
    """
    ce = _pixel_ce(logits, target, class_weight)
    with torch.no_grad():
        neg = (-ce).masked_fill(~valid, float("-inf")).flatten(1)
        w = torch.softmax(neg, 1)
        nv = valid.flatten(1).sum(1, keepdim=True).clamp_min(1)
        w = torch.nan_to_num(w * nv).view_as(ce)  # mean 1 over each image's valid pixels
    return (w * ce * valid).sum() / valid.sum().clamp_min(1)


def ce_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, *,
            class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Plain cross-entropy over the valid pixels (the ablation of :func:`ons_loss`), optionally class-weighted."""
    ce = _pixel_ce(logits, target, class_weight)
    return (ce * valid).sum() / valid.sum().clamp_min(1)


def pda_threshold(cfg: M5Config, epoch: int, epochs: int) -> float:
    """PDA threshold of ``epoch``: 1.0 (nothing erased) at the start down to ``pda_final`` at the end."""
    if not cfg.pda:
        return 1.0
    t = epoch / max(1, epochs - 1)
    return float(1.0 - (1.0 - cfg.pda_final) * t)


def _crop(rng: np.random.Generator, arrays: Sequence[np.ndarray], size: int, fills: Sequence[int]) -> list[np.ndarray]:
    """The same random ``size`` crop of each array (padded with its fill when smaller)."""
    h, w = arrays[0].shape[:2]
    y = int(rng.integers(0, max(0, h - size) + 1))
    x = int(rng.integers(0, max(0, w - size) + 1))
    out = []
    for a, f in zip(arrays, fills):
        c = np.full((size, size) + a.shape[2:], f, a.dtype)
        part = a[y:y + size, x:x + size]
        c[:part.shape[0], :part.shape[1]] = part
        out.append(c)
    return out


def cam_scores(net: TissueClassifier, images: Sequence[TissueImage], classes: Sequence[str], *,
               device: Any = "cpu", threshold: float = 210.0, tile: int = 0, min_share: float = 0.05) -> dict[str, Any]:
    """mIoU of the Grad-CAM++ pseudo masks of ``images`` (with masks) against their masks.

    ``tile`` > 0: the pseudo masks are made tile by tile (:func:`~.cam.tiled_pseudo_mask`) with
    the tile labels derived from each mask, as for the training patches.
    """
    n = len(classes)
    conf = np.zeros((n + 1, n + 1), np.int64)
    for item in images:
        if item.mask is None:
            continue
        if tile:
            tiles = tile_labels(item.mask, tile, n_classes=n, min_share=min_share)
            pm = tiled_pseudo_mask(net, item.image, tiles, tile, threshold=threshold, device=device)
        else:
            present = [i for i, v in enumerate(item.labels) if v]
            cams = gradcam_pp(net, item.image, classes=present, device=device)
            pm = pseudo_mask(cams, present, item.image, threshold=threshold)
        conf += confusion(pm, item.mask, n)
    return miou(conf, classes)


def class_weights(masks: Sequence[np.ndarray], n: int) -> torch.Tensor:
    """Class balancing of stage 2: (n,) weights ∝ 1 / sqrt(pixel share) of each class in ``masks``
    (ids 1..n), scaled to mean 1 over the pixels, clipped to [0.2, 5]; absent classes get 1."""
    counts = np.zeros(n, np.float64)
    for m in masks:
        counts += np.bincount(np.asarray(m).ravel(), minlength=n + 1)[1:n + 1]
    total = counts.sum()
    if total == 0:
        return torch.ones(n)
    share = counts / total
    w = np.where(share > 0, 1.0 / np.sqrt(np.maximum(share, 1e-12)), 1.0)
    w = w / max(1e-12, float((w * share).sum()))
    return torch.tensor(np.clip(w, 0.2, 5.0), dtype=torch.float32)


def _sampler(items: Sequence[TissueImage], balance: bool) -> np.ndarray:
    """Sampling probabilities of ``items``: uniform, or (``balance``) each label vector's group ∝ sqrt(its size)."""
    if not balance:
        return np.full(len(items), 1.0 / len(items))
    groups: dict[tuple[int, ...], int] = {}
    for t in items:
        groups[tuple(t.labels)] = groups.get(tuple(t.labels), 0) + 1
    p = np.array([1.0 / np.sqrt(groups[tuple(t.labels)]) for t in items])
    return p / p.sum()


class Stage1Task(TrainTask):
    """M5 stage 1: the multi-label classifier with progressive dropout attention."""

    kind = "m5-cls"
    best_metric = "score"
    best_mode = "max"

    def __init__(self, cfg: M5Config, train: Sequence[TissueImage], val: Sequence[TissueImage], *,
                 tile: int = 0, min_share: float = 0.05) -> None:
        if not train:
            raise PathosegError("Stage 1 needs labelled training patches.")
        self.cfg, self.train, self.val = cfg, list(train), list(val)
        self.tile, self.min_share = int(tile), float(min_share)
        self._thr = 1.0
        self._p = _sampler(self.train, cfg.balance)

    def config(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    def meta(self) -> dict[str, Any]:
        return {"train": [t.name for t in self.train], "val": [t.name for t in self.val], "stage": 1,
                "tile": self.tile, "min_share": self.min_share}

    def build(self, *, device: torch.device, rng: np.random.Generator) -> None:
        self.device, self.rng = device, rng
        self.net = TissueClassifier(self.cfg).to(device)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=self.cfg.lr1, momentum=0.9, weight_decay=5e-4)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"net": self.net}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"sgd": self.opt}

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        super().on_epoch_start(epoch, epochs)
        self._thr = pda_threshold(self.cfg, epoch, epochs)

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        size = self.tile or self.cfg.tile_size
        while True:
            imgs, labels = [], []
            for _ in range(self.cfg.batch1):
                item = self.train[int(self.rng.choice(len(self.train), p=self._p))]
                (img,) = _crop(self.rng, [item.image], size, [255])
                if self.rng.random() < 0.5:
                    img = img[:, ::-1]
                imgs.append(img)
                labels.append(item.labels)
            yield {"x": to_input(np.ascontiguousarray(np.stack(imgs))), "y": torch.tensor(labels, dtype=torch.float32)}

    def train_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        self.opt.zero_grad(set_to_none=True)
        logits = self.net(batch["x"].to(self.device), pda_threshold=self._thr)
        loss = F.multilabel_soft_margin_loss(logits, batch["y"].to(self.device))
        loss.backward()
        self.opt.step()
        return {"loss": float(loss.detach()), "pda": self._thr}

    def validate(self) -> dict[str, float]:
        self.net.eval()
        losses = []
        with torch.inference_mode():
            for item in self.val:
                x = to_input(pad_to(item.image, 64)[None]).to(self.device)
                y = torch.tensor([item.labels], dtype=torch.float32, device=self.device)
                losses.append(float(F.multilabel_soft_margin_loss(self.net(x), y)))
        out = {"val_loss": float(np.mean(losses)) if losses else float("nan")}
        if any(i.mask is not None for i in self.val):
            out.update(cam_scores(self.net, self.val, self.cfg.classes, device=self.device,
                                  threshold=self.cfg.background_grey, tile=self.tile, min_share=self.min_share))
            out["score"] = out["miou"]
        else:
            out["score"] = -out["val_loss"]
        return out


class Stage2Task(TrainTask):
    """M5 stage 2: PSPNet on (pseudo) masks with online noise suppression or plain CE.

    Parameters
    ----------
    cfg : M5Config
    train : sequence of TissueImage
        Patches whose ``mask`` holds the (pseudo) class ids, 0 = no label.
    val : sequence of TissueImage
        Patches with true masks (mIoU) or without (then ``score`` = -the training loss of the epoch).
    """

    kind = "m5"
    best_metric = "score"
    best_mode = "max"

    def __init__(self, cfg: M5Config, train: Sequence[TissueImage], val: Sequence[TissueImage], *,
                 mask_source: str = "pseudo") -> None:
        if not train or any(t.mask is None for t in train):
            raise PathosegError("Stage 2 needs training patches with (pseudo) masks.")
        self.cfg, self.train, self.val = cfg, list(train), list(val)
        self.mask_source = mask_source
        self._loss = ons_loss if cfg.loss == "ons" else ce_loss
        self._cw = class_weights([t.mask for t in self.train], cfg.n_classes) if cfg.balance else None
        self._last = float("nan")

    def config(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    def meta(self) -> dict[str, Any]:
        return {"train": [t.name for t in self.train], "val": [t.name for t in self.val], "stage": 2,
                "masks": self.mask_source, "task": "tissue", "classes": list(self.cfg.classes),
                "class_weights": None if self._cw is None else [round(float(v), 4) for v in self._cw]}

    def build(self, *, device: torch.device, rng: np.random.Generator) -> None:
        self.device, self.rng = device, rng
        self.net = TissuePSPNet(self.cfg).to(device)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=self.cfg.lr2, momentum=0.9, weight_decay=5e-4)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"net": self.net}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"sgd": self.opt}

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        size = self.cfg.tile_size
        while True:
            imgs, masks = [], []
            for _ in range(self.cfg.batch2):
                item = self.train[int(self.rng.integers(len(self.train)))]
                img, m = _crop(self.rng, [item.image, item.mask], size, [255, 0])
                k = int(self.rng.integers(4))
                img, m = np.rot90(img, k), np.rot90(m, k)
                if self.rng.random() < 0.5:
                    img, m = img[:, ::-1], m[:, ::-1]
                imgs.append(np.ascontiguousarray(img))
                masks.append(np.ascontiguousarray(m))
            m = torch.from_numpy(np.stack(masks).astype(np.int64))
            yield {"x": to_input(np.stack(imgs)), "t": m - 1, "valid": m > 0}

    def train_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        dev = self.device
        self.opt.zero_grad(set_to_none=True)
        logits = self.net(batch["x"].to(dev))
        loss = self._loss(logits, batch["t"].to(dev), batch["valid"].to(dev), class_weight=self._cw)
        loss.backward()
        self.opt.step()
        self._last = float(loss.detach())
        return {"loss": self._last}

    def validate(self) -> dict[str, float]:
        if any(i.mask is not None for i in self.val):
            res = evaluate_net(self.net, self.val, self.cfg.classes, tile=self.cfg.tile_size, mode="whole",
                               device=self.device, threshold=self.cfg.background_grey)
            res["score"] = res["miou"]
            return res
        return {"score": -self._last}
