"""The one whole-slide inference engine: a predictor over tiles, its outputs into sinks.

:func:`iter_predict` reads a region of a slide (or a plain image) at the predictor's µm per
pixel, tile by tile, runs the predictor on batches of tiles and hands every batch's outputs to
*sinks* that assemble what the method needs: a stitched probability map, per-tile scores for a
heat map, seam-free instances (:mod:`napari_pathoseg.inference.sinks`). Every method (nuclei,
lesions, tissue types, tile classifiers) plugs in a predictor and picks its sinks.

How it works
------------
* Resolution: ``scale`` = predictor µm/px / slide µm/px level-0 pixels per output pixel. The
  finest pyramid level at least as fine as the predictor's resolution is read, then resampled
  (Pillow's bilinear filter, anti-aliased when shrinking). A source without a known
  resolution needs ``mpp``.
* Tiles of ``tile`` output pixels overlap by ``overlap``; the grid covers the region, tiles
  at its right and bottom edges read past it (real pixels of the slide, white beyond the
  slide, or a mirror image with ``edge="reflect"``).
* Tissue only: tiles with no tissue on the slide's low-resolution tissue mask are skipped,
  for the whole slide and for a region alike.
* Tiles run in row-major order in batches; while the network runs on one batch, the next
  one is read on a second thread (``prefetch``). After each batch every output row above
  the next tile is final and sinks move it out of memory (to ``work_dir`` when given), so
  memory is bounded by the tiles in flight, not by the slide.
* Cancel: the token is checked between batches; a cancelled run still yields its
  :class:`InferenceResult`, with ``cancelled=True`` and the finished tiles in the outputs.

Examples
--------
>>> import numpy as np
>>> from napari_pathoseg.inference import ProbabilityMap, run_predict
>>> class Darkness:
...     mpp, tile_size, classes = 1.0, 64, ("dark",)
...     def predict(self, batch):
...         return {"prob": 1.0 - batch.mean(axis=-1) / 255.0}
>>> img = np.full((100, 150, 3), 255, np.uint8); img[:, 75:] = 0
>>> res = run_predict(img, Darkness(), [ProbabilityMap("prob")], mpp=1.0, overlap=16)
>>> m = res.outputs["prob"].array
>>> m.shape, float(m[50, 10]), float(m[50, 140])
((100, 150), 0.0, 1.0)
"""

from __future__ import annotations

import logging
import math
import os
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.events import Cancellable, Progress, run_to_end
from napari_pathoseg.inference.reading import TileReader, read_window
from napari_pathoseg.tiling import tissue_mask
from napari_pathoseg.wsi.slide import Slide

__all__ = [
    "Predictor",
    "ContextInput",
    "TilePlan",
    "InferenceResult",
    "iter_predict",
    "run_predict",
    "plan_tiles",
    "read_window",
    "EDGES",
]

logger = logging.getLogger(__name__)

#: How a tile is filled where it reaches past the source: glass (white) or a mirror image.
EDGES = ("white", "reflect")


@dataclass(frozen=True)
class ContextInput:
    """An extra input a predictor sees beside each tile: the same centre at another resolution.

    Attributes
    ----------
    mpp : float
        µm per pixel of the context window (coarser than the tile's for wider context).
    size : int
        Side of the window in its own pixels.
    """

    mpp: float
    size: int


@runtime_checkable
class Predictor(Protocol):
    """What the engine runs: a method's network, with its input resolution and output names.

    Attributes
    ----------
    mpp : float
        µm per pixel the network works at (its outputs are on that grid).
    tile_size : int
        Default input tile side (pixels at ``mpp``).
    classes : sequence of str
        Names of the output classes / channels.

    A predictor may also have ``name`` (shown in results) and ``context`` (a sequence of
    :class:`ContextInput`): then ``predict`` is called as ``predict(batch, context=[...])``
    with one ``(B, size, size, 3)`` uint8 batch per context input, centred on the tiles.
    """

    mpp: float
    tile_size: int
    classes: Sequence[str]

    def predict(self, batch: np.ndarray) -> Mapping[str, Any]:
        """``batch`` (B, H, W, 3) uint8 -> named outputs with a leading B axis.

        Per-pixel maps are ``(B, H, W)`` or ``(B, C, H, W)``; per-tile scores ``(B, K)``.
        Runs under ``torch.inference_mode()`` on the predictor's own device.
        """
        ...


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of a run go: the geometry every sink shares.

    Attributes
    ----------
    region : (x, y, width, height)
        Level-0 rectangle covered (clipped to the slide).
    scale : float
        Level-0 pixels per output pixel (predictor µm/px / slide µm/px; 1 when within 2 %).
    mpp : float
        µm per output pixel (the predictor's).
    shape : (rows, cols)
        Output grid size.
    tile, overlap : int
        Tile side and overlap in output pixels.
    grid_rows, grid_cols : tuple of int
        Top rows / left columns of the full tile grid (output pixels).
    tiles : tuple of (row, col)
        The tiles that run (tissue tiles when skipping background), row-major.
    level : int
        Pyramid level read.
    """

    region: tuple[int, int, int, int]
    scale: float
    mpp: float
    shape: tuple[int, int]
    tile: int
    overlap: int
    grid_rows: tuple[int, ...]
    grid_cols: tuple[int, ...]
    tiles: tuple[tuple[int, int], ...]
    level: int

    @property
    def step(self) -> int:
        """Distance between neighbouring tiles (output pixels)."""
        return self.tile - self.overlap

    @property
    def grid_size(self) -> int:
        """Tiles in the full grid (background tiles included)."""
        return len(self.grid_rows) * len(self.grid_cols)

    def core(self, row: int, col: int) -> tuple[int, int, int, int]:
        """The part of tile (row, col) that it owns, in tile pixels: (r0, c0, r1, c1).

        Inner sides lose half the overlap; sides on the edge of the output keep everything.
        """
        half = self.overlap // 2
        r0 = half if row > 0 else 0
        c0 = half if col > 0 else 0
        r1 = self.tile - (half if row + self.tile < self.shape[0] else 0)
        c1 = self.tile - (half if col + self.tile < self.shape[1] else 0)
        return r0, c0, r1, c1

    def to_level0(self, row: float, col: float) -> tuple[float, float]:
        """Level-0 (x, y) of the centre of output pixel (row, col)."""
        x, y = self.region[:2]
        f = self.scale
        return x + (col + 0.5) * f - 0.5, y + (row + 0.5) * f - 0.5

    def box(self, row: int, col: int) -> tuple[float, float, float, float]:
        """Level-0 (x, y, width, height) of the tile at (row, col)."""
        x, y = self.region[:2]
        f = self.scale
        return x + col * f, y + row * f, self.tile * f, self.tile * f


@dataclass
class InferenceResult:
    """The end of a run: every sink's output and how the run went.

    Attributes
    ----------
    outputs : dict
        ``{sink.name: output}``.
    plan : TilePlan
    region : (x, y, width, height)
        Level-0 rectangle covered.
    scale : float
        Level-0 pixels per output pixel.
    mpp : float
        µm per output pixel.
    timings : dict
        Seconds: ``read_s`` (reading and resampling tiles, also when hidden behind the
        network by prefetching), ``read_wait_s`` (time the run waited for tiles),
        ``network_s``, ``postprocess_s`` (sinks), ``total_s``.
    tiles : int
        Tiles run.
    tiles_total : int
        Tiles planned (tissue tiles when skipping background).
    cancelled : bool
        The run was stopped; outputs hold the ``tiles`` finished tiles.
    name : str
        The predictor's name.
    """

    outputs: dict[str, Any]
    plan: TilePlan
    region: tuple[int, int, int, int]
    scale: float
    mpp: float
    timings: dict[str, float] = field(default_factory=dict)
    tiles: int = 0
    tiles_total: int = 0
    cancelled: bool = False
    name: str = ""


# ----------------------------------------------------------------------------- planning

_MASKS: "weakref.WeakKeyDictionary[Slide, tuple[np.ndarray, float]]" = weakref.WeakKeyDictionary()


def _tissue(slide: Slide) -> tuple[np.ndarray, float]:
    """The slide's tissue mask, computed once per slide object."""
    mask = _MASKS.get(slide)
    if mask is None:
        mask = tissue_mask(slide)
        _MASKS[slide] = mask
    return mask


def _starts(n: int, tile: int, overlap: int) -> list[int]:
    if n <= tile:
        return [0]
    return list(range(0, max(1, n - overlap), tile - overlap))


def _as_slide(source: Any, mpp: float | None) -> tuple[Slide, bool]:
    if isinstance(source, Slide):
        return source, False
    arr = getattr(source, "shape", None)
    if arr is not None and len(arr) == 3 and arr[2] == 3:
        return Slide.from_array(source, mpp=mpp, name="image"), True
    raise PathosegError(
        f"the source must be a slide (open_slide) or an RGB image array (rows, cols, 3), got {type(source).__name__}"
        + (f" of shape {tuple(arr)}" if arr is not None else "")
    )


def plan_tiles(
    slide: Slide,
    *,
    mpp: float,
    slide_mpp: float,
    region: tuple[int, int, int, int] | None = None,
    tile: int,
    overlap: int,
    tissue_only: bool,
    min_tissue: float = 0.01,
) -> TilePlan:
    """Lay the tile grid of a run over ``region`` (level-0 x, y, w, h; default the slide).

    Parameters
    ----------
    slide : Slide
    mpp : float
        µm per output pixel (the predictor's).
    slide_mpp : float
        µm per level-0 pixel of the slide (its own or declared).
    region : (x, y, width, height), optional
    tile, overlap : int
        Output pixels; ``0 <= overlap < tile / 2``.
    tissue_only : bool
        Keep only tiles whose window has more than ``min_tissue`` tissue on the slide's
        tissue mask.

    Raises
    ------
    PathosegError
        Region empty or outside the slide, bad tile or overlap.
    """
    if tile < 8:
        raise PathosegError(f"tile must be at least 8 pixels, got {tile}")
    if not 0 <= overlap < tile // 2:
        raise PathosegError(f"overlap must be in [0, tile/2), got {overlap} for tile {tile}")
    rows0, cols0 = slide.shape
    if region is None:
        region = (0, 0, cols0, rows0)
    x, y, w, h = (int(v) for v in region)
    if w <= 0 or h <= 0:
        raise PathosegError(f"region {tuple(region)}: width and height must be positive")
    x1, y1 = min(x + w, cols0), min(y + h, rows0)
    x, y = max(x, 0), max(y, 0)
    if x1 <= x or y1 <= y:
        raise PathosegError(
            f"region {tuple(region)} (x, y, width, height in level-0 pixels) lies outside the slide ({cols0} x {rows0})"
        )
    w, h = x1 - x, y1 - y
    f = float(mpp) / float(slide_mpp)  # level-0 pixels per output pixel
    if abs(f - 1.0) < 0.02:
        f = 1.0
    out_rows, out_cols = max(1, int(round(h / f))), max(1, int(round(w / f)))
    grid_rows, grid_cols = _starts(out_rows, tile, overlap), _starts(out_cols, tile, overlap)
    tiles = [(r, c) for r in grid_rows for c in grid_cols]
    if tissue_only:
        m, mds = _tissue(slide)
        keep = []
        for r, c in tiles:
            mr0, mc0 = int((y + r * f) / mds), int((x + c * f) / mds)
            mr1 = max(mr0 + 1, int(math.ceil((y + min(r + tile, out_rows) * f) / mds)))
            mc1 = max(mc0 + 1, int(math.ceil((x + min(c + tile, out_cols) * f) / mds)))
            win = m[mr0:mr1, mc0:mc1]
            if win.size and win.mean() > min_tissue:
                keep.append((r, c))
        tiles = keep
    return TilePlan(
        region=(x, y, w, h),
        scale=f,
        mpp=float(mpp),
        shape=(out_rows, out_cols),
        tile=int(tile),
        overlap=int(overlap),
        grid_rows=tuple(grid_rows),
        grid_cols=tuple(grid_cols),
        tiles=tuple(tiles),
        level=slide.best_level_for_downsample(f),
    )


# ----------------------------------------------------------------------------- running


def _row_groups(chunk: Sequence[tuple[int, int]], next_row: int) -> list[tuple[int, int, int]]:
    """Split a batch where its tiles change row: ``(start, stop, rows final after it)``.

    Sinks then release a tile row's final rows before the next row's tiles arrive, so they
    hold about one tile row plus the overlap, however batches fall.
    """
    groups = []
    a = 0
    for i in range(1, len(chunk) + 1):
        if i == len(chunk) or chunk[i][0] != chunk[a][0]:
            groups.append((a, i, chunk[i][0] if i < len(chunk) else next_row))
            a = i
    return groups


def _slice_outputs(out: Mapping[str, Any], a: int, b: int, n: int) -> dict[str, Any]:
    """Tiles ``a .. b`` of a batch's outputs (entries without a batch axis pass unchanged)."""
    return {k: (v[a:b] if getattr(v, "shape", None) and len(v.shape) and v.shape[0] == n else v) for k, v in out.items()}


def _check_sinks(sinks: Sequence[Any]) -> None:
    names = [getattr(s, "name", None) for s in sinks]
    if not sinks:
        raise PathosegError("give at least one sink (ProbabilityMap, TileScores, Instances) to collect the outputs")
    if len(set(names)) != len(names):
        raise PathosegError(f"sinks need distinct names, got {names}; pass name=... to tell them apart")


def iter_predict(
    source: Slide | np.ndarray,
    predictor: Predictor,
    sinks: Sequence[Any],
    *,
    mpp: float | None = None,
    region: tuple[int, int, int, int] | None = None,
    tile: int | None = None,
    overlap: int = 64,
    batch_size: int = 4,
    tissue_only: bool | None = None,
    min_tissue: float = 0.01,
    edge: str = "white",
    work_dir: str | os.PathLike | None = None,
    prefetch: bool = True,
    cancel: Cancellable | None = None,
) -> Iterator[Progress | InferenceResult]:
    """Run ``predictor`` over a slide region; yield :class:`~napari_pathoseg.events.Progress`,
    finally an :class:`InferenceResult`.

    Parameters
    ----------
    source : Slide or (rows, cols, 3) uint8 array
    predictor : Predictor
    sinks : sequence of sinks
        Where outputs go (:class:`~napari_pathoseg.inference.sinks.ProbabilityMap`,
        :class:`~napari_pathoseg.inference.sinks.TileScores`,
        :class:`~napari_pathoseg.inference.sinks.Instances`), each with a distinct ``name``.
    mpp : float, optional
        Declared µm per level-0 pixel of the source when it is unknown (overrides the
        slide's own).
    region : (x, y, width, height), optional
        Level-0 rectangle; default the whole source.
    tile : int, optional
        Tile side in output pixels (default ``predictor.tile_size``).
    overlap : int
        Overlap between neighbouring tiles, in output pixels (``< tile / 2``).
    batch_size : int
        Tiles per ``predict`` call.
    tissue_only : bool, optional
        Skip tiles without tissue. Default: True for a slide (whole or region), False for
        an image array (already cropped to what matters).
    min_tissue : float
        Tissue fraction a tile needs to run.
    edge : {"white", "reflect"}
        Fill of tiles beyond the source's edge.
    work_dir : path, optional
        Folder for the outputs' files (bounded memory for whole slides); the caller owns it
        and keeps it while the outputs are used. Default: outputs in memory.
    prefetch : bool
        Read the next batch on a second thread while the network runs.
    cancel : object with ``is_set()``, optional
        Checked between batches; when set, the run yields its result with
        ``cancelled=True`` (finished tiles kept) and stops.

    Raises
    ------
    PathosegError
        Unknown resolution without ``mpp``, region outside the source, bad sizes or sinks,
        a predictor output that does not fit.
    """
    if mpp is not None and not mpp > 0:
        raise PathosegError(f"--mpp must be positive, got {mpp}")
    if batch_size < 1:
        raise PathosegError(f"batch size must be at least 1, got {batch_size}")
    if edge not in EDGES:
        raise PathosegError(f"edge must be one of {EDGES}, got {edge!r}")
    _check_sinks(sinks)
    slide, is_array = _as_slide(source, mpp)
    slide_mpp = mpp if mpp is not None else slide.mpp
    p_mpp = float(predictor.mpp)
    if slide_mpp is None:
        raise PathosegError(
            f"{slide.metadata.path}: the image's µm per pixel is unknown; declare it "
            f"(--mpp on the command line, 'µm/px' in the dock); the model works at {p_mpp} µm/px"
        )
    if tissue_only is None:
        tissue_only = not is_array
    plan = plan_tiles(
        slide,
        mpp=p_mpp,
        slide_mpp=float(slide_mpp),
        region=region,
        tile=int(tile or predictor.tile_size),
        overlap=int(overlap),
        tissue_only=bool(tissue_only),
        min_tissue=min_tissue,
    )
    wd = None
    if work_dir is not None:
        wd = Path(work_dir)
        wd.mkdir(parents=True, exist_ok=True)
    for s in sinks:
        s.start(plan, work_dir=wd)
    context = tuple(getattr(predictor, "context", ()) or ())
    read = TileReader(slide, plan, slide_mpp=float(slide_mpp), context=context, edge=edge)
    batches = [plan.tiles[i : i + batch_size] for i in range(0, len(plan.tiles), batch_size)]
    total = len(plan.tiles)
    name = str(getattr(predictor, "name", type(predictor).__name__))
    logger.info("%s: %d of %d tiles (%d px, overlap %d) at %.3g µm/px, scale %.4g, level %d",
                name, total, plan.grid_size, plan.tile, plan.overlap, plan.mpp, plan.scale, plan.level)
    t_read = t_wait = t_net = t_post = 0.0
    t_all = time.perf_counter()
    done = 0
    cancelled = False
    pool = ThreadPoolExecutor(1, thread_name_prefix="pathoseg-read") if prefetch and len(batches) > 1 else None
    yield Progress(0, total, f"{total} tiles", stage="inference")
    try:
        pending: Future | None = pool.submit(read, batches[0]) if pool is not None else None
        for k, chunk in enumerate(batches):
            if cancel is not None and cancel.is_set():
                cancelled = True
                break
            t = time.perf_counter()
            imgs, ctx, dt = pending.result() if pending is not None else read(chunk)
            t_wait += time.perf_counter() - t
            t_read += dt
            pending = pool.submit(read, batches[k + 1]) if pool is not None and k + 1 < len(batches) else None
            t = time.perf_counter()
            out = predictor.predict(imgs, context=ctx) if ctx is not None else predictor.predict(imgs)
            t_net += time.perf_counter() - t
            if not isinstance(out, Mapping):
                raise PathosegError(f"{name}.predict must return a dict of arrays, got {type(out).__name__}")
            t = time.perf_counter()
            next_row = batches[k + 1][0][0] if k + 1 < len(batches) else plan.shape[0]
            for a, b, upto in _row_groups(chunk, next_row):
                part = out if (a, b) == (0, len(chunk)) else _slice_outputs(out, a, b, len(chunk))
                for s in sinks:
                    s.add(chunk[a:b], part)
                    s.release(upto)
            t_post += time.perf_counter() - t
            done += len(chunk)
            yield Progress(done, total, f"{done} of {total} tiles", stage="inference")
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    t = time.perf_counter()
    outputs = {s.name: s.finish(cancelled=cancelled) for s in sinks}
    t_post += time.perf_counter() - t
    if cancelled:
        logger.info("%s: cancelled after %d of %d tiles", name, done, total)
    yield InferenceResult(
        outputs=outputs,
        plan=plan,
        region=plan.region,
        scale=plan.scale,
        mpp=plan.mpp,
        timings={
            "read_s": round(t_read, 3),
            "read_wait_s": round(t_wait, 3),
            "network_s": round(t_net, 3),
            "postprocess_s": round(t_post, 3),
            "total_s": round(time.perf_counter() - t_all, 3),
        },
        tiles=done,
        tiles_total=total,
        cancelled=cancelled,
        name=name,
    )


def run_predict(source: Slide | np.ndarray, predictor: Predictor, sinks: Sequence[Any], **kwargs: Any) -> InferenceResult:
    """Run :func:`iter_predict` to the end and return its :class:`InferenceResult`."""

    def log(ev: Any) -> None:
        if isinstance(ev, Progress):
            logger.debug("inference: %d/%d tiles", ev.done, ev.total)

    return run_to_end(iter_predict(source, predictor, sinks, **kwargs), InferenceResult, progress=log)
