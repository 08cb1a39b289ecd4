"""Where every tile of a mosaic slide goes: the seeded plan of cells, classes, sources and outline.

:func:`plan_mosaic` decides everything random about a mosaic from one seed, before any pixel is
drawn, and returns a :class:`MosaicLayout`: a grid of square cells covering the slide (the last
row and column cut by the slide's edge), the smooth tissue outline, which cells hold tissue, each
tissue cell's class, source tile and crop, and each cell's glass tile and crop. Rendering
(:mod:`napari_pathoseg.wsi.mosaic`) only reads it.

Outline: a standard-normal field on a coarse grid (one sample per ``step`` level-0 px), blurred
to about an eighth of the slide, minus a radial fall-off (tissue in the middle, glass at the
edges), cut at the quantile that leaves ``tissue_area`` of the slide inside; between samples it
is interpolated bilinearly, so the outline is smooth at every level. A cell is tissue when any of
its 8 x 8 probe points is inside.

Classes: the tumour cells are the ``round(tumour_fraction * n)`` tissue cells where a second
blurred field (``cluster`` cells) is highest, so tumour forms regions; the classes within the
tumour and the non-tumour cells are bands of further blurred fields, in the asked proportions
(largest-remainder rounding).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from napari_pathoseg.wsi.mosaic_sources import MosaicDataError, MosaicDataset

__all__ = ["MosaicLayout", "plan_mosaic", "resampled_shape", "GLASS_VALUE", "MIN_GLASS_GREY"]

logger = logging.getLogger(__name__)

#: Grey level of glass when a data set has no empty-glass tiles.
GLASS_VALUE = 242
#: An empty-class tile is used as glass only if its mean grey is at least this (NCT's BACK
#: class also holds dark, out-of-focus patches that are not glass).
MIN_GLASS_GREY = 200.0
#: Probe points per cell side deciding whether a cell holds tissue.
_PROBES = 8


def resampled_shape(rows: int, cols: int, scale: float) -> tuple[int, int]:
    """Size of a ``rows`` x ``cols`` tile resampled by ``scale`` (rounded half to even, at least 1)."""
    return max(1, int(np.round(rows * scale))), max(1, int(np.round(cols * scale)))


@dataclass
class MosaicLayout:
    """The plan of a mosaic (all arrays indexed by cell ``[i, j]``).

    Attributes
    ----------
    shape : (rows, cols)
        Level-0 size.
    mpp : float
    cell_px : int
        Cell side in level-0 px; cell ``(i, j)`` covers rows ``i*cell_px ...`` and columns
        ``j*cell_px ...``, cut by the slide's edge.
    n_rows, n_cols : int
    tissue : (n_rows, n_cols) bool
    cls : (n_rows, n_cols) int
        Index into ``classes`` (-1: glass only).
    source : (n_rows, n_cols) int
        Index of the tissue tile in ``ds.tiles`` (-1: none).
    crop : (n_rows, n_cols, 2) int
        (row, col) of the cell's window in the resampled source tile.
    glass : (n_rows, n_cols) int
        Index of the glass tile in ``ds.tiles`` (-1: plain ``glass_value``).
    glass_crop : (n_rows, n_cols, 2) int
    classes : tuple of str
        The drawn classes.
    tumour_classes : tuple of str
    weights : dict of str -> float
        The share of tissue cells asked of each class.
    field, step, threshold
        The outline: coarse field, level-0 px between its samples, and the inside cut
        (``field is None``: no outline, every cell is tissue).
    """

    shape: tuple[int, int]
    mpp: float
    cell_px: int
    tissue: np.ndarray
    cls: np.ndarray
    source: np.ndarray
    crop: np.ndarray
    glass: np.ndarray
    glass_crop: np.ndarray
    classes: tuple[str, ...]
    tumour_classes: tuple[str, ...]
    weights: dict[str, float]
    field: np.ndarray | None = None
    step: int = 1
    threshold: float = 0.0
    glass_value: int = GLASS_VALUE

    @property
    def n_rows(self) -> int:
        return int(self.tissue.shape[0])

    @property
    def n_cols(self) -> int:
        return int(self.tissue.shape[1])

    @property
    def n_cells(self) -> int:
        return int(self.tissue.size)

    def class_name(self, i: int, j: int) -> str:
        """The class of cell ``(i, j)`` (``"background"`` for glass-only cells)."""
        k = int(self.cls[i, j])
        return self.classes[k] if k >= 0 else "background"

    def inside(self, row: int, col: int, step: int, h: int, w: int) -> np.ndarray:
        """``(h, w)`` bool: are the level-0 points ``(row + step*a, col + step*b)`` inside the outline?"""
        if self.field is None:
            return np.ones((h, w), bool)
        ri, rt = _interp_index(row + step * np.arange(h), self.step, self.field.shape[0])
        ci, ct = _interp_index(col + step * np.arange(w), self.step, self.field.shape[1])
        # bilinear values lie between the extremes of the samples around them: most tiles are decided here
        support = self.field[ri[0] : ri[-1] + 2, ci[0] : ci[-1] + 2]
        if support.min() >= self.threshold:
            return np.ones((h, w), bool)
        if support.max() < self.threshold:
            return np.zeros((h, w), bool)
        return _bilinear(self.field, ri, rt, ci, ct) >= self.threshold


def _interp_index(pos: np.ndarray, step: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Grid index below each position and the fraction towards the next (grid spacing ``step``)."""
    u = np.asarray(pos, np.float64) / step
    i0 = np.clip(np.floor(u).astype(np.int64), 0, n - 2)
    return i0, np.clip(u - i0, 0.0, 1.0)


def _bilinear(grid: np.ndarray, ri: np.ndarray, rt: np.ndarray, ci: np.ndarray, ct: np.ndarray) -> np.ndarray:
    """``grid`` interpolated at the rows (ri + rt) x columns (ci + ct) of a separable sample grid."""
    rows = grid[ri] * (1.0 - rt)[:, None] + grid[ri + 1] * rt[:, None]  # (h, n_cols)
    return rows[:, ci] * (1.0 - ct)[None, :] + rows[:, ci + 1] * ct[None, :]


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Standard-normal noise blurred by ``sigma`` (grid units) and rescaled to unit std."""
    from scipy.ndimage import gaussian_filter

    f = rng.standard_normal(shape)
    if sigma > 0:
        f = gaussian_filter(f, sigma, mode="reflect")
    return (f - f.mean()) / (f.std() + 1e-12)


def _allocate(n: int, weights: dict[str, float]) -> dict[str, int]:
    """Split ``n`` into integer counts proportional to ``weights`` (largest remainder, ties by order)."""
    total = sum(weights.values())
    if n <= 0 or total <= 0:
        return {c: 0 for c in weights}
    exact = {c: n * w / total for c, w in weights.items()}
    counts = {c: int(np.floor(v)) for c, v in exact.items()}
    rest = sorted(weights, key=lambda c: -(exact[c] - counts[c]))
    for c in rest[: n - sum(counts.values())]:
        counts[c] += 1
    return counts


def _parse_weights(ds: MosaicDataset, classes: dict[str, float] | list[str] | tuple[str, ...] | None) -> dict[str, float]:
    valid = ds.tissue_classes
    if classes is None:
        return {c: 1.0 for c in valid}
    weights = dict(classes) if isinstance(classes, dict) else {c: 1.0 for c in classes}
    for c, w in weights.items():
        if c not in valid:
            raise MosaicDataError(f"{ds.name} has no tissue class {c!r}; choose from {', '.join(valid)}")
        if not (w > 0 and np.isfinite(w)):
            raise MosaicDataError(f"class weight of {c} must be a positive number, got {w}")
    if not weights:
        raise MosaicDataError(f"no classes chosen; choose from {', '.join(valid)}")
    return {c: float(w) for c, w in weights.items()}


def _glass_tiles(ds: MosaicDataset) -> list[int]:
    """Indices of the data set's empty-glass tiles that look like glass (mean grey >= MIN_GLASS_GREY)."""
    from PIL import Image

    out = []
    for k, t in enumerate(ds.tiles):
        if t.cls in ds.background_classes:
            with Image.open(ds.folder / t.image) as im:
                grey = float(np.asarray(im.convert("L"), np.float64).mean())
            if grey >= MIN_GLASS_GREY:
                out.append(k)
            else:
                logger.info("%s: mean grey %.0f < %.0f, not used as glass", t.image, grey, MIN_GLASS_GREY)
    return out


def _outline(rng: np.random.Generator, shape: tuple[int, int], tissue_area: float) -> tuple[np.ndarray, int, float]:
    rows, cols = shape
    step = max(16, int(np.ceil(max(rows, cols) / 256)))
    n_r, n_c = -(-(rows - 1) // step) + 2, -(-(cols - 1) // step) + 2
    noise = _smooth_field(rng, (n_r, n_c), sigma=max(n_r, n_c) / 10)
    yy = (np.arange(n_r) * step - rows / 2) / (rows / 2)
    xx = (np.arange(n_c) * step - cols / 2) / (cols / 2)
    r2 = yy[:, None] ** 2 + xx[None, :] ** 2
    f = 0.6 * noise - 2.5 * r2
    edge = (np.abs(yy)[:, None] > 0.92) | (np.abs(xx)[None, :] > 0.92)
    f[edge] = -1e3  # glass all round the edge
    in_slide = (np.arange(n_r) * step < rows)[:, None] & (np.arange(n_c) * step < cols)[None, :]
    threshold = float(np.quantile(f[in_slide & ~edge], 1.0 - tissue_area * in_slide.sum() / max(1, (in_slide & ~edge).sum())))
    return f, step, threshold


def plan_mosaic(
    ds: MosaicDataset,
    *,
    size: int | tuple[int, int],
    mpp: float,
    seed: int = 0,
    classes: dict[str, float] | list[str] | None = None,
    tumour_fraction: float | None = None,
    tumour_classes: list[str] | tuple[str, ...] | None = None,
    cell_um: float | None = None,
    outline: bool = True,
    tissue_area: float = 0.6,
    cluster: float = 2.0,
) -> MosaicLayout:
    """Plan a mosaic of ``ds`` (see :func:`napari_pathoseg.wsi.mosaic.iter_make_mosaic` for the options).

    Returns
    -------
    MosaicLayout

    Raises
    ------
    MosaicDataError
        Unknown classes, impossible proportions, sources smaller than the cell, bad sizes.
    """
    rows, cols = (int(size), int(size)) if np.ndim(size) == 0 else (int(size[0]), int(size[1]))
    if rows < 64 or cols < 64:
        raise MosaicDataError(f"a mosaic must be at least 64 x 64 px, got {rows} x {cols}")
    if not (mpp > 0 and np.isfinite(mpp)):
        raise MosaicDataError(f"target µm/px must be a positive number, got {mpp}")
    if not 0 < tissue_area <= 0.9:
        raise MosaicDataError(f"tissue area must be in (0, 0.9], got {tissue_area}")
    if cluster < 0:
        raise MosaicDataError(f"cluster must be >= 0 cells, got {cluster}")
    scale = ds.mpp / mpp
    weights = _parse_weights(ds, classes)
    tumour = tuple(tumour_classes) if tumour_classes is not None else ds.tumour_classes
    for c in tumour:
        if c not in ds.tissue_classes:
            raise MosaicDataError(f"{ds.name} has no tissue class {c!r} to call tumour; choose from {', '.join(ds.tissue_classes)}")
    if tumour_fraction is not None:
        if not 0 <= tumour_fraction <= 1:
            raise MosaicDataError(f"tumour fraction must be in [0, 1], got {tumour_fraction}")
        if tumour_fraction > 0 and not any(c in weights for c in tumour):
            if not tumour:
                raise MosaicDataError(f"{ds.name} has no tumour class; use --tumour-fraction 0 or --tumour-classes")
            weights.update({c: 1.0 for c in tumour})
        if tumour_fraction == 0:
            weights = {c: w for c, w in weights.items() if c not in tumour}
    tum_w = {c: w for c, w in weights.items() if c in tumour}
    other_w = {c: w for c, w in weights.items() if c not in tumour}
    frac = tumour_fraction if tumour_fraction is not None else sum(tum_w.values()) / sum(weights.values())
    if frac < 1 and not other_w:
        raise MosaicDataError(
            f"{ds.name}: no non-tumour class to draw ({', '.join(ds.tissue_classes)} are all tumour or not chosen); "
            "choose --classes or --tumour-fraction 1"
        )
    share = {c: frac * w / sum(tum_w.values()) for c, w in tum_w.items()} if frac > 0 else {}
    share.update({c: (1 - frac) * w / sum(other_w.values()) for c, w in other_w.items()} if frac < 1 else {})
    share = {c: v for c, v in share.items() if v > 0}
    drawn = tuple(c for c in ds.tissue_classes if c in share)

    # cell size: the smallest resampled side of the tiles in use, unless asked
    glass_ids = _glass_tiles(ds)
    in_use = [k for k, t in enumerate(ds.tiles) if t.cls in share] + glass_ids
    sides = {k: min(resampled_shape(ds.tiles[k].height, ds.tiles[k].width, scale)) for k in in_use}
    if cell_um is None:
        cell_px = min(sides.values())
    else:
        cell_px = int(np.round(cell_um / mpp))
    if cell_px < 16:
        raise MosaicDataError(f"cells of {cell_px} px are too small; raise --cell-um or lower --mpp (finer pixels)")
    by_class = {c: [k for k, t in enumerate(ds.tiles) if t.cls == c and sides[k] >= cell_px] for c in drawn}
    for c, ks in by_class.items():
        if not ks:
            raise MosaicDataError(f"{ds.name}: no {c} tile covers a {cell_px * mpp:g} µm cell at {mpp:g} µm/px; lower --cell-um")
    glass_ids = [k for k in glass_ids if sides[k] >= cell_px]

    rng = np.random.default_rng(seed)
    n_rows, n_cols = -(-rows // cell_px), -(-cols // cell_px)
    if outline:
        f, step, thr = _outline(rng, (rows, cols), tissue_area)
    else:
        f, step, thr = None, 1, 0.0
    lay = MosaicLayout(
        shape=(rows, cols),
        mpp=float(mpp),
        cell_px=cell_px,
        tissue=np.zeros((n_rows, n_cols), bool),
        cls=np.full((n_rows, n_cols), -1, np.int32),
        source=np.full((n_rows, n_cols), -1, np.int32),
        crop=np.zeros((n_rows, n_cols, 2), np.int32),
        glass=np.full((n_rows, n_cols), -1, np.int32),
        glass_crop=np.zeros((n_rows, n_cols, 2), np.int32),
        classes=drawn,
        tumour_classes=tuple(c for c in tumour if c in ds.tissue_classes),
        weights={c: round(share[c], 6) for c in drawn},
        field=f,
        step=step,
        threshold=thr,
    )
    # tissue cells: any of the cell's probe points inside the outline
    probes = (np.arange(_PROBES) + 0.5) * cell_px / _PROBES
    pr = (np.arange(n_rows)[:, None] * cell_px + probes[None, :]).ravel()
    pc = (np.arange(n_cols)[:, None] * cell_px + probes[None, :]).ravel()
    if f is not None:
        ri, rt = _interp_index(np.minimum(pr, rows - 1), step, f.shape[0])
        ci, ct = _interp_index(np.minimum(pc, cols - 1), step, f.shape[1])
        ins = _bilinear(f, ri, rt, ci, ct) >= thr
        lay.tissue[:] = ins.reshape(n_rows, _PROBES, n_cols, _PROBES).any(axis=(1, 3))
    else:
        lay.tissue[:] = True
    # valid probe points only count inside the slide (cut edge cells)
    lay.tissue &= (np.arange(n_rows) * cell_px < rows)[:, None] & (np.arange(n_cols) * cell_px < cols)[None, :]

    # classes: tumour where one smooth field is highest, then bands of two more
    fa = _smooth_field(rng, (n_rows, n_cols), cluster)
    fb = _smooth_field(rng, (n_rows, n_cols), cluster)
    fc = _smooth_field(rng, (n_rows, n_cols), cluster)
    cells = np.flatnonzero(lay.tissue)
    n_t = len(cells)
    if n_t == 0:
        raise MosaicDataError("no tissue cell on this slide; raise --size or --tissue-area, or lower --cell-um")
    n_tum = int(np.round(frac * n_t))
    if frac > 0 and n_tum == 0:
        n_tum = 1
    if frac < 1 and n_tum == n_t and n_t > 1:
        n_tum = n_t - 1
    by_a = cells[np.argsort(-fa.ravel()[cells], kind="stable")]
    groups = [(by_a[:n_tum], {c: share[c] for c in drawn if c in tum_w}, fb), (by_a[n_tum:], {c: share[c] for c in drawn if c in other_w}, fc)]
    for members, w, fld in groups:
        if len(members) == 0 or not w:
            continue
        members = members[np.argsort(fld.ravel()[members], kind="stable")]
        start = 0
        for c, n in _allocate(len(members), w).items():
            lay.cls.ravel()[members[start : start + n]] = drawn.index(c)
            start += n

    # sources and crops: uniform draws per cell, independent of the classes
    u = rng.random((n_rows, n_cols, 6))
    for i, j in zip(*np.nonzero(lay.tissue)):
        ks = by_class[drawn[lay.cls[i, j]]]
        k = ks[min(len(ks) - 1, int(u[i, j, 0] * len(ks)))]
        lay.source[i, j] = k
        lay.crop[i, j] = _crop(ds, k, scale, cell_px, u[i, j, 1:3])
    if glass_ids:
        for i in range(n_rows):
            for j in range(n_cols):
                k = glass_ids[min(len(glass_ids) - 1, int(u[i, j, 3] * len(glass_ids)))]
                lay.glass[i, j] = k
                lay.glass_crop[i, j] = _crop(ds, k, scale, cell_px, u[i, j, 4:6])
    logger.info(
        "mosaic plan: %d x %d cells of %d px, %d tissue (%d tumour), classes %s",
        n_rows, n_cols, cell_px, n_t, n_tum, lay.weights,
    )  # fmt: skip
    return lay


def _crop(ds: MosaicDataset, k: int, scale: float, cell_px: int, u: np.ndarray) -> tuple[int, int]:
    h, w = resampled_shape(ds.tiles[k].height, ds.tiles[k].width, scale)
    return min(h - cell_px, int(u[0] * (h - cell_px + 1))), min(w - cell_px, int(u[1] * (w - cell_px + 1)))
