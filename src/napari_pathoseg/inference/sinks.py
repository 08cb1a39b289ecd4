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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.events import Cancellable
from napari_pathoseg.inference._rows import RowBand, RowStore
from napari_pathoseg.inference._sink import Sink, batch_output
from napari_pathoseg.inference.engine import TilePlan
from napari_pathoseg.inference.instances import (  # re-exported: one place to import sinks from
    Instances,
    InstancesResult,
    paste_owned,
)
from napari_pathoseg.inference.tile_scores import ScoresResult, TileScores

__all__ = [
    "BLENDS",
    "Instances",
    "InstancesResult",
    "MapResult",
    "ProbabilityMap",
    "ScoresResult",
    "Sink",
    "TileScores",
    "paste_owned",
]

logger = logging.getLogger(__name__)

#: How overlapping tiles are combined: feathered mean, plain mean, or each pixel from the tile that owns it.
BLENDS = ("feather", "mean", "core")

#: Colours of classes 0, 1, 2... in a rendered multi-class map.
PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180),
    (70, 240, 240), (245, 130, 48), (240, 50, 230), (210, 245, 60), (128, 128, 128),
)


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
        if self.blend == "core":  # one owner per pixel: its stored value and a coverage flag (compact band)
            self._band = RowBand(rows, [(tail, self.dtype, self.fill), ((cols,), np.uint8, 0)])
        else:
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
        arr = batch_output(outputs, self.key, len(tiles), who=f"map {self.name!r}")
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
        if self.blend == "core":
            self._add_owned(tiles, arr)
            return
        for k, (r, c) in enumerate(tiles):
            hh, ww = min(arr.shape[1], rows - r), min(arr.shape[2], cols - c)
            wt = self._weight(r, c, hh, ww)
            acc, wsum = self._band.window(r, r + hh)
            t = np.multiply(arr[k, :hh, :ww], wt[..., None] if chans else wt, dtype=np.float32)
            acc[:, c : c + ww] += t
            wsum[:, c : c + ww] += wt

    def _encode(self, values: np.ndarray) -> np.ndarray:
        """Map values -> stored values (x ``scale``; rounded and clipped for integer types)."""
        v = np.multiply(values, np.float32(self.scale), dtype=np.float32)
        if np.issubdtype(self.dtype, np.integer):
            info = np.iinfo(self.dtype)
            np.rint(v, out=v)
            np.clip(v, info.min, info.max, out=v)
        return v.astype(self.dtype, copy=False)

    def _add_owned(self, tiles: Sequence[tuple[int, int]], arr: np.ndarray) -> None:
        """``blend="core"``: each tile's own part goes straight into the band, already in the stored type."""
        rows, cols = self.plan.shape
        for k, (r, c) in enumerate(tiles):
            hh, ww = min(arr.shape[1], rows - r), min(arr.shape[2], cols - c)
            r0, c0, r1, c1 = self.plan.core(r, c)
            r1, c1 = min(r1, hh), min(c1, ww)
            if r1 <= r0 or c1 <= c0:
                continue
            acc, seen = self._band.window(r + r0, r + r1)
            acc[:, c + c0 : c + c1] = self._encode(arr[k, r0:r1, c0:c1])
            seen[:, c + c0 : c + c1] = 1

    def release(self, row: int) -> None:
        if self._band is None:
            return
        if self.blend == "core":
            for r0, (acc, seen) in self._band.pop(row):
                self._covered += int(np.count_nonzero(seen))
                self._store.write(r0, acc)
            return
        integer = np.issubdtype(self.dtype, np.integer)
        for r0, (acc, wsum) in self._band.pop(row):  # released rows: scaled in place
            covered = wsum > 0
            n_covered = int(np.count_nonzero(covered))
            if n_covered == 0:  # rows no tile reached (background, a cancelled run): the fill, no arithmetic
                self._store.write(r0, np.full(acc.shape, self.fill, self.dtype))
                continue
            self._covered += n_covered
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
