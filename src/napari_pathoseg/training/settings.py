"""Run settings of the training engine: learning-rate schedules, threads, device.

Imported by :mod:`napari_pathoseg.training.engine`, which re-exports every name here.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Callable

import torch

from napari_pathoseg.training.rundir import TrainingError

__all__ = ["SCHEDULES", "resolve_schedule", "available_cores", "select_device", "ThreadPolicy"]

logger = logging.getLogger(__name__)


def _cyclegan(epoch: int, epochs: int) -> float:
    """Constant for the first half, then linear decay to 5% (CycleGAN)."""
    half = epochs / 2.0
    if epoch < half:
        return 1.0
    return max(0.05, 1.0 - (epoch - half) / max(1.0, epochs - half))


def _cosine(epoch: int, epochs: int) -> float:
    """Cosine decay from 1 to 0.01 over the run."""
    return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * epoch / max(1, epochs)))


#: Learning-rate factors ``f(epoch, epochs)``; ``"inverse:<decay>"`` is ``1 / (1 + decay * epoch)`` (M3).
SCHEDULES: dict[str, Callable[[int, int], float]] = {
    "constant": lambda epoch, epochs: 1.0,
    "cyclegan": _cyclegan,
    "cosine": _cosine,
}


def resolve_schedule(schedule: str | Callable[[int, int], float]) -> tuple[str, Callable[[int, int], float]]:
    """``(name, factor(epoch, epochs))`` of a schedule name or callable.

    Raises
    ------
    TrainingError
        An unknown name; the message lists the valid ones.
    """
    if callable(schedule):
        return getattr(schedule, "__name__", "custom"), schedule
    name = str(schedule)
    if name.startswith("inverse:"):
        try:
            decay = float(name.partition(":")[2])
        except ValueError:
            decay = -1.0
        if not decay >= 0:
            raise TrainingError(f"schedule {name!r}: 'inverse:<decay>' needs a decay >= 0, e.g. inverse:0.1.")
        return name, lambda epoch, epochs: 1.0 / (1.0 + decay * epoch)
    if name not in SCHEDULES:
        raise TrainingError(f"Unknown schedule {name!r}; valid: {sorted(SCHEDULES)} or 'inverse:<decay>'.")
    return name, SCHEDULES[name]


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def select_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or CUDA / MPS when available, else CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class ThreadPolicy:
    """How many intra-op threads torch uses during a run.

    Parameters
    ----------
    threads : int, "auto" or None
        A number; None: :func:`available_cores`; ``"auto"``: :func:`available_cores`, but 1
        while the 1-minute load average exceeds them + 1 (re-checked every ``every_s``).
    """

    def __init__(self, threads: int | str | None, *, every_s: float = 20.0) -> None:
        if threads == "auto":
            self.fixed = None
        elif threads is None:
            self.fixed = available_cores()
        else:
            try:
                self.fixed = int(threads)
            except (TypeError, ValueError):
                self.fixed = 0
            if self.fixed < 1:
                raise TrainingError(f"threads must be a number >= 1 or 'auto' (got {threads!r}).")
        self.every_s = every_s
        self._checked = -math.inf
        self.current = 0

    def want(self) -> int:
        if self.fixed is not None:
            return self.fixed
        cores = available_cores()
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            return cores
        return 1 if load > cores + 1 else cores

    def apply(self) -> int:
        """Set torch's thread count if due; returns the count in use."""
        now = time.monotonic()
        if self.current and (self.fixed is not None or now - self._checked < self.every_s):
            return self.current
        self._checked = now
        n = self.want()
        if n != self.current:
            if self.current:
                logger.info("torch threads %d -> %d (load)", self.current, n)
            torch.set_num_threads(n)
            self.current = n
        return n
