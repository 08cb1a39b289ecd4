"""M5 networks: a ResNet-38-style backbone, the stage-1 classifier and the stage-2 PSPNet.

The backbone follows the "wider or deeper" ResNet-38 layout used by M5: a 3x3 stem (B1), then
stages B2-B5 of basic residual blocks (two 3x3 convolutions) with stride 2 at B2, B3, B4, B5
dilated by 2 instead of strided, and B6, B7 single bottleneck blocks dilated by 4: output
stride 8. The method-sized preset has the published widths (64; 128, 256, 512, 1024; 2048,
4096) and block counts (3, 3, 6, 3); a lite preset keeps the layout at small widths and one or
two blocks per stage. BatchNorm + ReLU, pre-activation as in the original.

* :class:`TissueClassifier` (stage 1): backbone, dropout, 1x1 convolution to the class logits
  and global average pooling (so the weights of a class are also its class-activation map).
  Progressive dropout attention (PDA) erases, in training, the feature positions whose
  attention (channel mean of the final features, normalised to the per-image maximum) exceeds a
  threshold that falls from 1 towards ``pda_final`` over the run.
* :class:`TissuePSPNet` (stage 2): backbone, a pyramid pooling module (bins 1, 2, 3, 6), a 3x3
  fusion convolution and 1x1 class logits, up-sampled bilinearly to the input size.

No ImageNet weights are reachable here: every preset trains from random initialisation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from napari_pathoseg.errors import PathosegError

__all__ = ["LUAD_CLASSES", "PRESETS", "Backbone", "M5Config", "TissueClassifier", "TissuePSPNet", "get_preset"]

#: WSSS4LUAD tissue classes (ids 1..3; 0 is background).
LUAD_CLASSES = ("tumour epithelium", "stroma", "normal")


@dataclass
class M5Config:
    """Everything that defines an M5 model and its training.

    Attributes
    ----------
    preset : str
    widths : list of int
        Channels of B1 (stem), B2, B3, B4, B5, B6, B7.
    blocks : list of int
        Residual blocks in B2, B3, B4, B5.
    classes : list of str
        Tissue classes, ids 1..n in the map (0 = background).
    mpp : float
        µm per pixel the model works at.
    tile_size : int
        Inference window (224 in M5) and training crop.
    dropout : float
        Dropout before the classifier's 1x1 class layer.
    pda : bool
        Progressive dropout attention in stage 1.
    pda_final : float
        The PDA threshold at the end of training (it starts at 1.0: nothing erased).
    ppm_bins : list of int
        PSPNet pyramid pooling bins.
    ppm_channels : int
        Channels of each pooled branch (and of the fusion convolution).
    loss : str
        Stage 2 loss: ``"ons"`` (online noise suppression) or ``"ce"`` (plain cross-entropy).
    background_grey : float
        Grey level above which a pixel is background (M5: 210).
    lr1, lr2 : float
        SGD learning rates of stage 1 (M5: 0.01) and stage 2 (M5: 5e-3).
    batch1, batch2 : int
        Mini-batch sizes (M5: 16 and 16).
    balance : bool
        Class balancing (not in M5): stage 1 samples each label vector's patches ∝ sqrt of
        their number instead of uniformly; stage 2 weights each pixel's loss by its pseudo
        class (1 / sqrt of the class's pixel share, mean 1).
    """

    preset: str = "tissue-lite"
    widths: list[int] = field(default_factory=lambda: [8, 16, 32, 48, 64, 96, 128])
    blocks: list[int] = field(default_factory=lambda: [1, 1, 1, 1])
    classes: list[str] = field(default_factory=lambda: list(LUAD_CLASSES))
    mpp: float = 1.0
    tile_size: int = 224
    dropout: float = 0.3
    pda: bool = True
    pda_final: float = 0.7
    ppm_bins: list[int] = field(default_factory=lambda: [1, 2, 3, 6])
    ppm_channels: int = 32
    loss: str = "ons"
    background_grey: float = 210.0
    lr1: float = 0.01
    lr2: float = 5e-3
    batch1: int = 8
    batch2: int = 8
    balance: bool = False

    def __post_init__(self) -> None:
        if len(self.widths) != 7 or len(self.blocks) != 4:
            raise PathosegError("An M5 config has 7 widths (B1-B7) and 4 block counts (B2-B5).")
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise PathosegError("An M5 config names at least one tissue class, each once.")
        if self.loss not in ("ons", "ce"):
            raise PathosegError(f"Unknown stage-2 loss {self.loss!r}; use 'ons' or 'ce'.")

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> M5Config:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PathosegError(f"Unknown M5 config keys {unknown}.")
        return cls(**d)


#: Named presets. ``m5`` and ``m5-ce`` are the method-sized networks (ResNet-38 widths and depth);
#: the lite presets keep that structure at CPU size.
PRESETS: dict[str, M5Config] = {
    "m5": M5Config(preset="m5", widths=[64, 128, 256, 512, 1024, 2048, 4096], blocks=[3, 3, 6, 3],
                   dropout=0.5, ppm_channels=512, batch1=16, batch2=16),
    "tissue-lite": M5Config(),
    "tissue-lite-ce": M5Config(preset="tissue-lite-ce", loss="ce"),
    "tissue-lite-nopda": M5Config(preset="tissue-lite-nopda", pda=False),
}


def get_preset(name: str, **overrides: Any) -> M5Config:
    """A copy of preset ``name`` with ``overrides``; a typo lists the valid names."""
    if name not in PRESETS:
        raise PathosegError(f"Unknown M5 preset {name!r}; valid presets: {sorted(PRESETS)}.")
    cfg = replace(PRESETS[name])
    cfg = M5Config.from_dict({**cfg.to_dict(), **overrides})
    return cfg


def _bn_relu(c: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=False))


class _Basic(nn.Module):
    """Pre-activation residual block, two 3x3 convolutions (ResNet-38 B2-B5)."""

    def __init__(self, cin: int, cout: int, *, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.pre = _bn_relu(cin)
        d = dilation
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=d, dilation=d, bias=False)
        self.mid = _bn_relu(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=d, dilation=d, bias=False)
        self.short = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.pre(x)
        s = x if self.short is None else self.short(a)
        return s + self.conv2(self.mid(self.conv1(a)))


class _Bottle(nn.Module):
    """Pre-activation bottleneck block, 1x1 / dilated 3x3 / 1x1 (ResNet-38 B6, B7)."""

    def __init__(self, cin: int, cout: int, *, dilation: int) -> None:
        super().__init__()
        mid = max(1, cout // 4)
        self.pre = _bn_relu(cin)
        self.conv1 = nn.Conv2d(cin, cout // 2 if cout >= 2 else 1, 1, bias=False)
        c1 = self.conv1.out_channels
        self.mid1 = _bn_relu(c1)
        self.conv2 = nn.Conv2d(c1, mid * 2, 3, padding=dilation, dilation=dilation, bias=False)
        self.mid2 = _bn_relu(mid * 2)
        self.conv3 = nn.Conv2d(mid * 2, cout, 1, bias=False)
        self.short = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.pre(x)
        return self.short(a) + self.conv3(self.mid2(self.conv2(self.mid1(self.conv1(a)))))


class Backbone(nn.Module):
    """ResNet-38-style backbone, output stride 8, ``widths[6]`` output channels (after BN + ReLU)."""

    def __init__(self, cfg: M5Config) -> None:
        super().__init__()
        w, b = cfg.widths, cfg.blocks
        self.stem = nn.Conv2d(3, w[0], 3, padding=1, bias=False)
        stages = []
        cin = w[0]
        for i, (cout, n) in enumerate(zip(w[1:5], b)):
            stride = 2 if i < 3 else 1
            dil = 1 if i < 3 else 2
            layers = [_Basic(cin, cout, stride=stride, dilation=dil)]
            layers += [_Basic(cout, cout, dilation=dil) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.b6 = _Bottle(cin, w[5], dilation=4)
        self.b7 = _Bottle(w[5], w[6], dilation=4)
        self.post = _bn_relu(w[6])
        self.out_channels = w[6]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.b7(self.b6(self.stages(self.stem(x)))))


def pda_mask(features: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep-mask (B, 1, h, w) of progressive dropout attention: 0 where the attention exceeds ``threshold``.

    The attention is the channel mean of the (non-negative) features, divided by its
    per-image maximum; ``threshold >= 1`` keeps everything.
    """
    att = features.mean(1, keepdim=True)
    att = att / att.flatten(1).amax(1).clamp_min(1e-6)[:, None, None, None]
    return (att <= threshold).to(features.dtype)


class TissueClassifier(nn.Module):
    """Stage 1: multi-label tissue classifier (logits per class) with optional PDA.

    ``forward(x, pda_threshold=None)`` returns (B, n) logits; with a threshold < 1 in training,
    the most discriminative positions of the final features are erased first.
    ``features(x)`` and ``head(f)`` expose the parts Grad-CAM++ needs.
    """

    def __init__(self, cfg: M5Config) -> None:
        super().__init__()
        self.backbone = Backbone(cfg)
        self.drop = nn.Dropout2d(cfg.dropout)
        self.fc = nn.Conv2d(self.backbone.out_channels, cfg.n_classes, 1, bias=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(f)).mean((2, 3))

    def forward(self, x: torch.Tensor, pda_threshold: float | None = None) -> torch.Tensor:
        f = self.features(x)
        if self.training and pda_threshold is not None and pda_threshold < 1.0:
            f = f * pda_mask(f.detach(), pda_threshold)
        return self.head(f)


class TissuePSPNet(nn.Module):
    """Stage 2: PSPNet on the ResNet-38-style backbone; (B, n, H, W) logits at the input size."""

    def __init__(self, cfg: M5Config) -> None:
        super().__init__()
        self.backbone = Backbone(cfg)
        c = self.backbone.out_channels
        k = cfg.ppm_channels
        self.bins = list(cfg.ppm_bins)
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, k, 1, bias=False), nn.BatchNorm2d(k), nn.ReLU()) for _ in self.bins
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(c + k * len(self.bins), k, 3, padding=1, bias=False), nn.BatchNorm2d(k), nn.ReLU(),
            nn.Dropout2d(0.1),
        )
        self.cls = nn.Conv2d(k, cfg.n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        f = self.backbone(x)
        size = f.shape[2:]
        pooled = [F.interpolate(m(F.adaptive_avg_pool2d(f, b)), size=size, mode="bilinear", align_corners=False)
                  for b, m in zip(self.bins, self.ppm)]
        out = self.cls(self.fuse(torch.cat([f, *pooled], 1)))
        return F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
