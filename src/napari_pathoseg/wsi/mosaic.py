"""Mosaic slides: real labelled tiles laid into large pyramidal TIFFs with ground truth beside them.

The slide-level methods (lesion detection across magnifications, slide classification with tile
heat maps, cohorts) need whole slides with ground truth; the public data at hand are labelled
tiles and patches. A mosaic lays those tiles on a grid of square cells at one target µm/px:

* every source tile is resampled from its own scale to the target (:func:`resample_tile`) and a
  cell-sized window of it is taken at a seeded offset;
* a smooth, seeded tissue outline (a blurred random field with a radial fall-off, cut at the
  quantile giving ``tissue_area``) decides which cells hold tissue and where glass shows, so
  :func:`napari_pathoseg.tiling.tissue_mask` finds the tissue as on a scan; glass is drawn from
  the data set's empty-glass tiles (or plain light grey);
* tissue cells get classes in the asked proportions, tumour cells gathered into smooth regions
  (``cluster``, in cells; 0 = independent cells);
* the same seed gives a byte-identical slide.

Four files are written, each atomically, only when all are complete (a cancelled or failed run
leaves none): the RGB pyramid ``OUT`` (through
:func:`napari_pathoseg.wsi.pyramid_tiff.write_tiled_pyramid`, coarser levels as 2x2 means), a
uint8 label pyramid ``OUT.labels.tif`` on the same grid (label ids in the sidecar; coarser levels
take the label at each pixel's centre), ``OUT.cells.csv`` (one row per cell: level-0 box, class,
source tile, crop) and ``OUT.mosaic.json`` (options, data set and licence, label ids, pixel
counts, the slide label with its rule, per-cell provenance). Memory stays a few tiles plus the
resampled source tiles of about two rows of cells (an LRU), whatever the slide height.

Examples
--------
>>> res = make_mosaic("shared/data/kather2016_texture_tiles", "m.tif", size=4096, mpp=0.5,
...                   seed=0, tumour_fraction=0.2)  # doctest: +SKIP
>>> res.slide_label, res.labels.name  # doctest: +SKIP
('tumour', 'm.labels.tif')
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import queue
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from napari_pathoseg._atomic import OutputError, atomic_path, check_output, write_json, write_text
from napari_pathoseg.errors import CancelledError
from napari_pathoseg.events import Cancellable, Progress, run_to_end
from napari_pathoseg.wsi.mosaic_layout import MosaicLayout, plan_mosaic
from napari_pathoseg.wsi.mosaic_render import MosaicRenderer, resample_tile
from napari_pathoseg.wsi.mosaic_sources import MosaicDataError, MosaicDataset, load_mosaic_dataset
from napari_pathoseg.wsi.pyramid_tiff import check_options, level_shapes, write_tiled_pyramid

__all__ = ["MosaicResult", "mosaic_paths", "resample_tile", "iter_make_mosaic", "make_mosaic", "MosaicRenderer"]

logger = logging.getLogger(__name__)

#: Written in the TIFF ``Software`` tag and the sidecar.
SOFTWARE = "napari-pathoseg mosaic"
#: Sidecar format id.
FORMAT = "napari-pathoseg-mosaic/1"


def mosaic_paths(out: str | os.PathLike) -> dict[str, Path]:
    """The four files a mosaic at ``out`` consists of: ``slide``, ``labels``, ``cells``, ``sidecar``."""
    out = Path(out)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return {
        "slide": out,
        "labels": out.with_name(f"{stem}.labels.tif"),
        "cells": out.with_name(f"{stem}.cells.csv"),
        "sidecar": out.with_name(f"{stem}.mosaic.json"),
    }


@dataclass(frozen=True)
class MosaicResult:
    """The final event of :func:`iter_make_mosaic`.

    Attributes
    ----------
    slide, labels, cells, sidecar : Path
        The files written.
    slide_label : {"tumour", "normal"}
    rule : str
        The slide-label rule, in words.
    tumour_area_um2 : float
        Area of tumour-labelled pixels at level 0.
    shape : (rows, cols)
    mpp : float
    levels : int
    cell_px : int
    n_cells, n_tissue_cells : int
    cells_by_class : dict of str -> int
        Tissue cells per class (glass-only cells as ``"background"``).
    label_pixels : dict of str -> int
        Level-0 pixels per label name.
    dataset : str
    seed : int
    """

    slide: Path
    labels: Path
    cells: Path
    sidecar: Path
    slide_label: str
    rule: str
    tumour_area_um2: float
    shape: tuple[int, int]
    mpp: float
    levels: int
    cell_px: int
    n_cells: int
    n_tissue_cells: int
    cells_by_class: dict[str, int]
    label_pixels: dict[str, int]
    dataset: str
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (paths as strings)."""
        d = asdict(self)
        for k in ("slide", "labels", "cells", "sidecar"):
            d[k] = str(d[k])
        d["shape"] = list(self.shape)
        return d


# ----------------------------------------------------------------------------- writing


def _write_label_pyramid(
    path: Path,
    render: Callable[[int, int, int, int, int], np.ndarray],
    *,
    shapes: list[tuple[int, int]],
    tile: int,
    mpp: float,
    progress: Callable[[int], None],
    cancelled: Callable[[], bool],
) -> None:
    """A uint8 single-channel pyramid (zlib, lossless), each level rendered directly."""
    import tifffile

    rows, cols = shapes[0]
    with tifffile.TiffWriter(path, bigtiff=rows * cols > 2**31) as tw:
        for k, (lr, lc) in enumerate(shapes):

            def tiles(k: int = k, lr: int = lr, lc: int = lc) -> Iterator[np.ndarray]:
                for r in range(0, lr, tile):
                    for c in range(0, lc, tile):
                        if cancelled():
                            raise CancelledError(f"writing {path.name} was cancelled; no mosaic was written")
                        h, w = min(tile, lr - r), min(tile, lc - c)
                        block = np.zeros((tile, tile), np.uint8)
                        block[:h, :w] = render(k, r, c, h, w)
                        progress(1)
                        yield block

            px_per_cm = 1e4 / (mpp * 2**k)
            tw.write(
                tiles(),
                shape=(lr, lc),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="minisblack",
                subfiletype=0 if k == 0 else 1,
                compression="zlib",
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
                metadata=None,
                software=SOFTWARE,
            )


_DONE = object()


def _in_thread(job: Callable[[Callable[[Any], None], Callable[[], bool]], Any], cancel: Cancellable | None) -> Iterator[Any]:
    """Run ``job(emit, cancelled)`` in a worker thread; yield what it emits, then its return value.

    Closing the generator (or an error in the consumer) cancels the job and waits for it.
    """
    q: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()

    def cancelled() -> bool:
        return stop.is_set() or (cancel is not None and cancel.is_set())

    def run() -> None:
        try:
            q.put((_DONE, job(q.put, cancelled)))
        except BaseException as exc:  # handed to the consumer's thread
            q.put((_DONE, exc))

    worker = threading.Thread(target=run, name="pathoseg-mosaic", daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, tuple) and len(item) == 2 and item[0] is _DONE:
                if isinstance(item[1], BaseException):
                    raise item[1]
                yield item[1]
                return
            yield item
    finally:
        stop.set()
        worker.join()


def iter_make_mosaic(
    data: str | os.PathLike | MosaicDataset,
    out: str | os.PathLike,
    *,
    kind: str | None = None,
    size: int | tuple[int, int] = 8192,
    mpp: float = 0.5,
    seed: int = 0,
    classes: dict[str, float] | list[str] | None = None,
    tumour_fraction: float | None = None,
    tumour_classes: list[str] | None = None,
    cell_um: float | None = None,
    source_mpp: float | None = None,
    outline: bool = True,
    tissue_area: float = 0.6,
    cluster: float = 2.0,
    min_tumour_um2: float = 10_000.0,
    tile: int = 256,
    compression: str | None = "jpeg",
    quality: int = 90,
    overwrite: bool = False,
    cache_mb: float | None = None,
    cancel: Cancellable | None = None,
) -> Iterator[Progress | MosaicResult]:
    """Lay real labelled tiles into a pyramidal slide with ground truth; yield progress, then the result.

    Parameters
    ----------
    data : path-like or MosaicDataset
        A labelled tile data set folder (see :mod:`napari_pathoseg.wsi.mosaic_sources`).
    out : path-like
        The slide ``.tif``; the label TIFF, cells CSV and JSON sidecar go beside it
        (:func:`mosaic_paths`).
    kind : {"tissue-classes", "lesion-masks"}, optional
        Refuse a data set of the other kind.
    size : int or (rows, cols)
        Level-0 size in pixels.
    mpp : float
        Target µm per level-0 pixel.
    seed : int
        Seed of every random choice: the same seed gives byte-identical files.
    classes : list of str or dict of str -> float, optional
        Tissue classes to draw (with weights; default every tissue class, equal weights).
    tumour_fraction : float, optional
        Share of tissue cells drawn from the tumour classes (0 makes a normal slide);
        default: as the class weights give.
    tumour_classes : list of str, optional
        The classes that are tumour (default: the data set's).
    cell_um : float, optional
        Cell side in µm (default: the smallest source tile side, so every tile fits).
    source_mpp : float, optional
        µm/px of the source tiles, replacing the data set's given or assumed scale.
    outline : bool
        Cut the tissue by a smooth outline on glass (else every cell is tissue).
    tissue_area : float
        Share of the slide inside the outline (0-1).
    cluster : float
        Smoothness of class regions in cells (0: classes drawn cell by cell).
    min_tumour_um2 : float
        Slide-label rule: ``"tumour"`` when tumour labels cover at least this area.
    tile, compression, quality
        TIFF tile side, RGB compression (``"jpeg"``, ``"zlib"``, None) and JPEG quality.
    overwrite : bool
        Replace existing outputs (else they are refused).
    cache_mb : float, optional
        Memory budget for resampled source tiles (default: the tiles of two rows of cells,
        32-512 MB).
    cancel : object with ``is_set()``, optional
        Stops the job at the next tile: nothing is written, ``CancelledError`` is raised.

    Yields
    ------
    Progress
        ``stage`` ``"labels"`` then ``"slide"``; ``done``/``total`` in tiles of both pyramids.
    MosaicResult
        Last.

    Raises
    ------
    napari_pathoseg.errors.PathosegError
        Bad data set, options or output path (``OutputError``); ``CancelledError`` when cancelled.
    """
    compression = check_options(tile=tile, compression=compression)
    if not (min_tumour_um2 >= 0 and np.isfinite(min_tumour_um2)):
        raise MosaicDataError(f"the minimum tumour area must be a number >= 0 µm², got {min_tumour_um2}")
    if cache_mb is not None and not cache_mb > 0:
        raise MosaicDataError(f"the source cache must be > 0 MB, got {cache_mb}")
    paths = mosaic_paths(out)
    ds = data if isinstance(data, MosaicDataset) else load_mosaic_dataset(data, kind=kind, mpp=source_mpp)
    folder = ds.folder.resolve()
    for role, p in paths.items():
        try:
            check_output(p, what=f"mosaic {role}", overwrite=overwrite)
        except OutputError as exc:
            if p.is_file() and not overwrite:
                raise OutputError(f"{exc} (or replace it: --force / overwrite=True)") from None
            raise
        if folder == p.resolve().parent or folder in p.resolve().parents:
            raise MosaicDataError(f"{p} is inside the data set {ds.folder}; write mosaics to a folder outside the data")
    if paths["slide"].suffix.lower() not in (".tif", ".tiff"):
        raise MosaicDataError(f"{paths['slide']}: a mosaic slide is a pyramidal TIFF; name it .tif")
    layout = plan_mosaic(
        ds,
        size=size,
        mpp=mpp,
        seed=seed,
        classes=classes,
        tumour_fraction=tumour_fraction,
        tumour_classes=tumour_classes,
        cell_um=cell_um,
        outline=outline,
        tissue_area=tissue_area,
        cluster=cluster,
    )
    shapes = level_shapes(layout.shape)
    n_tiles = sum(-(-r // tile) * -(-c // tile) for r, c in shapes)
    total = n_tiles + n_tiles
    renderer = MosaicRenderer(ds, layout, cache_mb=cache_mb)
    every = max(1, total // 200)

    def job(emit: Callable[[Any], None], cancelled: Callable[[], bool]) -> MosaicResult:
        done = 0

        def tick(stage: str) -> Callable[[Any], None]:
            def on_tile(_: Any) -> None:
                nonlocal done
                done += 1
                if done % every == 0 or done == total:
                    emit(Progress(done=done, total=total, message=f"{stage} of {paths['slide'].name}", stage=stage))

            return on_tile

        with contextlib.ExitStack() as stack:
            tmp = {role: stack.enter_context(atomic_path(p)) for role, p in paths.items()}
            _write_label_pyramid(
                tmp["labels"], renderer.labels, shapes=shapes, tile=tile, mpp=layout.mpp, progress=tick("labels"), cancelled=cancelled
            )
            write_tiled_pyramid(
                tmp["slide"],
                renderer.rgb,
                shape=layout.shape,
                n_levels=len(shapes),
                tile=tile,
                mpp=layout.mpp,
                compression=compression,
                quality=quality,
                software=SOFTWARE,
                progress=tick("slide"),
                cancel=cancelled,
            )
            result = _summary(ds, layout, renderer, paths, shapes=shapes, seed=seed, min_tumour_um2=min_tumour_um2)
            write_text(tmp["cells"], _cells_csv(ds, layout, renderer))
            options = {
                "tile": tile, "compression": compression or "none", "quality": quality, "outline": outline,
                "tissue_area": tissue_area, "cluster": cluster, "min_tumour_um2": min_tumour_um2,
            }  # fmt: skip
            write_json(tmp["sidecar"], _sidecar(ds, layout, renderer, result, paths, options=options))
            if cancelled():
                raise CancelledError(f"making {paths['slide'].name} was cancelled; no mosaic was written")
        logger.info("mosaic %s: %s, %d x %d px, %d cells", paths["slide"], result.slide_label, *layout.shape, layout.n_cells)
        return result

    yield from _in_thread(job, cancel)


def make_mosaic(data: str | os.PathLike | MosaicDataset, out: str | os.PathLike, **options: Any) -> MosaicResult:
    """Run :func:`iter_make_mosaic` to its end (same options); returns the :class:`MosaicResult`."""
    return run_to_end(iter_make_mosaic(data, out, **options), MosaicResult)


# ----------------------------------------------------------------------------- summaries


def _summary(
    ds: MosaicDataset, layout: MosaicLayout, r: MosaicRenderer, paths: dict[str, Path], *, shapes: list, seed: int, min_tumour_um2: float
) -> MosaicResult:
    tumour_ids = ds.labels_of(layout.tumour_classes)
    tumour_px = int(sum(r.label_px[i] for i in tumour_ids))
    area = tumour_px * layout.mpp**2
    names = ", ".join(f"{i} {ds.labels[i]}" for i in tumour_ids) or "none"
    rule = (
        f"tumour if the tumour labels ({names}) cover >= {min_tumour_um2:g} µm² of the slide "
        f"(>= {int(np.ceil(min_tumour_um2 / layout.mpp**2))} level-0 px at {layout.mpp:g} µm/px), else normal"
    )
    ids, counts = np.unique(layout.cls, return_counts=True)
    cells_by_class = {layout.classes[k] if k >= 0 else "background": int(n) for k, n in zip(ids, counts)}
    return MosaicResult(
        slide=paths["slide"],
        labels=paths["labels"],
        cells=paths["cells"],
        sidecar=paths["sidecar"],
        slide_label="tumour" if tumour_px > 0 and area >= min_tumour_um2 else "normal",
        rule=rule,
        tumour_area_um2=round(float(area), 3),
        shape=layout.shape,
        mpp=layout.mpp,
        levels=len(shapes),
        cell_px=layout.cell_px,
        n_cells=layout.n_cells,
        n_tissue_cells=int(layout.tissue.sum()),
        cells_by_class=dict(sorted(cells_by_class.items())),
        label_pixels={ds.labels.get(i, str(i)): int(n) for i, n in enumerate(r.label_px) if n},
        dataset=ds.name,
        seed=seed,
    )


def _cells_csv(ds: MosaicDataset, layout: MosaicLayout, r: MosaicRenderer) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["cell_row", "cell_col", "x", "y", "w", "h", "class", "label", "tumour", "tissue_fraction",
                "source", "crop_x", "crop_y", "glass_source"])  # fmt: skip
    rows, cols = layout.shape
    cp = layout.cell_px
    tumour = set(layout.tumour_classes)
    for i in range(layout.n_rows):
        for j in range(layout.n_cols):
            x, y = j * cp, i * cp
            cw, ch = min(cp, cols - x), min(cp, rows - y)
            g = int(layout.glass[i, j])
            glass = ds.tiles[g].image if g >= 0 else ""
            if layout.tissue[i, j]:
                t = ds.tiles[int(layout.source[i, j])]
                frac = r.inside_px[i, j] / float(cw * ch)
                w.writerow([i, j, x, y, cw, ch, t.cls, t.lut[0] if t.mask is None else "", int(t.cls in tumour), f"{frac:.4f}",
                            t.image, int(layout.crop[i, j, 1]), int(layout.crop[i, j, 0]), glass])  # fmt: skip
            else:
                w.writerow([i, j, x, y, cw, ch, "background", 0, 0, "0.0000", "", "", "", glass])
    return buf.getvalue()


def _sidecar(
    ds: MosaicDataset, layout: MosaicLayout, r: MosaicRenderer, res: MosaicResult, paths: dict[str, Path], *, options: dict[str, Any]
) -> dict[str, Any]:
    used: dict[int, int] = {}
    cells = []
    for i in range(layout.n_rows):
        for j in range(layout.n_cols):
            s = int(layout.source[i, j]) if layout.tissue[i, j] else -1
            g = int(layout.glass[i, j])
            for k in (s, g):
                if k >= 0:
                    used[k] = used.get(k, 0) + 1
            cells.append(f"{i},{j},{s},{g}")
    order = sorted(used)
    return {
        "format": FORMAT,
        "software": SOFTWARE,
        "files": {role: p.name for role, p in paths.items()},
        "slide_label": res.slide_label,
        "slide_label_rule": res.rule,
        "tumour_area_um2": res.tumour_area_um2,
        "tumour_classes": list(layout.tumour_classes),
        "tumour_label_ids": list(ds.labels_of(layout.tumour_classes)),
        "label_ids": {str(i): name for i, name in sorted(ds.labels.items())},
        "label_pixels": res.label_pixels,
        "cells_by_class": res.cells_by_class,
        "seed": res.seed,
        "mpp": layout.mpp,
        "height": layout.shape[0],
        "width": layout.shape[1],
        "levels": res.levels,
        "cell_px": layout.cell_px,
        "cell_um": round(layout.cell_px * layout.mpp, 4),
        "grid": [layout.n_rows, layout.n_cols],
        "class_weights": layout.weights,
        "options": options,
        "dataset": ds.provenance(),
        "licence_note": (
            "Pixels and labels derive from the data set above under its licence"
            + (" (non-commercial / research use only)" if ds.non_commercial else "")
            + ": do not redistribute or commit generated mosaics."
        ),
        "sources": [{"index": k, "file": ds.tiles[k].image, "mask": ds.tiles[k].mask, "class": ds.tiles[k].cls, "n_cells": used[k]} for k in order],
        "cells_format": "cell_row,cell_col,source,glass_source (indices in 'sources', -1 = none); boxes and crops in the cells CSV",
        "cells": cells,
    }
