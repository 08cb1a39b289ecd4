"""Per-tile scores (tile classifiers: malignancy, slide classification) -> heat map and table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.inference._sink import Sink, batch_output
from napari_pathoseg.inference.engine import TilePlan

__all__ = ["TileScores", "ScoresResult"]


@dataclass
class ScoresResult:
    """Per-tile class scores of a run and their heat map.

    Attributes
    ----------
    scores : (N, K) float32
        One row per tile run.
    tiles : (N, 2) int
        (row, col) of each tile on the output grid.
    plan : TilePlan
    classes : tuple of str
    """

    scores: np.ndarray
    tiles: np.ndarray
    plan: TilePlan
    classes: tuple[str, ...] = ()

    @property
    def boxes(self) -> np.ndarray:
        """(N, 4) float: level-0 (x, y, width, height) of each tile."""
        return np.array([self.plan.box(int(r), int(c)) for r, c in self.tiles], np.float64).reshape(-1, 4)

    @property
    def heatmap(self) -> np.ndarray:
        """(grid rows, grid cols, K) float32: each tile's scores in its cell, NaN where no tile ran.

        Cell (i, j) is the ``step`` x ``step`` square centred on tile (i, j); see
        :attr:`cell` and :attr:`origin` to place it over the slide.
        """
        p = self.plan
        k = self.scores.shape[1] if self.scores.ndim == 2 else max(1, len(self.classes))
        hm = np.full((len(p.grid_rows), len(p.grid_cols), k), np.nan, np.float32)
        ri = {r: i for i, r in enumerate(p.grid_rows)}
        ci = {c: j for j, c in enumerate(p.grid_cols)}
        for (r, c), s in zip(self.tiles, self.scores):
            hm[ri[int(r)], ci[int(c)]] = s
        return hm

    @property
    def cell(self) -> float:
        """Level-0 pixels per heat-map cell."""
        return self.plan.step * self.plan.scale

    @property
    def origin(self) -> tuple[float, float]:
        """Level-0 (x, y) of the heat map's top-left corner (cells are centred on their tiles)."""
        x, y = self.plan.region[:2]
        off = self.plan.overlap / 2.0 * self.plan.scale
        return x + off, y + off

    @property
    def table(self) -> list[dict[str, Any]]:
        """One row per tile: level-0 ``x``, ``y``, ``width``, ``height`` and one column per class."""
        names = list(self.classes) if len(self.classes) == self.scores.shape[1] else [f"class_{k}" for k in range(self.scores.shape[1])]
        rows = []
        for (x, y, w, h), s in zip(self.boxes, self.scores):
            row: dict[str, Any] = {"x": round(float(x), 2), "y": round(float(y), 2), "width": round(float(w), 2), "height": round(float(h), 2)}
            row.update({n: round(float(v), 5) for n, v in zip(names, s)})
            rows.append(row)
        return rows


class TileScores(Sink):
    """Collect one score vector per tile: ``(B, K)`` (or ``(B,)``) output ``key``.

    Parameters
    ----------
    key : str
    name : str, optional
        Default ``key``.
    classes : sequence of str
        Names of the K scores (table columns).
    """

    def __init__(self, key: str = "scores", *, name: str | None = None, classes: Sequence[str] = ()) -> None:
        self.key = key
        self.name = name or key
        self.classes = tuple(classes)

    def start(self, plan: TilePlan, *, work_dir: Path | None) -> None:
        super().start(plan, work_dir=work_dir)
        self._scores: list[np.ndarray] = []
        self._tiles: list[tuple[int, int]] = []

    def add(self, tiles: Sequence[tuple[int, int]], outputs: Mapping[str, Any]) -> None:
        arr = batch_output(outputs, self.key, len(tiles), who=f"scores {self.name!r}")
        if arr is None:
            raise PathosegError(f"scores {self.name!r}: the predictor returned no {self.key!r} output")
        arr = arr.reshape(len(tiles), -1).astype(np.float32)
        self._scores.extend(arr)
        self._tiles.extend(tiles)

    def finish(self, *, cancelled: bool) -> ScoresResult:
        k = self._scores[0].shape[0] if self._scores else max(1, len(self.classes))
        scores = np.stack(self._scores) if self._scores else np.zeros((0, k), np.float32)
        return ScoresResult(scores=scores, tiles=np.array(self._tiles, np.int64).reshape(-1, 2), plan=self.plan, classes=self.classes)
