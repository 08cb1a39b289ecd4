"""Loading an M4 slide classifier: the ``"m4"`` config schema, the loader, :class:`SlideClassifier`.

A slide-classifier checkpoint holds the student (``net.*``: ResNet-18 structure + linear head)
and, in its config, the scale and tile size, the entropy threshold of the background filter,
and the slide pooling with its call threshold. The loader checks the config against
:data:`M4_SCHEMA` (bounds on every key, the feature-map size, the parameter count) before any
network is built, and reads safetensors only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.methods.mil.network import VARIANTS, MilConfig, MilNet, to_input
from napari_pathoseg.methods.mil.pooling import POOLINGS, check_pooling, pool
from napari_pathoseg.models.validation import (
    MAX_FEATURE_BYTES,
    MAX_PARAMETERS,
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

__all__ = ["M4_SCHEMA", "SlideClassifier", "load_slide_classifier", "validate_m4_config"]

logger = logging.getLogger(__name__)

#: The schema of an ``"m4"`` checkpoint config (:meth:`MilConfig.to_dict`).
M4_SCHEMA = Record(
    {
        "preset": Text(64),
        "widths": Seq(Int(1, 4096), 4, 4),
        "blocks": Seq(Int(1, 64), 4, 4),
        "mpp": Float(0.0, 100.0, low_open=True),
        "tile_size": Int(16, 4096),
        "entropy_threshold": Float(0.0, 8.0),
        "variant": Choice(VARIANTS),
        "batch": Int(1, 4096),
        "lr": Float(0.0, 1.0),
        "momentum": Float(0.0, 1.0),
        "k": Float(0.0, 1.0, low_open=True),
        "sinkhorn_iters": Int(1, 10_000),
        "sinkhorn_lambda": Float(0.0, 100.0, low_open=True),
        "bank_refresh": Int(0, 1_000_000),
        "bag_tiles": Int(1, 4096),
        "pooling": Choice(POOLINGS),
        "pooling_k": Float(0.0, 1e6, low_open=True),
        "threshold": Float(0.0, 1.0),
    }
)


def validate_m4_config(config: dict[str, Any], *, where: str) -> MilConfig:
    """Check an ``"m4"`` checkpoint config before any network is built from it.

    Raises
    ------
    CheckpointError
        One line naming the key and the bound, or the network size.
    """
    validate(config, M4_SCHEMA, where=where)
    try:
        cfg = MilConfig.from_dict(dict(config))
        check_pooling(cfg.pooling, cfg.pooling_k)
    except (PathosegError, TypeError, ValueError) as exc:
        raise ConfigSchemaError(f"{where}: not a valid M4 config ({exc}).") from None
    feature_bytes = (cfg.tile_size // 2) ** 2 * cfg.widths[0] * 4
    if feature_bytes > MAX_FEATURE_BYTES:
        raise ConfigSchemaError(f"{where}: its config implies {feature_bytes / 2**30:.1f} GiB feature maps per tile; "
                                "the checkpoint was edited or damaged: use the original file.")
    n = count_parameters(lambda: MilNet(cfg))
    if n > MAX_PARAMETERS:
        raise ConfigSchemaError(f"{where}: its config describes a {n / 1e6:,.0f} M-parameter model; "
                                "the checkpoint was edited or damaged: use the original file.")
    return cfg


class SlideClassifier:
    """A loaded M4 slide classifier (the student network).

    Attributes
    ----------
    name : str
    card : ModelCard or None
    device : torch.device
    classes : tuple of str
        ``("negative", "positive")``.
    mpp : float
        µm/px of the tiles.
    tile_size : int
        Tile side (px at ``mpp``); tiles do not overlap.
    entropy_threshold : float
        Background filter (:mod:`.entropy`).
    pooling : str
    pooling_k : int or float
    threshold : float
        Positive call when the pooled probability is at least this.
    network : torch.nn.Module
        The student.
    config : MilConfig
    """

    task = "slide"
    classes = ("negative", "positive")

    def __init__(self, net: MilNet, config: MilConfig, *, device: torch.device | str = "cpu", name: str = "slide",
                 path: Path | None = None, meta: dict[str, Any] | None = None, card: Any = None) -> None:
        self.network = net.to(device).eval()
        self.config = config
        self.device = torch.device(device)
        self.name = name
        self.path = path
        self.meta = meta or {}
        self.card = card
        self.mpp = float(config.mpp)
        self.tile_size = int(config.tile_size)
        self.entropy_threshold = float(config.entropy_threshold)
        self.pooling = config.pooling
        k = float(config.pooling_k)
        self.pooling_k: int | float = int(k) if k >= 1 and k.is_integer() else k
        self.threshold = float(config.threshold)

    def __repr__(self) -> str:
        return f"SlideClassifier({self.name!r}, {self.config.preset}, {self.tile_size} px at {self.mpp} um/px)"

    def predict_tiles(self, batch: np.ndarray, *, chunk: int = 256) -> np.ndarray:
        """Positive probability of each tile: uint8 (N, tile, tile, 3) -> float32 (N,).

        Tiles of another size are used as given (the network pools globally), but the model
        was trained on :attr:`tile_size` px at :attr:`mpp`.
        """
        x = np.asarray(batch)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise PathosegError(f"predict_tiles needs uint8 tiles (N, H, W, 3), got shape {x.shape}.")
        if x.shape[0] == 0:
            return np.zeros(0, np.float32)
        out = []
        with torch.inference_mode():
            for i in range(0, x.shape[0], chunk):
                logits = self.network(to_input(np.ascontiguousarray(x[i:i + chunk], np.uint8)).to(self.device))
                out.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy())
        return np.concatenate(out).astype(np.float32)

    def pool(self, probs: Any) -> float:
        """Slide probability from tile probabilities with the model's pooling."""
        return pool(probs, method=self.pooling, k=self.pooling_k, threshold=0.5)

    def call(self, probability: float) -> str:
        """``"positive"`` when ``probability >= threshold``, else ``"negative"``."""
        return self.classes[int(probability >= self.threshold)]


def load_slide_classifier(path: str | os.PathLike, *, card: Any = None, name: str | None = None,
                          device: str | torch.device | None = None) -> SlideClassifier:
    """Build the :class:`SlideClassifier` of an ``"m4"`` checkpoint (the ``slide`` task's loader).

    Raises
    ------
    CheckpointError
        A pickle, another architecture, a config out of its schema, NaN/Inf weights, or
        weights that do not fit the stored config.
    """
    from napari_pathoseg.models.checkpoint import load_network
    from napari_pathoseg.training.settings import select_device

    path = Path(path)
    net, cfg, meta = load_network(path, kind="m4", validate=validate_m4_config, build=MilNet,
                                  what="an M4 slide classifier")
    dev = select_device(device)
    name = getattr(card, "name", None) or name or path.stem
    logger.info("loaded slide classifier %s from %s on %s", name, path, dev)
    return SlideClassifier(net, cfg, device=dev, name=name, path=path, meta=meta, card=card)
