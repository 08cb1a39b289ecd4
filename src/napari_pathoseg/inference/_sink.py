"""The sink interface the engine calls, and a helper to take a predictor output."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.inference.engine import TilePlan

__all__ = ["Sink", "batch_output"]


class Sink(ABC):
    """Base of the sinks: a name, the plan, and the four calls the engine makes.

    ``add`` and ``finish`` are what a sink is (abstract); ``start`` and ``release`` have defaults.
    """

    name: str = ""

    def start(self, plan: TilePlan, *, work_dir: Path | None) -> None:
        """Get ready for a run laid out by ``plan``; files go in ``work_dir`` when given."""
        self.plan = plan
        self.work_dir = work_dir

    @abstractmethod
    def add(self, tiles: Sequence[tuple[int, int]], outputs: Mapping[str, Any]) -> None:
        """Take one batch: ``tiles`` (row, col) and the predictor's ``outputs`` (leading B axis)."""

    def release(self, row: int) -> None:
        """Every output row above ``row`` is final (no later tile reaches it)."""

    @abstractmethod
    def finish(self, *, cancelled: bool) -> Any:
        """Return the output (``cancelled``: only the tiles added so far ran)."""

    def _file(self, suffix: str = ".npy") -> Path | None:
        return None if self.work_dir is None else Path(self.work_dir) / f"{self.name}{suffix}"


def batch_output(outputs: Mapping[str, Any], key: str, n: int, *, who: str) -> np.ndarray | None:
    arr = outputs.get(key)
    if arr is None:
        return None
    arr = np.asarray(arr)
    if arr.ndim == 0 or arr.shape[0] != n:
        raise PathosegError(f"{who}: the predictor's {key!r} output has shape {arr.shape}, expected {n} tiles first")
    return arr
