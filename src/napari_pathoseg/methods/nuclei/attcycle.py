"""M2 teacher ("AttCycle"): a CycleGAN whose generators also segment nuclei.

Each :class:`Generator` is one pluggable encoder plus two decoders that share
its skip features through attention gates: a stain-normalisation decoder
(RGB in [-1, 1], ``tanh``) and a segmentation decoder (nucleus logit plus
optional extra channels used to split touching nuclei).  :class:`M2Model`
holds the two generators ``G_X2Y``/``G_Y2X`` and the two least-squares PatchGAN
discriminators ``D_X``/``D_Y`` (see ``docs/m2.md``).

Encoder contract
----------------
An encoder is any ``nn.Module`` with an attribute ``out_channels`` (tuple of
int, fine to coarse) whose ``forward(x)`` with ``x`` of shape ``(B, 3, H, W)``
returns a list of feature maps at strides ``1, 2, 4, ..., 2**(n-1)``.  Encoders
are created by :func:`build_encoder`, which dispatches on
``M2Config.encoder``; other modules add kinds with :func:`register_encoder`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from napari_pathoseg.errors import CheckpointError, PathosegError
from napari_pathoseg.training.engine import select_device

__all__ = [
    "M2Config",
    "PRESETS",
    "get_preset",
    "AttentionGate",
    "AttUNetEncoder",
    "Decoder",
    "Generator",
    "Discriminator",
    "M2Model",
    "build_encoder",
    "register_encoder",
    "encoder_kinds",
    "select_device",
]

logger = logging.getLogger(__name__)


class ModelConfigError(PathosegError):
    """An M2 configuration is invalid (unknown preset, encoder or value)."""


@dataclass(frozen=True)
class M2Config:
    """Configuration of the M2 teacher/student networks.

    Attributes
    ----------
    preset : str
        Name of the preset the configuration came from.
    encoder : str
        Encoder kind, a key of the encoder registry (``"attunet"`` built in,
        ``"resnet50_transformer"`` registered by :mod:`napari_pathoseg.methods.nuclei.transcycle`).
    widths : tuple of int
        Channels of the encoder levels, fine to coarse (stride 1, 2, 4, ...).
    decoder_widths : tuple of int or None
        Channels of the decoder blocks, fine to coarse, one per skip level
        (``len(widths) - 1`` entries); ``None`` reuses ``widths[:-1]``.
    attention : bool
        Attention gates on the skip connections (the point of AttCycle).
    f_int : int or None
        Intermediate channels ``F_int`` of the attention gates; ``None`` means
        half of the skip channels (Attention U-Net's choice).
    norm : str
        ``"instance"`` or ``"batch"`` normalisation in the convolution blocks.
    seg_channels : int
        Segmentation output channels: channel 0 is the nucleus logit, channel 1
        (when present) the nucleus-boundary logit used to split touching nuclei.
    disc_width, disc_layers : int
        PatchGAN discriminator base width and number of stride-2 layers.
    tile_size : int
        Crop size used in training and the preferred inference tile (pixels).
    mpp : float
        Micrometres per pixel the model works at (0.5 = 20x).
    lambda_adv, lambda_cyc, lambda_seg : float
        Loss weights of the adversarial, cycle (L1) and segmentation terms.
    lambda_boundary : float
        Weight of the boundary channel inside the segmentation loss.
    lambda_dice : float
        Weight of a soft-Dice term on the nucleus channel added to its BCE.
    gan_every : int
        Run the adversarial/cycle half of a training step every ``gan_every``
        steps (1 = every step, as in the method); segmentation is trained
        every step.
    """

    preset: str = "attcycle-lite"
    encoder: str = "attunet"
    widths: tuple[int, ...] = (16, 32, 64, 128)
    decoder_widths: tuple[int, ...] | None = None
    attention: bool = True
    f_int: int | None = None
    norm: str = "batch"
    seg_channels: int = 2
    disc_width: int = 32
    disc_layers: int = 2
    tile_size: int = 128
    mpp: float = 0.5
    lambda_adv: float = 1.0
    lambda_cyc: float = 10.0
    lambda_seg: float = 10.0
    lambda_boundary: float = 1.0
    lambda_dice: float = 1.0
    gan_every: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.widths) < 2:
            raise ModelConfigError(f"M2Config.widths needs at least 2 levels, got {self.widths!r}.")
        if self.decoder_widths is not None and len(self.decoder_widths) != len(self.widths) - 1:
            raise ModelConfigError(
                f"M2Config.decoder_widths needs {len(self.widths) - 1} entries "
                f"(one per skip level), got {self.decoder_widths!r}."
            )
        if self.norm not in ("instance", "batch"):
            raise ModelConfigError(f"M2Config.norm must be 'instance' or 'batch', got {self.norm!r}.")
        if self.seg_channels < 1:
            raise ModelConfigError(f"M2Config.seg_channels must be >= 1, got {self.seg_channels}.")
        if self.tile_size % (2 ** (len(self.widths) - 1)):
            raise ModelConfigError(
                f"M2Config.tile_size {self.tile_size} must be divisible by "
                f"{2 ** (len(self.widths) - 1)} (2**(levels-1))."
            )
        if self.mpp <= 0:
            raise ModelConfigError(f"M2Config.mpp must be > 0, got {self.mpp}.")

    @property
    def skip_widths(self) -> tuple[int, ...]:
        """Decoder block widths, fine to coarse (one per skip level)."""
        if self.decoder_widths is not None:
            return tuple(self.decoder_widths)
        return tuple(self.widths[:-1])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        d["decoder_widths"] = None if self.decoder_widths is None else list(self.decoder_widths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "M2Config":
        """Build a config from :meth:`to_dict` output; unknown keys are refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CheckpointError(
                f"Model config has unknown keys {unknown}; it was written by another "
                "version or is not an M2 config. Use a checkpoint made by napari-pathoseg."
            )
        d = dict(d)
        if "widths" in d:
            d["widths"] = tuple(d["widths"])
        if d.get("decoder_widths") is not None:
            d["decoder_widths"] = tuple(d["decoder_widths"])
        return cls(**d)


#: Every M2 preset, teacher and student, in one table: a lookup never depends on which modules
#: were imported before (the TransCycle encoder registers itself when a config needs it).
PRESETS: dict[str, M2Config] = {
    # The method's size: a full Attention U-Net encoder (64..1024) at 256x256 tiles,
    # 3-layer PatchGAN, adversarial and cycle terms every step.
    "attcycle": M2Config(
        preset="attcycle",
        widths=(64, 128, 256, 512, 1024),
        disc_width=64,
        disc_layers=3,
        tile_size=256,
        lambda_adv=1.0,
        lambda_cyc=10.0,
        lambda_seg=10.0,
        gan_every=1,
    ),
    # Same structure, CPU-sized: 4 levels, 16..128 channels, 128x128 crops at 0.5 um/px,
    # 2-layer PatchGAN; the adversarial/cycle half runs every 2nd step so the segmentation
    # decoder gets most of the update budget.
    "attcycle-lite": M2Config(
        preset="attcycle-lite",
        widths=(16, 32, 64, 128),
        disc_width=32,
        disc_layers=2,
        tile_size=128,
        lambda_adv=0.5,
        lambda_cyc=5.0,
        lambda_seg=10.0,
        gan_every=2,
    ),
    # M2's student, TransCycle (methods/nuclei/transcycle.py): the same set-up with a ResNet-50 +
    # Transformer encoder. ``widths`` are that encoder's out_channels (strides 1..32), which
    # tests/test_transcycle.py checks against TRANSCYCLE_PRESETS.
    "transcycle": M2Config(
        preset="transcycle",
        encoder="resnet50_transformer",
        widths=(64, 64, 256, 512, 1024, 512),
        disc_width=64,
        disc_layers=3,
        tile_size=256,
        lambda_adv=1.0,
        lambda_cyc=10.0,
        lambda_seg=10.0,
        gan_every=1,
    ),
    "transcycle-lite": M2Config(
        preset="transcycle-lite",
        encoder="resnet50_transformer",
        widths=(16, 16, 32, 64, 128, 64),
        disc_width=32,
        disc_layers=2,
        tile_size=128,
        lambda_adv=0.5,
        lambda_cyc=5.0,
        lambda_seg=10.0,
        gan_every=2,
    ),
}


def get_preset(name: str, **overrides: Any) -> M2Config:
    """Return the preset ``name`` with ``overrides`` applied.

    Raises
    ------
    ModelConfigError
        When ``name`` is not a preset; the message lists the valid names.
    """
    if name not in PRESETS:
        raise ModelConfigError(f"Unknown M2 preset {name!r}; valid presets: {sorted(PRESETS)}.")
    return dataclasses.replace(PRESETS[name], **overrides)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.InstanceNorm2d(channels, affine=True)


class ConvBlock(nn.Module):
    """Two 3x3 convolutions, each followed by normalisation and ReLU."""

    def __init__(self, in_ch: int, out_ch: int, *, norm: str = "instance") -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            _norm(norm, out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            _norm(norm, out_ch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in, H, W) -> (B, out, H, W)
        return self.body(x)


class AttentionGate(nn.Module):
    """Additive attention gate of Attention U-Net on a skip connection.

    ``q = psi^T(relu(W_x^T x + W_g^T g + b_g)) + b_psi``, ``alpha = sigmoid(q)``,
    ``out = x * alpha``, where ``W_x``, ``W_g`` and ``psi`` are 1x1 convolutions
    to ``F_int``, ``F_int`` and 1 channels.  The gating signal ``g`` comes from
    the coarser level; its projection is resized to ``x``'s grid (bilinear)
    before the sum.

    Parameters
    ----------
    f_l : int
        Channels of the skip features ``x``.
    f_g : int
        Channels of the gating signal ``g``.
    f_int : int
        Intermediate channels.
    """

    def __init__(self, f_l: int, f_g: int, f_int: int) -> None:
        super().__init__()
        self.w_x = nn.Conv2d(f_l, f_int, 1, bias=False)
        self.w_g = nn.Conv2d(f_g, f_int, 1, bias=True)  # carries b_g
        self.psi = nn.Conv2d(f_int, 1, 1, bias=True)  # carries b_psi

    def coefficients(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Attention coefficients ``alpha`` of shape (B, 1, H, W) for x (B, F_l, H, W)."""
        gx = self.w_x(x)  # (B, F_int, H, W)
        gg = self.w_g(g)  # (B, F_int, h, w)
        if gg.shape[-2:] != gx.shape[-2:]:
            gg = F.interpolate(gg, size=gx.shape[-2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(self.psi(F.relu(gx + gg)))

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x * self.coefficients(x, g)  # (B, F_l, H, W)


class AttUNetEncoder(nn.Module):
    """Attention U-Net encoder: conv blocks with 2x2 max pooling between levels.

    ``forward(x (B, 3, H, W))`` returns ``len(widths)`` feature maps at strides
    1, 2, ..., 2**(n-1) with ``widths[i]`` channels.
    """

    def __init__(self, config: M2Config) -> None:
        super().__init__()
        self.out_channels: tuple[int, ...] = tuple(config.widths)
        blocks = []
        in_ch = 3
        for w in config.widths:
            blocks.append(ConvBlock(in_ch, w, norm=config.norm))
            in_ch = w
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, block in enumerate(self.blocks):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)  # (B, widths[i], H / 2**i, W / 2**i)
            feats.append(x)
        return feats


_ENCODERS: dict[str, Callable[[M2Config], nn.Module]] = {"attunet": AttUNetEncoder}


def register_encoder(kind: str, factory: Callable[[M2Config], nn.Module]) -> None:
    """Register an encoder ``factory(config) -> nn.Module`` under ``kind``."""
    _ENCODERS[kind] = factory


def encoder_kinds() -> list[str]:
    """Names of the registered encoder kinds."""
    _load_optional_encoders()
    return sorted(_ENCODERS)


def _load_optional_encoders() -> None:
    if "resnet50_transformer" not in _ENCODERS:
        try:  # registers itself on import
            import napari_pathoseg.methods.nuclei.transcycle  # noqa: F401
        except ImportError:
            logger.debug("napari_pathoseg.methods.nuclei.transcycle not available")


def build_encoder(config: M2Config) -> nn.Module:
    """Build the encoder named by ``config.encoder``.

    Raises
    ------
    ModelConfigError
        For an unknown kind (the message lists the registered kinds) or an
        encoder that breaks the contract (no ``out_channels``).
    """
    if config.encoder not in _ENCODERS:
        _load_optional_encoders()
    if config.encoder not in _ENCODERS:
        raise ModelConfigError(
            f"Unknown encoder kind {config.encoder!r}; registered kinds: {sorted(_ENCODERS)}."
        )
    enc = _ENCODERS[config.encoder](config)
    if not hasattr(enc, "out_channels") or len(enc.out_channels) < 2:
        raise ModelConfigError(
            f"Encoder {config.encoder!r} must expose out_channels (>= 2 levels, fine to coarse)."
        )
    return enc


class Decoder(nn.Module):
    """U-Net decoder with attention-gated skips.

    Parameters
    ----------
    enc_channels : tuple of int
        Encoder ``out_channels``, fine to coarse.
    widths : tuple of int
        Decoder block widths, fine to coarse (``len(enc_channels) - 1``).
    out_channels : int
        Output channels of the final 1x1 convolution.
    attention : bool
        Gate the skip connections.
    f_int : int or None
        Attention-gate ``F_int`` (``None``: half the skip channels, at least 1).
    """

    def __init__(
        self,
        enc_channels: tuple[int, ...],
        widths: tuple[int, ...],
        out_channels: int,
        *,
        attention: bool = True,
        f_int: int | None = None,
        norm: str = "instance",
    ) -> None:
        super().__init__()
        n = len(enc_channels)
        if len(widths) != n - 1:
            raise ModelConfigError(
                f"Decoder needs {n - 1} widths for an encoder of {n} levels, got {widths!r}."
            )
        self.gates = nn.ModuleList()
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        coarse = enc_channels[-1]
        for level in range(n - 2, -1, -1):  # coarse to fine
            skip = enc_channels[level]
            width = widths[level]
            self.gates.append(
                AttentionGate(skip, coarse, f_int or max(1, skip // 2)) if attention else nn.Identity()
            )
            self.ups.append(nn.Conv2d(coarse, width, 1))
            self.blocks.append(ConvBlock(width + skip, width, norm=norm))
            coarse = width
        self.attention = attention
        self.head = nn.Conv2d(coarse, out_channels, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        d = feats[-1]  # (B, C_n, H / 2**(n-1), W / 2**(n-1))
        for i, (gate, up, block) in enumerate(zip(self.gates, self.ups, self.blocks)):
            skip = feats[-2 - i]  # (B, C_l, h, w)
            if self.attention:
                skip = gate(skip, d)
            d = F.interpolate(d, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            d = block(torch.cat([up(d), skip], dim=1))  # (B, width_l, h, w)
        return self.head(d)  # (B, out_channels, H, W)


class Generator(nn.Module):
    """One encoder, a stain-normalisation decoder and a segmentation decoder.

    ``forward(x (B, 3, H, W) in [-1, 1])`` returns ``(rgb (B, 3, H, W) in [-1, 1],
    seg_logits (B, seg_channels, H, W))``.  ``H`` and ``W`` must be divisible
    by the encoder's coarsest stride.
    """

    def __init__(self, config: M2Config, *, encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder if encoder is not None else build_encoder(config)
        enc_ch = tuple(self.encoder.out_channels)
        widths = config.skip_widths if len(config.skip_widths) == len(enc_ch) - 1 else enc_ch[:-1]
        kw = dict(attention=config.attention, f_int=config.f_int, norm=config.norm)
        self.norm_decoder = Decoder(enc_ch, widths, 3, **kw)
        self.seg_decoder = Decoder(enc_ch, widths, config.seg_channels, **kw)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.encoder(x)
        return torch.tanh(self.norm_decoder(feats)), self.seg_decoder(feats)

    def translate(self, x: torch.Tensor) -> torch.Tensor:
        """Stain-normalised RGB only (B, 3, H, W); skips the segmentation decoder."""
        return torch.tanh(self.norm_decoder(self.encoder(x)))

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Segmentation logits only (B, seg_channels, H, W)."""
        return self.seg_decoder(self.encoder(x))


class Discriminator(nn.Module):
    """Least-squares PatchGAN discriminator: (B, 3, H, W) -> (B, 1, h, w) scores."""

    def __init__(self, config: M2Config) -> None:
        super().__init__()
        w = config.disc_width
        layers: list[nn.Module] = [nn.Conv2d(3, w, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        ch = w
        for i in range(1, config.disc_layers):
            nxt = min(w * 2**i, w * 8)
            layers += [
                nn.Conv2d(ch, nxt, 4, stride=2, padding=1, bias=False),
                _norm(config.norm, nxt),
                nn.LeakyReLU(0.2, True),
            ]
            ch = nxt
        nxt = min(ch * 2, w * 8)
        layers += [
            nn.Conv2d(ch, nxt, 4, stride=1, padding=1, bias=False),
            _norm(config.norm, nxt),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(nxt, 1, 4, stride=1, padding=1),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class M2Model(nn.Module):
    """The full M2 set-up: ``G_X2Y``, ``G_Y2X``, ``D_X``, ``D_Y``."""

    def __init__(self, config: M2Config) -> None:
        super().__init__()
        self.config = config
        self.G_X2Y = Generator(config)
        self.G_Y2X = Generator(config)
        self.D_X = Discriminator(config)
        self.D_Y = Discriminator(config)

    def generator_parameters(self) -> list[nn.Parameter]:
        return list(self.G_X2Y.parameters()) + list(self.G_Y2X.parameters())

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return list(self.D_X.parameters()) + list(self.D_Y.parameters())
