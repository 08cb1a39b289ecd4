"""Nucleus model registry: shipped and user-registered M2 checkpoints.

* Shipped models live in ``napari_pathoseg/models/weights/`` as
  ``<name>.safetensors`` plus a ``<name>.json`` card (description, scores).
* User models are recorded in ``models.json`` under ``$PATHOSEG_HOME`` (or
  ``~/.local/share/napari-pathoseg``) by :func:`register_model`.

:func:`load_model` accepts a registered name or a checkpoint path and returns
a :class:`NucleusModel` that runs the ``G_X2Y`` generator.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_pathoseg.errors import CheckpointError, PathosegError
from napari_pathoseg.methods.nuclei.instances import to_instances as _to_instances
from napari_pathoseg.models.checkpoint import load_checkpoint, load_state_strict, read_header
from napari_pathoseg.methods.nuclei.attcycle import Generator, M2Config, select_device

__all__ = [
    "NucleusModel",
    "load_model",
    "list_models",
    "register_model",
    "registry_path",
    "WEIGHTS_DIR",
    "DEFAULT_MODEL",
]

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_MODEL = "nuclei-lite"


def registry_path() -> Path:
    """The user registry file: ``$PATHOSEG_HOME/models.json`` or ``~/.local/share/napari-pathoseg/models.json``."""
    home = os.environ.get("PATHOSEG_HOME")
    base = Path(home) if home else Path.home() / ".local" / "share" / "napari-pathoseg"
    return base / "models.json"


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
    ) -> None:
        self.generator = generator.to(device).eval()
        self.config = config
        self.device = device
        self.name = name
        self.path = path
        self.meta = dict(meta or {})
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


def _read_registry() -> list[dict[str, Any]]:
    path = registry_path()
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PathosegError(f"Model registry {path} is unreadable ({exc}); fix or delete it.") from exc
    return list(data.get("models", []))


def _shipped() -> list[dict[str, Any]]:
    out = []
    for f in sorted(WEIGHTS_DIR.glob("*.safetensors")):
        card: dict[str, Any] = {}
        jf = f.with_suffix(".json")
        if jf.is_file():
            try:
                card = json.loads(jf.read_text())
            except ValueError:
                card = {}
        out.append({"name": f.stem, "path": str(f), "shipped": True, **{k: v for k, v in card.items() if k not in ("name", "path")}})
    return out


def list_models() -> list[dict[str, Any]]:
    """Shipped and user-registered models as dicts (``name``, ``path``, ``shipped``, ``scores``, ...)."""
    return _shipped() + [dict(m, shipped=False) for m in _read_registry()]


def register_model(
    path: str | os.PathLike,
    *,
    name: str,
    base: str | None = None,
    data: str | None = None,
    scores: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Record a checkpoint under ``name`` in the user registry (atomic write).

    The checkpoint must be a readable M2 safetensors checkpoint; ``name`` must
    not shadow a shipped model.  Re-registering a name replaces its entry.
    """
    path = Path(path).resolve()
    header = read_header(path)
    if header["kind"] != "m2":
        raise CheckpointError(f"{path} holds a {header['kind']!r} model; only M2 nucleus models can be registered.")
    if any(m["name"] == name for m in _shipped()):
        raise PathosegError(f"{name!r} is a shipped model name; choose another name.")
    entry = {"name": name, "path": str(path), "base": base, "data": data, "scores": scores or {},
             "preset": header["config"].get("preset")}
    models = [m for m in _read_registry() if m.get("name") != name] + [entry]
    reg = registry_path()
    reg.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=reg.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump({"models": models}, fh, indent=1)
    os.replace(tmp, reg)
    return entry


def _resolve(name_or_path: str | os.PathLike) -> tuple[str, Path]:
    s = str(name_or_path)
    p = Path(s).expanduser()
    if p.suffix in (".safetensors", ".pt", ".pth", ".ckpt", ".bin") or p.is_file():
        return p.stem, p
    for m in list_models():
        if m["name"] == s:
            return s, Path(m["path"])
    names = [m["name"] for m in list_models()]
    raise CheckpointError(f"Unknown model {s!r}; valid names: {names} (or give a .safetensors path).")


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, *, device: str | torch.device | None = None) -> NucleusModel:
    """Load a nucleus model by registered name or checkpoint path.

    Parameters
    ----------
    name_or_path : str or path
        ``"nuclei-lite"`` (shipped), a name from :func:`list_models`, or a
        ``.safetensors`` checkpoint written by napari-pathoseg.
    device : str, torch.device or None
        Default: CUDA / MPS when available, else CPU.

    Raises
    ------
    CheckpointError
        Unknown name, missing file, a pickle, another architecture, or weights
        that do not fit the stored config.
    """
    name, path = _resolve(name_or_path)
    tensors, config_d, meta = load_checkpoint(path, expected_kind="m2")
    config = M2Config.from_dict(config_d)
    if "G_X2Y" not in tensors:
        raise CheckpointError(f"{path} has no G_X2Y generator weights; it is not an M2 nucleus model.")
    try:
        gen = Generator(config)
    except PathosegError as exc:
        raise CheckpointError(f"{path}: cannot build its model ({exc}).") from exc
    load_state_strict(gen, tensors["G_X2Y"], what="G_X2Y", path=path)
    dev = select_device(device)
    logger.info("loaded nucleus model %s from %s on %s", name, path, dev)
    return NucleusModel(gen, config, device=dev, name=name, path=path, meta=meta)
