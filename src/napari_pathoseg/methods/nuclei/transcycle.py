"""TransCycle student encoder: ResNet-50 bottleneck stages followed by a Transformer.

M2's student (methods.md, step S3) keeps the teacher's two-generator, two-decoder,
two-discriminator set-up and swaps each generator's encoder for a ResNet-50 whose coarsest
feature map is cut into tokens, passed through a Transformer encoder and folded back into a
feature map, as in TransUNet.

The encoder satisfies the M2 encoder contract: it has an ``out_channels`` tuple and its
forward pass returns feature maps at strides 1, 2, 4, ..., 2**(n-1), fine to coarse, where
``n = len(out_channels)``. With the ResNet-50 layout the strides are

========  ==========================================  ======================
stride    block                                       channels (method/lite)
========  ==========================================  ======================
1         two 3x3 conv + BN + ReLU at full resolution  64 / 16
2         7x7 stride-2 stem conv + BN + ReLU            64 / 16
4         max-pool + ResNet stage 1 (bottlenecks)       256 / 32
8         ResNet stage 2                                512 / 64
16        ResNet stage 3                                1024 / 128
32        ResNet stage 4 -> tokens -> Transformer       512 / 64
          -> feature map -> 3x3 conv + BN + ReLU
========  ==========================================  ======================

Choices the method description leaves open, made here (see docs/review.md):

* the Transformer works on the stride-32 output of all four ResNet-50 stages with 1x1
  patches (TransUNet's hybrid encoder uses patch size 1 on the CNN features too);
* pre-norm Transformer layers (ViT style) with GELU and a final LayerNorm;
* learned positional embeddings for a reference token grid (``tile_size // 32`` squared),
  bilinearly interpolated to the token grid of any other input size divisible by 32;
* the token sequence is folded back to a map and reduced to ``head_channels`` by a 3x3
  convolution (TransUNet's "conv_more", 512 channels in the method preset).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from napari_pathoseg.errors import PathosegError

__all__ = [
    "ENCODER_KIND",
    "TRANSCYCLE_PRESETS",
    "EncoderInputError",
    "TransCycleEncoder",
    "TransCycleEncoderConfig",
    "build_transcycle_encoder",
]

logger = logging.getLogger(__name__)

#: Encoder kind under which this encoder is registered with :mod:`napari_pathoseg.methods.nuclei.attcycle`.
ENCODER_KIND = "resnet50_transformer"


class EncoderInputError(PathosegError, ValueError):
    """An input tensor does not fit the encoder (wrong rank, channels or size)."""


@dataclass(frozen=True)
class TransCycleEncoderConfig:
    """Sizes of a :class:`TransCycleEncoder`.

    Parameters
    ----------
    blocks : tuple of int
        Number of bottleneck blocks in each of the four ResNet stages ([3, 4, 6, 3] is
        ResNet-50).
    base_width : int
        Bottleneck width of the first stage; stage ``i`` uses ``base_width * 2**i``.
    expansion : int
        Bottleneck expansion (output channels = width * expansion; 4 in ResNet-50).
    stem_channels : int
        Channels of the 7x7 stride-2 stem (64 in ResNet-50).
    full_res_channels : int
        Channels of the stride-1 feature map (two 3x3 convolutions on the input).
    hidden : int
        Transformer width (token dimension).
    layers : int
        Number of Transformer encoder layers.
    heads : int
        Attention heads per layer (``hidden`` must be divisible by it).
    mlp_ratio : float
        Width of the Transformer MLP relative to ``hidden``.
    dropout : float
        Dropout in the Transformer (embeddings, attention output and MLP).
    head_channels : int
        Channels of the stride-32 feature map after the tokens are folded back.
    tile_size : int
        Reference input size; the learned positional embedding has
        ``(tile_size // 32) ** 2`` entries and is interpolated for other sizes.
    """

    blocks: tuple[int, ...] = (3, 4, 6, 3)
    base_width: int = 64
    expansion: int = 4
    stem_channels: int = 64
    full_res_channels: int = 64
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    head_channels: int = 512
    tile_size: int = 256

    def __post_init__(self) -> None:
        if len(self.blocks) != 4 or any(int(b) < 1 for b in self.blocks):
            raise EncoderInputError(
                f"TransCycle needs four ResNet stages of at least one block each, got "
                f"blocks={self.blocks!r}; use e.g. (3, 4, 6, 3)."
            )
        if self.hidden % self.heads:
            raise EncoderInputError(
                f"Transformer width hidden={self.hidden} is not divisible by heads="
                f"{self.heads}; choose a width that is a multiple of the head count."
            )
        if self.tile_size % self.total_stride or self.tile_size < self.total_stride:
            raise EncoderInputError(
                f"tile_size={self.tile_size} must be a positive multiple of the encoder "
                f"stride {self.total_stride}."
            )
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in {"blocks", "mlp_ratio", "dropout"}:
                continue
            if int(value) < 1:
                raise EncoderInputError(f"TransCycle config {f.name}={value!r} must be >= 1.")

    @property
    def total_stride(self) -> int:
        """Stride of the coarsest feature map (32)."""
        return 32

    @property
    def out_channels(self) -> tuple[int, ...]:
        """Channels of the six feature maps, strides 1 to 32."""
        w, e = self.base_width, self.expansion
        return (
            self.full_res_channels,
            self.stem_channels,
            w * e,
            2 * w * e,
            4 * w * e,
            self.head_channels,
        )

    def to_dict(self) -> dict:
        """JSON-serialisable form (for checkpoint metadata)."""
        d = asdict(self)
        d["blocks"] = list(self.blocks)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> TransCycleEncoderConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`EncoderInputError`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EncoderInputError(
                f"Unknown TransCycle encoder settings {unknown}; valid: {sorted(known)}."
            )
        values = dict(data)
        if "blocks" in values:
            values["blocks"] = tuple(int(b) for b in values["blocks"])
        return cls(**values)


#: Method-sized preset (ResNet-50 + ViT-Base-sized Transformer) and a CPU-sized "lite" one.
TRANSCYCLE_PRESETS: dict[str, TransCycleEncoderConfig] = {
    "transcycle": TransCycleEncoderConfig(),
    "transcycle-lite": TransCycleEncoderConfig(
        blocks=(1, 1, 1, 1),
        base_width=8,
        expansion=4,
        stem_channels=16,
        full_res_channels=16,
        hidden=64,
        layers=2,
        heads=4,
        mlp_ratio=2.0,
        dropout=0.0,
        head_channels=64,
    ),
}


def _conv_bn_relu(c_in: int, c_out: int, *, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 reduce, 3x3 (stride), 1x1 expand, plus a projected shortcut."""

    def __init__(self, c_in: int, width: int, *, expansion: int = 4, stride: int = 1) -> None:
        super().__init__()
        c_out = width * expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))  # (B, width, H/s, W/s)
        out = self.bn3(self.conv3(out))  # (B, C_out, H/s, W/s)
        return self.relu(out + self.shortcut(x))


class TransCycleEncoder(nn.Module):
    """ResNet-50 + Transformer encoder with multi-scale outputs (strides 1 to 32).

    Parameters
    ----------
    config : TransCycleEncoderConfig, optional
        Sizes; defaults to the method preset. See :data:`TRANSCYCLE_PRESETS`.

    Attributes
    ----------
    out_channels : tuple of int
        Channels of the six returned feature maps, fine to coarse.

    Examples
    --------
    >>> enc = TransCycleEncoder(TRANSCYCLE_PRESETS["transcycle-lite"])
    >>> feats = enc(torch.zeros(1, 3, 64, 96))
    >>> [tuple(f.shape[1:]) for f in feats][-1]
    (64, 2, 3)
    """

    def __init__(self, config: TransCycleEncoderConfig | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else TRANSCYCLE_PRESETS["transcycle"]
        self.config = cfg
        self.out_channels: tuple[int, ...] = cfg.out_channels
        self.stride = cfg.total_stride

        self.full_res = nn.Sequential(
            _conv_bn_relu(3, cfg.full_res_channels),
            _conv_bn_relu(cfg.full_res_channels, cfg.full_res_channels),
        )
        self.stem = _conv_bn_relu(3, cfg.stem_channels, kernel=7, stride=2)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        stages = []
        c_in = cfg.stem_channels
        for i, n_blocks in enumerate(cfg.blocks):
            width = cfg.base_width * 2**i
            stride = 1 if i == 0 else 2
            blocks = [Bottleneck(c_in, width, expansion=cfg.expansion, stride=stride)]
            c_in = width * cfg.expansion
            blocks += [
                Bottleneck(c_in, width, expansion=cfg.expansion) for _ in range(int(n_blocks) - 1)
            ]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)

        # Tokens: 1x1 patch embedding of the stride-32 ResNet features.
        self.patch_embed = nn.Conv2d(c_in, cfg.hidden, 1)
        grid = cfg.tile_size // cfg.total_stride
        self.pos_grid = grid
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.hidden, grid, grid))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.embed_drop = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(
            d_model=cfg.hidden,
            nhead=cfg.heads,
            dim_feedforward=int(round(cfg.hidden * cfg.mlp_ratio)),
            dropout=cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(
            layer, num_layers=cfg.layers, enable_nested_tensor=False
        )
        self.norm = nn.LayerNorm(cfg.hidden)
        self.head = _conv_bn_relu(cfg.hidden, cfg.head_channels)

    def _positional(self, rows: int, cols: int) -> torch.Tensor:
        """Positional embedding for a (rows, cols) token grid, shape (1, hidden, rows, cols)."""
        if (rows, cols) == (self.pos_grid, self.pos_grid):
            return self.pos_embed
        return F.interpolate(
            self.pos_embed, size=(rows, cols), mode="bilinear", align_corners=False
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encode a batch of RGB tiles.

        Parameters
        ----------
        x : torch.Tensor
            (B, 3, H, W) float tensor; H and W must be multiples of 32.

        Returns
        -------
        list of torch.Tensor
            Six maps (B, out_channels[i], H / 2**i, W / 2**i), i = 0..5, fine to coarse.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise EncoderInputError(
                f"TransCycle expects a (B, 3, H, W) tensor, got shape {tuple(x.shape)}."
            )
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if h % self.stride or w % self.stride or h == 0 or w == 0:
            raise EncoderInputError(
                f"TransCycle input size {h}x{w} is not a multiple of its stride {self.stride}; "
                f"pad or crop tiles to a multiple of {self.stride} (e.g. 256x256)."
            )
        feats = [self.full_res(x)]  # (B, C0, H, W)
        y = self.stem(x)  # (B, C1, H/2, W/2)
        feats.append(y)
        y = self.pool(y)  # (B, C1, H/4, W/4)
        for i, stage in enumerate(self.stages):
            y = stage(y)  # stage 0: H/4, then H/8, H/16, H/32
            if i < len(self.stages) - 1:
                feats.append(y)
        tok = self.patch_embed(y)  # (B, hidden, h, w) with h = H/32, w = W/32
        rows, cols = int(tok.shape[-2]), int(tok.shape[-1])
        tok = tok + self._positional(rows, cols)
        tok = tok.flatten(2).transpose(1, 2)  # (B, h*w, hidden)
        tok = self.norm(self.transformer(self.embed_drop(tok)))  # (B, h*w, hidden)
        fmap = tok.transpose(1, 2).reshape(tok.shape[0], -1, rows, cols)  # (B, hidden, h, w)
        feats.append(self.head(fmap))  # (B, head_channels, H/32, W/32)
        return feats


def _preset_for(config: object) -> TransCycleEncoderConfig:
    """Pick the TransCycle sizes for an M2 config (or anything with ``preset``/``tile_size``)."""
    if isinstance(config, TransCycleEncoderConfig):
        return config
    if isinstance(config, str):
        name, tile_size = config, None
    else:
        extra = getattr(config, "extra", None) or {}
        overrides = extra.get("transcycle") if isinstance(extra, dict) else None
        name = str(getattr(config, "preset", "") or "")
        tile_size = getattr(config, "tile_size", None)
        if isinstance(overrides, dict) and overrides:
            values = {"tile_size": int(tile_size)} if tile_size else {}
            values.update(overrides)
            return TransCycleEncoderConfig.from_dict(values)
    if name in TRANSCYCLE_PRESETS:
        cfg = TRANSCYCLE_PRESETS[name]
    else:
        cfg = TRANSCYCLE_PRESETS["transcycle-lite" if "lite" in name else "transcycle"]
    if tile_size:
        cfg = replace(cfg, tile_size=int(tile_size))
    return cfg


def build_transcycle_encoder(config: object = None) -> TransCycleEncoder:
    """Encoder factory registered for the ``"resnet50_transformer"`` encoder kind.

    Parameters
    ----------
    config : M2Config, TransCycleEncoderConfig, str or None
        An M2 config (its ``preset`` name picks the lite sizes when it contains ``"lite"``,
        its ``tile_size`` sets the positional-embedding grid, and an optional
        ``extra["transcycle"]`` dict sets every size), a TransCycle config, a preset name
        of :data:`TRANSCYCLE_PRESETS`, or None for the method preset.

    Returns
    -------
    TransCycleEncoder
    """
    cfg = TRANSCYCLE_PRESETS["transcycle"] if config is None else _preset_for(config)
    logger.debug("building TransCycle encoder %s", cfg)
    return TransCycleEncoder(cfg)


# Registration with the M2 model: the encoder kind. The student presets ("transcycle",
# "transcycle-lite") live in attcycle.PRESETS with the teacher's, so preset lookup does not
# depend on this module having been imported.
from napari_pathoseg.methods.nuclei import attcycle as _m2  # noqa: E402  (after the definitions it needs)

_m2.register_encoder(ENCODER_KIND, build_transcycle_encoder)
