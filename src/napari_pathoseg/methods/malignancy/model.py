"""Loading an M1 malignancy model: the ``"m1"`` config schema, the loader, :class:`MalignancyModel`.

A released M1 checkpoint holds two networks: ``classifier`` (C, the call) and ``segmenter``
(B, the malignant region), and the :class:`~napari_pathoseg.methods.malignancy.network.M1Config`
they share (µm/px, input size, thresholds). Stage checkpoints of a training run (``A``,
``B``, ``C``) use the same kind and schema and hold one of the two networks.

Plain images (:meth:`MalignancyModel.classify_image`): the image is resampled to the model's
µm/px; an image whose sides are both at most :data:`WHOLE_IMAGE_FACTOR` x ``tile_size`` goes
through C whole (global pooling makes any size valid); a larger one is cut into tiles of that
side (the last row and column shifted inwards to stay inside the image) and its probability is
the mean of the tiles' probabilities weighted by their area.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_pathoseg.errors import CheckpointError, PathosegError
from napari_pathoseg.methods.malignancy.network import (
    MULTIPLE,
    M1Config,
    MalignancyClassifier,
    MalignancySegmenter,
    to_input,
)
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

__all__ = [
    "MalignancyModel",
    "MalignancyInputError",
    "M1_SCHEMA",
    "validate_m1_config",
    "load_malignancy_model",
    "pad_to_multiple",
    "pooled_probability",
    "resample",
    "WHOLE_IMAGE_FACTOR",
]

logger = logging.getLogger(__name__)

#: Plain images up to this many ``tile_size`` per side go through C whole; larger ones in tiles.
WHOLE_IMAGE_FACTOR = 4


class MalignancyInputError(PathosegError):
    """An image is too small (or not RGB) for the malignancy model."""


#: The schema of an ``"m1"`` checkpoint config (:meth:`M1Config.to_dict`).
M1_SCHEMA = Record(
    {
        "preset": Text(64),
        "widths": Seq(Int(1, 4096), 5, 5),
        "mpp": Float(0.0, 100.0, low_open=True),
        "tile_size": Int(16, 4096),
        "min_size": Int(16, 4096),
        "batch_size": Int(1, 4096),
        "lr": Float(0.0, 1.0),
        "weight_decay": Float(0.0, 1.0),
        "dice_weight": Float(0.0, 100.0),
        "threshold": Float(0.0, 1.0),
        "mask_threshold": Float(0.0, 1.0),
        "stage": Choice(("A", "B", "C", "BC")),
    }
)


def validate_m1_config(config: dict[str, Any], *, where: str) -> M1Config:
    """Check an ``"m1"`` checkpoint config before any network is built from it.

    Checks the schema (:data:`M1_SCHEMA`), that :class:`M1Config` accepts it, the largest
    feature map of one training tile (``tile_size² x 2 widths[0]`` float32, the decoder's
    concatenation) and the number of parameters of both networks (counted on the ``meta`` device).

    Raises
    ------
    CheckpointError
        One line naming the key and the bound, or the network size.
    """
    validate(config, M1_SCHEMA, where=where)
    try:
        cfg = M1Config.from_dict(dict(config))
    except (PathosegError, TypeError, ValueError) as exc:
        raise ConfigSchemaError(f"{where}: not a valid M1 config ({exc}).") from None
    feature_bytes = cfg.tile_size ** 2 * 2 * cfg.widths[0] * 4
    if feature_bytes > MAX_FEATURE_BYTES:
        raise ConfigSchemaError(f"{where}: its config implies {feature_bytes / 2**30:.1f} GiB feature maps per tile; "
                                "the checkpoint was edited or damaged: use the original file.")
    n = count_parameters(lambda: MalignancySegmenter(cfg)) + count_parameters(lambda: MalignancyClassifier(cfg))
    if n > MAX_PARAMETERS:
        raise ConfigSchemaError(f"{where}: its config describes a {n / 1e6:,.0f} M-parameter model; "
                                "the checkpoint was edited or damaged: use the original file.")
    return cfg


def pad_to_multiple(batch: np.ndarray, *, multiple: int = MULTIPLE, minimum: int = 0) -> np.ndarray:
    """Reflect-pad (N, H, W, C) at the bottom/right to sides that are multiples of ``multiple`` (>= ``minimum``).

    Padding larger than the image repeats the reflection (``symmetric`` mode, tiled).
    """
    n, h, w = batch.shape[:3]
    th = max(-(-h // multiple) * multiple, -(-minimum // multiple) * multiple)
    tw = max(-(-w // multiple) * multiple, -(-minimum // multiple) * multiple)
    out = batch
    while out.shape[1] < th or out.shape[2] < tw:
        ph, pw = min(th - out.shape[1], out.shape[1]), min(tw - out.shape[2], out.shape[2])
        pad = [(0, 0), (0, ph), (0, pw)] + [(0, 0)] * (batch.ndim - 3)
        out = np.pad(out, pad, mode="symmetric")
    return out


def resample(image: np.ndarray, factor: float, *, order: int = 1) -> np.ndarray:
    """Resample an (H, W[, 3]) image by ``factor`` (anti-aliased when shrinking); dtype kept.

    ``order=0`` (nearest, no anti-aliasing) for masks.
    """
    if abs(factor - 1.0) < 1e-6:
        return image
    from skimage.transform import resize

    h, w = image.shape[:2]
    shape = (max(1, int(round(h * factor))), max(1, int(round(w * factor)))) + image.shape[2:]
    out = resize(image, shape, order=order, anti_aliasing=(order > 0 and factor < 1.0), preserve_range=True,
                 mode="reflect")
    if image.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.astype(image.dtype)


def _tile_starts(size: int, tile: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, tile))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def pooled_probability(image: np.ndarray, *, side: int, classify: Any) -> float:
    """One image's malignant probability: ``classify`` on the whole (H, W, 3) image when both sides
    are <= ``side``, else the area-weighted mean over tiles of ``side`` px (last row/column shifted inwards).

    ``classify`` maps an (N, h, w, 3) uint8 batch to (N,) probabilities.
    """
    h, w = image.shape[:2]
    if h <= side and w <= side:
        return float(classify(image[None])[0])
    probs, weights = [], []
    for y in _tile_starts(h, side):
        for x in _tile_starts(w, side):
            tile = image[y:y + side, x:x + side]
            probs.append(float(classify(tile[None])[0]))
            weights.append(tile.shape[0] * tile.shape[1])
    return float(np.average(probs, weights=weights))


class MalignancyModel:
    """A loaded M1 model: C for the malignancy call, B for the malignant region.

    Parameters
    ----------
    classifier : MalignancyClassifier
        C (A's architecture).
    segmenter : MalignancySegmenter
        B (the U-Net).
    config : M1Config
    device : torch.device or str
    name : str
    path : Path or None
    meta : dict or None
    card : ModelCard or None

    Attributes
    ----------
    mpp, input_size, min_size, threshold, mask_threshold
        From the config (``input_size`` is the training crop side).
    classes : tuple
        ``("benign", "malignant")``.
    """

    task = "malignancy"
    classes = ("benign", "malignant")

    def __init__(self, classifier: MalignancyClassifier, segmenter: MalignancySegmenter, config: M1Config, *,
                 device: torch.device | str = "cpu", name: str = "malignancy", path: Path | None = None,
                 meta: dict[str, Any] | None = None, card: Any = None) -> None:
        self.device = torch.device(device)
        self.classifier = classifier.to(self.device).eval()
        self.segmenter = segmenter.to(self.device).eval()
        self.config = config
        self.name = name
        self.path = path
        self.meta = meta or {}
        self.card = card
        self.mpp = float(config.mpp)
        self.input_size = int(config.tile_size)
        self.min_size = int(config.min_size)
        self.threshold = float(config.threshold)
        self.mask_threshold = float(config.mask_threshold)

    def __repr__(self) -> str:
        return f"MalignancyModel({self.name!r}, {self.config.preset}, {self.mpp} um/px)"

    # ------------------------------------------------------------------ batches at mpp
    def _check(self, batch: np.ndarray, what: str) -> np.ndarray:
        batch = np.asarray(batch)
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise MalignancyInputError(f"{what}: expected an (N, H, W, 3) RGB batch, got shape {batch.shape}.")
        h, w = batch.shape[1:3]
        if min(h, w) < self.min_size:
            raise MalignancyInputError(
                f"{what}: {w} x {h} px at {self.mpp:g} um/px is smaller than the model's minimum "
                f"{self.min_size} px; give a larger image or region.")
        if batch.dtype != np.uint8:
            batch = np.clip(batch, 0, 255).astype(np.uint8)
        return batch

    def classify(self, batch: np.ndarray) -> np.ndarray:
        """Malignant probability of C for each image of a (N, H, W, 3) uint8 batch at :attr:`mpp`: (N,) float32.

        Sides are reflect-padded to a multiple of 16; any side >= :attr:`min_size` works.
        """
        batch = self._check(batch, "classify")
        if len(batch) == 0:
            return np.zeros(0, np.float32)
        x = to_input(pad_to_multiple(batch))
        with torch.inference_mode():
            logits = self.classifier(x.to(self.device))
            return torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy().astype(np.float32)

    def segment(self, batch: np.ndarray) -> np.ndarray:
        """Malignant-region probability of B: (N, H, W, 3) uint8 at :attr:`mpp` -> (N, H, W) float32."""
        batch = self._check(batch, "segment")
        h, w = batch.shape[1:3]
        if len(batch) == 0:
            return np.zeros((0, h, w), np.float32)
        x = to_input(pad_to_multiple(batch))
        with torch.inference_mode():
            logits = self.segmenter(x.to(self.device))[:, 0, :h, :w]
            return torch.sigmoid(logits.float()).cpu().numpy().astype(np.float32)

    # ------------------------------------------------------------------ plain images
    def _to_model_scale(self, image: np.ndarray, mpp: float | None, what: str) -> np.ndarray:
        image = np.asarray(image)
        if image.ndim == 3 and image.shape[-1] == 4:
            image = image[..., :3]
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise MalignancyInputError(f"{what}: expected an RGB image (H, W, 3), got shape {image.shape}.")
        if image.dtype != np.uint8:
            image = np.clip(image, 0, 255).astype(np.uint8)
        src = self.mpp if mpp is None else float(mpp)
        if not np.isfinite(src) or src <= 0:
            raise MalignancyInputError(f"{what}: µm/px must be a positive number, got {mpp!r}.")
        out = resample(image, src / self.mpp)
        if min(out.shape[:2]) < self.min_size:
            h, w = image.shape[:2]
            raise MalignancyInputError(
                f"{what}: {w} x {h} px at {src:g} um/px is {out.shape[1]} x {out.shape[0]} px at the model's "
                f"{self.mpp:g} um/px, smaller than its minimum {self.min_size} px; give a larger image.")
        return out

    def classify_image(self, image: np.ndarray, *, mpp: float | None) -> float:
        """Malignant probability of a plain RGB image of any size at ``mpp`` µm/px (``None``: the model's).

        Whole image through C when both sides are <= ``WHOLE_IMAGE_FACTOR * input_size`` at the
        model's scale, else the area-weighted mean over tiles of that side (see the module text).
        """
        img = self._to_model_scale(image, mpp, "classify_image")
        return pooled_probability(img, side=WHOLE_IMAGE_FACTOR * self.input_size, classify=self.classify)

    def segment_image(self, image: np.ndarray, *, mpp: float | None, tile: int = 512, overlap: int = 32) -> np.ndarray:
        """B's malignant-region probability of a plain image, on the image's own pixel grid: (H, W) float32.

        Large images are segmented in overlapping tiles of ``tile`` px at the model's scale
        (each tile's central part kept) so memory stays bounded.
        """
        h0, w0 = np.asarray(image).shape[:2]
        img = self._to_model_scale(image, mpp, "segment_image")
        h, w = img.shape[:2]
        if h <= tile and w <= tile:
            prob = self.segment(img[None])[0]
        else:
            prob = np.zeros((h, w), np.float32)
            step = tile - 2 * overlap
            for y in range(0, h, step):
                for x in range(0, w, step):
                    y0, x0 = max(0, y - overlap), max(0, x - overlap)
                    y1, x1 = min(h, y + step + overlap), min(w, x + step + overlap)
                    if min(y1 - y0, x1 - x0) < self.min_size:  # a thin last strip: take a full-size window
                        y0, x0 = max(0, min(y0, h - self.min_size)), max(0, min(x0, w - self.min_size))
                    p = self.segment(img[None, y0:y1, x0:x1])[0]
                    ye, xe = min(h, y + step), min(w, x + step)
                    prob[y:ye, x:xe] = p[y - y0:ye - y0, x - x0:xe - x0]
        if prob.shape != (h0, w0):
            from skimage.transform import resize

            prob = resize(prob, (h0, w0), order=1, preserve_range=True, anti_aliasing=False).astype(np.float32)
        return prob


def load_malignancy_model(path: str | os.PathLike, *, card: Any = None, name: str | None = None,
                          device: str | torch.device | None = None) -> MalignancyModel:
    """Build the :class:`MalignancyModel` of a released ``"m1"`` checkpoint (the ``malignancy`` task's loader).

    Raises
    ------
    CheckpointError
        A pickle, another architecture, a config out of its schema, NaN/Inf weights, a stage
        checkpoint holding only one of the two networks, or weights that do not fit the config.
    """
    from napari_pathoseg.models.checkpoint import load_checkpoint, load_state_strict
    from napari_pathoseg.training.settings import select_device

    path = Path(path)
    tensors, config_d, meta = load_checkpoint(path, expected_kind="m1")
    cfg = validate_m1_config(config_d, where=str(path))
    missing = [k for k in ("classifier", "segmenter") if k not in tensors]
    if missing:
        raise CheckpointError(
            f"{path} has no {' or '.join(missing)} weights (a stage-{cfg.stage} training checkpoint?); "
            "load the released pair (run folder's malignancy.safetensors) instead.")
    clf, seg = MalignancyClassifier(cfg), MalignancySegmenter(cfg)
    load_state_strict(clf, tensors["classifier"], what="classifier", path=path)
    load_state_strict(seg, tensors["segmenter"], what="segmenter", path=path)
    dev = select_device(device)
    name = getattr(card, "name", None) or name or path.stem
    logger.info("loaded malignancy model %s from %s on %s", name, path, dev)
    return MalignancyModel(clf, seg, cfg, device=dev, name=name, path=path, meta=meta, card=card)
