"""M3 training on the training engine: :class:`M3Task` (multi-scale or single-scale).

One step of the multi-scale task follows M3's three steps, on ``batch_blocks`` blocks at once:

1. the low-resolution blocks (``block_size`` px at ``mpp``) -> loss -> Adam update;
2. the updated network on each block's ``hires_factor ** 2`` high-resolution tiles (same side,
   at ``mpp / hires_factor``), logits stitched by tile position and down-sampled
   (``hires_factor`` x ``hires_factor`` mean) to T1;
3. the network again on the low-resolution blocks -> T2; fused logits ``(T1 + T2) / 2``; the
   loss on the fused map, back-propagated (through both passes unless ``hires_grad`` is off),
   a second Adam update.

The single-scale task (ablation) does step 1 only. The loss is the focal loss
(:func:`napari_pathoseg.training.losses.focal_loss`) or, for the ablation, binary
cross-entropy. Adam (0.9, 0.999, 1e-8) at ``lr``; the engine's ``inverse:<lr_decay>``
schedule gives ``lr0 / (1 + decay * epoch)``.

Validation: pooled pixel ROC AUC and Dice (threshold 0.5) of the whole validation images at
``mpp`` (the inference scale).
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from napari_pathoseg.methods.lesion.data import WEIGHTS, LesionData, LesionImage, block_mean
from napari_pathoseg.methods.lesion.network import LesionFPN, M3Config
from napari_pathoseg.metrics import roc_auc
from napari_pathoseg.training.losses import focal_loss
from napari_pathoseg.training.task import TrainTask

__all__ = ["M3Task", "to_input", "predict_logits", "pixel_scores", "roc_auc", "evaluate_images"]

logger = logging.getLogger(__name__)


def to_input(rgb: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 or float 0-255 -> (B, 3, H, W) float32 network input, ``(x/255 - 0.5) / 0.25``."""
    t = torch.as_tensor(np.asarray(rgb, np.float32) if not isinstance(rgb, torch.Tensor) else rgb).float()
    return ((t / 255.0 - 0.5) / 0.25).permute(0, 3, 1, 2).contiguous()


def predict_logits(net: torch.nn.Module, rgb: np.ndarray, *, device: Any = "cpu", pad_to: int = 64) -> np.ndarray:
    """Logits of one (H, W, 3) image, reflect-padded to at least ``pad_to`` px; (H, W) float32."""
    h, w = rgb.shape[:2]
    ph, pw = max(0, pad_to - h), max(0, pad_to - w)
    x = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode="reflect") if (ph or pw) else rgb
    with torch.inference_mode():
        out = net(to_input(x[None]).to(device))[0, 0, :h, :w]
    return out.float().cpu().numpy()


def pixel_scores(prob: np.ndarray, truth: np.ndarray, *, threshold: float = 0.5) -> dict[str, float]:
    """Pooled pixel ROC AUC and Dice of probabilities vs a {0, 1} truth (flattened arrays)."""
    prob = np.asarray(prob, np.float64).ravel()
    truth = np.asarray(truth).ravel() > 0
    pred = prob >= threshold
    inter = float(np.sum(pred & truth))
    denom = float(pred.sum() + truth.sum())
    dice = 2 * inter / denom if denom else 1.0
    auc = roc_auc(prob, truth)
    return {"auc": auc, "dice": dice, "pixels": int(truth.size), "lesion_fraction": float(truth.mean())}


def evaluate_images(net: torch.nn.Module, images: list[LesionImage], *, factor: int, device: Any = "cpu",
                    per_dataset: bool = False) -> dict[str, Any]:
    """Pooled scores of ``net`` on whole images at the low-resolution scale (``factor`` x coarser than stored)."""
    net.eval()
    probs, truths, by_ds = [], [], {}
    for item in images:
        low = np.clip(np.rint(block_mean(item.image, factor)), 0, 255).astype(np.uint8)
        truth = block_mean(item.mask.astype(np.float32), factor) >= 0.5
        p = 1.0 / (1.0 + np.exp(-predict_logits(net, low, device=device)))
        probs.append(p.ravel())
        truths.append(truth.ravel())
        by_ds.setdefault(item.dataset, ([], []))
        by_ds[item.dataset][0].append(p.ravel())
        by_ds[item.dataset][1].append(truth.ravel())
    res: dict[str, Any] = pixel_scores(np.concatenate(probs), np.concatenate(truths)) if probs else {}
    if per_dataset:
        res["per_dataset"] = {d: {**pixel_scores(np.concatenate(a), np.concatenate(b)), "images": len(a)}
                              for d, (a, b) in sorted(by_ds.items())}
    return res


class M3Task(TrainTask):
    """The M3 lesion training task (multi-scale per ``cfg.multiscale``, focal or BCE loss).

    Parameters
    ----------
    cfg : M3Config
    data : LesionData
        Training blocks are drawn from ``data.train``; validation uses ``data.val``.
    """

    kind = "m3"
    best_metric = "score"
    best_mode = "max"

    def __init__(self, cfg: M3Config, data: LesionData) -> None:
        self.cfg = cfg
        self.data = data
        if not data.train or not data.val:
            from napari_pathoseg.errors import PathosegError

            raise PathosegError("M3 training needs training and validation images; check --data and the split.")

    def config(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    def meta(self) -> dict[str, Any]:
        return {"data_counts": self.data.summary(), "stain_failures": self.data.stain_failures[:50]}

    def build(self, *, device: torch.device, rng: np.random.Generator) -> None:
        self.device, self.rng = device, rng
        self.net = LesionFPN(self.cfg).to(device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=self.cfg.lr, betas=(0.9, 0.999), eps=1e-8)
        by_ds: dict[str, list[LesionImage]] = {}
        for item in self.data.train:
            by_ds.setdefault(item.dataset, []).append(item)
        self._sets = sorted(by_ds.items())
        w = np.array([WEIGHTS.get(d, 0.1) for d, _ in self._sets], np.float64)
        self._p = w / w.sum()

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"net": self.net}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"adam": self.opt}

    # ------------------------------------------------------------------ data
    def _block(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One augmented high-resolution block: image (S, S, 3) float, mask (S, S), weight (S, S)."""
        f, L = self.cfg.hires_factor, self.cfg.block_size
        S = L * f
        rng = self.rng
        items = self._sets[int(rng.choice(len(self._sets), p=self._p))][1]
        item = items[int(rng.integers(len(items)))]
        h, w = item.mask.shape
        y = int(rng.integers(0, max(1, (h - S) // f + 1))) * f
        x = int(rng.integers(0, max(1, (w - S) // f + 1))) * f
        img = np.full((S, S, 3), 255, np.uint8)
        msk = np.zeros((S, S), np.float32)
        wt = np.zeros((S, S), np.float32)
        ch, cw = min(S, h - y), min(S, w - x)
        img[:ch, :cw] = item.image[y:y + ch, x:x + cw]
        msk[:ch, :cw] = item.mask[y:y + ch, x:x + cw]
        wt[:ch, :cw] = 1.0
        k = int(rng.integers(4))
        flip = bool(rng.integers(2))
        stack = [np.rot90(a, k) for a in (img, msk, wt)]
        if flip:
            stack = [a[:, ::-1] for a in stack]
        gain = rng.uniform(0.95, 1.05, size=3).astype(np.float32)  # mild colour jitter
        imf = np.clip(stack[0].astype(np.float32) * gain, 0, 255)
        return imf, np.ascontiguousarray(stack[1]), np.ascontiguousarray(stack[2])

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        f = self.cfg.hires_factor
        while True:
            hi, mh, wh = zip(*(self._block() for _ in range(self.cfg.batch_blocks)))
            hi_a = np.stack(hi)  # (B, S, S, 3)
            low = np.stack([block_mean(a, f) for a in hi])  # (B, L, L, 3)
            m_low = np.stack([block_mean(m, f) for m in mh]) >= 0.5
            w_low = np.stack([block_mean(w, f) for w in wh]) >= 0.5
            yield {
                "low": to_input(low),
                "hi": to_input(hi_a),
                "mask": torch.from_numpy(m_low.astype(np.float32))[:, None],
                "weight": torch.from_numpy(w_low.astype(np.float32))[:, None],
            }

    # ------------------------------------------------------------------ step
    def _loss(self, logits: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.cfg.loss == "focal":
            return focal_loss(logits, mask, alpha=self.cfg.focal_alpha, gamma=self.cfg.focal_gamma, weight=weight)
        bce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")
        return (bce * weight).sum() / weight.sum().clamp_min(1.0)

    def _hires_logits(self, hi: torch.Tensor) -> torch.Tensor:
        """Tiles of each high-resolution block -> stitched logits down-sampled to the block grid (B, 1, L, L)."""
        f, L = self.cfg.hires_factor, self.cfg.block_size
        B = hi.shape[0]
        tiles = hi.reshape(B, 3, f, L, f, L).permute(0, 2, 4, 1, 3, 5).reshape(B * f * f, 3, L, L)
        out = self.net(tiles)  # (B f f, 1, L, L)
        stitched = out.reshape(B, f, f, 1, L, L).permute(0, 3, 1, 4, 2, 5).reshape(B, 1, f * L, f * L)
        return F.avg_pool2d(stitched, f)

    def train_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        dev = self.device
        low, mask, weight = batch["low"].to(dev), batch["mask"].to(dev), batch["weight"].to(dev)
        self.opt.zero_grad(set_to_none=True)
        loss_low = self._loss(self.net(low), mask, weight)
        loss_low.backward()
        self.opt.step()
        out = {"loss": float(loss_low.detach())}
        if not self.cfg.multiscale:
            return out
        self.opt.zero_grad(set_to_none=True)
        hi = batch["hi"].to(dev)
        if self.cfg.hires_grad:
            t1 = self._hires_logits(hi)
        else:
            with torch.no_grad():
                t1 = self._hires_logits(hi)
        t2 = self.net(low)
        loss_fused = self._loss(0.5 * (t1 + t2), mask, weight)
        loss_fused.backward()
        self.opt.step()
        out["fused"] = float(loss_fused.detach())
        return out

    def validate(self) -> dict[str, float]:
        res = evaluate_images(self.net, self.data.val, factor=self.cfg.hires_factor, device=self.device)
        auc = res.get("auc", float("nan"))
        score = 0.5 * ((auc if np.isfinite(auc) else 0.5) + res.get("dice", 0.0))
        return {"auc": auc, "dice": res.get("dice", 0.0), "score": score}
