"""M4's network: ResNet-18 (BasicBlock, 2-2-2-2) and one linear head; the teacher is a copy.

Structure (both presets): a 7x7 stride-2 stem convolution, BatchNorm, ReLU, a 3x3 stride-2
max-pool, four stages of two BasicBlocks (two 3x3 convolutions with BatchNorm and a residual;
the first block of stages 2-4 halves the size with stride 2 and a 1x1 projection), global
average pooling and one linear layer to two logits (negative, positive).

:data:`PRESETS`:

* ``m4`` — the method's network: widths 64-128-256-512 (11.2 M parameters), 512-px tiles at
  0.5 µm/px (about 20x), as M4 describes;
* ``lite`` — the same structure at a quarter of the width (16-32-64-128, 0.7 M parameters) on
  64-px tiles at 1.0 µm/px (a 64 µm field, about 10x), so that it trains on one CPU core.

No pretrained weights are reachable here: both start from random initialisation.

Examples
--------
>>> import torch
>>> net = MilNet(get_preset("lite"))
>>> net(torch.zeros(2, 3, 64, 64)).shape
torch.Size([2, 2])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from napari_pathoseg.errors import PathosegError

__all__ = ["PRESETS", "VARIANTS", "BasicBlock", "MilConfig", "MilNet", "get_preset", "preset_names"]

#: Training variants: the method and the ablation's baselines.
VARIANTS = ("negguide", "selfdistill", "meanpool")


@dataclass
class MilConfig:
    """Everything that defines an M4 slide classifier (saved in every checkpoint).

    Attributes
    ----------
    preset : str
        Name of the preset it came from.
    widths : list of int
        Channels of the four stages (ResNet-18: 64, 128, 256, 512).
    blocks : list of int
        BasicBlocks per stage (ResNet-18: 2, 2, 2, 2).
    mpp : float
        µm per pixel of the tiles.
    tile_size : int
        Tile side in pixels at ``mpp`` (non-overlapping tiles).
    entropy_threshold : float
        Tiles with a grey-level entropy (bits) below it are background.
    variant : str
        Training variant (:data:`VARIANTS`).
    batch : int
        Tiles per pool and step (M4: 64).
    lr : float
        Adam's learning rate.
    momentum : float
        Teacher momentum lambda of ``theta_t <- lambda theta_t + (1 - lambda) theta_s``.
    k : float
        Share of positive tiles among positive-slide tiles (the Sinkhorn constraint).
    sinkhorn_iters : int
        Sinkhorn-Knopp iterations per re-solve.
    sinkhorn_lambda : float
        Sharpness: the transport plan is built from ``probabilities ** lambda``.
    bank_refresh : int
        Re-predict the whole prediction bank with the teacher every this many steps (0: never).
    bag_tiles : int
        ``meanpool`` baseline: tiles per slide bag.
    pooling : str
        Slide pooling of the tile probabilities (:data:`.pooling.POOLINGS`).
    pooling_k : float
        ``k`` of the pooling.
    threshold : float
        Positive call when the pooled probability is at least this.
    """

    preset: str = "lite"
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    blocks: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    mpp: float = 1.0
    tile_size: int = 64
    entropy_threshold: float = 3.0
    variant: str = "negguide"
    batch: int = 64
    lr: float = 1e-3
    momentum: float = 0.99
    k: float = 0.2
    sinkhorn_iters: int = 50
    sinkhorn_lambda: float = 1.0
    bank_refresh: int = 50
    bag_tiles: int = 16
    pooling: str = "topk_mean"
    pooling_k: float = 5
    threshold: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MilConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PathosegError(f"unknown M4 config keys {unknown}")
        cfg = cls(**d)
        if len(cfg.widths) != 4 or len(cfg.blocks) != 4:
            raise PathosegError("an M4 network has four stages: give four widths and four block counts")
        if cfg.variant not in VARIANTS:
            raise PathosegError(f"unknown variant {cfg.variant!r}; use one of {', '.join(VARIANTS)}")
        return cfg


PRESETS: dict[str, MilConfig] = {
    "m4": MilConfig(preset="m4", widths=[64, 128, 256, 512], mpp=0.5, tile_size=512),
    "lite": MilConfig(preset="lite"),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str, **overrides: Any) -> MilConfig:
    """A copy of preset ``name`` with ``overrides``; a typo lists the valid names."""
    if name not in PRESETS:
        raise PathosegError(f"Unknown M4 preset {name!r}; valid presets: {', '.join(PRESETS)}.")
    d = PRESETS[name].to_dict()
    d.update(overrides)
    return MilConfig.from_dict(d)


class BasicBlock(nn.Module):
    """ResNet's BasicBlock: 3x3 conv-BN-ReLU, 3x3 conv-BN, plus the (projected) input, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + idt)


class MilNet(nn.Module):
    """ResNet-18-structured encoder + one linear head (2 logits: negative, positive).

    Parameters
    ----------
    cfg : MilConfig
    """

    def __init__(self, cfg: MilConfig) -> None:
        super().__init__()
        w = list(cfg.widths)
        self.stem = nn.Sequential(
            nn.Conv2d(3, w[0], 7, 2, 3, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        stages, cin = [], w[0]
        for i, (cout, n) in enumerate(zip(w, cfg.blocks)):
            blocks = [BasicBlock(cin, cout, 1 if i == 0 else 2)]
            blocks += [BasicBlock(cout, cout) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, 2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised tiles -> (B, widths[-1]) pooled features."""
        return self.stages(self.stem(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised tiles -> (B, 2) logits."""
        return self.head(self.features(x))


def to_input(batch: Any) -> torch.Tensor:
    """uint8 (B, H, W, 3) array or tensor -> float (B, 3, H, W) in [-1, 1]."""
    t = torch.as_tensor(batch)
    return t.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
