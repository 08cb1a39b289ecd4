"""M4 training on the platform's engine: :class:`MilTask` and :func:`train_mil`.

One ``negguide`` step (M4):

1. draw ``batch`` (64) tiles from the positive-slide pool and ``batch`` from the
   negative-slide pool; two independently augmented views of each positive tile, one of each
   negative tile (:func:`.data.augment`);
2. the teacher predicts view 1 of the positive tiles; the predictions replace those tiles'
   entries in the prediction bank (one teacher logit margin per positive-slide tile). The bank
   starts with the initial teacher's prediction of every positive-slide tile (unaugmented) and
   is re-predicted whole every ``bank_refresh`` steps; in between, the entries not in the batch
   are shifted by the teacher's mean drift measured on the batch's tiles (new minus stored
   margin), so that fresh and stale entries stay comparable (ours: without it the fresh batch
   always ranked below or above the stale bank and the pseudo-labels of the batch collapsed to
   one class in our first runs);
3. Sinkhorn-Knopp re-solves the pseudo-labels of the whole bank under ``sum(Y) = K |X_pos|``
   (:mod:`.sinkhorn`); the batch takes its tiles' labels;
4. the student on view 2: ``CE(student(pos), Y) + CE(student(neg), 0)``; Adam on the sum;
5. ``after_step``: the teacher follows by momentum (``ema_update``, lambda = ``momentum``).

``K`` is a fixed prior, not estimated from the data (``MilConfig.k``, ``--k``; default 0.2:
the mean tumour share of the positive slides of our mosaic cohort, which its generator draws
from U(0.1, 0.3); on real slides set it from what is known of the cohort).

Ablation variants (same data, encoder, batch and budget): ``selfdistill`` (steps 1, 2 and 4
without the bank, Sinkhorn and negative term: the student learns the teacher's arg-max on
view 2 of positive-slide tiles only) and ``meanpool`` (:mod:`.baseline`: slide bags, mean
pooling, bag cross-entropy).

The teacher and the bank are extra state (``state_tensors``), so a run resumes exactly; the
``best`` checkpoint keeps the student only (``net``), which the ``slide`` loader reads.
Validation: the student on every tissue tile of the validation slides, pooled per slide with
the config's pooling: slide ROC AUC and accuracy; the best epoch maximises
``val_score = slide_auc + 0.1 (mean pooled probability of positive slides - of negative
slides)`` (the margin breaks ties once the AUC reaches 1).
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_pathoseg.events import Progress
from napari_pathoseg.methods.mil.baseline import bag_batch, bag_loss
from napari_pathoseg.methods.mil.cohort_csv import CohortError, CohortSlide, read_cohort
from napari_pathoseg.methods.mil.data import TilePools, augment, load_pools
from napari_pathoseg.methods.mil.network import (
    VARIANTS,
    MilConfig,
    MilNet,
    get_preset,
    to_input,
)
from napari_pathoseg.methods.mil.pooling import pool
from napari_pathoseg.methods.mil.sinkhorn import pseudo_labels
from napari_pathoseg.metrics import roc_auc as _roc_auc
from napari_pathoseg.training.task import TrainTask, ema_update

__all__ = ["DEFAULT_BUDGET", "MilTask", "MilTrainResult", "predict_pools", "roc_auc", "train_mil"]

logger = logging.getLogger(__name__)

#: Default (epochs, steps per epoch) per preset.
DEFAULT_BUDGET = {"lite": (12, 100), "m4": (50, 200)}


def roc_auc(score: Any, truth: Any) -> float | None:
    """:func:`napari_pathoseg.metrics.roc_auc`, but ``None`` (JSON null) without both classes."""
    auc = _roc_auc(score, truth)
    return None if math.isnan(auc) else auc


def predict_pools(net: torch.nn.Module, pools: TilePools, *, device: torch.device, chunk: int = 256) -> list[np.ndarray]:
    """Positive probability of every tile of every slide of ``pools`` (eval mode), in slide order."""
    was = net.training
    net.eval()
    out = []
    with torch.inference_mode():
        for _, tiles in pools.slide_arrays():
            probs = [torch.softmax(net(to_input(tiles[i:i + chunk]).to(device)).float(), 1)[:, 1].cpu().numpy()
                     for i in range(0, len(tiles), chunk)]
            out.append(np.concatenate(probs) if probs else np.zeros(0, np.float32))
    net.train(was)
    return out


class MilTask(TrainTask):
    """M4 (and its ablation variants) as a training-engine task.

    Parameters
    ----------
    cfg : MilConfig
    pools : TilePools
        Training tiles.
    val_pools : TilePools
        Validation slides' tiles.
    data_meta : dict
        Facts saved in every checkpoint (cohort files, tile counts).
    """

    kind = "m4"
    best_metric = "val_score"
    best_mode = "max"

    def __init__(self, cfg: MilConfig, pools: TilePools, val_pools: TilePools, *, data_meta: dict | None = None) -> None:
        self.cfg, self.pools, self.val_pools = cfg, pools, val_pools
        self.data_meta = dict(data_meta or {})
        self.distill = cfg.variant in ("negguide", "selfdistill")

    def config(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    def meta(self) -> dict[str, Any]:
        return dict(self.data_meta, train=self.pools.summary(), val=self.val_pools.summary())

    def build(self, *, device: torch.device, rng: np.random.Generator) -> None:
        self.device, self.rng = device, rng
        self.net = MilNet(self.cfg).to(device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=self.cfg.lr)
        self.teacher = None
        if self.distill:
            self.teacher = copy.deepcopy(self.net).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.bank = torch.zeros(len(self.pools.pos))  # teacher logit margins (positive - negative)
        if self.teacher is not None:  # the teacher's first opinion of every positive-slide tile
            self.bank = self._teacher_margins(self.pools.pos)

    def _teacher_margins(self, tiles: np.ndarray, chunk: int = 256) -> torch.Tensor:
        self.teacher.eval()
        with torch.inference_mode():
            out = []
            for i in range(0, len(tiles), chunk):
                z = self.teacher(to_input(tiles[i:i + chunk]).to(self.device)).float().cpu()
                out.append(z[:, 1] - z[:, 0])
        return torch.cat(out).float()

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"net": self.net}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"adam": self.opt}

    def best_modules(self) -> list[str]:
        return ["net"]

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        self.net.train()
        if self.teacher is not None:
            self.teacher.eval()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"bank": self.bank.clone()}
        if self.teacher is not None:
            out.update({f"teacher__{k}": v.detach().clone() for k, v in self.teacher.state_dict().items()})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "bank" not in tensors or tensors["bank"].shape != self.bank.shape:
            raise CohortError("the run's prediction bank does not fit this cohort; resume with the same cohort CSV.")
        self.bank = tensors["bank"].float().clone()
        if self.teacher is not None:
            from napari_pathoseg.models.checkpoint import load_state_strict

            state = {k[len("teacher__"):]: v for k, v in tensors.items() if k.startswith("teacher__")}
            load_state_strict(self.teacher, state, what="teacher", path="last.safetensors")

    # ------------------------------------------------------------------------------ steps
    def batches(self) -> Iterator[dict[str, Any]]:
        cfg, rng = self.cfg, self.rng
        while True:
            if cfg.variant == "meanpool":
                yield bag_batch(self.pools, rng, batch=cfg.batch, bag_tiles=cfg.bag_tiles)
                continue
            pi = rng.choice(len(self.pools.pos), min(cfg.batch, len(self.pools.pos)), replace=False)
            tiles = self.pools.pos[pi]
            b = {"pos_idx": torch.from_numpy(pi), "v1": augment(tiles, rng), "v2": augment(tiles, rng)}
            if cfg.variant == "negguide":
                ni = rng.choice(len(self.pools.neg), min(cfg.batch, len(self.pools.neg)), replace=False)
                b["neg"] = augment(self.pools.neg[ni], rng)
            yield b

    def train_step(self, batch: dict[str, Any], step: int) -> dict[str, float]:
        cfg, dev = self.cfg, self.device
        if cfg.variant == "meanpool":
            loss, out = bag_loss(self.net, batch, dev)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            return out
        with torch.no_grad():
            z = self.teacher(batch["v1"].to(dev)).float().cpu()
        t_margin = z[:, 1] - z[:, 0]
        idx = batch["pos_idx"]
        out: dict[str, float] = {}
        if cfg.variant == "negguide":
            if cfg.bank_refresh and step > 0 and step % cfg.bank_refresh == 0:
                self.bank = self._teacher_margins(self.pools.pos)
            else:  # shift the stale entries by the teacher's drift measured on this batch's tiles
                drift = float((t_margin - self.bank[idx]).mean())
                self.bank += drift
            self.bank[idx] = t_margin
            y = pseudo_labels(torch.sigmoid(self.bank), k=cfg.k, iters=cfg.sinkhorn_iters,
                              lam=cfg.sinkhorn_lambda)[idx].to(dev)
            n_pos = batch["v2"].shape[0]
            logits = self.net(torch.cat([batch["v2"], batch["neg"]]).to(dev))
            l_sd = F.cross_entropy(logits[:n_pos], y)
            l_neg = F.cross_entropy(logits[n_pos:], torch.zeros(logits.shape[0] - n_pos, dtype=torch.long, device=dev))
            loss = l_sd + l_neg
            out.update(sd=l_sd.item(), neg=l_neg.item(), pseudo_pos=float(y.float().mean()))
        else:  # selfdistill
            y = (t_margin >= 0).long().to(dev)
            loss = F.cross_entropy(self.net(batch["v2"].to(dev)), y)
            out.update(sd=loss.item(), pseudo_pos=float(y.float().mean()))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        out["loss"] = loss.item()
        return out

    def after_step(self, step: int) -> None:
        if self.teacher is not None:
            ema_update(self.teacher, self.net, momentum=self.cfg.momentum)

    def validate(self) -> dict[str, float]:
        probs = predict_pools(self.net, self.val_pools, device=self.device)
        labels = np.array([s.label for s in self.val_pools.slides])
        slide_p = np.array([pool(p, method=self.cfg.pooling, k=self.cfg.pooling_k) for p in probs])
        auc = roc_auc(slide_p, labels)
        margin = float(slide_p[labels == 1].mean() - slide_p[labels == 0].mean())
        acc = float(((slide_p >= self.cfg.threshold) == (labels == 1)).mean())
        tiles_pos = float(np.mean(np.concatenate([p for p, l in zip(probs, labels) if l == 1])))
        tiles_neg = float(np.mean(np.concatenate([p for p, l in zip(probs, labels) if l == 0])))
        return {"val_score": (auc if auc is not None else 0.5) + 0.1 * margin, "slide_auc": auc if auc is not None else float("nan"),
                "slide_accuracy": acc, "margin": margin, "tile_mean_pos_slides": tiles_pos,
                "tile_mean_neg_slides": tiles_neg}


@dataclass
class MilTrainResult:
    """The end of :func:`train_mil`.

    Attributes
    ----------
    model_path : Path or None
        ``best.safetensors`` of the run (or the registered checkpoint's path).
    scores : dict
        Best validation metrics (with ``epoch``).
    card : dict or ModelCard
        The registered card, or the card the run would get.
    done : DoneEvent
    cancelled : bool
    """

    model_path: Path | None
    scores: dict[str, Any]
    card: Any
    done: Any = None
    cancelled: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _cohort(c: Any, *, what: str, default_mpp: float | None) -> list[CohortSlide]:
    if isinstance(c, (str, os.PathLike)):
        return read_cohort(c, default_mpp=default_mpp)
    return list(c)


def _split_val(slides: list[CohortSlide], seed: int) -> tuple[list[CohortSlide], list[CohortSlide], str]:
    pos = [s for s in slides if s.label == 1]
    neg = [s for s in slides if s.label == 0]
    if min(len(pos), len(neg)) < 5:
        return slides, slides, "the training slides (too few slides to hold any out: validation measures the fit)"
    rng = np.random.default_rng(seed)
    val = []
    for group in (pos, neg):
        n = max(1, round(0.2 * len(group)))
        val += [group[i] for i in sorted(rng.choice(len(group), n, replace=False))]
    ids = {id(s) for s in val}
    return [s for s in slides if id(s) not in ids], val, "20 % of the training slides per label, held out (seeded)"


def train_mil(
    *,
    cohort: Any,
    run_dir: str | os.PathLike,
    preset: str = "lite",
    variant: str = "negguide",
    seed: int = 0,
    epochs: int | None = None,
    steps_per_epoch: int | None = None,
    K: float | None = None,
    resume: bool = False,
    force: bool = False,
    threads: int | str | None = None,
    device: str | None = None,
    cancel: Any = None,
    register_as: str | None = None,
    val_cohort: Any = None,
    default_mpp: float | None = None,
    max_tiles_per_slide: int | None = 2000,
    overrides: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Iterator[Any]:
    """Train an M4 slide classifier from a cohort; a generator of events ending in a :class:`MilTrainResult`.

    Parameters
    ----------
    cohort : path or list of CohortSlide
        The training cohort CSV (``slide,label[,mpp]``, :mod:`.cohort_csv`).
    run_dir : path
        The run folder (engine: ``last``/``best``/``history.json``, lock).
    preset : {"lite", "m4"}
    variant : {"negguide", "selfdistill", "meanpool"}
    seed : int
    epochs, steps_per_epoch : int, optional
        Default :data:`DEFAULT_BUDGET` of the preset.
    K : float, optional
        Share of positive tiles in positive slides (default: the preset's prior, 0.2).
    resume, force : bool
        Continue the run in ``run_dir`` / start over there.
    threads, device, cancel
        As :func:`napari_pathoseg.training.engine.iter_train`.
    register_as : str, optional
        Register the best checkpoint under this name when the run ends (not when stopped).
    val_cohort : path or list of CohortSlide, optional
        Validation slides (default: 20 % of the training slides held out when each label has
        at least 5, else the training slides themselves).
    default_mpp : float, optional
        µm/px of slides that have none.
    max_tiles_per_slide : int, optional
        Cap on tissue tiles kept per slide (seeded subset).
    overrides : dict, optional
        Other :class:`MilConfig` values (``lr``, ``batch``, ``momentum``...).
    meta : dict, optional
        Facts saved in every checkpoint (the command line).

    Yields
    ------
    Progress (stage ``"tiles"``) while the slides are cut, then the engine's events, then one
    MilTrainResult.

    Raises
    ------
    CohortError, RunExistsError, PathosegError
        Bad cohort (before any training), an occupied run folder, a slide without tissue.
    """
    from napari_pathoseg.training.engine import DoneEvent, check_run_folder, iter_train

    if variant not in VARIANTS:
        raise CohortError(f"unknown variant {variant!r}; use one of {', '.join(VARIANTS)}.")
    ov = dict(overrides or {}, variant=variant)
    if K is not None:
        if not 0.0 < float(K) < 1.0:
            raise CohortError(f"K (share of positive tiles in positive slides) must be in (0, 1), got {K}.")
        ov["k"] = float(K)
    cfg = get_preset(preset, **ov)
    slides = _cohort(cohort, what="training", default_mpp=default_mpp)
    val_note = "the validation cohort"
    if val_cohort is not None:
        val = _cohort(val_cohort, what="validation", default_mpp=default_mpp)
    else:
        slides, val, val_note = _split_val(slides, seed)
    if len({s.label for s in slides}) < 2:
        raise CohortError("the training slides hold one label only; M4 needs positive and negative slides.")
    check_run_folder(run_dir, resume=resume, force=force)
    e_default, s_default = DEFAULT_BUDGET.get(preset, (12, 100))
    epochs, steps = int(epochs or e_default), int(steps_per_epoch or s_default)
    progress: list[Progress] = []

    def note(done: int, total: int, msg: str) -> None:
        progress.append(Progress(done, total, msg, "tiles"))

    total = len(slides) + len(val)
    kw = dict(mpp=cfg.mpp, tile_size=cfg.tile_size, entropy_threshold=cfg.entropy_threshold,
              max_tiles_per_slide=max_tiles_per_slide, seed=seed, cancel=cancel)
    pools = _load(slides, kw, note, 0, total)
    yield from progress
    progress.clear()
    val_pools = _load(val, kw, note, len(slides), total)
    yield from progress
    data_meta = {"cohort": str(cohort) if isinstance(cohort, (str, os.PathLike)) else "slides",
                 "validation": val_note, "val_cohort": str(val_cohort) if val_cohort is not None else None}
    task = MilTask(cfg, pools, val_pools, data_meta=data_meta)
    done = None
    for ev in iter_train(task, out_dir=run_dir, epochs=epochs, steps_per_epoch=steps, resume=resume, force=force,
                         cancel=cancel, threads=threads, seed=seed, schedule="cosine", device=device,
                         meta=dict(meta or {})):
        if isinstance(ev, DoneEvent):
            done = ev
        yield ev
    from napari_pathoseg.methods.mil.release import card_for

    best = done.best_checkpoint if done is not None else None
    card: Any = card_for(register_as or Path(run_dir).name, cfg.to_dict(), scores={
        k: v for k, v in (done.best_metrics if done else {}).items() if k in ("slide_auc", "slide_accuracy")})
    if register_as and best is not None and done is not None and not done.cancelled:
        from napari_pathoseg.models.registry import register_model

        card = register_model(best, name=register_as, task="slide", data=str(cohort),
                              scores={k: float(v) for k, v in done.best_metrics.items()
                                      if k in ("slide_auc", "slide_accuracy") and np.isfinite(v)},
                              description=f"M4 {variant} slide classifier ({preset}) trained on {Path(str(cohort)).name}",
                              command=(meta or {}).get("command"))
    yield MilTrainResult(best, dict(done.best_metrics) if done else {}, card, done, bool(done and done.cancelled))


def _load(slides: list[CohortSlide], kw: dict, note: Any, offset: int, total: int) -> TilePools:
    return load_pools(slides, progress=lambda d, t, m: note(offset + d, total, m), **kw)
