"""M3's network: a fully convolutional Feature Pyramid Network on a bottleneck ResNet.

Bottom-up: a ResNet stem (7x7 stride-2 convolution, 3x3 stride-2 max-pool) and four stages of
bottleneck units (1x1 / 3x3 / 1x1 convolutions, the 3x3 carrying the stride-2 down-sampling)
giving C2..C5 at strides 4, 8, 16, 32. Top-down: P5 = 1x1(C5); P_i = bilinear-up(P_{i+1}) +
1x1(C_i), then a 3x3 convolution (BatchNorm + ReLU) on each sum. The head turns P2 into one
logit channel (3x3 convolution, BatchNorm, ReLU, 1x1 convolution) that is up-sampled
bilinearly to the input size; ``sigmoid`` gives the lesion probability map.

:data:`PRESETS` holds the method-sized network (``m3``: ResNet-50, blocks 3-4-6-3, widths
64-2048, 256 FPN channels) and ``lesion-lite``, the same structure narrowed and shortened to
train on a CPU. No pretrained weights are reachable here: every preset starts from random
initialisation (the method's ResNet-50 would normally start from ImageNet weights).

Examples
--------
>>> import torch
>>> cfg = get_preset("lesion-lite")
>>> net = LesionFPN(cfg)
>>> net(torch.zeros(1, 3, 64, 64)).shape
torch.Size([1, 1, 64, 64])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from napari_pathoseg.errors import PathosegError

__all__ = ["M3Config", "LesionFPN", "Bottleneck", "PRESETS", "get_preset", "preset_names"]


@dataclass
class M3Config:
    """Everything that defines an M3 lesion model (saved in every checkpoint).

    Attributes
    ----------
    preset : str
        Name of the preset it came from.
    blocks : list of int
        Bottleneck units per stage (4 stages; ResNet-50: 3, 4, 6, 3).
    base_width : int
        Inner width of stage 1's bottlenecks (doubles per stage; ResNet-50: 64).
    expansion : int
        Output width / inner width of a bottleneck (ResNet: 4).
    stem_channels : int
        Channels of the 7x7 stem convolution.
    fpn_channels : int
        Channels of the top-down pathway.
    head_channels : int
        Channels of the 3x3 convolution before the logit.
    mpp : float
        µm per pixel of the low-resolution input (the inference level).
    hires_factor : int
        Scale ratio of the high-resolution tiles to the low-resolution block (M3: 8).
    block_size : int
        Side of a low-resolution block in pixels (M3: 512); each block has
        ``hires_factor ** 2`` high-resolution tiles of this side.
    tile_size : int
        Inference tile side in pixels at ``mpp`` (M3: 512).
    multiscale : bool
        Train with M3's three-step multi-scale step (else: single-scale on blocks).
    loss : {"focal", "bce"}
        Training loss (``bce``: the ablation's plain cross-entropy).
    focal_alpha, focal_gamma : float
        Class balance xi and focusing gamma of the focal loss.
    lr : float
        Adam's initial learning rate (M3: 1e-3).
    lr_decay : float
        ``lr = lr0 / (1 + lr_decay * epoch)``.
    hires_grad : bool
        Back-propagate the fused loss through the high-resolution pass too (ours; M3 does not say).
    batch_blocks : int
        Blocks per step (M3: 1; more keeps BatchNorm stable on small blocks).
    stain : dict or None
        The fitted Vahadane reference normaliser (``StainNormalizer.to_dict()``), applied to
        every input before the network; ``None``: no normalisation.
    """

    preset: str = "lesion-lite"
    blocks: list[int] = field(default_factory=lambda: [1, 2, 2, 1])
    base_width: int = 16
    expansion: int = 4
    stem_channels: int = 16
    fpn_channels: int = 48
    head_channels: int = 32
    mpp: float = 2.0
    hires_factor: int = 2
    block_size: int = 96
    tile_size: int = 512
    multiscale: bool = True
    loss: str = "focal"
    focal_alpha: float = 0.5
    focal_gamma: float = 2.0
    lr: float = 1e-3
    lr_decay: float = 0.05
    hires_grad: bool = True
    batch_blocks: int = 8
    stain: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (the checkpoint config)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "M3Config":
        """Build from :meth:`to_dict` output; unknown keys raise :class:`PathosegError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise PathosegError(f"unknown M3 config keys {unknown}")
        cfg = cls(**d)
        cfg.blocks = [int(b) for b in cfg.blocks]
        cfg.check()
        return cfg

    def check(self) -> None:
        """Raise :class:`PathosegError` when the config cannot describe a network or a run."""
        if len(self.blocks) != 4 or min(self.blocks) < 1:
            raise PathosegError(f"blocks must be 4 positive counts (C2..C5), got {self.blocks}")
        if self.loss not in ("focal", "bce"):
            raise PathosegError(f"loss must be 'focal' or 'bce', got {self.loss!r}")
        if self.block_size % 32:
            raise PathosegError(f"block_size must be a multiple of 32 (stride of C5), got {self.block_size}")
        if not 0.0 < self.focal_alpha < 1.0:
            raise PathosegError(f"focal_alpha must be in (0, 1), got {self.focal_alpha}")


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """ResNet bottleneck unit: 1x1 -> 3x3 (stride) -> 1x1, BatchNorm, identity or projection shortcut."""

    def __init__(self, cin: int, width: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn(cin, width, 1), _conv_bn(width, width, 3, stride), _conv_bn(width, cout, 1, relu=False)
        )
        self.short = None if (cin == cout and stride == 1) else _conv_bn(cin, cout, 1, stride, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.short is None else self.short(x)
        return F.relu(self.body(x) + idt, inplace=True)


class LesionFPN(nn.Module):
    """The M3 FPN: (B, 3, H, W) normalised RGB -> (B, 1, H, W) lesion logits.

    ``H`` and ``W`` need not be multiples of 32: every top-down step up-samples to the size
    of the lateral map, and the logit is up-sampled to the input size.

    Parameters
    ----------
    cfg : M3Config
    """

    def __init__(self, cfg: M3Config) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, cfg.stem_channels, 7, 2), nn.MaxPool2d(3, 2, 1))
        stages, cin, outs = [], cfg.stem_channels, []
        for i, n in enumerate(cfg.blocks):
            width = cfg.base_width * 2**i
            cout = width * cfg.expansion
            units = [Bottleneck(cin if j == 0 else cout, width, cout, (1 if i == 0 else 2) if j == 0 else 1)
                     for j in range(n)]
            stages.append(nn.Sequential(*units))
            cin = cout
            outs.append(cout)
        self.stages = nn.ModuleList(stages)  # C2..C5
        f = cfg.fpn_channels
        self.lateral = nn.ModuleList([nn.Conv2d(c, f, 1) for c in outs])
        self.smooth = nn.ModuleList([_conv_bn(f, f, 3) for _ in outs[:-1]])
        self.head = nn.Sequential(_conv_bn(f, cfg.head_channels, 3), nn.Conv2d(cfg.head_channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        c = self.stem(x)  # (B, stem, H/4, W/4)
        feats = []
        for stage in self.stages:
            c = stage(c)
            feats.append(c)  # C2..C5
        p = self.lateral[3](feats[3])  # P5
        for i in (2, 1, 0):
            lat = self.lateral[i](feats[i])
            p = F.interpolate(p, size=lat.shape[-2:], mode="bilinear", align_corners=False) + lat
            p = self.smooth[i](p)  # P4, P3, P2
        logit = self.head(p)  # (B, 1, H/4, W/4)
        return F.interpolate(logit, size=size, mode="bilinear", align_corners=False)


#: Named configurations. ``m3``: the method's ResNet-50 FPN on 512 px blocks with 8x
#: high-resolution tiles (64 per block, batch 1), as described; ``lesion-lite``: the same
#: structure (bottleneck stages C2..C5, FPN, head) narrowed (base width 16, blocks 1-2-2-1,
#: 48 FPN channels) on 96 px blocks at 2 µm/px with 2x tiles at 1 µm/px, 8 blocks a step.
PRESETS: dict[str, dict[str, Any]] = {
    "m3": dict(preset="m3", blocks=[3, 4, 6, 3], base_width=64, expansion=4, stem_channels=64,
               fpn_channels=256, head_channels=128, mpp=2.0, hires_factor=8, block_size=512,
               tile_size=512, batch_blocks=1),
    "lesion-lite": dict(preset="lesion-lite"),
    "lesion-lite-single": dict(preset="lesion-lite-single", multiscale=False),
    "lesion-lite-bce": dict(preset="lesion-lite-bce", multiscale=False, loss="bce"),
}


def preset_names() -> list[str]:
    """The valid preset names."""
    return sorted(PRESETS)


def get_preset(name: str, **overrides: Any) -> M3Config:
    """The :class:`M3Config` of preset ``name`` (a :class:`PathosegError` lists valid names)."""
    if name not in PRESETS:
        raise PathosegError(f"Unknown lesion preset {name!r}; valid presets: {', '.join(preset_names())}.")
    cfg = M3Config(**{**PRESETS[name], **overrides})
    cfg.check()
    return cfg
