"""Losses of the M2 teacher: least-squares GAN, cycle L1 and segmentation.

``total = lambda_adv * adversarial + lambda_cyc * cycle + lambda_seg * segmentation``
(``lambda_adv`` is the method's ``lambda_X2Y``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "lsgan_d_loss",
    "lsgan_g_loss",
    "cycle_loss",
    "soft_dice_loss",
    "segmentation_loss",
    "focal_loss",
]


def lsgan_d_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator LSGAN loss ``1/2 E[(1 - D(real))^2] + 1/2 E[D(fake)^2]``.

    ``d_real``/``d_fake``: PatchGAN score maps (B, 1, h, w); ``d_fake`` must be
    computed on detached generator output.
    """
    return 0.5 * ((1.0 - d_real) ** 2).mean() + 0.5 * (d_fake**2).mean()


def lsgan_g_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """Generator LSGAN loss ``1/2 E[(D(G(x)) - 1)^2]`` on scores (B, 1, h, w)."""
    return 0.5 * ((d_fake - 1.0) ** 2).mean()


def cycle_loss(recon: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Cycle-consistency L1 ``E|G_Y2X(G_X2Y(x)) - x|_1`` on (B, 3, H, W) images."""
    return (recon - original).abs().mean()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``1 - soft Dice`` of sigmoid(logits) (B, H, W) vs a {0, 1} target (B, H, W)."""
    p = torch.sigmoid(logits)
    if weight is not None:
        p = p * weight
        target = target * weight
    inter = (p * target).sum()
    return 1.0 - (2.0 * inter + 1.0) / (p.sum() + target.sum() + 1.0)


def segmentation_loss(
    logits: torch.Tensor,
    nuclei: torch.Tensor,
    boundary: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    *,
    lambda_boundary: float = 1.0,
    lambda_dice: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Segmentation loss of the seg decoder.

    Parameters
    ----------
    logits : (B, C, H, W) tensor
        Channel 0 nucleus logit; channel 1 (if C > 1) boundary logit.
    nuclei, boundary : (B, H, W) float tensors in {0, 1}
    weight : (B, H, W) float tensor or None
        Per-pixel weights (0 on padding; pseudo-label confidence).
    lambda_boundary, lambda_dice : float
        Weights of the boundary BCE and of the nucleus soft-Dice term.

    Returns
    -------
    loss : scalar tensor
        ``BCE(nuclei) + lambda_dice * Dice(nuclei) + lambda_boundary * BCE(boundary)``.
    parts : dict of float
    """
    w = torch.ones_like(nuclei) if weight is None else weight
    norm = w.sum().clamp_min(1.0)
    bce = (F.binary_cross_entropy_with_logits(logits[:, 0], nuclei, reduction="none") * w).sum() / norm
    dice = soft_dice_loss(logits[:, 0], nuclei, w)
    loss = bce + lambda_dice * dice
    parts = {"seg_bce": float(bce.detach()), "seg_dice": float(dice.detach())}
    if logits.shape[1] > 1 and boundary is not None:
        # Boundaries are rare (~10% of pixels): weight positives 3x.
        pw = torch.tensor(3.0, device=logits.device)
        bb = F.binary_cross_entropy_with_logits(logits[:, 1], boundary, reduction="none", pos_weight=pw)
        bb = (bb * w).sum() / norm
        loss = loss + lambda_boundary * bb
        parts["seg_boundary"] = float(bb.detach())
    return loss, parts


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float = 0.5,
    gamma: float = 2.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Binary focal loss (Lin et al. 2017; M3), mean over (weighted) pixels.

    ``-alpha (1-p)^gamma log p`` on positive pixels, ``-(1-alpha) p^gamma log(1-p)`` on the
    rest, ``p = sigmoid(logits)``; computed from logits (stable). ``gamma = 0`` and
    ``alpha = 0.5`` give half the binary cross-entropy.

    Parameters
    ----------
    logits, target : tensors of the same shape
        Target in [0, 1] (soft targets mix both terms).
    alpha, gamma : float
        Class balance (M3's xi) and focusing parameter.
    weight : tensor or None
        Per-pixel weights (0 ignores a pixel).
    """
    logp = F.logsigmoid(logits)
    log1mp = F.logsigmoid(-logits)
    p = logp.exp()
    loss = -alpha * target * (1.0 - p) ** gamma * logp - (1.0 - alpha) * (1.0 - target) * p**gamma * log1mp
    if weight is None:
        return loss.mean()
    return (loss * weight).sum() / weight.sum().clamp_min(1.0)
