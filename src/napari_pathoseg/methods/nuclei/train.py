"""M2 training (AttCycle teacher, TransCycle student) as a task of the training engine.

:class:`M2Task` is the method's part: the four networks, the two optimisers, crops of the X / Y
images, one step, validation. :func:`napari_pathoseg.training.engine.iter_train` does the rest
(checkpoints, resume, schedule, cancel, lock, threads). :func:`train_m2` is the thin wrapper
the CLI and scripts use; :func:`run_training` drives it headless.

Each step draws ``batch_size`` X crops (varied styles, stain augmentation) and ``batch_size``
Y crops (one style, geometric augmentation only). Every ``config.gan_every``-th step is the
method's full CycleGAN step:

* ``G_X2Y(x) -> (fake_y, seg_x)``, ``G_Y2X(y) -> (fake_x, seg_y)``,
  reconstructions ``G_Y2X(fake_y)``, ``G_X2Y(fake_x)``;
* ``lambda_adv * LSGAN_G + lambda_cyc * L1_cycle + lambda_seg * (L_seg(seg_x)
  + L_seg(seg_y))`` for both generators, then the LSGAN loss of ``D_X`` and
  ``D_Y`` on real vs. detached fake images.

The other steps are segmentation-only steps for ``G_X2Y`` (the generator used at inference) on
X crops plus stain-augmented Y crops, so the segmentation decoder gets most of the update budget
on a CPU.

Files in ``out_dir`` (see :mod:`napari_pathoseg.training.rundir`): ``last.safetensors``
(resumable), ``best.safetensors`` (the four networks of the epoch with the best validation AJI,
its metrics and the instance method that reached it) and ``history.json``.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterator

import numpy as np
import torch

from napari_pathoseg.events import Cancellable, run_to_end
from napari_pathoseg.methods.nuclei.attcycle import M2Config, M2Model
from napari_pathoseg.methods.nuclei.datasets import CropSampler, LabelledImage, M2Data, default_stain_augment
from napari_pathoseg.methods.nuclei.instances import boundary_watershed, distance_watershed
from napari_pathoseg.metrics import instance_metrics
from napari_pathoseg.training.engine import (
    DoneEvent,
    EpochEvent,
    StepEvent,
    TrainEvent,
    TrainingError,
    TrainStart,
    ValidationEvent,
    iter_train,
)
from napari_pathoseg.training.losses import cycle_loss, lsgan_d_loss, lsgan_g_loss, segmentation_loss
from napari_pathoseg.training.task import TrainTask

__all__ = [
    "M2Task",
    "TrainStart",
    "StepEvent",
    "ValidationEvent",
    "EpochEvent",
    "DoneEvent",
    "TrainEvent",
    "train_m2",
    "run_training",
    "validate",
    "predict_image",
    "MODULES",
]

logger = logging.getLogger(__name__)

#: The four networks of an M2 checkpoint.
MODULES = ("G_X2Y", "G_Y2X", "D_X", "D_Y")

StainAugment = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return t.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def _targets(batch: dict[str, np.ndarray], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(batch[k]).to(device) for k in ("nuclei", "boundary", "weight"))


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


def validate(generator: torch.nn.Module, items: list[LabelledImage], *, mpp: float) -> dict[str, float]:
    """Mean instance metrics on whole validation images for both instance methods.

    Returns
    -------
    dict
        ``aji``, ``dice``, ``pq``, ``f1``, ... of the boundary-watershed instances, the same keys
        prefixed ``distance_`` for the distance-transform watershed, and ``best_aji`` (the
        better of the two AJIs; it picks the best epoch).
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
    out = {k: float(np.mean(v)) for k, v in per.items()}
    if out:
        out["best_aji"] = max(out["aji"], out["distance_aji"])
    return out


def instance_method(val: dict[str, float]) -> str:
    """The instance method with the better validation AJI (``"boundary"`` or ``"distance"``)."""
    return "boundary" if val["aji"] >= val["distance_aji"] else "distance"


class M2Task(TrainTask):
    """The M2 CycleGAN with segmentation decoders, as a :class:`~napari_pathoseg.training.task.TrainTask`.

    Used for the teacher (AttCycle presets) and the student (TransCycle presets, or a fine-tune
    of any M2 model: start it with ``init_from``).

    Parameters
    ----------
    config : M2Config
    data : M2Data
        X / Y training images and validation images.
    lr : float
        Adam learning rate of the generators (discriminators use ``lr / 2``); betas (0.5, 0.999).
    batch_size : int
        X and Y crops per step.
    stain_augment : callable or None
        ``f(image, rng) -> image`` stain augmentation of X crops (HED by default).
    """

    kind = "m2"
    best_metric = "best_aji"
    best_mode = "max"

    def __init__(
        self,
        config: M2Config,
        data: M2Data,
        *,
        lr: float = 5e-4,
        batch_size: int = 4,
        stain_augment: StainAugment | None = default_stain_augment,
    ) -> None:
        if batch_size < 1 or not lr > 0:
            raise TrainingError(f"batch_size must be >= 1 and lr > 0 (got {batch_size}, {lr}).")
        if not data.x_train or not data.y_train or not data.val:
            raise TrainingError(
                "Training needs X images, Y images and validation images "
                f"(got {len(data.x_train)}, {len(data.y_train)}, {len(data.val)})."
            )
        self.m2config, self.data = config, data
        self.lr, self.batch_size, self.stain_augment = float(lr), int(batch_size), stain_augment

    # -------------------------------------------------------------- engine protocol
    def config(self) -> dict[str, Any]:
        return self.m2config.to_dict()

    def meta(self) -> dict[str, Any]:
        return {"split": self.data.split, "batch_size": self.batch_size, "lr": self.lr}

    def build(self, *, device: torch.device, rng: np.random.Generator) -> None:
        self.device, self.rng = device, rng
        self.model = M2Model(self.m2config).to(device)
        self.opt_g = torch.optim.Adam(self.model.generator_parameters(), lr=self.lr, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.model.discriminator_parameters(), lr=self.lr / 2, betas=(0.5, 0.999))
        tile = self.m2config.tile_size
        self.sampler_x = CropSampler(self.data.x_train, crop=tile, rng=rng, stain_augment=self.stain_augment)
        self.sampler_y = CropSampler(self.data.y_train, crop=tile, rng=rng, stain_augment=None)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {name: getattr(self.model, name) for name in MODULES}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"G": self.opt_g, "D": self.opt_d}

    def batches(self) -> Iterator[tuple[dict, dict]]:
        while True:
            bx = self.sampler_x.sample(self.batch_size)
            by = self.sampler_y.sample(self.batch_size)
            yield bx, by

    def train_step(self, batch: tuple[dict, dict], step: int) -> dict[str, float]:
        if step % self.m2config.gan_every == 0:
            return self._gan_step(*batch)
        return self._seg_step(*batch)

    def validate(self) -> dict[str, float]:
        return validate(self.model.G_X2Y, self.data.val, mpp=self.m2config.mpp)

    def best_meta(self, val: dict[str, float]) -> dict[str, Any]:
        return {"instance_method": instance_method(val)}

    # -------------------------------------------------------------- the two kinds of step
    def _gan_step(self, bx: dict, by: dict) -> dict[str, float]:
        """Generators (adversarial + cycle + segmentation), then discriminators (LSGAN)."""
        cfg, model, dev = self.m2config, self.model, self.device
        seg_kw = dict(lambda_boundary=cfg.lambda_boundary, lambda_dice=cfg.lambda_dice)
        x, y = _to_tensor(bx["image"], dev), _to_tensor(by["image"], dev)
        tx, ty = _targets(bx, dev), _targets(by, dev)
        for p in model.discriminator_parameters():
            p.requires_grad_(False)
        self.opt_g.zero_grad(set_to_none=True)
        fake_y, seg_x = model.G_X2Y(x)  # (B, 3, c, c), (B, S, c, c)
        fake_x, seg_y = model.G_Y2X(y)
        rec_x = model.G_Y2X.translate(fake_y)
        rec_y = model.G_X2Y.translate(fake_x)
        adv = lsgan_g_loss(model.D_Y(fake_y)) + lsgan_g_loss(model.D_X(fake_x))
        cyc = cycle_loss(rec_x, x) + cycle_loss(rec_y, y)
        lsx, px = segmentation_loss(seg_x, *tx, **seg_kw)
        lsy, _ = segmentation_loss(seg_y, *ty, **seg_kw)
        total = cfg.lambda_adv * adv + cfg.lambda_cyc * cyc + cfg.lambda_seg * (lsx + lsy)
        total.backward()
        self.opt_g.step()
        for p in model.discriminator_parameters():
            p.requires_grad_(True)
        self.opt_d.zero_grad(set_to_none=True)
        d_loss = lsgan_d_loss(model.D_Y(y), model.D_Y(fake_y.detach())) + lsgan_d_loss(
            model.D_X(x), model.D_X(fake_x.detach())
        )
        d_loss.backward()
        self.opt_d.step()
        return dict(
            adv=float(adv.detach()), cyc=float(cyc.detach()), d=float(d_loss.detach()),
            seg=float((lsx + lsy).detach()) / 2, total=float(total.detach()), **px,
        )

    def _seg_step(self, bx: dict, by: dict) -> dict[str, float]:
        """Segmentation-only step of the inference generator on X + stain-augmented Y crops."""
        cfg, dev = self.m2config, self.device
        y_aug = by["image"]
        if self.stain_augment is not None:
            y_aug = np.stack([self.stain_augment(im, self.rng) for im in y_aug])
        inp = torch.cat([_to_tensor(bx["image"], dev), _to_tensor(y_aug, dev)])
        tgt = tuple(torch.cat([a, b]) for a, b in zip(_targets(bx, dev), _targets(by, dev)))
        self.opt_g.zero_grad(set_to_none=True)
        ls, parts = segmentation_loss(self.model.G_X2Y.segment(inp), *tgt,
                                      lambda_boundary=cfg.lambda_boundary, lambda_dice=cfg.lambda_dice)
        (cfg.lambda_seg * ls).backward()
        self.opt_g.step()
        return dict(seg=float(ls.detach()), **parts)


def train_m2(
    config: M2Config,
    data: M2Data,
    *,
    out_dir: str | os.PathLike,
    epochs: int,
    lr: float = 5e-4,
    seed: int = 0,
    resume: bool = False,
    force: bool = False,
    cancel: Cancellable | None = None,
    steps_per_epoch: int = 200,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    stain_augment: StainAugment | None = default_stain_augment,
    meta: dict[str, Any] | None = None,
    threads: int | str | None = None,
    init_from: Any = None,
    schedule: str | Callable[[int, int], float] = "cyclegan",
) -> Iterator[TrainEvent]:
    """Train an M2 model (teacher or student) on the engine; a generator of :data:`TrainEvent`.

    Parameters
    ----------
    config : M2Config
    data : M2Data
    out_dir : path
        The run folder (checkpoints, ``history.json``).
    epochs, steps_per_epoch, batch_size : int
        Run length (a resumed run continues up to ``epochs``) and X / Y crops per step.
    lr : float
        Generator learning rate (discriminators ``lr / 2``).
    seed : int
        With the same seed and data, runs repeat.
    resume, force : bool
        Continue the run in ``out_dir``, or replace it; without either an occupied folder is
        refused (:class:`~napari_pathoseg.training.rundir.RunExistsError`).
    cancel : object with ``is_set()``, optional
        Stop after the current step with a resumable checkpoint (a cancelled :class:`DoneEvent`).
    device : str or torch.device, optional
    stain_augment : callable or None
    meta : dict, optional
        Extra metadata saved in the checkpoints (e.g. the command line).
    threads : int, "auto" or None
        torch threads (default: every core the process may use; see
        :class:`~napari_pathoseg.training.engine.ThreadPolicy`).
    init_from : path, module or state dicts, optional
        Start a fresh run from these weights (matching names and shapes; fine-tuning).
    schedule : str or callable
        Learning-rate schedule (default ``"cyclegan"``: constant for half the epochs, then linear
        decay to 5 %).

    Yields
    ------
    TrainStart, StepEvent, ValidationEvent, EpochEvent, DoneEvent
    """
    task = M2Task(config, data, lr=lr, batch_size=batch_size, stain_augment=stain_augment)
    return iter_train(
        task, out_dir=out_dir, epochs=epochs, steps_per_epoch=steps_per_epoch, resume=resume, force=force,
        cancel=cancel, threads=threads, seed=seed, schedule=schedule, device=device, init_from=init_from, meta=meta,
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
