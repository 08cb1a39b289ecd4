"""Loading an M3 lesion model: the ``"m3"`` config schema, the loader, :class:`LesionModel`.

A lesion checkpoint holds the FPN (``net.*``) and, in its config, the Vahadane reference
normaliser it was trained with. :class:`LesionModel` normalises every input to that reference
(the source stain estimated once per image or slide and given as ``source``), runs the network
and returns the lesion probability.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_pathoseg.errors import PathosegError, StainError
from napari_pathoseg.methods.lesion.network import LesionFPN, M3Config
from napari_pathoseg.models.validation import (
    MAX_FEATURE_BYTES,
    MAX_PARAMETERS,
    Bool,
    Choice,
    ConfigSchemaError,
    Float,
    Int,
    Record,
    Seq,
    Spec,
    Text,
    count_parameters,
    validate,
)

__all__ = ["LesionModel", "M3_SCHEMA", "validate_m3_config", "load_lesion_model"]

logger = logging.getLogger(__name__)

_WIDTH = Int(1, 4096)


class _StainSpec(Spec):
    """``null`` or a saved stain normaliser (checked by :func:`normalizer_from_dict`)."""

    def check(self, value: Any, where: str, key: str) -> None:
        if value is None:
            return
        from napari_pathoseg.stain.persistence import normalizer_from_dict

        try:
            normalizer_from_dict(value, what=f"{where}: config {key}")
        except StainError as exc:
            raise ConfigSchemaError(f"{exc}; the checkpoint was edited or damaged: use the original file.") from None


#: The schema of an ``"m3"`` checkpoint config (:meth:`M3Config.to_dict`).
M3_SCHEMA = Record(
    {
        "preset": Text(64),
        "blocks": Seq(Int(1, 64), 4, 4),
        "base_width": Int(1, 1024),
        "expansion": Int(1, 16),
        "stem_channels": _WIDTH,
        "fpn_channels": _WIDTH,
        "head_channels": _WIDTH,
        "mpp": Float(0.0, 100.0, low_open=True),
        "hires_factor": Int(1, 32),
        "block_size": Int(32, 4096),
        "tile_size": Int(64, 4096),
        "multiscale": Bool(),
        "loss": Choice(("focal", "bce")),
        "focal_alpha": Float(0.0, 1.0),
        "focal_gamma": Float(0.0, 10.0),
        "lr": Float(0.0, 1.0),
        "lr_decay": Float(0.0, 100.0),
        "hires_grad": Bool(),
        "batch_blocks": Int(1, 1024),
        "stain": _StainSpec(),
    }
)


def validate_m3_config(config: dict[str, Any], *, where: str) -> M3Config:
    """Check an ``"m3"`` checkpoint config before any network is built from it.

    Checks the schema (:data:`M3_SCHEMA`), that :class:`M3Config` accepts it, the largest
    feature map of one tile (``(tile_size / 2)² x stem_channels`` float32) and the number of
    parameters (counted on the ``meta`` device).

    Raises
    ------
    CheckpointError
        One line naming the key and the bound, or the network size.
    """
    validate(config, M3_SCHEMA, where=where)
    try:
        cfg = M3Config.from_dict(dict(config))
    except (PathosegError, TypeError, ValueError) as exc:
        raise ConfigSchemaError(f"{where}: not a valid M3 config ({exc}).") from None
    feature_bytes = (cfg.tile_size // 2) ** 2 * max(cfg.stem_channels, cfg.fpn_channels) * 4
    if feature_bytes > MAX_FEATURE_BYTES:
        raise ConfigSchemaError(f"{where}: its config implies {feature_bytes / 2**30:.1f} GiB feature maps per tile; "
                                "the checkpoint was edited or damaged: use the original file.")
    n = count_parameters(lambda: LesionFPN(cfg))
    if n > MAX_PARAMETERS:
        raise ConfigSchemaError(f"{where}: its config describes a {n / 1e6:,.0f} M-parameter model; "
                                "the checkpoint was edited or damaged: use the original file.")
    return cfg


class LesionModel:
    """A loaded M3 lesion model.

    Parameters
    ----------
    net : LesionFPN
    config : M3Config
    device : torch.device
    name : str
    path : Path or None
    meta : dict
    card : ModelCard or None

    Attributes
    ----------
    normalizer : StainNormalizer or None
        The stored reference normaliser (``None``: the model was trained without one).
    """

    task = "lesion"

    def __init__(self, net: LesionFPN, config: M3Config, *, device: torch.device | str = "cpu", name: str = "lesion",
                 path: Path | None = None, meta: dict[str, Any] | None = None, card: Any = None) -> None:
        self.net = net.to(device).eval()
        self.config = config
        self.device = torch.device(device)
        self.name = name
        self.path = path
        self.meta = meta or {}
        self.card = card
        self.normalizer = None
        if config.stain is not None:
            from napari_pathoseg.stain.persistence import normalizer_from_dict

            self.normalizer = normalizer_from_dict(config.stain, what=f"{name}: stain reference")

    @property
    def mpp(self) -> float:
        return float(self.config.mpp)

    @property
    def tile_size(self) -> int:
        return int(self.config.tile_size)

    def __repr__(self) -> str:
        return f"LesionModel({self.name!r}, {self.config.preset}, {self.mpp} um/px)"

    def estimate_stain(self, image: np.ndarray, *, what: str = "image") -> Any:
        """The source stain of ``image`` for :meth:`normalize` (``None`` when it cannot be measured)."""
        if self.normalizer is None:
            return None
        try:
            return self.normalizer.estimate(image, what=what)
        except StainError as exc:
            logger.warning("%s: stain not normalised (%s)", what, exc)
            return None

    def normalize(self, batch: np.ndarray, source: Any) -> np.ndarray:
        """``batch`` (B, H, W, 3) uint8 mapped onto the reference stain (unchanged when ``source`` is None)."""
        if self.normalizer is None or source is None:
            return batch
        return self.normalizer.transform(batch, source=source)

    def predict(self, batch: np.ndarray, *, source: Any = None) -> np.ndarray:
        """Lesion probability of a (B, H, W, 3) uint8 batch at :attr:`mpp`: (B, H, W) float32 in [0, 1].

        ``source``: the stain parameters of the image or slide the batch comes from
        (:meth:`estimate_stain`); tiles are normalised to the stored reference first.
        """
        from napari_pathoseg.methods.lesion.train import to_input

        x = self.normalize(np.asarray(batch, np.uint8), source)
        with torch.inference_mode():
            logits = self.net(to_input(x).to(self.device))[:, 0]
            return torch.sigmoid(logits).float().cpu().numpy()


def load_lesion_model(path: str | os.PathLike, *, card: Any = None, name: str | None = None,
                      device: str | torch.device | None = None) -> LesionModel:
    """Build the :class:`LesionModel` of an ``"m3"`` checkpoint (the ``lesion`` task's loader).

    Raises
    ------
    CheckpointError
        A pickle, another architecture, a config out of its schema, NaN/Inf weights, or
        weights that do not fit the stored config.
    """
    from napari_pathoseg.models.checkpoint import load_network
    from napari_pathoseg.training.settings import select_device

    path = Path(path)
    net, cfg, meta = load_network(path, kind="m3", validate=validate_m3_config, build=LesionFPN,
                                  what="an M3 lesion model")
    dev = select_device(device)
    name = getattr(card, "name", None) or name or path.stem
    logger.info("loaded lesion model %s from %s on %s", name, path, dev)
    return LesionModel(net, cfg, device=dev, name=name, path=path, meta=meta, card=card)
