"""Sinks: where the engine's per-tile outputs go, and what each method gets back.

* :class:`ProbabilityMap` - per-pixel maps (n class probabilities, or an image such as M2's
  stain-normalised tiles) stitched with overlap averaging (feathered, plain or by tile
  ownership), stored as float32/float16 or quantised to uint8; a :class:`MapResult` that
  streams itself to a pyramidal TIFF.
* :class:`TileScores` - one score vector per tile (tile classifiers: malignancy, slide
  classification) -> a coarse heat map on the tile grid and a table (:class:`ScoresResult`).
* :class:`Instances` - object labels made per tile and stitched seam-free by ownership (M2's
  nuclei): an object belongs to the tile whose core holds its centroid, so with an overlap
  wider than an object no object is split or duplicated; one table row per object
  (:class:`InstancesResult`).

Every sink has ``name`` (its key in :attr:`InferenceResult.outputs
<napari_pathoseg.inference.engine.InferenceResult.outputs>`) and the engine calls
``start(plan, work_dir=...)``, then per batch ``add(tiles, outputs)`` and ``release(row)``
(every row above ``row`` is final), and finally ``finish(cancelled=...)``, which returns the
output. A new kind of output is a new class with these four methods.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.events import Cancellable
from napari_pathoseg.inference._rows import RowBand, RowStore
from napari_pathoseg.inference.engine import TilePlan

__all__ = [
    "Sink",
    "ProbabilityMap",
    "MapResult",
    "TileScores",
    "ScoresResult",
    "Instances",
    "InstancesResult",
    "paste_owned",
    "BLENDS",
]

logger = logging.getLogger(__name__)

#: How overlapping tiles are combined: feathered mean, plain mean, or each pixel from the tile that owns it.
BLENDS = ("feather", "mean", "core")

#: Colours of classes 0, 1, 2... in a rendered multi-class map.
PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180),
    (70, 240, 240), (245, 130, 48), (240, 50, 230), (210, 245, 60), (128, 128, 128),
)


class Sink:
    """Base of the sinks: a name, the plan, and the four calls the engine makes."""

    name: str = ""

    def start(self, plan: TilePlan, *, work_dir: Path | None) -> None:
        """Get ready for a run laid out by ``plan``; files go in ``work_dir`` when given."""
        self.plan = plan
        self.work_dir = work_dir

    def add(self, tiles: Sequence[tuple[int, int]], outputs: Mapping[str, Any]) -> None:
        """Take one batch: ``tiles`` (row, col) and the predictor's ``outputs`` (leading B axis)."""
        raise NotImplementedError

    def release(self, row: int) -> None:
        """Every output row above ``row`` is final (no later tile reaches it)."""

    def finish(self, *, cancelled: bool) -> Any:
        """Return the output (``cancelled``: only the tiles added so far ran)."""
        raise NotImplementedError

    def _file(self, suffix: str = ".npy") -> Path | None:
        return None if self.work_dir is None else Path(self.work_dir) / f"{self.name}{suffix}"


def _batch_output(outputs: Mapping[str, Any], key: str, n: int, *, who: str) -> np.ndarray | None:
    arr = outputs.get(key)
    if arr is None:
        return None
    arr = np.asarray(arr)
    if arr.ndim == 0 or arr.shape[0] != n:
        raise PathosegError(f"{who}: the predictor's {key!r} output has shape {arr.shape}, expected {n} tiles first")
    return arr


# ----------------------------------------------------------------------------- maps


@dataclass
class MapResult:
    """A stitched per-pixel map on the plan's output grid.

    Attributes
    ----------
    store : RowStore
        Where the rows are (memory or a ``.npy`` file in the work folder).
    plan : TilePlan
    scale : float
        Stored value = map value x ``scale`` (255 for uint8-quantised probabilities).
    classes : tuple of str
        Channel names (may be empty).
    coverage : float
        Fraction of the output that tiles reached.
    peak_rows : int
        Most output rows the run held in memory at once (the rest were streamed out).
    """

    store: RowStore
    plan: TilePlan
    scale: float
    classes: tuple[str, ...] = ()
    coverage: float = 0.0
    key: str = ""
    peak_rows: int = 0

    @property
    def array(self) -> np.ndarray:
        """``(rows, cols)`` or ``(rows, cols, C)`` stored values (a memory map with a work folder)."""
        return self.store.array()

    @property
    def shape(self) -> tuple[int, ...]:
        return self.store.shape

    def values(self, rows: slice = slice(None)) -> np.ndarray:
        """Map values (stored / ``scale``) of some rows as float32."""
        return np.asarray(self.store.read(*rows.indices(self.shape[0])[:2]), np.float32) / np.float32(self.scale)

    def _rgb(self, block: np.ndarray, *, channel: int | None, colors: Sequence[tuple[int, int, int]] | None) -> np.ndarray:
        v = block.astype(np.float32) / np.float32(self.scale)
        if v.ndim == 2:
            v = v[..., None]
        if channel is not None:
            v = v[..., channel : channel + 1]
        if v.shape[-1] == 3 and self.store.dtype == np.uint8 and self.scale == 1 and channel is None and colors is None:
            return block.astype(np.uint8)  # an RGB image (e.g. stain-normalised tiles)
        if v.shape[-1] == 1:
            g = np.clip(np.rint(v[..., 0] * 255.0), 0, 255).astype(np.uint8)
            return np.repeat(g[..., None], 3, axis=2)
        cols = np.asarray(colors or [PALETTE[k % len(PALETTE)] for k in range(v.shape[-1])], np.float32)
        if cols.shape != (v.shape[-1], 3):
            raise PathosegError(f"give one (r, g, b) colour per channel: {v.shape[-1]} channels, {len(cols)} colours")
        return np.clip(np.rint(v @ cols), 0, 255).astype(np.uint8)  # probability-weighted class colours

    def write_pyramid(
        self,
        path: str | os.PathLike,
        *,
        channel: int | None = None,
        colors: Sequence[tuple[int, int, int]] | None = None,
        tile: int = 256,
        levels: int | None = None,
        compression: str | None = "zlib",
        cancel: Cancellable | None = None,
    ) -> Path:
        """Stream the map to a pyramidal tiled RGB TIFF on its own grid (µm/px = ``plan.mpp``).

        One channel is written as grey (value x 255), an RGB image as itself, several
        channels as probability-weighted class colours (``colors``, default a palette);
        ``channel`` picks one channel. Rows are read from the store a strip at a time, so
        memory stays a few strips whatever the map size. ``levels``: number of pyramid
        levels (default: halve until the longest side is at most 1024). ``cancel`` (with
        ``is_set()``) stops the write: nothing is left behind and
        :class:`~napari_pathoseg.errors.CancelledError` is raised. Atomic.

        Returns
        -------
        Path
        """
        from napari_pathoseg._atomic import atomic_path
        from napari_pathoseg.wsi.pyramid_tiff import check_options, write_tiled_pyramid

        check_options(tile=tile, compression=compression)
        n_chan = self.shape[2] if len(self.shape) == 3 else 1
        if channel is not None and not 0 <= channel < n_chan:
            raise PathosegError(f"channel {channel} does not exist; the map has shape {self.shape}")
        strip: dict[str, Any] = {"row": -1, "data": None}

        def read(level: int, row: int, col: int, height: int, width: int) -> np.ndarray:
            if strip["row"] != row:
                strip["row"], strip["data"] = row, self._rgb(
                    np.asarray(self.store.read(row, row + height)), channel=channel, colors=colors
                )
            return strip["data"][:height, col : col + width]

        with atomic_path(path) as tmp:
            write_tiled_pyramid(tmp, read, shape=self.shape[:2], n_levels=levels, tile=tile, mpp=self.plan.mpp,
                                compression=compression, software="napari-pathoseg",
                                cancel=None if cancel is None else cancel.is_set)
        return Path(path)


def _feather(hh: int, ww: int, *, sides: tuple[bool, bool, bool, bool], margin: int) -> np.ndarray:
    """(hh, ww) weights rising from ~0 to 1 over ``margin`` pixels from the (top, bottom, left, right) sides asked.

    The rise is a raised cosine: a tile's last few pixels, where its padding shows, weigh
    almost nothing, and the blend is smooth across the overlap.
    """
    if margin <= 0:
        return np.ones((hh, ww), np.float32)
    top, bottom, left, right = sides

    def ramp(n: int, lo: bool, hi: bool) -> np.ndarray:
        i = np.arange(n, dtype=np.float32)
        d = np.full(n, np.float32(margin))
        if lo:
            d = np.minimum(d, i + 0.5)
        if hi:
            d = np.minimum(d, n - i - 0.5)
        v = 0.5 - 0.5 * np.cos(np.pi * np.clip(d / margin, 0.0, 1.0))
        return np.clip(v, 1e-4, 1.0).astype(np.float32)

    return np.minimum(ramp(hh, top, bottom)[:, None], ramp(ww, left, right)[None, :])


class ProbabilityMap(Sink):
    """Stitch a per-pixel output of the predictor into one map over the region.

    Parameters
    ----------
    key : str
        The predictor output to take: ``(B, H, W)`` or ``(B, C, H, W)`` (``(B, H, W, C)``
        with ``channels_last``).
    name : str, optional
        Output name (default ``key``); also the file name in the work folder.
    dtype : numpy dtype
        Stored type: float32, float16, or uint8 (quantised: value x ``scale``).
    scale : float, optional
        Stored value per map value (default 255 for integer types, else 1; 1 for an RGB
        image already in 0..255).
    fill : float
        Stored value where no tile ran (background tiles skipped, a cancelled run).
    blend : {"feather", "mean", "core"}
        Overlap handling: a mean weighted by ramps over ``margin`` pixels from each inner
        tile edge (no seams), a plain mean, or each pixel from the one tile owning it.
    margin : int, optional
        Feathering ramp (default half the overlap).
    channels_last : bool
        The output has its channels last (images).
    classes : sequence of str, optional
        Channel names, kept in the result.

    A key the predictor does not return (or returns as None) gives ``None``.
    """

    def __init__(
        self,
        key: str = "prob",
        *,
        name: str | None = None,
        dtype: Any = np.float32,
        scale: float | None = None,
        fill: float = 0,
        blend: str = "feather",
        margin: int | None = None,
        channels_last: bool = False,
        classes: Sequence[str] = (),
    ) -> None:
        if blend not in BLENDS:
            raise PathosegError(f"blend must be one of {BLENDS}, got {blend!r}")
        self.key = key
        self.name = name or key
        self.dtype = np.dtype(dtype)
        self.scale = float(scale if scale is not None else (255.0 if np.issubdtype(self.dtype, np.integer) else 1.0))
        self.fill = fill
        self.blend = blend
        self.margin = margin
        self.channels_last = channels_last
        self.classes = tuple(classes)

    def start(self, plan: TilePlan, *, work_dir: Path | None) -> None:
        super().start(plan, work_dir=work_dir)
        self._band: RowBand | None = None
        self._store: RowStore | None = None
        self._channels: int | None = None
        self._missing = False
        self._covered = 0
        self._weights: dict[tuple[int, int], np.ndarray] = {}

    def _open(self, channels: int) -> None:
        rows, cols = self.plan.shape
        self._channels = channels
        tail = (cols, channels) if channels else (cols,)
        self._band = RowBand(rows, [(tail, np.float32, 0.0), ((cols,), np.float32, 0.0)])
        self._store = RowStore((rows,) + tail, self.dtype, path=self._file())

    def _weight(self, r: int, c: int, hh: int, ww: int) -> np.ndarray:
        p = self.plan
        if self.blend == "core":
            r0, c0, r1, c1 = p.core(r, c)
            w = np.zeros((hh, ww), np.float32)
            w[r0:r1, c0:c1] = 1.0
            return w
        if self.blend == "mean":
            return np.ones((hh, ww), np.float32)
        # feather only the sides that have a neighbour: at the output's own edges a tile is
        # alone, and ramping there would let a neighbour's padded edge weigh as much as it
        sides = (r > 0, r + p.tile < p.shape[0], c > 0, c + p.tile < p.shape[1])
        key = sides + (hh, ww)
        w = self._weights.get(key)
        if w is None:
            margin = p.overlap // 2 if self.margin is None else self.margin
            w = self._weights[key] = _feather(hh, ww, sides=sides, margin=margin)
        return w

    def add(self, tiles: Sequence[tuple[int, int]], outputs: Mapping[str, Any]) -> None:
        arr = _batch_output(outputs, self.key, len(tiles), who=f"map {self.name!r}")
        if arr is None:
            self._missing = True
            return
        if arr.ndim == 3:
            chans = 0
        elif arr.ndim == 4:
            if not self.channels_last:
                arr = np.ascontiguousarray(np.moveaxis(arr, 1, -1))  # (B, H, W, C), one copy per batch
            chans = arr.shape[-1]
        else:
            raise PathosegError(f"map {self.name!r}: output {self.key!r} must be (B, H, W) or (B, C, H, W), got {arr.shape}")
        if self._band is None:
            self._open(chans)
        elif chans != self._channels:
            raise PathosegError(f"map {self.name!r}: {chans} channels in this batch, {self._channels} before")
        rows, cols = self.plan.shape
        for k, (r, c) in enumerate(tiles):
            hh, ww = min(arr.shape[1], rows - r), min(arr.shape[2], cols - c)
            wt = self._weight(r, c, hh, ww)
            acc, wsum = self._band.window(r, r + hh)
            t = np.multiply(arr[k, :hh, :ww], wt[..., None] if chans else wt, dtype=np.float32)
            acc[:, c : c + ww] += t
            wsum[:, c : c + ww] += wt

    def release(self, row: int) -> None:
        if self._band is None:
            return
        integer = np.issubdtype(self.dtype, np.integer)
        for r0, (acc, wsum) in self._band.pop(row):  # fresh arrays: computed on in place
            covered = wsum > 0
            self._covered += int(np.count_nonzero(covered))
            np.maximum(wsum, np.float32(1e-20), out=wsum)
            inv = np.divide(np.float32(self.scale), wsum, out=wsum)
            acc *= inv[..., None] if self._channels else inv
            if integer:
                info = np.iinfo(self.dtype)
                np.rint(acc, out=acc)
                np.clip(acc, info.min, info.max, out=acc)
            acc[~covered] = self.fill
            self._store.write(r0, acc.astype(self.dtype, copy=False))

    def finish(self, *, cancelled: bool) -> MapResult | None:
        if self._band is None:
            if self._missing:
                return None
            self._open(len(self.classes) if len(self.classes) > 1 else 0)
        self.release(self.plan.shape[0])
        self._store.close()
        rows, cols = self.plan.shape
        return MapResult(store=self._store, plan=self.plan, scale=self.scale, classes=self.classes,
                         coverage=self._covered / float(rows * cols), key=self.key, peak_rows=self._band.peak)


# ----------------------------------------------------------------------------- tile scores


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
        arr = _batch_output(outputs, self.key, len(tiles), who=f"scores {self.name!r}")
        if arr is None:
            raise PathosegError(f"scores {self.name!r}: the predictor returned no {self.key!r} output")
        arr = arr.reshape(len(tiles), -1).astype(np.float32)
        self._scores.extend(arr)
        self._tiles.extend(tiles)

    def finish(self, *, cancelled: bool) -> ScoresResult:
        k = self._scores[0].shape[0] if self._scores else max(1, len(self.classes))
        scores = np.stack(self._scores) if self._scores else np.zeros((0, k), np.float32)
        return ScoresResult(scores=scores, tiles=np.array(self._tiles, np.int64).reshape(-1, 2), plan=self.plan, classes=self.classes)


# ----------------------------------------------------------------------------- instances


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
        prob = _batch_output(outputs, self.key, len(tiles), who=f"instances {self.name!r}")
        if prob is None:
            raise PathosegError(f"instances {self.name!r}: the predictor returned no {self.key!r} map")
        extra = _batch_output(outputs, self.extra_key, len(tiles), who=f"instances {self.name!r}")
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
