"""The ablation's slide-level MIL baseline on M4's encoder: mean pooling of tile probabilities.

``meanpool``: every step draws ``batch // bag_tiles`` positive and as many negative slides
(with replacement), ``bag_tiles`` tissue tiles of each (with replacement when a slide has fewer),
one augmented view per tile. The network (the same ResNet-18 structure + linear head) gives
each tile a positive probability; a bag's probability is their mean, and the loss is the binary
cross-entropy of the bags against their slide labels (Adam). The heat map at inference is the
tile probability, as for M4. No teacher, no prediction bank, no tile pseudo-labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_pathoseg.methods.mil.data import TilePools, augment

__all__ = ["bag_batch", "bag_loss"]


def bag_batch(pools: TilePools, rng: np.random.Generator, *, batch: int, bag_tiles: int) -> dict[str, Any]:
    """Draw positive and negative slide bags; one augmented view of their tiles."""
    n_bags = max(1, batch // bag_tiles)
    tiles, labels = [], []
    for label, pool, owner in ((1, pools.pos, pools.pos_slide), (0, pools.neg, pools.neg_slide)):
        ids = np.unique(owner)
        for sid in rng.choice(ids, n_bags, replace=True):
            idx = np.flatnonzero(owner == sid)
            pick = rng.choice(idx, bag_tiles, replace=len(idx) < bag_tiles)
            tiles.append(pool[pick])
            labels.append(label)
    x = augment(np.concatenate(tiles), rng)
    return {"x": x, "labels": torch.tensor(labels, dtype=torch.float32), "bag_tiles": bag_tiles}


def bag_loss(net: torch.nn.Module, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    """BCE of the mean tile probability of each bag against the bag's slide label."""
    logits = net(batch["x"].to(device))
    p = torch.softmax(logits, dim=1)[:, 1].view(-1, batch["bag_tiles"])
    bag = p.mean(1).clamp(1e-6, 1 - 1e-6)
    y = batch["labels"].to(device)
    loss = F.binary_cross_entropy(bag, y)
    return loss, {"loss": loss.item(), "bag_pos": bag[y > 0.5].mean().item(), "bag_neg": bag[y < 0.5].mean().item()}
