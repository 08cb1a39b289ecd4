"""Whole-slide nucleus segmentation: tiles in, seamless instance labels out.

:func:`iter_segment_nuclei` runs a nucleus model (:class:`~napari_pathoseg.models.registry.NucleusModel`)
over a region of a slide, or the tissue of the whole slide, and yields progress events,
then a :class:`NucleiResult`. :func:`segment_nuclei` drives it headless; the Nuclei dock
drives it in a worker thread.

How it works
------------
* The region is resampled to the model's resolution (``model.mpp``; the finest pyramid
  level at least that fine is read, then down-sampled). For plain images without a
  known resolution, ``mpp`` must be declared.
* Tiles of ``tile`` pixels overlap by ``overlap`` pixels and are run in batches.
* Instances are made per tile (the model's own post-processing) and stitched by
  ownership: a nucleus belongs to the tile whose *core* (the tile minus half the
  overlap on each inner side) holds its centroid. With the overlap larger than a
  nucleus, every nucleus lies whole in the tile that owns it, so nuclei on seams are
  neither split nor duplicated. Pixels already claimed keep their nucleus.
* The labels (uint32) and the normalised image live at the model's resolution in
  arrays that can be memory-mapped to disk (``work_dir``), so memory is bounded by the
  tiles in flight. :func:`write_labels_tiff` writes them on the slide's level-0 grid.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np

from napari_pathoseg.errors import CancelledError, PathosegError
from napari_pathoseg.events import run_to_end
from napari_pathoseg.wsi.slide import Slide
from napari_pathoseg.tiling import Stitcher, tissue_mask

__all__ = [
    "Progress",
    "NucleiResult",
    "iter_segment_nuclei",
    "segment_nuclei",
    "write_labels_tiff",
    "write_table_csv",
    "demo_nuclei",
]

logger = logging.getLogger(__name__)


class _Cancel(Protocol):
    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class Progress:
    """Progress of a run: ``done`` of ``total`` tiles."""

    done: int
    total: int
    message: str = ""


@dataclass
class NucleiResult:
    """Nuclei of a region, at the model's resolution.

    Attributes
    ----------
    labels : (rows, cols) uint32
        Instance labels at the model's resolution (0 = background).
    normalized : (rows, cols, 3) uint8 or None
        The stain-normalised image (the model's second output).
    region : (x, y, width, height)
        Level-0 rectangle covered.
    scale : float
        Level-0 pixels per output pixel (``model.mpp / slide.mpp``; 1 when equal).
    mpp : float or None
        µm per output pixel.
    table : list of dict
        One row per nucleus: ``id``, ``x``, ``y`` (centroid, level-0 pixels),
        ``area_um2``, ``confidence`` (mean nucleus probability).
    timings : dict
        Seconds spent reading, in the network, in post-processing, in total.
    model : str
    """

    labels: np.ndarray
    normalized: np.ndarray | None
    region: tuple[int, int, int, int]
    scale: float
    mpp: float | None
    table: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    model: str = ""
    tiles: int = 0

    @property
    def n_nuclei(self) -> int:
        return len(self.table)


def _alloc(shape: tuple[int, ...], dtype: Any, work_dir: str | None, name: str) -> np.ndarray:
    if work_dir is None:
        return np.zeros(shape, dtype)
    return np.lib.format.open_memmap(Path(work_dir) / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)


def _read_resampled(slide: Slide, *, level: int, f: float, r: int, c: int, size: int, origin: tuple[int, int]) -> np.ndarray:
    """Output-grid tile (r, c, size) -> (size, size, 3) uint8 read from ``level``."""
    from skimage.transform import resize

    ds = slide.level_downsample(level)
    y0 = origin[1] + r * f  # level-0 pixels
    x0 = origin[0] + c * f
    row = int(math.floor(y0 / ds))
    col = int(math.floor(x0 / ds))
    n = int(round(size * f / ds))
    img = slide.read_region(level=level, row=row, col=col, height=n, width=n)
    if n != size:
        img = resize(img, (size, size), order=1, anti_aliasing=n > size, preserve_range=True)
        img = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return img


def iter_segment_nuclei(
    slide: Slide,
    model: Any,
    *,
    region: tuple[int, int, int, int] | None = None,
    mpp: float | None = None,
    tile: int | None = None,
    overlap: int = 64,
    batch_size: int = 4,
    tissue_only: bool | None = None,
    with_normalized: bool = True,
    work_dir: str | os.PathLike | None = None,
    cancel: _Cancel | None = None,
) -> Iterator[Progress | NucleiResult]:
    """Segment the nuclei of a slide region; yield :class:`Progress`, finally a :class:`NucleiResult`.

    Parameters
    ----------
    slide : Slide
    model : NucleusModel
        Anything with ``mpp``, ``tile_size``, ``name``, ``predict(batch)`` and
        ``to_instances(prob, extra, mpp=...)``.
    region : (x, y, width, height), optional
        Level-0 rectangle; default the whole slide.
    mpp : float, optional
        Declared µm per level-0 pixel, for images whose resolution is unknown
        (overrides the slide's own).
    tile, overlap : int
        Tile side (default: the larger of 256 and the model's training tile) and overlap
        in model pixels (overlap must exceed a nucleus).
    batch_size : int
        Tiles per network call.
    tissue_only : bool, optional
        Skip tiles without tissue (default: True for the whole slide, False for a region).
    with_normalized : bool
        Also stitch the stain-normalised image.
    work_dir : path, optional
        Folder for memory-mapped outputs (bounded memory for whole slides); the
        caller owns it and must keep it while the result is used.
    cancel : object with ``is_set()``, optional
        Checked between batches; a set token raises :class:`CancelledError`.

    Raises
    ------
    PathosegError
        Region outside the slide, unknown resolution without ``mpp``, bad sizes.
    CancelledError
        When ``cancel`` is set.
    """
    slide_mpp = mpp if mpp is not None else slide.mpp
    if mpp is not None and mpp <= 0:
        raise PathosegError(f"--mpp must be positive, got {mpp}")
    if slide_mpp is None:
        raise PathosegError(
            f"{slide.metadata.path}: the image's µm per pixel is unknown; declare it "
            f"(--mpp on the command line, 'µm/px' in the Nuclei dock); the model works at {model.mpp} µm/px"
        )
    # the network is fully convolutional: infer on tiles larger than its training crops
    tile = int(tile or max(256, int(model.tile_size)))
    if not 0 <= overlap < tile // 2:
        raise PathosegError(f"overlap must be in [0, tile/2), got {overlap} for tile {tile}")
    rows0, cols0 = slide.shape
    if region is None:
        region = (0, 0, cols0, rows0)
        if tissue_only is None:
            tissue_only = True
    x, y, w, h = (int(v) for v in region)
    if w <= 0 or h <= 0:
        raise PathosegError(f"region {region}: width and height must be positive")
    x1, y1 = min(x + w, cols0), min(y + h, rows0)
    x, y = max(x, 0), max(y, 0)
    if x1 <= x or y1 <= y:
        raise PathosegError(
            f"region {tuple(region)} (x, y, width, height in level-0 pixels) lies outside the slide ({cols0} x {rows0})"
        )
    w, h = x1 - x, y1 - y
    f = float(model.mpp) / float(slide_mpp)  # level-0 pixels per model pixel
    if abs(f - 1.0) < 0.02:
        f = 1.0
    out_rows, out_cols = max(1, int(round(h / f))), max(1, int(round(w / f)))
    # the level to read: the finest level at most f times coarser than level 0
    level = slide.best_level_for_downsample(f)
    mask = None
    if tissue_only:
        mask = tissue_mask(slide)

    step = tile - overlap
    half = overlap // 2
    starts_r = list(range(0, max(1, out_rows - overlap), step)) if out_rows > tile else [0]
    starts_c = list(range(0, max(1, out_cols - overlap), step)) if out_cols > tile else [0]
    grid = [(r, c) for r in starts_r for c in starts_c]
    if mask is not None:
        m, mds = mask
        keep = []
        for r, c in grid:
            mr0, mc0 = int((y + r * f) / mds), int((x + c * f) / mds)
            mr1 = max(mr0 + 1, int(math.ceil((y + min(r + tile, out_rows) * f) / mds)))
            mc1 = max(mc0 + 1, int(math.ceil((x + min(c + tile, out_cols) * f) / mds)))
            win = m[mr0:mr1, mc0:mc1]
            if win.size and win.mean() > 0.01:
                keep.append((r, c))
        grid = keep

    wd = None
    if work_dir is not None:
        wd = str(work_dir)
        Path(wd).mkdir(parents=True, exist_ok=True)
    labels = _alloc((out_rows, out_cols), np.uint32, wd, "labels")
    norm_st = Stitcher(shape=(out_rows, out_cols), channels=3, dtype=np.uint8, path=wd, margin=half) if with_normalized else None
    table: list[dict[str, Any]] = []
    next_id = 1
    t_read = t_net = t_post = 0.0
    t_all = time.perf_counter()
    total = len(grid)
    yield Progress(0, total, f"{total} tiles")
    for b0 in range(0, total, batch_size):
        if cancel is not None and cancel.is_set():
            raise CancelledError(f"nucleus segmentation cancelled after {b0} of {total} tiles")
        chunk = grid[b0 : b0 + batch_size]
        t = time.perf_counter()
        imgs = np.stack([_read_resampled(slide, level=level, f=f, r=r, c=c, size=tile, origin=(x, y)) for r, c in chunk])
        t_read += time.perf_counter() - t
        t = time.perf_counter()
        out = model.predict(imgs)
        t_net += time.perf_counter() - t
        t = time.perf_counter()
        for k, (r, c) in enumerate(chunk):
            prob = out["prob"][k]
            extra = out["extra"][k] if out.get("extra") is not None else None
            inst = model.to_instances(prob, extra, mpp=float(model.mpp))
            # the tile's core: the part it owns (inner borders lose half the overlap)
            cr0 = r + (half if r > 0 else 0)
            cc0 = c + (half if c > 0 else 0)
            cr1 = r + tile - (half if r + tile < out_rows else 0)
            cc1 = c + tile - (half if c + tile < out_cols else 0)
            hh, ww = min(tile, out_rows - r), min(tile, out_cols - c)
            dest = labels[r : r + hh, c : c + ww]
            rows_added = _paste_owned(
                dest,
                np.asarray(inst[:hh, :ww]),
                prob[:hh, :ww],
                core=(cr0 - r, cc0 - c, cr1 - r, cc1 - c),
                first_id=next_id,
            )
            for nid, cy, cx, n_px, conf in rows_added:
                table.append(
                    {
                        "id": nid,
                        "x": round(x + (c + cx + 0.5) * f - 0.5, 2),
                        "y": round(y + (r + cy + 0.5) * f - 0.5, 2),
                        "area_um2": round(n_px * float(model.mpp) ** 2, 3),
                        "confidence": round(conf, 4),
                    }
                )
            next_id += len(rows_added)
            if norm_st is not None:
                norm_st.add(out["normalized"][k][:hh, :ww], row=r, col=c)
        t_post += time.perf_counter() - t
        yield Progress(min(b0 + batch_size, total), total, f"{len(table)} nuclei")
    normalized = None
    if norm_st is not None:
        normalized = _alloc((out_rows, out_cols, 3), np.uint8, wd, "normalized")
        norm_st.result(out=normalized)
        normalized[~norm_st.coverage()] = 255
    yield NucleiResult(
        labels=labels,
        normalized=normalized,
        region=(x, y, w, h),
        scale=f,
        mpp=float(model.mpp),
        table=table,
        timings={
            "read_s": round(t_read, 3),
            "network_s": round(t_net, 3),
            "postprocess_s": round(t_post, 3),
            "total_s": round(time.perf_counter() - t_all, 3),
        },
        model=str(getattr(model, "name", "")),
        tiles=total,
    )


def _paste_owned(
    dest: np.ndarray,
    inst: np.ndarray,
    prob: np.ndarray,
    *,
    core: tuple[int, int, int, int],
    first_id: int,
) -> list[tuple[int, float, float, int, float]]:
    """Paste the nuclei of one tile that the tile owns into ``dest`` (vectorised).

    A nucleus is owned when its centroid lies in ``core`` = (r0, c0, r1, c1) (tile
    pixels); it is written only on pixels of ``dest`` still 0, with consecutive ids
    from ``first_id``. Returns ``(id, centroid_row, centroid_col, pixels, mean_prob)``
    per pasted nucleus (centroid in tile pixels, of the whole nucleus).
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
    keep = pasted > 0  # a nucleus wholly under earlier ones is dropped, not duplicated
    final = np.zeros(ids.size + 1, np.int64)
    final[1:][keep] = first_id + np.arange(int(keep.sum()))
    dest[free] = final[tentative[free]]
    return [
        (int(final[k + 1]), float(cy[i]), float(cx[i]), int(pasted[k]), float(conf[i]))
        for k, i in enumerate(ids)
        if keep[k]
    ]


def segment_nuclei(slide: Slide, model: Any, **kwargs: Any) -> NucleiResult:
    """Run :func:`iter_segment_nuclei` to the end and return its result."""
    def log(ev: Any) -> None:
        if isinstance(ev, Progress):
            logger.info("nuclei: %d/%d tiles, %s", ev.done, ev.total, ev.message)

    return run_to_end(iter_segment_nuclei(slide, model, **kwargs), NucleiResult, progress=log)


def upsample_to_level0(result: NucleiResult, *, rows: slice | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(row0, strip)`` of the labels on the level-0 grid of ``result.region``."""
    x, y, w, h = result.region
    f = result.scale
    strip = 1024
    cols_idx = np.minimum((np.arange(w) / f).astype(np.int64), result.labels.shape[1] - 1)
    for r0 in range(0, h, strip):
        rr = np.minimum((np.arange(r0, min(h, r0 + strip)) / f).astype(np.int64), result.labels.shape[0] - 1)
        yield r0, np.asarray(result.labels[rr][:, cols_idx])


def write_labels_tiff(result: NucleiResult, path: str | os.PathLike, *, level0: bool = True, tile: int = 256) -> Path:
    """Write the labels as a tiled uint32 TIFF (atomic).

    ``level0=True`` writes them on the slide's level-0 pixel grid of the region
    (nearest-neighbour up-sampling, streamed in strips); otherwise at the model's grid.
    """
    import tifffile

    path = Path(path)
    x, y, w, h = result.region
    if not level0 or result.scale == 1.0:
        data = result.labels
        shape = data.shape
    else:
        shape = (h, w)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")

    def tiles() -> Iterator[np.ndarray]:
        if not level0 or result.scale == 1.0:
            for r in range(0, shape[0], tile):
                for c in range(0, shape[1], tile):
                    t = np.zeros((tile, tile), np.uint32)
                    blk = np.asarray(result.labels[r : r + tile, c : c + tile])
                    t[: blk.shape[0], : blk.shape[1]] = blk
                    yield t
            return
        f = result.scale
        cols_idx = np.minimum((np.arange(w) / f).astype(np.int64), result.labels.shape[1] - 1)
        for r in range(0, h, tile):
            rr = np.minimum((np.arange(r, min(h, r + tile)) / f).astype(np.int64), result.labels.shape[0] - 1)
            for c in range(0, w, tile):
                t = np.zeros((tile, tile), np.uint32)
                blk = np.asarray(result.labels[rr][:, cols_idx[c : c + tile]])
                t[: blk.shape[0], : blk.shape[1]] = blk
                yield t

    try:
        tifffile.imwrite(
            tmp,
            tiles(),
            shape=shape,
            dtype=np.uint32,
            tile=(tile, tile),
            compression="zlib",
            metadata={"region_xywh": list(result.region), "model": result.model, "level0": bool(level0)},
        )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_table_csv(result: NucleiResult, path: str | os.PathLike) -> Path:
    """Write the per-nucleus table (id, x, y, area_um2, confidence) as CSV (atomic)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=["id", "x", "y", "area_um2", "confidence"])
        wr.writeheader()
        wr.writerows(result.table)
    os.replace(tmp, path)
    return path


def _write_rgb_tiff(img: np.ndarray, path: Path) -> Path:
    import tifffile

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tifffile.imwrite(tmp, np.asarray(img), photometric="rgb", tile=(256, 256), compression="zlib")
    os.replace(tmp, path)
    return path


def overlay_picture(slide: Slide, result: NucleiResult, *, max_size: int = 2048) -> np.ndarray:
    """(r, c, 3) uint8: the region at the model's resolution with nucleus outlines (≤ ``max_size``)."""
    from skimage.segmentation import find_boundaries

    x, y, w, h = result.region
    lab = np.asarray(result.labels)
    k = max(1, int(math.ceil(max(lab.shape) / max_size)))
    lab = lab[::k, ::k]
    f = result.scale * k
    lv = slide.best_level_for_downsample(f)
    ds = slide.level_downsample(lv)
    img = slide.read_region(level=lv, row=int(y / ds), col=int(x / ds), height=int(round(h / ds)), width=int(round(w / ds)))
    from skimage.transform import resize

    img = np.clip(resize(img, lab.shape, order=1, preserve_range=True) + 0.5, 0, 255).astype(np.uint8)
    img[find_boundaries(lab, mode="inner")] = (0, 255, 0)
    return img


def demo_nuclei(slide: Slide, *, out_dir: str | os.PathLike, model_name: str = "nuclei-lite") -> dict[str, Any]:
    """The demo's nucleus step: the whole slide's tissue, labels + overlay + table."""
    from napari_pathoseg.demo import save_png
    from napari_pathoseg.models.registry import load_model

    out = Path(out_dir)
    model = load_model(model_name)
    with tempfile.TemporaryDirectory(prefix=".nuclei-", dir=out) as wd:
        result = segment_nuclei(slide, model, work_dir=wd)
        return {
            "model": result.model,
            "n_nuclei": result.n_nuclei,
            "labels": str(write_labels_tiff(result, out / "nuclei_labels.tif")),
            "table": str(write_table_csv(result, out / "nuclei.csv")),
            "overlay": str(save_png(out / "nuclei_overlay.png", overlay_picture(slide, result))),
            "timings": result.timings,
        }
