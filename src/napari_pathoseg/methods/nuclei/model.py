"""The nucleus model (M2 ``G_X2Y``): its loader, and the schema its checkpoints must meet.

:func:`load_nucleus_model` is the ``nuclei`` task's loader in the model registry
(:mod:`napari_pathoseg.models.tasks`); :func:`validate_m2_config` is the config validator of
``"m2"`` checkpoints, run by :func:`napari_pathoseg.models.checkpoint.read_header` before any
network is built from a checkpoint's config.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_pathoseg.errors import CheckpointError, PathosegError
from napari_pathoseg.methods.nuclei.attcycle import Discriminator, Generator, M2Config, encoder_kinds, select_device
from napari_pathoseg.methods.nuclei.instances import to_instances as _to_instances
from napari_pathoseg.models.validation import (
    MAX_FEATURE_BYTES,
    MAX_PARAMETERS,
    Bool,
    Choice,
    ConfigSchemaError,
    Float,
    Int,
    Nullable,
    Record,
    Seq,
    Text,
    count_parameters,
    validate,
)

__all__ = ["NucleusModel", "load_nucleus_model", "validate_m2_config", "M2_SCHEMA"]

logger = logging.getLogger(__name__)


class NucleusModel:
    """A loaded nucleus segmentation + stain normalisation model (M2 ``G_X2Y``).

    Attributes
    ----------
    config : M2Config
    mpp : float
        Micrometres per pixel the model expects.
    tile_size : int
        Preferred tile size (pixels).
    device : torch.device
    name : str
    path : pathlib.Path
    meta : dict
        Checkpoint metadata (training info, validation scores).
    card : ModelCard or None
        The registry's card of the model (task, classes, scores...), when loaded through it.
    instance_method : str
        Instance post-processing chosen on validation (``"boundary"`` or ``"distance"``).
    instance_params : dict
        Its thresholds tuned on validation (keywords of :func:`napari_pathoseg.methods.nuclei.instances.to_instances`).
    """

    def __init__(
        self,
        generator: Generator,
        config: M2Config,
        *,
        device: torch.device,
        name: str,
        path: Path,
        meta: dict[str, Any] | None = None,
        card: Any = None,
    ) -> None:
        self.generator = generator.to(device).eval()
        self.config = config
        self.device = device
        self.name = name
        self.path = path
        self.meta = dict(meta or {})
        self.card = card
        default = "boundary" if config.seg_channels > 1 else "distance"
        self.instance_method = self.meta.get("instance_method", default)
        self.instance_params: dict[str, float] = dict(self.meta.get("instance_params", {}))
        self._multiple = 2 ** (len(self.generator.encoder.out_channels) - 1)

    @property
    def mpp(self) -> float:
        return float(self.config.mpp)

    @property
    def tile_size(self) -> int:
        return int(self.config.tile_size)

    def __repr__(self) -> str:
        return f"NucleusModel(name={self.name!r}, preset={self.config.preset!r}, mpp={self.mpp}, device={self.device})"

    def predict(self, batch: np.ndarray) -> dict[str, np.ndarray | None]:
        """Segment nuclei and normalise the stain of a batch of RGB tiles.

        Parameters
        ----------
        batch : (B, H, W, 3) uint8 ndarray
            Tiles at :attr:`mpp`.  Any H, W (padded by reflection internally).

        Returns
        -------
        dict
            ``prob`` (B, H, W) float32 nucleus probability; ``normalized``
            (B, H, W, 3) uint8 stain-normalised tiles; ``extra`` (B, C, H, W)
            float32 extra segmentation channels (C = seg_channels - 1; channel 0
            is the nucleus-boundary probability) or ``None``.
        """
        batch = np.asarray(batch)
        if batch.ndim == 3:
            raise PathosegError(f"predict needs a batch (B, H, W, 3); got {batch.shape}. Use batch[None].")
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise PathosegError(
                f"predict needs RGB tiles (B, H, W, 3), got shape {batch.shape}; "
                "drop an alpha channel or convert greyscale to RGB first."
            )
        if batch.dtype != np.uint8:
            raise PathosegError(f"predict needs uint8 tiles, got {batch.dtype}; scale to 0..255 uint8.")
        b, h, w, _ = batch.shape
        m = self._multiple
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            mode = "reflect" if h > ph and w > pw else "edge"
            batch = np.pad(batch, ((0, 0), (0, ph), (0, pw), (0, 0)), mode=mode)
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # (B, 3, H, W) in [-1, 1]
            rgb, seg = self.generator(x)
            prob = torch.sigmoid(seg)[:, :, :h, :w].float().cpu().numpy()  # (B, S, H, W)
            norm = ((rgb[:, :, :h, :w] + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
            norm = norm.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
        extra = np.ascontiguousarray(prob[:, 1:]) if prob.shape[1] > 1 else None
        return {"prob": np.ascontiguousarray(prob[:, 0]), "normalized": norm, "extra": extra}

    def to_instances(
        self,
        prob: np.ndarray,
        extra: np.ndarray | None = None,
        *,
        method: str | None = None,
        mpp: float | None = None,
    ) -> np.ndarray:
        """Instance labels (H, W) int32 of one tile from ``prob`` (H, W) and ``extra`` (C, H, W).

        ``method`` defaults to the one chosen on validation (with its tuned
        thresholds, :attr:`instance_params`); ``mpp`` to the model's (pass the
        maps' um/px if they were resampled).
        """
        method = method or self.instance_method
        params = self.instance_params if method == self.instance_method else {}
        return _to_instances(
            prob, extra, method=method, mpp=mpp if mpp is not None else self.mpp, **params
        )


# ---------------------------------------------------------------------------- config schema

_WIDTH = Int(1, 4096)
_LAMBDA = Float(0.0, 1e6)


def _transcycle_keys() -> list[str]:
    from napari_pathoseg.methods.nuclei.transcycle import TransCycleEncoderConfig

    return [f.name for f in dataclasses.fields(TransCycleEncoderConfig)]


#: Bounds of the TransCycle encoder sizes (``M2Config.extra["transcycle"]``).
_TRANSCYCLE = Record(
    {
        "blocks": Seq(Int(1, 64), 4, 4),
        "base_width": Int(1, 1024),
        "expansion": Int(1, 16),
        "stem_channels": _WIDTH,
        "full_res_channels": _WIDTH,
        "hidden": Int(1, 8192),
        "layers": Int(1, 48),
        "heads": Int(1, 256),
        "mlp_ratio": Float(0.0, 16.0, low_open=True),
        "dropout": Float(0.0, 0.99),
        "head_channels": _WIDTH,
        "tile_size": Int(8, 2048),
    },
    allowed=_transcycle_keys,
)

#: The schema of an ``"m2"`` checkpoint config (:meth:`M2Config.to_dict`). Keys M2Config gains
#: later are allowed with a generic check (finite, ``|x| <= 1e6``); any other key is refused.
M2_SCHEMA = Record(
    {
        "preset": Text(64),
        "encoder": Choice(encoder_kinds),
        "widths": Seq(_WIDTH, 2, 8),
        "decoder_widths": Nullable(Seq(_WIDTH, 1, 7)),
        "attention": Bool(),
        "f_int": Nullable(_WIDTH),
        "norm": Choice(("instance", "batch")),
        "seg_channels": Int(1, 16),
        "disc_width": Int(1, 1024),
        "disc_layers": Int(1, 8),
        "tile_size": Int(8, 2048),
        "mpp": Float(0.0, 100.0, low_open=True),
        "lambda_adv": _LAMBDA,
        "lambda_cyc": _LAMBDA,
        "lambda_seg": _LAMBDA,
        "lambda_boundary": _LAMBDA,
        "lambda_dice": _LAMBDA,
        "gan_every": Int(1, 100_000),
        "extra": Record({"transcycle": _TRANSCYCLE}),
    },
    allowed=lambda: [f.name for f in dataclasses.fields(M2Config)],
)


def validate_m2_config(config: dict[str, Any], *, where: str) -> M2Config:
    """Check an ``"m2"`` checkpoint config before any network is built from it.

    Checks, in order: the schema (:data:`M2_SCHEMA`: known keys, types, bounds), that
    :class:`M2Config` accepts it, the largest feature map one tile implies
    (``tile_size² x widths[0]`` float32 at most :data:`MAX_FEATURE_BYTES`), and the size of the
    four networks, counted on the ``meta`` device (at most :data:`MAX_PARAMETERS`).

    Parameters
    ----------
    config : dict
        The checkpoint's config.
    where : str
        The checkpoint, for messages.

    Returns
    -------
    M2Config

    Raises
    ------
    CheckpointError
        With one line naming the key and the bound, or the network size.
    """
    validate(config, M2_SCHEMA, where=where)
    try:
        cfg = M2Config.from_dict(config)
    except CheckpointError:
        raise
    except (PathosegError, TypeError, ValueError) as exc:
        raise ConfigSchemaError(f"{where}: not a valid M2 config ({exc}).") from exc
    feature_bytes = cfg.tile_size**2 * max(cfg.widths[0], cfg.skip_widths[0]) * 4
    if feature_bytes > MAX_FEATURE_BYTES:
        raise ConfigSchemaError(
            f"{where}: its config implies {feature_bytes / 2**30:.1f} GiB feature maps per tile "
            f"(tile_size {cfg.tile_size}, {cfg.widths[0]} channels; limit {MAX_FEATURE_BYTES / 2**30:.0f} GiB); "
            "the checkpoint was edited or damaged: use the original file."
        )
    try:
        n = 2 * count_parameters(lambda: [Generator(cfg), Discriminator(cfg)])
    except CheckpointError:
        raise
    except (PathosegError, TypeError, ValueError, RuntimeError) as exc:
        raise ConfigSchemaError(f"{where}: its config does not describe a buildable M2 model ({exc}).") from exc
    if n > MAX_PARAMETERS:
        raise ConfigSchemaError(
            f"{where}: its config describes a {n / 1e6:,.0f} M-parameter model (limit {MAX_PARAMETERS / 1e6:,.0f} M); "
            "refusing to build it: the checkpoint was edited or damaged, use the original file."
        )
    return cfg


# ---------------------------------------------------------------------------- loader


def load_nucleus_model(
    path: str | os.PathLike,
    *,
    card: Any = None,
    name: str | None = None,
    device: str | torch.device | None = None,
) -> NucleusModel:
    """Build the :class:`NucleusModel` of an ``"m2"`` checkpoint (the ``nuclei`` task's loader).

    Parameters
    ----------
    path : path
        A ``.safetensors`` checkpoint written by napari-pathoseg.
    card : ModelCard or None
        The registry's card; gives the model its name and is kept as ``model.card``.
    name : str or None
        The model's name when no card is given (default: the file's stem).
    device : str, torch.device or None
        Default: CUDA / MPS when available, else CPU.

    Raises
    ------
    CheckpointError
        A pickle, another architecture, a config out of its schema, NaN/Inf weights, or
        weights that do not fit the stored config.
    """
    from napari_pathoseg.models.checkpoint import load_checkpoint, load_state_strict

    path = Path(path)
    tensors, config_d, meta = load_checkpoint(path, expected_kind="m2")
    config = M2Config.from_dict(config_d)  # already validated by load_checkpoint
    if "G_X2Y" not in tensors:
        raise CheckpointError(f"{path} has no G_X2Y generator weights; it is not an M2 nucleus model.")
    try:
        gen = Generator(config)
    except PathosegError as exc:
        raise CheckpointError(f"{path}: cannot build its model ({exc}).") from exc
    load_state_strict(gen, tensors["G_X2Y"], what="G_X2Y", path=path)
    dev = select_device(device)
    name = getattr(card, "name", None) or name or path.stem
    logger.info("loaded nucleus model %s from %s on %s", name, path, dev)
    return NucleusModel(gen, config, device=dev, name=name, path=path, meta=meta, card=card)
