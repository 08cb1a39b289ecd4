"""The one training engine: :func:`iter_train` runs any :class:`~napari_pathoseg.training.task.TrainTask`.

It is a generator of small events, so the CLI, the docks and scripts drive it the same way:

* :class:`TrainStart` - once: position (fresh or resumed), device, threads, what
  ``init_from`` copied;
* :class:`StepEvent` - after every optimisation step (losses; ``done``/``total`` steps);
* :class:`ValidationEvent` - before validation starts (it can take a while: show "validating");
* :class:`EpochEvent` - after every epoch (mean losses, validation metrics, ``is_best``,
  seconds, the checkpoint written);
* :class:`DoneEvent` - last: best/last checkpoints, best metrics, history, ``cancelled``.

What the engine owns (every method gets it the same way):

* **Run folder** (:mod:`~napari_pathoseg.training.rundir`): ``last.safetensors`` after every
  epoch and on Stop (resumable), ``best.safetensors`` when the validation metric improves,
  ``history.json``. A folder that already holds a run is refused unless ``resume`` (continue it)
  or ``force`` (start over, replacing it). One process per folder (a pid lock file; a stale
  lock of a dead process is taken over).
* **Resume**: the modules, optimisers, task state tensors, torch and numpy random states and the
  position (epoch, step) come back, so an interrupted run continues exactly as an uninterrupted
  one would. A different task config in the folder is refused.
* **Cancel**: a token with ``is_set()`` is checked after every step (and before every epoch);
  the step finishes, ``last`` is saved, and a :class:`DoneEvent` with ``cancelled=True`` ends
  the run (it does not raise).
* **Schedule**: every optimiser group's learning rate is ``initial_lr * factor(epoch, epochs)``
  (:data:`SCHEDULES`: ``constant``, ``cyclegan``, ``cosine``, ``inverse:<decay>``, or a callable).
* **Threads and device**: torch uses every core the process may use
  (``len(os.sched_getaffinity(0))``) unless ``threads`` says otherwise (a number, or ``"auto"``:
  all of them, but 1 while the machine's load exceeds them - :class:`ThreadPolicy`), restored afterwards;
  the device is CUDA / MPS when present, else CPU.

Example
-------
>>> for ev in iter_train(task, out_dir="runs/x", epochs=10, steps_per_epoch=100):  # doctest: +SKIP
...     print(ev)
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from napari_pathoseg import _atomic
from napari_pathoseg.errors import CheckpointError
from napari_pathoseg.events import Cancellable, run_to_end
from napari_pathoseg.training.rundir import (
    BEST,
    HISTORY,
    LAST,
    RunExistsError,
    RunLock,
    TrainingError,
    existing_run,
    load_optimizer,
    optimizer_tensors,
    restore_rng,
    rng_tensors,
)
from napari_pathoseg.training.settings import (
    SCHEDULES,
    ThreadPolicy,
    available_cores,
    resolve_schedule,
    select_device,
)
from napari_pathoseg.training.task import InitReport, TrainTask, check_names

__all__ = [
    "TrainStart",
    "StepEvent",
    "ValidationEvent",
    "EpochEvent",
    "DoneEvent",
    "TrainEvent",
    "iter_train",
    "run_train",
    "SCHEDULES",
    "resolve_schedule",
    "check_run_folder",
    "available_cores",
    "ThreadPolicy",
    "select_device",
    "TrainingError",
    "RunExistsError",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ events


@dataclass
class TrainStart:
    """The run starts (fresh, or resumed at ``epoch``/``step``)."""

    epoch: int
    step: int
    epochs: int
    steps_per_epoch: int
    resumed: bool
    device: str
    threads: int
    out_dir: Path
    init: InitReport | None = None

    @property
    def message(self) -> str:
        where = f"resumed at epoch {self.epoch + 1}, step {self.step + 1}" if self.resumed else "fresh start"
        text = f"{where}; {self.epochs} epochs x {self.steps_per_epoch} steps on {self.device}, {self.threads} threads"
        if self.init is not None:
            text += f"; initialised with {self.init.summary()}"
        return text


@dataclass
class StepEvent:
    """One optimisation step finished (``step`` counts within the epoch, from 0)."""

    epoch: int
    step: int
    steps_per_epoch: int
    losses: dict[str, float]
    epochs: int = 0
    lr_factor: float = 1.0

    @property
    def done(self) -> int:
        """Steps finished in the whole run."""
        return self.epoch * self.steps_per_epoch + self.step + 1

    @property
    def total(self) -> int:
        """Steps of the whole run."""
        return max(self.epochs, self.epoch + 1) * self.steps_per_epoch


@dataclass
class ValidationEvent:
    """Validation of epoch ``epoch`` starts (the steps of the epoch are done)."""

    epoch: int
    message: str = "validating"


@dataclass
class EpochEvent:
    """One epoch finished: mean losses, validation metrics, checkpoint written."""

    epoch: int
    losses: dict[str, float]
    val_metrics: dict[str, float]
    checkpoint_path: Path
    is_best: bool = False
    seconds: float = 0.0
    validation_seconds: float = 0.0
    lr_factor: float = 1.0


@dataclass
class DoneEvent:
    """The run ended: all epochs, or cancelled after saving ``last_checkpoint``."""

    best_checkpoint: Path | None
    best_metrics: dict[str, Any]
    last_checkpoint: Path | None = None
    cancelled: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    seconds: float = 0.0

    @property
    def message(self) -> str:
        if self.cancelled:
            return f"stopped; resumable checkpoint {self.last_checkpoint}"
        return f"done; best checkpoint {self.best_checkpoint}"


TrainEvent = TrainStart | StepEvent | ValidationEvent | EpochEvent | DoneEvent


# ------------------------------------------------------------------------------------------ helpers


def _json(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _save(path: Path, tensors: dict[str, dict[str, torch.Tensor]], config: dict, meta: dict, kind: str) -> Path:
    from napari_pathoseg.models.checkpoint import save_checkpoint

    try:
        return save_checkpoint(path, tensors, config, meta, kind=kind)
    except OSError as exc:
        raise TrainingError(
            f"cannot write the checkpoint {path}: {exc.strerror or exc}; free some space or choose another folder."
        ) from exc


def _better(value: float, best: float | None, mode: str) -> bool:
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def check_run_folder(out_dir: str | os.PathLike, *, resume: bool = False, force: bool = False) -> dict[str, Any] | None:
    """Refuse a folder holding a run unless ``resume`` or ``force``; returns what it holds.

    Call it early (before loading data) to fail fast; :func:`iter_train` calls it again under
    the folder's lock.

    Raises
    ------
    RunExistsError
        The folder holds a finished or started run and neither flag was given.
    """
    out = Path(out_dir).expanduser()
    run = existing_run(out)
    if run is not None and not resume and not force:
        if run["finished"]:
            what = f"a finished training run ({run['epochs']} epochs)"
        elif run["epoch"] is not None:
            what = f"a started training run (at epoch {run['epoch']} of {run['epochs']})"
        else:
            what = f"training files ({', '.join(run['files'])})"
        raise RunExistsError(f"{out} holds {what}; pass --resume to continue it or --force to start over (replacing it).")
    return run


def _prepare_folder(out: Path, *, resume: bool, force: bool) -> bool:
    """Refuse an occupied folder unless resume/force; returns True when resuming from ``last``."""
    run = check_run_folder(out, resume=resume, force=force)
    resuming = resume and (out / LAST).is_file()
    if run is not None and not resuming:
        for name in run["files"]:
            (out / name).unlink(missing_ok=True)
        logger.info("%s: removed the previous run's %s (starting over)", out, ", ".join(run["files"]))
    return resuming


# ------------------------------------------------------------------------------------------ engine


def iter_train(
    task: TrainTask,
    *,
    out_dir: str | os.PathLike,
    epochs: int,
    steps_per_epoch: int,
    resume: bool = False,
    force: bool = False,
    cancel: Cancellable | None = None,
    threads: int | str | None = None,
    seed: int = 0,
    schedule: str | Callable[[int, int], float] = "constant",
    device: str | torch.device | None = None,
    init_from: Any = None,
    meta: dict[str, Any] | None = None,
) -> Iterator[TrainEvent]:
    """Train ``task``; a generator of :data:`TrainEvent` ending in one :class:`DoneEvent`.

    Parameters
    ----------
    task : TrainTask
    out_dir : path
        The run folder (created): checkpoints, ``history.json``, the lock.
    epochs, steps_per_epoch : int
        Length of the run; a resumed run continues up to ``epochs``.
    resume : bool
        Continue the run in ``out_dir`` (from ``last.safetensors``; a fresh start when there is none).
    force : bool
        Start over in a folder that holds a run, replacing its files.
    cancel : object with ``is_set()``, optional
        Checked after every step and before every epoch; when set, ``last`` is saved and a
        cancelled :class:`DoneEvent` ends the run.
    threads : int, "auto" or None
        torch intra-op threads. None (default): every core this process may use; ``"auto"``:
        the same, but 1 while the 1-minute load average exceeds those cores + 1 (checked every
        20 s; intra-op threads that wait on busy cores slow a step down many times).
    seed : int
        Seeds torch and the numpy generator handed to ``task.build``.
    schedule : str or callable
        Learning-rate factor per epoch (:func:`resolve_schedule`).
    device : str or torch.device, optional
        Default: CUDA / MPS when present, else CPU.
    init_from : path, module or state dicts, optional
        Passed to ``task.init_from`` on a fresh start (ignored when resuming).
    meta : dict, optional
        JSON-able facts saved in every checkpoint (e.g. the command line).

    Yields
    ------
    TrainStart, StepEvent, ValidationEvent, EpochEvent, DoneEvent

    Raises
    ------
    RunExistsError
        ``out_dir`` holds a run and neither ``resume`` nor ``force`` was given.
    RunLockedError
        Another live process trains into ``out_dir``.
    TrainingError, CheckpointError
        Bad lengths, a different config in the folder, a damaged checkpoint.
    """
    if epochs < 1 or steps_per_epoch < 1:
        raise TrainingError(f"epochs and steps_per_epoch must be >= 1 (got {epochs}, {steps_per_epoch}).")
    policy = ThreadPolicy(threads)
    if task.best_mode not in ("max", "min"):
        raise TrainingError(f"{type(task).__name__}.best_mode must be 'max' or 'min', got {task.best_mode!r}.")
    sched_name, factor = resolve_schedule(schedule)
    out = Path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainingError(f"cannot create the run folder {out}: {exc.strerror or exc}.") from exc
    t_run = time.perf_counter()
    lock = RunLock(out).acquire()
    prev_threads = torch.get_num_threads()
    try:
        resuming = _prepare_folder(out, resume=resume, force=force)
        n_threads = policy.apply()
        dev = select_device(device)
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        task.build(device=dev, rng=rng)
        modules, optims = task.modules(), task.optimizers()
        check_names(modules, "module")
        check_names(optims, "optimiser")
        initial_lrs = [[g["lr"] for g in opt.param_groups] for opt in optims.values()]
        config = _json(task.config())
        last_path, best_path = out / LAST, out / BEST
        run_meta = _json(dict(meta or {}, **task.meta(), seed=seed, epochs=epochs,
                              steps_per_epoch=steps_per_epoch, schedule=sched_name))
        start_epoch = start_step = 0
        best_value: float | None = None
        best_epoch: int | None = None
        best_metrics: dict[str, Any] = {}
        history: list[dict[str, Any]] = []
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        report = None
        if resuming:
            from napari_pathoseg.models.checkpoint import load_checkpoint, load_state_strict, read_header

            header = read_header(last_path)
            if header["kind"] != task.kind:
                raise TrainingError(f"{last_path} holds a {header['kind']!r} run, not {task.kind!r}; choose another folder.")
            diff = _config_diff(header["config"], config)
            if diff:
                raise TrainingError(
                    f"{last_path} was trained with a different config (differs in {', '.join(diff[:5])}); "
                    "use the same options to resume, another output folder, or --force to start over."
                )
            tensors, _, state = load_checkpoint(last_path, expected_kind=task.kind)
            for name, module in modules.items():
                if name not in tensors:
                    raise CheckpointError(f"{last_path} has no {name!r} weights; it was written by another task.")
                load_state_strict(module, tensors[name], what=name, path=last_path)
            groups = state.get("optimizers", {})
            for name, opt in optims.items():
                g = groups.get(name, state.get(f"opt_{name.lower()}_groups"))  # older M2 checkpoints
                if g is None:
                    raise CheckpointError(f"{last_path} has no state of optimiser {name!r}; resume with the same task.")
                load_optimizer(opt, tensors.get(f"opt_{name}", {}), g)
            restore_rng(tensors.get("rng", {}))
            task.load_state_tensors(tensors.get("state", {}))
            rng.bit_generator.state = state["numpy_rng"]
            start_epoch, start_step = int(state["epoch"]), int(state["step"])
            best_value = state.get("best_value", state.get("best_aji"))
            best_epoch = state.get("best_epoch", state.get("best_metrics", {}).get("epoch"))
            best_metrics = state.get("best_metrics", {})
            history = state.get("history", [])
            sums, counts = state.get("epoch_sums", {}), state.get("epoch_counts", {})
            logger.info("resumed %s at epoch %d step %d", last_path, start_epoch, start_step)
        elif init_from is not None:
            report = task.init_from(init_from)
            logger.info("initialised: %s", report.summary())
        for opt, lrs in zip(optims.values(), initial_lrs):
            for g, lr in zip(opt.param_groups, lrs):
                g.setdefault("initial_lr", lr)  # checkpoints of older versions lack it

        def save_last(epoch: int, step: int) -> Path:
            tensors: dict[str, dict[str, torch.Tensor]] = {n: m.state_dict() for n, m in modules.items()}
            groups = {}
            for n, opt in optims.items():
                tensors[f"opt_{n}"], groups[n] = optimizer_tensors(opt)
            tensors["rng"] = rng_tensors()
            extra = task.state_tensors()
            if extra:
                tensors["state"] = extra
            state = dict(
                run_meta, epoch=epoch, step=step, finished=epoch >= epochs, best_value=best_value,
                best_epoch=best_epoch, best_metrics=best_metrics, history=history,
                numpy_rng=rng.bit_generator.state, optimizers=groups, epoch_sums=sums, epoch_counts=counts,
            )
            return _save(last_path, tensors, config, state, task.kind)

        def done(cancelled: bool) -> DoneEvent:
            return DoneEvent(
                best_path if best_path.is_file() else None, dict(best_metrics),
                last_path if last_path.is_file() else None, cancelled, list(history), best_epoch,
                time.perf_counter() - t_run,
            )

        yield TrainStart(start_epoch, start_step, epochs, steps_per_epoch, resuming, str(dev), n_threads, out, report)
        batches = task.batches()
        for epoch in range(start_epoch, epochs):
            if cancel is not None and cancel.is_set():
                path = save_last(epoch, start_step)
                logger.info("training cancelled before epoch %d step %d; saved %s", epoch, start_step, path)
                yield done(True)
                return
            t_epoch = time.perf_counter()
            f = float(factor(epoch, epochs))
            for opt in optims.values():
                for g in opt.param_groups:
                    g["lr"] = g["initial_lr"] * f
            task.on_epoch_start(epoch, epochs)
            for step in range(start_step, steps_per_epoch):
                global_step = epoch * steps_per_epoch + step
                policy.apply()
                losses = {k: float(v) for k, v in task.train_step(next(batches), global_step).items()}
                task.after_step(global_step)
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
                yield StepEvent(epoch, step, steps_per_epoch, losses, epochs, f)
                if cancel is not None and cancel.is_set():
                    path = save_last(epoch, step + 1)
                    logger.info("training cancelled at epoch %d step %d; saved %s", epoch, step + 1, path)
                    yield done(True)
                    return
            start_step = 0
            yield ValidationEvent(epoch)
            t_val = time.perf_counter()
            val = {k: (float(v) if isinstance(v, numbers.Real) else v) for k, v in task.validate().items()}
            val_seconds = time.perf_counter() - t_val
            if task.best_metric not in val:
                raise TrainingError(f"{type(task).__name__}.validate() returned no {task.best_metric!r} (got {sorted(val)}).")
            mean_losses = {k: sums[k] / counts[k] for k in sums}
            sums, counts = {}, {}
            is_best = _better(val[task.best_metric], best_value, task.best_mode)
            seconds = time.perf_counter() - t_epoch
            history.append({"epoch": epoch, "losses": mean_losses, "val": val, "seconds": seconds,
                            "validation_seconds": val_seconds, "lr_factor": f, "is_best": is_best})
            if is_best:
                best_value, best_epoch = float(val[task.best_metric]), epoch
                extra = _json(task.best_meta(val))
                best_metrics = dict(val, epoch=epoch, **extra)
                keep = task.best_modules()
                _save(best_path, {n: modules[n].state_dict() for n in keep}, config,
                      dict(run_meta, epoch=epoch, val_metrics=val, **extra), task.kind)
            path = save_last(epoch + 1, 0)
            _atomic.write_json(out / HISTORY, history)
            logger.info("epoch %d: losses %s val %s (%.0f s)", epoch, mean_losses, val, seconds)
            yield EpochEvent(epoch, mean_losses, val, path, is_best, seconds, val_seconds, f)
            if cancel is not None and cancel.is_set() and epoch + 1 < epochs:
                logger.info("training cancelled after epoch %d; saved %s", epoch, path)
                yield done(True)
                return
        yield done(False)
    finally:
        torch.set_num_threads(prev_threads)
        lock.release()


def run_train(task: TrainTask, *, progress: Callable[[Any], None] | None = None, **kwargs: Any) -> DoneEvent:
    """Run :func:`iter_train` to the end; ``progress(event)`` sees every event."""
    return run_to_end(iter_train(task, **kwargs), DoneEvent, progress=progress)
