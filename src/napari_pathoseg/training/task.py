"""What a method supplies to the training engine: a :class:`TrainTask`.

The engine (:func:`napari_pathoseg.training.engine.iter_train`) owns everything every method
needs the same way: seeding, the device and thread settings, the learning-rate schedule,
checkpoints (``last`` every epoch and on Stop, ``best`` by a validation metric), resume,
``history.json``, cancel and the run-folder lock. A task owns what is particular to a method:
its networks and optimisers, its data, one optimisation step, validation, and any extra state.

Write a task by subclassing :class:`TrainTask` and filling in the required methods::

    class MyTask(TrainTask):
        kind = "my-method"            # checkpoint family (models.checkpoint ``kind``)
        best_metric = "dice"          # key of validate() that picks the best epoch
        best_mode = "max"

        def __init__(self, cfg: dict, data):
            self.cfg, self.data = cfg, data

        def config(self):
            return dict(self.cfg)     # JSON-able; saved in every checkpoint

        def build(self, *, device, rng):
            self.net = Net(**self.cfg).to(device)
            self.opt = torch.optim.Adam(self.net.parameters(), lr=self.cfg["lr"])
            self.rng, self.device = rng, device

        def modules(self):
            return {"net": self.net}

        def optimizers(self):
            return {"net": self.opt}

        def batches(self):
            while True:               # draws lazily from self.rng: resume restores the position
                yield self.data.sample(8, self.rng)

        def train_step(self, batch, step):
            ...; return {"loss": float(loss)}

        def validate(self):
            return {"dice": ...}

Optional hooks (defaults do nothing or the obvious): :meth:`TrainTask.state_tensors` /
:meth:`TrainTask.load_state_tensors` (extra tensors saved in ``last``: an EMA teacher, a
prediction bank), :meth:`TrainTask.init_from` (start from another model's matching weights;
M1's segmenter from the classifier's encoder, a student from its teacher),
:meth:`TrainTask.after_step` (M4's momentum teacher: :func:`ema_update`),
:meth:`TrainTask.on_epoch_start`, :meth:`TrainTask.best_meta`, :meth:`TrainTask.meta`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from napari_pathoseg.errors import CheckpointError

__all__ = ["TrainTask", "InitReport", "copy_matching", "ema_update", "RESERVED_NAMES"]

logger = logging.getLogger(__name__)

#: Checkpoint group names the engine uses itself (a task's modules must not take them).
RESERVED_NAMES = ("rng", "state")


@dataclass
class InitReport:
    """What :meth:`TrainTask.init_from` took from another model.

    Attributes
    ----------
    source : str
        The checkpoint path or a description of the model.
    copied : list of str
        ``"<module>.<parameter>"`` names copied (same name and shape).
    shape_mismatch : list of str
        Names present in both with different shapes (left as initialised).
    missing : list of str
        Names of the task's modules the source does not have (left as initialised).
    unused : list of str
        Names in the source the task has no place for.
    """

    source: str
    copied: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    @property
    def n_copied(self) -> int:
        return len(self.copied)

    @property
    def complete(self) -> bool:
        """Every tensor of the task's modules came from the source."""
        return bool(self.copied) and not self.shape_mismatch and not self.missing

    def summary(self) -> str:
        """One line: how many tensors were copied and what was left as initialised."""
        total = len(self.copied) + len(self.shape_mismatch) + len(self.missing)
        text = f"{len(self.copied)} of {total} tensors from {Path(self.source).name or self.source}"
        if self.shape_mismatch:
            text += f"; {len(self.shape_mismatch)} differ in shape"
        if self.missing:
            text += f"; {len(self.missing)} not in the source"
        if self.unused:
            text += f"; {len(self.unused)} source tensors unused"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "copied": len(self.copied), "shape_mismatch": list(self.shape_mismatch),
            "missing": len(self.missing), "unused": len(self.unused), "summary": self.summary(),
        }


def _flat(state: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{m}.{k}": t for m, sd in state.items() for k, t in sd.items()}


def copy_matching(
    modules: Mapping[str, nn.Module],
    source: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    rename: Mapping[str, str] | None = None,
    source_name: str = "",
) -> InitReport:
    """Copy every source tensor whose name and shape match into ``modules``.

    Parameters
    ----------
    modules : dict of str to nn.Module
        The task's modules (``TrainTask.modules()``).
    source : dict of str to state dict
        ``{module name: state_dict}`` (as :func:`models.checkpoint.load_checkpoint` returns).
    rename : dict of str to str, optional
        Prefix map applied to the source's flat names ``"<module>.<key>"`` before matching, e.g.
        ``{"A.encoder.": "B.encoder."}`` takes classifier A's encoder into segmenter B's.
        The longest matching prefix wins.
    source_name : str
        How the report names the source.

    Returns
    -------
    InitReport

    Examples
    --------
    >>> a, b = nn.Linear(2, 3), nn.Linear(2, 3)
    >>> copy_matching({"net": b}, {"net": a.state_dict()}).n_copied
    2
    """
    flat = _flat(source)
    if rename:
        prefixes = sorted(rename, key=len, reverse=True)
        moved = {}
        for name, t in flat.items():
            new = name
            for p in prefixes:
                if name.startswith(p):
                    new = rename[p] + name[len(p):]
                    break
            moved[new] = t
        flat = moved
    report = InitReport(source=source_name)
    seen = set()
    for mname, module in modules.items():
        own = module.state_dict()
        take = {}
        for key, t in own.items():
            name = f"{mname}.{key}"
            if name not in flat:
                report.missing.append(name)
                continue
            seen.add(name)
            src = flat[name]
            if tuple(src.shape) != tuple(t.shape):
                report.shape_mismatch.append(name)
                continue
            take[key] = src.to(dtype=t.dtype)
            report.copied.append(name)
        if take:
            with torch.no_grad():
                module.load_state_dict(take, strict=False)
    report.unused = sorted(set(flat) - seen)
    return report


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, *, momentum: float) -> None:
    """Momentum update ``theta_t <- momentum * theta_t + (1 - momentum) * theta_s`` (in place).

    Floating-point buffers (BatchNorm running statistics) follow the same rule; integer buffers
    (``num_batches_tracked``) are copied. ``teacher`` and ``student`` must have the same structure.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    t_state, s_state = teacher.state_dict(), student.state_dict()
    if t_state.keys() != s_state.keys():
        raise ValueError("ema_update: teacher and student have different parameters")
    for k, t in t_state.items():
        s = s_state[k]
        if t.dtype.is_floating_point:
            t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
        else:
            t.copy_(s)


class TrainTask:
    """Base class of a method's training task (see the module docstring for an example).

    Class attributes
    ----------------
    kind : str
        Checkpoint family written into every checkpoint (``"m2"``...).
    best_metric : str
        Key of :meth:`validate`'s result that decides the best epoch.
    best_mode : {"max", "min"}
        Whether higher or lower ``best_metric`` is better.
    """

    kind: str = "task"
    best_metric: str = "loss"
    best_mode: str = "max"

    # ------------------------------------------------------------------ required
    def config(self) -> dict[str, Any]:
        """JSON-able configuration; saved in every checkpoint, a resume with another one is refused."""
        raise NotImplementedError

    def build(self, *, device: torch.device, rng: np.random.Generator) -> None:
        """Create networks and optimisers on ``device``; keep ``rng`` for data sampling.

        The engine seeds torch before calling it, so the initial weights repeat with the seed.
        """
        raise NotImplementedError

    def modules(self) -> dict[str, nn.Module]:
        """The networks, by name (saved in ``last`` and ``best``)."""
        raise NotImplementedError

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimisers, by name (saved in ``last``; the schedule scales their learning rates)."""
        raise NotImplementedError

    def batches(self) -> Iterator[Any]:
        """An endless iterator of training batches.

        Draw from the ``rng`` given to :meth:`build` lazily (one batch per ``next``, no
        read-ahead): the engine restores that generator's state on resume, which puts the
        iterator where it was.
        """
        raise NotImplementedError

    def train_step(self, batch: Any, step: int) -> dict[str, float]:
        """One optimisation step on ``batch``; ``step`` counts from 0 over the whole run.

        Returns
        -------
        dict of str to float
            The step's losses (plain floats).
        """
        raise NotImplementedError

    def validate(self) -> dict[str, float]:
        """Validation metrics of the current weights (must hold :attr:`best_metric`)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ optional
    def meta(self) -> dict[str, Any]:
        """JSON-able facts about the run saved in every checkpoint (data split, batch size...)."""
        return {}

    def best_meta(self, val: dict[str, float]) -> dict[str, Any]:
        """Extra JSON-able metadata saved with a new best checkpoint (and in the best metrics)."""
        return {}

    def best_modules(self) -> list[str]:
        """Modules saved in ``best`` (default: all)."""
        return list(self.modules())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Extra tensors saved in ``last`` (an EMA teacher, a prediction bank, counters)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_tensors` on resume."""
        if tensors:
            raise CheckpointError(
                f"{type(self).__name__} got extra state {sorted(tensors)[:3]} it cannot restore; "
                "resume with the task that wrote the checkpoint."
            )

    def init_from(self, source: Any) -> InitReport:
        """Initialise from another model's matching weights (a fresh run only).

        Parameters
        ----------
        source : path, nn.Module, or dict of module name to state dict
            A ``.safetensors`` checkpoint (any ``kind``), a module (matched against every task
            module by parameter name), or state dicts by module name.

        Returns
        -------
        InitReport
        """
        from napari_pathoseg.models.checkpoint import read_header

        if isinstance(source, (str, os.PathLike)):
            from safetensors.torch import load_file

            from napari_pathoseg.models.checkpoint import split_state

            read_header(source)  # refuses pickles and foreign files with a clear message
            state = split_state(load_file(str(source), device="cpu"))
            return copy_matching(self.modules(), state, source_name=str(source))
        if isinstance(source, nn.Module):
            sd = source.state_dict()
            return copy_matching(self.modules(), {m: sd for m in self.modules()}, source_name=type(source).__name__)
        if isinstance(source, Mapping):
            return copy_matching(self.modules(), source, source_name="state dicts")
        raise TypeError(f"init_from takes a checkpoint path, a module or state dicts, not {type(source).__name__}")

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """Called before the first step of every epoch (default: all modules to train mode)."""
        for m in self.modules().values():
            m.train()

    def after_step(self, step: int) -> None:
        """Called after every optimisation step (M4: :func:`ema_update` of a momentum teacher)."""


def check_names(names: Iterable[str], what: str) -> None:
    """Refuse module / optimiser names the checkpoint layout cannot hold."""
    for n in names:
        if not n or "." in n or n in RESERVED_NAMES or n.startswith("opt_"):
            raise CheckpointError(
                f"{what} name {n!r} cannot be stored: use a plain name without '.', not 'rng', 'state' or 'opt_*'."
            )
