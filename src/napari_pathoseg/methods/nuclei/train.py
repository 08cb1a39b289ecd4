"""M2 (AttCycle) training loop, written as a generator of events.

:func:`train_m2` yields :class:`StepEvent` after every optimisation step,
:class:`EpochEvent` after every epoch (validation metrics, checkpoint path)
and finally one :class:`DoneEvent`.  :func:`run_training` drives it headless.

Each step draws ``batch_size`` X crops (varied styles, HED stain
augmentation) and ``batch_size`` Y crops (one style, geometric augmentation
only).  Every ``config.gan_every``-th step is the method's full CycleGAN step:

* ``G_X2Y(x) -> (fake_y, seg_x)``, ``G_Y2X(y) -> (fake_x, seg_y)``,
  reconstructions ``G_Y2X(fake_y)``, ``G_X2Y(fake_x)``;
* ``lambda_adv * LSGAN_G + lambda_cyc * L1_cycle + lambda_seg * (L_seg(seg_x)
  + L_seg(seg_y))`` for both generators, then the LSGAN loss of ``D_X`` and
  ``D_Y`` on real vs. detached fake images.

The other steps are segmentation-only steps for ``G_X2Y`` (the generator used
at inference) on X crops plus stain-augmented Y crops, so the segmentation
decoder gets most of the update budget on a CPU.

Files in ``out_dir``: ``last.safetensors`` (models, optimisers, RNG states
and position; resumable), ``best.safetensors`` (models of the epoch with
the best validation AJI, plus its metrics) and ``history.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.events import run_to_end
from napari_pathoseg.methods.nuclei.instances import boundary_watershed, distance_watershed
from napari_pathoseg.metrics import instance_metrics
from napari_pathoseg.models.checkpoint import (
    load_checkpoint,
    load_state_strict,
    read_header,
    save_checkpoint,
)
from napari_pathoseg.methods.nuclei.attcycle import M2Config, M2Model, select_device
from napari_pathoseg.methods.nuclei.datasets import CropSampler, LabelledImage, M2Data, default_stain_augment
from napari_pathoseg.training.losses import (
    cycle_loss,
    lsgan_d_loss,
    lsgan_g_loss,
    segmentation_loss,
)

__all__ = [
    "StepEvent",
    "EpochEvent",
    "DoneEvent",
    "TrainEvent",
    "train_m2",
    "run_training",
    "validate",
    "predict_image",
]

logger = logging.getLogger(__name__)


class CancelToken(Protocol):
    def is_set(self) -> bool: ...


@dataclass
class StepEvent:
    """One optimisation step finished."""

    epoch: int
    step: int
    steps_per_epoch: int
    losses: dict[str, float]


@dataclass
class EpochEvent:
    """One epoch finished: mean losses, validation metrics, checkpoint written."""

    epoch: int
    losses: dict[str, float]
    val_metrics: dict[str, float]
    checkpoint_path: Path
    is_best: bool = False
    seconds: float = 0.0


@dataclass
class DoneEvent:
    """Training ended (all epochs, or cancelled after saving ``last_checkpoint``)."""

    best_checkpoint: Path | None
    best_metrics: dict[str, float]
    last_checkpoint: Path | None = None
    cancelled: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


TrainEvent = StepEvent | EpochEvent | DoneEvent


def _to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return t.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def _targets(batch: dict[str, np.ndarray], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(batch[k]).to(device) for k in ("nuclei", "boundary", "weight"))


def _write_json(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{idx}:{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    return tensors, sd["param_groups"]


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        idx, _, name = key.partition(":")
        state.setdefault(int(idx), {})[name] = v
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


@torch.inference_mode()
def predict_image(generator: torch.nn.Module, image: np.ndarray, *, multiple: int = 8) -> np.ndarray:
    """Segmentation probabilities of one whole image (no tiling; for validation).

    Parameters
    ----------
    generator : Generator
    image : (H, W, 3) uint8 ndarray
    multiple : int
        The image is padded (reflect) to a multiple of this.

    Returns
    -------
    (C, H, W) float32 ndarray
        Sigmoid of the segmentation channels.
    """
    h, w = image.shape[:2]
    ph, pw = (-h) % multiple, (-w) % multiple
    img = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect")
    device = next(generator.parameters()).device
    x = _to_tensor(img[None], device)
    seg = generator.segment(x)
    return torch.sigmoid(seg)[0, :, :h, :w].float().cpu().numpy()


def validate(
    generator: torch.nn.Module, items: list[LabelledImage], *, mpp: float
) -> dict[str, float]:
    """Mean instance metrics on whole validation images for both instance methods.

    Returns
    -------
    dict
        ``aji``, ``dice``, ``pq``, ``f1``, ... of the boundary-watershed
        instances, and the same keys prefixed ``distance_`` for the
        distance-transform watershed.  :func:`train_m2` keeps the epoch with
        the best AJI of either method and records the method
        (``instance_method``) in the checkpoint metadata.
    """
    was_training = generator.training
    generator.eval()
    per: dict[str, list[float]] = {}
    multiple = 2 ** (len(generator.encoder.out_channels) - 1)
    try:
        for it in items:
            prob = predict_image(generator, it.image, multiple=multiple)
            preds = {"distance_": distance_watershed(prob[0], mpp=mpp)}
            if prob.shape[0] > 1:
                preds[""] = boundary_watershed(prob[0], prob[1], mpp=mpp)
            else:
                preds[""] = preds["distance_"]
            for prefix, lab in preds.items():
                for k, v in instance_metrics(it.labels, lab).items():
                    per.setdefault(prefix + k, []).append(v)
    finally:
        generator.train(was_training)
    return {k: float(np.mean(v)) for k, v in per.items()}


def _lr_factor(epoch: int, epochs: int) -> float:
    """Constant for the first half, then linear decay to 5% (CycleGAN schedule)."""
    half = epochs / 2.0
    if epoch < half:
        return 1.0
    return max(0.05, 1.0 - (epoch - half) / max(1.0, epochs - half))


def train_m2(
    config: M2Config,
    data: M2Data,
    *,
    out_dir: str | os.PathLike,
    epochs: int,
    lr: float = 5e-4,
    seed: int = 0,
    resume: bool = True,
    cancel: CancelToken | None = None,
    steps_per_epoch: int = 200,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    stain_augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = default_stain_augment,
    meta: dict[str, Any] | None = None,
) -> Iterator[TrainEvent]:
    """Train the M2 teacher; a generator of :data:`TrainEvent`.

    Parameters
    ----------
    config : M2Config
    data : M2Data
        X / Y training images and validation images.
    out_dir : path
        Checkpoints and ``history.json`` go here.
    epochs : int
        Total epochs (a resumed run continues up to this number).
    lr : float
        Adam learning rate of the generators (discriminators use ``lr / 2``);
        betas (0.5, 0.999); constant for half the epochs, then linear decay.
    seed : int
        Seeds numpy and torch; with the same seed and data, runs repeat.
    resume : bool
        Continue from ``out_dir/last.safetensors`` when it exists.
    cancel : object with ``is_set()`` or None
        Checked after every step; when set, a checkpoint of the current
        position is saved and a cancelled :class:`DoneEvent` is yielded.
    steps_per_epoch, batch_size : int
        Steps per epoch; X and Y crops per step.
    device : str, torch.device or None
        Default CUDA / MPS when available, else CPU.
    stain_augment : callable or None
        ``f(image, rng) -> image`` stain augmentation (HED by default).
    meta : dict or None
        Extra metadata saved in the checkpoints (e.g. the command line).

    Yields
    ------
    StepEvent, EpochEvent, DoneEvent
    """
    if epochs < 1 or steps_per_epoch < 1 or batch_size < 1:
        raise PathosegError(
            f"epochs, steps_per_epoch and batch_size must be >= 1 (got {epochs}, {steps_per_epoch}, {batch_size})."
        )
    if not data.x_train or not data.y_train or not data.val:
        raise PathosegError(
            "Training needs X images, Y images and validation images "
            f"(got {len(data.x_train)}, {len(data.y_train)}, {len(data.val)})."
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last_path = out / "last.safetensors"
    best_path = out / "best.safetensors"
    dev = select_device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    model = M2Model(config).to(dev)
    opt_g = torch.optim.Adam(model.generator_parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(model.discriminator_parameters(), lr=lr / 2, betas=(0.5, 0.999))
    start_epoch, start_step = 0, 0
    best_aji = -math.inf
    best_metrics: dict[str, float] = {}
    history: list[dict[str, Any]] = []

    if resume and last_path.is_file():
        header = read_header(last_path)
        saved = M2Config.from_dict(header["config"])
        if saved != config:
            raise PathosegError(
                f"{last_path} was trained with a different config ({saved.preset}); "
                "use another --out directory or the same preset/options, or pass resume=False."
            )
        tensors, _, state = load_checkpoint(last_path, expected_kind="m2")
        for name in ("G_X2Y", "G_Y2X", "D_X", "D_Y"):
            load_state_strict(getattr(model, name), tensors[name], what=name, path=last_path)
        _load_optimizer(opt_g, tensors.get("opt_G", {}), state["opt_g_groups"])
        _load_optimizer(opt_d, tensors.get("opt_D", {}), state["opt_d_groups"])
        torch.set_rng_state(tensors["rng"]["torch"])
        rng.bit_generator.state = state["numpy_rng"]
        start_epoch, start_step = state["epoch"], state["step"]
        best_aji = state.get("best_aji", -math.inf)
        best_metrics = state.get("best_metrics", {})
        history = state.get("history", [])
        logger.info("resumed from %s at epoch %d step %d", last_path, start_epoch, start_step)

    sampler_x = CropSampler(data.x_train, crop=config.tile_size, rng=rng, stain_augment=stain_augment)
    sampler_y = CropSampler(data.y_train, crop=config.tile_size, rng=rng, stain_augment=None)
    seg_kw = dict(lambda_boundary=config.lambda_boundary, lambda_dice=config.lambda_dice)
    base_meta = dict(meta or {})
    base_meta.update(
        split=data.split, batch_size=batch_size, steps_per_epoch=steps_per_epoch, lr=lr, seed=seed, epochs=epochs
    )

    def save_last(epoch: int, step: int) -> Path:
        g_t, g_groups = _optimizer_tensors(opt_g)
        d_t, d_groups = _optimizer_tensors(opt_d)
        state = dict(
            base_meta,
            epoch=epoch,
            step=step,
            best_aji=best_aji if math.isfinite(best_aji) else None,
            best_metrics=best_metrics,
            history=history,
            numpy_rng=rng.bit_generator.state,
            opt_g_groups=g_groups,
            opt_d_groups=d_groups,
        )
        if state["best_aji"] is None:
            state.pop("best_aji")
        return save_checkpoint(
            last_path,
            {
                "G_X2Y": model.G_X2Y.state_dict(),
                "G_Y2X": model.G_Y2X.state_dict(),
                "D_X": model.D_X.state_dict(),
                "D_Y": model.D_Y.state_dict(),
                "opt_G": g_t,
                "opt_D": d_t,
                "rng": {"torch": torch.get_rng_state()},
            },
            config.to_dict(),
            state,
        )

    model.train()
    for epoch in range(start_epoch, epochs):
        t_epoch = time.perf_counter()
        for g in opt_g.param_groups:
            g["lr"] = lr * _lr_factor(epoch, epochs)
        for g in opt_d.param_groups:
            g["lr"] = lr / 2 * _lr_factor(epoch, epochs)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for step in range(start_step, steps_per_epoch):
            bx = sampler_x.sample(batch_size)
            by = sampler_y.sample(batch_size)
            x = _to_tensor(bx["image"], dev)
            y = _to_tensor(by["image"], dev)
            tx = _targets(bx, dev)
            ty = _targets(by, dev)
            losses: dict[str, float] = {}
            global_step = epoch * steps_per_epoch + step
            if global_step % config.gan_every == 0:
                # ---- generators: adversarial + cycle + segmentation -------------
                for p in model.discriminator_parameters():
                    p.requires_grad_(False)
                opt_g.zero_grad(set_to_none=True)
                fake_y, seg_x = model.G_X2Y(x)  # (B, 3, c, c), (B, S, c, c)
                fake_x, seg_y = model.G_Y2X(y)
                rec_x = model.G_Y2X.translate(fake_y)
                rec_y = model.G_X2Y.translate(fake_x)
                adv = lsgan_g_loss(model.D_Y(fake_y)) + lsgan_g_loss(model.D_X(fake_x))
                cyc = cycle_loss(rec_x, x) + cycle_loss(rec_y, y)
                lsx, px = segmentation_loss(seg_x, *tx, **seg_kw)
                lsy, _ = segmentation_loss(seg_y, *ty, **seg_kw)
                total = config.lambda_adv * adv + config.lambda_cyc * cyc + config.lambda_seg * (lsx + lsy)
                total.backward()
                opt_g.step()
                for p in model.discriminator_parameters():
                    p.requires_grad_(True)
                # ---- discriminators ----------------------------------------------
                opt_d.zero_grad(set_to_none=True)
                d_loss = lsgan_d_loss(model.D_Y(y), model.D_Y(fake_y.detach())) + lsgan_d_loss(
                    model.D_X(x), model.D_X(fake_x.detach())
                )
                d_loss.backward()
                opt_d.step()
                losses.update(
                    adv=float(adv.detach()), cyc=float(cyc.detach()), d=float(d_loss.detach()),
                    seg=float((lsx + lsy).detach()) / 2, total=float(total.detach()),
                )
                losses.update({k: v for k, v in px.items()})
            else:
                # ---- segmentation-only step of the inference generator -------------
                y_aug = by["image"]
                if stain_augment is not None:
                    y_aug = np.stack([stain_augment(im, rng) for im in y_aug])
                inp = torch.cat([x, _to_tensor(y_aug, dev)])
                tgt = tuple(torch.cat([a, b]) for a, b in zip(tx, ty))
                opt_g.zero_grad(set_to_none=True)
                seg = model.G_X2Y.segment(inp)
                ls, parts = segmentation_loss(seg, *tgt, **seg_kw)
                (config.lambda_seg * ls).backward()
                opt_g.step()
                losses.update(seg=float(ls.detach()), **parts)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
            yield StepEvent(epoch, step, steps_per_epoch, losses)
            if cancel is not None and cancel.is_set():
                path = save_last(epoch, step + 1)
                logger.info("training cancelled at epoch %d step %d; saved %s", epoch, step + 1, path)
                yield DoneEvent(best_path if best_path.is_file() else None, best_metrics, path, True, history)
                return
        start_step = 0
        val = validate(model.G_X2Y, data.val, mpp=config.mpp)
        # the better of the two instance methods decides (and is stored with the model)
        method = "boundary" if val["aji"] >= val["distance_aji"] else "distance"
        val["best_aji"] = max(val["aji"], val["distance_aji"])
        mean_losses = {k: sums[k] / counts[k] for k in sums}
        is_best = val["best_aji"] > best_aji
        seconds = time.perf_counter() - t_epoch
        history.append({"epoch": epoch, "losses": mean_losses, "val": val, "seconds": seconds})
        if is_best:
            best_aji = val["best_aji"]
            best_metrics = dict(val, epoch=epoch, instance_method=method)
            save_checkpoint(
                best_path,
                {
                    "G_X2Y": model.G_X2Y.state_dict(),
                    "G_Y2X": model.G_Y2X.state_dict(),
                    "D_X": model.D_X.state_dict(),
                    "D_Y": model.D_Y.state_dict(),
                },
                config.to_dict(),
                dict(base_meta, epoch=epoch, val_metrics=val, instance_method=method),
            )
        path = save_last(epoch + 1, 0)
        _write_json(out / "history.json", history)
        logger.info("epoch %d: %s val %s (%.0f s)", epoch, mean_losses, val, seconds)
        yield EpochEvent(epoch, mean_losses, val, path, is_best, seconds)
    yield DoneEvent(
        best_path if best_path.is_file() else None, best_metrics, last_path if last_path.is_file() else None,
        False, history,
    )


def run_training(
    config: M2Config,
    data: M2Data,
    *,
    progress: Callable[[TrainEvent], None] | None = None,
    **kwargs: Any,
) -> DoneEvent:
    """Run :func:`train_m2` to the end; ``progress(event)`` sees every event."""
    return run_to_end(train_m2(config, data, **kwargs), DoneEvent, progress=progress)
