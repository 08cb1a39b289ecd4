"""Fine-tune an M2 nucleus model on strong labels plus reviewed pseudo-labels (M2 step S3).

:func:`iter_finetune` runs the student as an :class:`~napari_pathoseg.methods.nuclei.train.M2Task`
on the training engine (:func:`napari_pathoseg.training.engine.iter_train`: a checkpoint every
epoch, the best by validation AJI kept, resumable, stoppable, one process per output folder):

1. the student's architecture: by default the base model's own (``preset=None``), so the run
   fine-tunes the base; another preset takes the base's matching weights only;
2. the data (:func:`~napari_pathoseg.methods.nuclei.finetune_data.build_finetune_data`);
3. a fresh run starts from the base's weights (``init_from``); an existing run in ``out_dir`` is
   resumed (``force=True`` starts over);
4. the base model is scored on the same validation images (``base_metrics``), so the Done event
   compares the new model with what it started from;
5. the best checkpoint is registered (:func:`napari_pathoseg.models.registry.register_model`),
   unless the run was stopped, ``register=False``, or its best validation AJI is below the floor
   ``min_aji`` (then the Done event carries a warning instead; ``force_register`` overrides).

Files in ``out_dir``: ``finetune.json`` (the run's options, data and the base's validation
scores), ``last.safetensors``, ``best.safetensors``, ``history.json``.
No Qt or napari here; the Fine-tune dock drives it in a worker thread.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from napari_pathoseg import _atomic
from napari_pathoseg.errors import CheckpointError
from napari_pathoseg.events import run_to_end
from napari_pathoseg.methods.nuclei.finetune_config import (
    DEFAULT_FRESH_PRESET,
    FinetuneConfig,
    FinetuneError,
    parse_strong,
)
from napari_pathoseg.methods.nuclei.finetune_data import (
    FinetuneData,
    build_finetune_data,
    load_pseudo_items,
    load_strong_folder,
)

__all__ = [
    "FinetuneConfig",
    "FinetuneError",
    "FinetuneStage",
    "FinetuneDone",
    "FinetuneData",
    "FinetuneEvent",
    "load_strong_folder",
    "load_pseudo_items",
    "build_finetune_data",
    "student_config",
    "evaluate_base",
    "iter_finetune",
    "run_finetune",
    "parse_strong",
]

logger = logging.getLogger(__name__)

_SCORE_KEYS = ("aji", "aji_plus", "dice", "f1", "pq", "miou", "best_aji", "distance_aji", "distance_f1", "distance_dice")


@dataclass
class FinetuneStage:
    """A stage started: ``"data"``, ``"init"``, ``"base"`` (scoring the base), ``"train"``, ``"register"``."""

    stage: str
    message: str


@dataclass
class FinetuneDone:
    """Last event of :func:`iter_finetune`.

    Attributes
    ----------
    best_checkpoint, last_checkpoint : Path or None
    best_metrics : dict
        Validation metrics of the best epoch (``aji``, ``best_aji``, ``f1``, ``dice``, ...).
    cancelled : bool
        Stopped by the cancel token; ``last_checkpoint`` resumes it.
    registered : dict or None
        The registry card (None when cancelled, ``register=False`` or below the floor).
    history : list of dict
        One entry per epoch (losses, validation metrics, seconds).
    initialised_from : str or None
        Base checkpoint the student took weights from (None: fresh, or resumed).
    base_metrics : dict or None
        The base model's metrics on the same validation images (None without a base).
    warnings : list of str
        What the user should know: not registered because below the floor, not better than
        the base, only part of the base's weights used...
    init : dict or None
        What was taken from the base (counts, summary), for a fresh start from a base.
    """

    best_checkpoint: Path | None
    last_checkpoint: Path | None
    best_metrics: dict[str, Any]
    cancelled: bool = False
    registered: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    initialised_from: str | None = None
    base_metrics: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    init: dict[str, Any] | None = None


# the engine's events (TrainStart, StepEvent, ValidationEvent, EpochEvent) pass through unchanged
FinetuneEvent = Any  # FinetuneStage | TrainStart | StepEvent | ValidationEvent | EpochEvent | FinetuneDone


def student_config(preset: str) -> Any:
    """The :class:`~napari_pathoseg.methods.nuclei.attcycle.M2Config` of a student preset.

    Raises
    ------
    FinetuneError
        Unknown preset; the message lists the valid ones.
    """
    from napari_pathoseg.methods.nuclei.attcycle import PRESETS, get_preset

    if preset not in PRESETS:
        raise FinetuneError(f"Unknown student preset {preset!r}; valid presets: {sorted(PRESETS)} (or none: the base's).")
    return get_preset(preset)


def _base_path(base: str) -> Path:
    from napari_pathoseg.models.registry import list_models

    p = Path(base).expanduser()
    if p.suffix == ".safetensors" or p.is_file():
        if not p.is_file():
            raise FinetuneError(f"Base checkpoint {p} does not exist; choose a .safetensors file or a model name.")
        return p
    models = list_models()
    for m in models:
        if m["name"] == base:
            return Path(m["path"])
    names = [m["name"] for m in models]
    raise FinetuneError(f"Unknown base model {base!r}; valid names: {names} (or give a .safetensors path).")


def _base_config(path: Path) -> Any:
    from napari_pathoseg.methods.nuclei.attcycle import M2Config
    from napari_pathoseg.models.checkpoint import read_header

    header = read_header(path)
    if header["kind"] != "m2":
        raise FinetuneError(f"Base {path} holds a {header['kind']!r} model, not an M2 nucleus model.")
    return M2Config.from_dict(header["config"])


def evaluate_base(base: str | os.PathLike, items: list[Any], *, mpp: float, device: str | None = None) -> dict[str, float]:
    """The base model's validation metrics on ``items`` (the same function that scores every epoch).

    Parameters
    ----------
    base : path
        An M2 ``.safetensors`` checkpoint.
    items : list of LabelledImage
        Validation images at ``mpp`` µm/px (resampled to the base's µm/px when it differs).
    mpp : float
    device : str, optional

    Returns
    -------
    dict
        As :func:`napari_pathoseg.methods.nuclei.train.validate` (``aji``, ``best_aji``...).
    """
    from napari_pathoseg.methods.nuclei.attcycle import Generator
    from napari_pathoseg.methods.nuclei.datasets import LabelledImage, resample_pair
    from napari_pathoseg.methods.nuclei.train import validate
    from napari_pathoseg.models.checkpoint import load_checkpoint, load_state_strict
    from napari_pathoseg.training.engine import select_device

    base = Path(base)
    cfg = _base_config(base)
    tensors, _, _ = load_checkpoint(base, expected_kind="m2")
    if "G_X2Y" not in tensors:
        raise CheckpointError(f"{base} has no G_X2Y weights; it is not an M2 nucleus model.")
    gen = Generator(cfg)
    load_state_strict(gen, tensors["G_X2Y"], what="G_X2Y", path=base)
    gen.to(select_device(device))
    if abs(cfg.mpp - mpp) > 1e-6:
        moved = []
        for it in items:
            img, lab = resample_pair(it.image, it.labels, src_mpp=mpp, dst_mpp=cfg.mpp)
            moved.append(LabelledImage(it.name, img, lab, 1.0, it.source, cfg.mpp))
        items = moved
    return validate(gen, items, mpp=cfg.mpp)


def _resolve_student(config: FinetuneConfig, base_path: Path | None) -> Any:
    if config.preset is not None:
        return student_config(config.preset)
    if base_path is not None:
        return _base_config(base_path)
    return student_config(DEFAULT_FRESH_PRESET)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def iter_finetune(
    config: FinetuneConfig,
    *,
    cancel: Any = None,
    data: FinetuneData | None = None,
    stain_augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None | str = "default",
    force: bool = False,
) -> Iterator[FinetuneEvent]:
    """Fine-tune a student; a generator of progress events ending in :class:`FinetuneDone`.

    Parameters
    ----------
    config : FinetuneConfig
    cancel : object with ``is_set()`` or None
        Checked after every training step; when set, the step finishes, a resumable checkpoint
        is saved (``last.safetensors``) and a cancelled :class:`FinetuneDone` ends the run
        (nothing is registered).
    data : FinetuneData or None
        Pre-assembled data (default: :func:`build_finetune_data` from ``config``).
    stain_augment : callable, None or "default"
        Stain augmentation of X crops (``"default"``: the training default, HED).
    force : bool
        Start over in an ``out_dir`` that holds a run (default: resume it).

    Yields
    ------
    FinetuneStage
        ``"data"``, ``"init"``, ``"base"`` (with a base), ``"train"`` and ``"register"``.
    TrainStart, StepEvent, ValidationEvent, EpochEvent
        The training engine's events.
    FinetuneDone
        Last.

    Raises
    ------
    FinetuneError, CheckpointError, TrainingError
        Bad options or data, a base model that cannot be read, an ``out_dir`` holding a run of
        another architecture, or one another process is training into.

    Examples
    --------
    >>> cfg = FinetuneConfig(out_dir="runs/ft", strong=("/data/monuseg_train",),
    ...                      projects=("review",), epochs=2)  # doctest: +SKIP
    >>> done = run_finetune(cfg)  # doctest: +SKIP
    """
    from napari_pathoseg.methods.nuclei.attcycle import M2Config
    from napari_pathoseg.methods.nuclei.datasets import default_stain_augment
    from napari_pathoseg.methods.nuclei.train import M2Task
    from napari_pathoseg.models.checkpoint import read_header
    from napari_pathoseg.models.registry import register_model
    from napari_pathoseg.training.engine import DoneEvent, TrainStart, iter_train
    from napari_pathoseg.training.rundir import LAST

    base_path = _base_path(config.base) if config.base else None
    student = _resolve_student(config, base_path)
    out = Path(config.out_dir).expanduser()
    last_path = out / LAST
    if last_path.is_file() and not force:
        saved = M2Config.from_dict(read_header(last_path)["config"])
        if saved != student:
            raise FinetuneError(
                f"{out} holds a run of the {saved.preset!r} preset, not {student.preset!r}; choose another "
                "output folder, the same preset to resume it, or start over (force)."
            )
    if config.register:  # a read-only registry is found now, not after the training
        from napari_pathoseg.models._store import check_writable
        from napari_pathoseg.models.registry import registry_path

        check_writable(registry_path())
    yield FinetuneStage("data", "loading strong labels and pseudo-labels")
    if data is None:
        data = build_finetune_data(config, mpp=student.mpp)
    logger.info("fine-tune data: %s; %d validation images", data.description, len(data.m2.val))
    augment = default_stain_augment if stain_augment == "default" else stain_augment
    task = M2Task(student, data.m2, lr=config.lr, batch_size=config.batch_size, stain_augment=augment)
    started = _now()
    meta = {"finetune": {
        "name": config.name, "base": config.base, "data": data.description, "started": started,
        "n_strong": data.n_strong, "n_pseudo": data.n_pseudo, "preset": student.preset,
    }}
    events = iter_train(
        task, out_dir=out, epochs=config.epochs, steps_per_epoch=config.steps_per_epoch,
        resume=not force, force=force, cancel=cancel, threads=config.threads, seed=config.seed,
        schedule="cyclegan", device=config.device, init_from=base_path, meta=meta,
    )
    warnings: list[str] = []
    initialised_from = init = base_metrics = None
    done: DoneEvent | None = None
    cfg_file = out / "finetune.json"
    try:
        for ev in events:
            if isinstance(ev, TrainStart):  # the engine holds the folder's lock from here on
                before = _read_json(cfg_file)
                if ev.resumed:
                    changed = sorted(k for k, v in config.to_dict().items()
                                     if k in before and before[k] != v and k not in ("epochs", "threads", "device"))
                    if changed:
                        logger.warning("resuming %s with changed options %s", out, changed)
                    yield FinetuneStage("init", f"resuming from {last_path} (epoch {ev.epoch + 1}, step {ev.step + 1})")
                elif ev.init is not None:
                    init = ev.init.to_dict()
                    initialised_from = str(base_path) if ev.init.n_copied else None
                    if ev.init.n_copied == 0:
                        msg = f"base {base_path.name} shares no weights with the {student.preset!r} student; it starts fresh"
                    elif ev.init.complete:
                        msg = f"fine-tuning {base_path.name}: the student starts from all of its weights"
                    else:
                        msg = (f"the {student.preset!r} student takes the base's matching weights only "
                               f"({ev.init.summary()})")
                    if not ev.init.complete:
                        warnings.append(msg)
                    yield FinetuneStage("init", msg)
                else:
                    yield FinetuneStage("init", f"fresh {student.preset!r} student (no base model)")
                if base_path is not None:
                    same = before.get("base_path") == str(base_path) and isinstance(before.get("base_metrics"), dict)
                    if ev.resumed and same:
                        base_metrics = before["base_metrics"]
                    else:
                        yield FinetuneStage("base", f"scoring the base {base_path.name} on the validation images")
                        base_metrics = evaluate_base(base_path, data.m2.val, mpp=student.mpp, device=config.device)
                _atomic.write_json(cfg_file, dict(
                    config.to_dict(), started=before.get("started", started) if ev.resumed else started,
                    data=data.description, student_preset=student.preset,
                    base_path=str(base_path) if base_path else None, base_metrics=base_metrics,
                ))
                yield ev
                yield FinetuneStage("train", f"training on {data.description}")
            elif isinstance(ev, DoneEvent):
                done = ev
            else:
                yield ev
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()
    assert done is not None
    best = done.best_metrics.get("best_aji", done.best_metrics.get("aji"))
    registered = None
    if not done.cancelled and base_metrics and best is not None:
        base_best = base_metrics.get("best_aji", base_metrics.get("aji"))
        if base_best is not None and best <= base_best:
            warnings.append(f"the fine-tuned model (validation AJI {best:.3f}) does not beat its base "
                            f"({base_best:.3f}) on the same validation images")
    if not done.cancelled and config.register and done.best_checkpoint is not None:
        if (best is None or best < config.min_aji) and not config.force_register:
            warnings.append(
                f"not registered: the best validation AJI {0.0 if best is None else best:.3f} is below the floor "
                f"{config.min_aji:g}; train longer or on more labels, or register anyway (force_register / --force-register)"
            )
        else:
            yield FinetuneStage("register", f"registering {config.name}")
            scores = {k: float(done.best_metrics[k]) for k in _SCORE_KEYS if k in done.best_metrics}
            card = register_model(
                done.best_checkpoint, name=config.name, base=config.base, data=data.description, scores=scores
            )
            registered = dict(card.to_dict() if hasattr(card, "to_dict") else card, date=_now())
            logger.info("registered %s -> %s", config.name, done.best_checkpoint)
    for w in warnings:
        logger.warning("%s", w)
    yield FinetuneDone(
        best_checkpoint=done.best_checkpoint, last_checkpoint=done.last_checkpoint,
        best_metrics=dict(done.best_metrics), cancelled=done.cancelled, registered=registered,
        history=list(done.history), initialised_from=initialised_from, base_metrics=base_metrics,
        warnings=warnings, init=init,
    )


def run_finetune(
    config: FinetuneConfig,
    *,
    progress: Callable[[Any], None] | None = None,
    cancel: Any = None,
    **kwargs: Any,
) -> FinetuneDone:
    """Run :func:`iter_finetune` to the end (headless); ``progress(event)`` sees every event."""
    return run_to_end(iter_finetune(config, cancel=cancel, **kwargs), FinetuneDone, progress=progress)
