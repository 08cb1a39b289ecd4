"""Grad-CAM++ class maps of the stage-1 classifier and the pseudo masks made from them.

Grad-CAM++ (Chattopadhay et al., 2018) with the exponential score: for class ``c`` with logit
``S`` and final features ``A`` (K x h x w), ``g = dS/dA``,
``alpha = g² / (2 g² + sum_ij(A) g³)``, channel weights ``w_k = sum_ij alpha relu(g)`` and
the map ``relu(sum_k w_k A_k)``, up-sampled to the image and divided by its maximum.

A pseudo mask gives every tissue pixel the present class (by the patch label) with the highest
map; pixels of the grey > 210 rule are background (0, ignored by stage 2).
:func:`tiled_pseudo_mask` does the same tile by tile, each tile with its own label (the
patch cut into tiles whose labels say which classes each tile holds).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from napari_pathoseg.methods.tissue.data import background_mask

__all__ = ["gradcam_pp", "pad_to", "pseudo_confidence", "pseudo_mask", "tiled_pseudo_mask", "to_input"]


def to_input(rgb: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 (or float 0-255) -> (B, 3, H, W) float32, ``(x / 255 - 0.5) / 0.25``."""
    t = rgb if isinstance(rgb, torch.Tensor) else torch.from_numpy(np.asarray(rgb, np.float32))
    return ((t.float() / 255.0 - 0.5) / 0.25).permute(0, 3, 1, 2).contiguous()


def pad_to(rgb: np.ndarray, size: int, *, multiple: int = 8, value: int = 255) -> np.ndarray:
    """Pad an (H, W, 3) image with white to at least ``size`` and a multiple of ``multiple`` per side."""
    h, w = rgb.shape[:2]
    H = max(size, -(-h // multiple) * multiple)
    W = max(size, -(-w // multiple) * multiple)
    if (H, W) == (h, w):
        return rgb
    out = np.full((H, W, 3), value, np.uint8)
    out[:h, :w] = rgb
    return out


def gradcam_pp(net: torch.nn.Module, rgb: np.ndarray, *, classes: Sequence[int] | None = None,
               device: torch.device | str = "cpu", min_size: int = 64) -> np.ndarray:
    """Grad-CAM++ maps of an (H, W, 3) uint8 patch: (n_classes, H, W) float32 in [0, 1].

    Classes not in ``classes`` (default: all) stay zero. ``net`` is a
    :class:`~napari_pathoseg.methods.tissue.network.TissueClassifier`; it is put in eval mode.
    """
    net.eval()
    h, w = rgb.shape[:2]
    x = to_input(pad_to(rgb, min_size)[None]).to(device)
    with torch.enable_grad():
        feats = net.features(x).detach().requires_grad_(True)
        logits = net.head(feats)[0]
        n = logits.shape[0]
        cams = torch.zeros((n,) + tuple(feats.shape[2:]), device=feats.device)
        for c in (range(n) if classes is None else classes):
            (g,) = torch.autograd.grad(logits[c], feats, retain_graph=True)
            g, a = g[0], feats[0].detach()
            g2, g3 = g * g, g * g * g
            denom = 2 * g2 + a.sum((1, 2), keepdim=True) * g3
            alpha = g2 / torch.where(denom != 0, denom, torch.ones_like(denom))
            wk = (alpha * F.relu(g)).sum((1, 2))
            cams[c] = F.relu((wk[:, None, None] * a).sum(0))
    H, W = x.shape[2:]
    up = F.interpolate(cams[None], size=(H, W), mode="bilinear", align_corners=False)[0, :, :h, :w]
    mx = up.flatten(1).amax(1).clamp_min(1e-8)[:, None, None]
    return (up / mx).detach().cpu().numpy().astype(np.float32)


def pseudo_mask(cams: np.ndarray, present: Sequence[int], rgb: np.ndarray, *, threshold: float = 210.0) -> np.ndarray:
    """Class ids (H, W) uint8 from Grad-CAM++ ``cams``: 1 + the present class with the highest map; 0 = background."""
    present = list(present)
    h, w = rgb.shape[:2]
    if len(present) == 1:
        ids = np.full((h, w), present[0] + 1, np.uint8)
    else:
        sub = cams[present]
        ids = (np.asarray(present)[np.argmax(sub, axis=0)] + 1).astype(np.uint8)
    ids[background_mask(rgb, threshold=threshold)] = 0
    return ids


def tiled_pseudo_mask(net: torch.nn.Module, rgb: np.ndarray, tiles: Sequence[tuple[int, int, Sequence[int]]],
                      size: int, *, threshold: float = 210.0, device: torch.device | str = "cpu") -> np.ndarray:
    """Pseudo mask (H, W) uint8 of a patch from its labelled ``size`` px tiles (y, x, multi-hot labels).

    Each tile gets :func:`pseudo_mask` of its own Grad-CAM++ maps and label (a one-class tile is
    that class; later tiles overwrite the overlap of earlier ones); pixels of no tile are 0 (no
    label), as are background pixels by the grey rule.
    """
    h, w = rgb.shape[:2]
    out = np.zeros((h, w), np.uint8)
    for y, x, labels in tiles:
        crop = rgb[y:y + size, x:x + size]
        present = [k for k, v in enumerate(labels) if v]
        if not present:
            continue
        cams = None if len(present) == 1 else gradcam_pp(net, crop, classes=present, device=device)
        if cams is None:
            ids = np.full(crop.shape[:2], present[0] + 1, np.uint8)
        else:
            ids = (np.asarray(present)[np.argmax(cams[present], axis=0)] + 1).astype(np.uint8)
        out[y:y + size, x:x + size] = ids
    out[background_mask(rgb, threshold=threshold)] = 0
    return out


def pseudo_confidence(net: torch.nn.Module, rgb: np.ndarray, tiles: Sequence[tuple[int, int, Sequence[int]]],
                      size: int, *, threshold: float = 210.0, device: torch.device | str = "cpu") -> float:
    """The classifier's confidence in a patch's tiled pseudo mask: the mean, over its labelled tissue
    pixels, of the margin between the highest and the second-highest Grad-CAM++ map of the tile's
    classes (1 on one-class tiles, whose label decides). Low = the maps hardly told the classes apart."""
    margin = np.full(rgb.shape[:2], np.nan, np.float32)
    for y, x, labels in tiles:
        crop = rgb[y:y + size, x:x + size]
        present = [k for k, v in enumerate(labels) if v]
        if len(present) == 1:
            margin[y:y + size, x:x + size] = 1.0
        elif present:
            top = np.sort(gradcam_pp(net, crop, classes=present, device=device)[present], axis=0)
            margin[y:y + size, x:x + size] = top[-1] - top[-2]
    keep = ~background_mask(rgb, threshold=threshold) & np.isfinite(margin)
    return float(margin[keep].mean()) if keep.any() else 1.0
