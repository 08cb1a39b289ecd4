"""M1's networks: the U-Net encoder as classifier (A, C) and the full U-Net as segmenter (B).

The encoder is the contracting path of a U-Net: five double-convolution blocks (3x3
convolution, BatchNorm, ReLU, twice: 10 convolution layers) with a 2x2 max-pool between them
(4 down-samplings). Convolutions are padded, so a 448 x 448 input gives a 28 x 28 bottom map
(448 / 16); with the method's widths 64-128-256-512-1024 that map is 28 x 28 x 1024.

* :class:`MalignancyClassifier` (A and C): ``encoder`` + ``head`` (global average pooling to
  1 x 1 x C, then one fully connected layer with 2 outputs: benign, malignant). Global
  pooling makes any input size valid (a multiple of 16).
* :class:`MalignancySegmenter` (B): the same ``encoder`` + the U-Net expanding path
  (``decoder``: 2x2 transposed convolution halving the width, concatenation with the skip,
  double convolution; four times) + ``out`` (1x1 convolution to one malignant-region logit).

Both networks name their encoder ``encoder``, so A's encoder goes into B's and B's back into
C's by parameter name (``training.task.copy_matching`` with a module-prefix rename).

:data:`PRESETS`: ``m1`` (the method as described: widths 64..1024, 448 px input at 0.5 µm/px,
for a GPU; untrained here) and ``lite`` (the same structure at widths 16..256, 128 px input at
1.0 µm/px, trained on one CPU core).

Examples
--------
>>> import torch
>>> cfg = get_preset("lite")
>>> MalignancyClassifier(cfg)(torch.zeros(2, 3, 64, 64)).shape
torch.Size([2, 2])
>>> MalignancySegmenter(cfg)(torch.zeros(1, 3, 64, 48)).shape
torch.Size([1, 1, 64, 48])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_pathoseg.errors import PathosegError

__all__ = [
    "M1Config",
    "DoubleConv",
    "UNetEncoder",
    "MalignancyClassifier",
    "MalignancySegmenter",
    "PRESETS",
    "get_preset",
    "preset_names",
    "to_input",
    "MULTIPLE",
]

#: Input sides must be a multiple of this (4 down-samplings by 2).
MULTIPLE = 16


@dataclass
class M1Config:
    """Everything that defines an M1 model pair (saved in every checkpoint).

    Attributes
    ----------
    preset : str
        The preset it came from (``"lite"``, ``"m1"``).
    widths : list of int
        Channels of the five encoder blocks (the method: 64, 128, 256, 512, 1024).
    mpp : float
        µm per pixel the networks work at.
    tile_size : int
        Side of the training crops (px at ``mpp``); the classifier's natural input.
    min_size : int
        Smallest image side (px at ``mpp``) the model accepts.
    batch_size : int
        Crops per training step.
    lr : float
        Adam learning rate of every stage.
    weight_decay : float
        Adam weight decay.
    dice_weight : float
        Weight of the soft Dice term in B's loss (plus binary cross-entropy).
    threshold : float
        Default call threshold on C's malignant probability.
    mask_threshold : float
        Default threshold on B's malignant-region probability.
    stage : str
        ``"A"``, ``"B"``, ``"C"`` for a stage's run, ``"BC"`` for a released pair.
    """

    preset: str = "lite"
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])
    mpp: float = 1.0
    tile_size: int = 128
    min_size: int = 64
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    dice_weight: float = 1.0
    threshold: float = 0.5
    mask_threshold: float = 0.5
    stage: str = "BC"

    def __post_init__(self) -> None:
        if len(self.widths) != 5 or any(int(w) < 1 for w in self.widths):
            raise PathosegError(f"M1 needs 5 positive encoder widths, got {self.widths}.")
        if self.tile_size % MULTIPLE or self.min_size % MULTIPLE:
            raise PathosegError(f"tile_size and min_size must be multiples of {MULTIPLE}.")
        if self.stage not in ("A", "B", "C", "BC"):
            raise PathosegError(f"stage must be A, B, C or BC, got {self.stage!r}.")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["widths"] = [int(w) for w in self.widths]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "M1Config":
        return cls(**d)

    def replace(self, **changes: Any) -> "M1Config":
        return dataclasses.replace(self, **changes)


#: The method as described (GPU-sized) and the CPU-sized lite preset of the same structure.
PRESETS: dict[str, M1Config] = {
    "m1": M1Config(preset="m1", widths=[64, 128, 256, 512, 1024], mpp=0.5, tile_size=448, min_size=64,
                   batch_size=8, lr=1e-4),
    "lite": M1Config(preset="lite", widths=[16, 32, 64, 128, 256], mpp=1.0, tile_size=128, min_size=64,
                     batch_size=16, lr=1e-3),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> M1Config:
    """A copy of preset ``name``; an unknown name lists the valid ones."""
    try:
        return PRESETS[name].replace()
    except KeyError:
        raise PathosegError(f"Unknown M1 preset {name!r}; choose one of {preset_names()}.") from None


def to_input(rgb: Any) -> torch.Tensor:
    """(B, H, W, 3) uint8 or float 0-255 -> (B, 3, H, W) float32 network input, ``(x/255 - 0.5) / 0.25``."""
    t = rgb.float() if isinstance(rgb, torch.Tensor) else torch.from_numpy(np.array(rgb, dtype=np.float32))
    return ((t / 255.0 - 0.5) / 0.25).permute(0, 3, 1, 2).contiguous()


class DoubleConv(nn.Sequential):
    """(3x3 convolution, BatchNorm, ReLU) x 2, padded: (B, c_in, H, W) -> (B, c_out, H, W)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        )


class UNetEncoder(nn.Module):
    """The U-Net contracting path: 5 double convolutions (10 conv layers), 4 max-pools.

    ``forward`` returns the five block outputs (strides 1, 2, 4, 8, 16).
    """

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        chans = [3, *widths]
        self.blocks = nn.ModuleList(DoubleConv(chans[i], chans[i + 1]) for i in range(5))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            feats.append(x)
        return feats  # last: (B, widths[4], H/16, W/16)


class MalignancyClassifier(nn.Module):
    """Classifier A / C: encoder, global average pooling, FC(2); (B, 3, H, W) -> (B, 2) logits."""

    def __init__(self, cfg: M1Config) -> None:
        super().__init__()
        self.encoder = UNetEncoder(list(cfg.widths))
        self.head = nn.Linear(cfg.widths[-1], 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bottom = self.encoder(x)[-1]  # (B, C, H/16, W/16)
        return self.head(bottom.mean(dim=(2, 3)))  # (B, 2): benign, malignant


class MalignancySegmenter(nn.Module):
    """Segmenter B: the full U-Net; (B, 3, H, W) -> (B, 1, H, W) malignant-region logits."""

    def __init__(self, cfg: M1Config) -> None:
        super().__init__()
        w = list(cfg.widths)
        self.encoder = UNetEncoder(w)
        self.up = nn.ModuleList(nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2) for i in reversed(range(4)))
        self.decoder = nn.ModuleList(DoubleConv(2 * w[i], w[i]) for i in reversed(range(4)))
        self.out = nn.Conv2d(w[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        y = feats[-1]
        for up, dec, skip in zip(self.up, self.decoder, reversed(feats[:-1])):
            y = dec(torch.cat([up(y), skip], dim=1))
        return self.out(y)
