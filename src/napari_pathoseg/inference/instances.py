"""Objects made per tile and stitched seam-free by ownership (M2's nuclei, any instance method)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.inference._rows import RowBand, RowStore
from napari_pathoseg.inference._sink import Sink, batch_output
from napari_pathoseg.inference.engine import TilePlan

__all__ = ["Instances", "InstancesResult", "paste_owned"]


def paste_owned(
    dest: np.ndarray,
    inst: np.ndarray,
    prob: np.ndarray,
    *,
    core: tuple[int, int, int, int],
    first_id: int,
) -> list[tuple[int, float, float, int, float]]:
    """Paste the objects of one tile that the tile owns into ``dest`` (vectorised).

    An object is owned when its centroid lies in ``core`` = (r0, c0, r1, c1) (tile pixels);
    it is written only on pixels of ``dest`` still 0, with consecutive ids from
    ``first_id``. An object wholly under earlier ones is dropped, not duplicated.

    Returns
    -------
    list of (id, centroid_row, centroid_col, pixels, mean_prob)
        Per pasted object: centroid (tile pixels) and mean probability of the whole object,
        pixels actually written.
    """
    n = int(inst.max()) if inst.size else 0
    if n == 0:
        return []
    flat = inst.ravel()
    cnt = np.bincount(flat, minlength=n + 1).astype(np.float64)
    rr, cc = np.indices(inst.shape)
    cy = np.bincount(flat, weights=rr.ravel(), minlength=n + 1) / np.maximum(cnt, 1)
    cx = np.bincount(flat, weights=cc.ravel(), minlength=n + 1) / np.maximum(cnt, 1)
    conf = np.bincount(flat, weights=prob.ravel().astype(np.float64), minlength=n + 1) / np.maximum(cnt, 1)
    r0, c0, r1, c1 = core
    owned = (cnt > 0) & (cy >= r0) & (cy < r1) & (cx >= c0) & (cx < c1)
    owned[0] = False
    ids = np.flatnonzero(owned)
    if ids.size == 0:
        return []
    lut = np.zeros(n + 1, np.int64)
    lut[ids] = np.arange(1, ids.size + 1)
    tentative = lut[inst]
    free = (tentative > 0) & (dest == 0)
    pasted = np.bincount(tentative[free], minlength=ids.size + 1)[1:]
    keep = pasted > 0
    final = np.zeros(ids.size + 1, np.int64)
    final[1:][keep] = first_id + np.arange(int(keep.sum()))
    dest[free] = final[tentative[free]]
    return [
        (int(final[k + 1]), float(cy[i]), float(cx[i]), int(pasted[k]), float(conf[i]))
        for k, i in enumerate(ids)
        if keep[k]
    ]


@dataclass
class InstancesResult:
    """Stitched object labels and their table.

    Attributes
    ----------
    labels : (rows, cols) uint32
        On the output grid (0 = background); a memory map with a work folder.
    table : list of dict
        One row per object: ``id``, ``x``, ``y`` (centroid, level-0 pixels), ``area_um2``,
        ``confidence`` (mean probability).
    """

    labels: np.ndarray
    table: list[dict[str, Any]] = field(default_factory=list)


class Instances(Sink):
    """Objects made per tile by ``to_instances`` and stitched by ownership.

    Parameters
    ----------
    to_instances : callable
        ``to_instances(prob, extra) -> (H, W)`` int labels of one tile, from the tile's
        ``key`` map and its ``extra_key`` maps (None when the predictor has none).
    key, extra_key : str
        Predictor outputs: ``(B, H, W)`` probability, ``(B, C, H, W)`` extra maps.
    name : str
        Output name (and file name in the work folder).

    The overlap of the run must be wider than an object for no object to be cut.
    """

    def __init__(
        self,
        to_instances: Callable[[np.ndarray, np.ndarray | None], np.ndarray],
        *,
        key: str = "prob",
        extra_key: str = "extra",
        name: str = "labels",
    ) -> None:
        self.to_instances = to_instances
        self.key = key
        self.extra_key = extra_key
        self.name = name

    def start(self, plan: TilePlan, *, work_dir: Path | None) -> None:
        super().start(plan, work_dir=work_dir)
        rows, cols = plan.shape
        self._band = RowBand(rows, [((cols,), np.uint32, 0)])
        self._store = RowStore((rows, cols), np.uint32, path=self._file())
        self.table: list[dict[str, Any]] = []
        self._next = 1

    @property
    def count(self) -> int:
        """Objects so far."""
        return len(self.table)

    def add(self, tiles: Sequence[tuple[int, int]], outputs: Mapping[str, Any]) -> None:
        prob = batch_output(outputs, self.key, len(tiles), who=f"instances {self.name!r}")
        if prob is None:
            raise PathosegError(f"instances {self.name!r}: the predictor returned no {self.key!r} map")
        extra = batch_output(outputs, self.extra_key, len(tiles), who=f"instances {self.name!r}")
        p = self.plan
        rows, cols = p.shape
        a = float(p.mpp) ** 2
        for k, (r, c) in enumerate(tiles):
            inst = np.asarray(self.to_instances(prob[k], extra[k] if extra is not None else None))
            hh, ww = min(inst.shape[0], rows - r), min(inst.shape[1], cols - c)
            (band,) = self._band.window(r, r + hh)
            rc0, cc0, rc1, cc1 = p.core(r, c)
            added = paste_owned(band[:, c : c + ww], inst[:hh, :ww], prob[k][:hh, :ww], core=(rc0, cc0, rc1, cc1), first_id=self._next)
            for nid, cy, cx, n_px, conf in added:
                x0, y0 = p.to_level0(r + cy, c + cx)
                self.table.append({
                    "id": nid,
                    "x": round(x0, 2),
                    "y": round(y0, 2),
                    "area_um2": round(n_px * a, 3),
                    "confidence": round(conf, 4),
                })
            self._next += len(added)

    def release(self, row: int) -> None:
        for r0, (block,) in self._band.pop(row):
            self._store.write(r0, block)

    def finish(self, *, cancelled: bool) -> InstancesResult:
        self.release(self.plan.shape[0])
        self._store.close()
        return InstancesResult(labels=self._store.array(), table=self.table)
