"""Loading an M5 tissue model: the ``"m5"`` config schema, the loader and :class:`TissueModel`.

An M5 checkpoint (stage 2 of ``pathoseg tissue-train``) holds the PSPNet (``net.*``) and its
:class:`~napari_pathoseg.methods.tissue.network.M5Config`, which names the tissue classes (ids
1..n in a map; 0 is background by the grey > 210 rule), the µm per pixel and the window size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.methods.tissue.network import (
    M5Config,
    TissueClassifier,
    TissuePSPNet,
)
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
    Text,
    count_parameters,
    validate,
)

__all__ = ["M5_SCHEMA", "ClassMismatchError", "TissueModel", "load_tissue_model", "validate_m5_config"]

logger = logging.getLogger(__name__)


class ClassMismatchError(PathosegError):
    """A tissue model does not have the classes the user asked for."""


#: The schema of an ``"m5"`` (and ``"m5-cls"``) checkpoint config (:meth:`M5Config.to_dict`).
M5_SCHEMA = Record(
    {
        "preset": Text(64),
        "widths": Seq(Int(1, 8192), 7, 7),
        "blocks": Seq(Int(1, 64), 4, 4),
        "classes": Seq(Text(64), 1, 64),
        "mpp": Float(0.0, 100.0, low_open=True),
        "tile_size": Int(32, 4096),
        "dropout": Float(0.0, 1.0),
        "pda": Bool(),
        "pda_final": Float(0.0, 1.0),
        "ppm_bins": Seq(Int(1, 64), 1, 8),
        "ppm_channels": Int(1, 4096),
        "loss": Choice(("ons", "ce")),
        "background_grey": Float(0.0, 255.0),
        "lr1": Float(0.0, 10.0),
        "lr2": Float(0.0, 10.0),
        "batch1": Int(1, 4096),
        "batch2": Int(1, 4096),
        "balance": Bool(),
    }
)


def validate_m5_config(config: dict[str, Any], *, where: str) -> M5Config:
    """Check an M5 checkpoint config before any network is built from it (one line naming the key)."""
    validate(config, M5_SCHEMA, where=where)
    try:
        cfg = M5Config.from_dict(dict(config))
    except (PathosegError, TypeError, ValueError) as exc:
        raise ConfigSchemaError(f"{where}: not a valid M5 config ({exc}).") from None
    feature_bytes = cfg.tile_size ** 2 * max(cfg.widths[:2]) * 4
    if feature_bytes > MAX_FEATURE_BYTES:
        raise ConfigSchemaError(f"{where}: its config implies {feature_bytes / 2**30:.1f} GiB feature maps per tile; "
                                "the checkpoint was edited or damaged: use the original file.")
    n = count_parameters(lambda: TissuePSPNet(cfg))
    if n > MAX_PARAMETERS:
        raise ConfigSchemaError(f"{where}: its config describes a {n / 1e6:,.0f} M-parameter model; "
                                "the checkpoint was edited or damaged: use the original file.")
    return cfg


class TissueModel:
    """A loaded M5 tissue model (PSPNet): class probabilities of RGB tiles at :attr:`mpp`.

    Parameters
    ----------
    net : TissuePSPNet
    config : M5Config
    device : torch.device or str
    name : str
    path : Path, optional
    meta : dict, optional
    card : ModelCard, optional
    """

    task = "tissue"

    def __init__(self, net: TissuePSPNet, config: M5Config, *, device: torch.device | str = "cpu",
                 name: str = "tissue", path: Path | None = None, meta: dict[str, Any] | None = None,
                 card: Any = None) -> None:
        self.net = net.to(device).eval()
        self.config = config
        self.device = torch.device(device)
        self.name = name
        self.path = path
        self.meta = meta or {}
        self.card = card

    @property
    def mpp(self) -> float:
        return float(self.config.mpp)

    @property
    def tile_size(self) -> int:
        return int(self.config.tile_size)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.config.classes)

    @property
    def background_grey(self) -> float:
        return float(self.config.background_grey)

    def __repr__(self) -> str:
        return f"TissueModel({self.name!r}, {self.config.preset}, {list(self.classes)}, {self.mpp} um/px)"

    def check_classes(self, wanted: Sequence[str]) -> None:
        """Refuse a model whose classes differ from ``wanted`` (one line naming both)."""
        if [c.lower() for c in wanted] != [c.lower() for c in self.classes]:
            raise ClassMismatchError(f"Model {self.name} has classes {list(self.classes)}, not {list(wanted)}; "
                                     "pick a model trained for those classes or train one (pathoseg tissue-train).")

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(B, n, H, W) float32 class probabilities of a (B, H, W, 3) uint8 batch."""
        from napari_pathoseg.methods.tissue.cam import to_input

        with torch.inference_mode():
            logits = self.net(to_input(np.asarray(batch, np.uint8)).to(self.device))
            return torch.softmax(logits.float(), 1).cpu().numpy()


def load_tissue_model(path: str | os.PathLike, *, card: Any = None, name: str | None = None,
                      device: str | torch.device | None = None) -> TissueModel:
    """Build the :class:`TissueModel` of an ``"m5"`` checkpoint (the ``tissue`` task's loader).

    Raises
    ------
    CheckpointError
        A pickle, another architecture, a config out of its schema, NaN/Inf weights, or
        weights that do not fit the stored config.
    """
    from napari_pathoseg.models.checkpoint import load_network
    from napari_pathoseg.training.settings import select_device

    path = Path(path)
    net, cfg, meta = load_network(path, kind="m5", validate=validate_m5_config, build=TissuePSPNet,
                                  what="an M5 tissue model")
    dev = select_device(device)
    name = getattr(card, "name", None) or name or path.stem
    logger.info("loaded tissue model %s from %s on %s", name, path, dev)
    return TissueModel(net, cfg, device=dev, name=name, path=path, meta=meta, card=card)


def load_classifier(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[TissueClassifier, M5Config]:
    """The stage-1 classifier of an ``"m5-cls"`` checkpoint (for Grad-CAM++ pseudo masks)."""
    from napari_pathoseg.models.checkpoint import load_checkpoint, load_state_strict

    tensors, config_d, _ = load_checkpoint(path, expected_kind="m5-cls")
    cfg = validate_m5_config(config_d, where=str(path))
    net = TissueClassifier(cfg)
    load_state_strict(net, tensors["net"], what="net", path=Path(path))
    return net.to(device).eval(), cfg
