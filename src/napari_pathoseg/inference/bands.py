"""Slide-sized binary maps processed a band of rows at a time: labelling, hole filling, region figures.

A whole-slide map (a lesion probability at 2 µm/px on a 50,000² slide is 12,500²) is read from
its :class:`~napari_pathoseg.inference._rows.RowStore` in bands of rows, so memory stays one band
whatever the slide size. :class:`BandLabels` gives the connected components of a binary map read
that way, identical to :func:`scipy.ndimage.label` (4-connectivity, labels in raster order of
each component's first pixel): every band is labelled on its own, components meeting across a
band seam are merged by a union-find over the seam's pixel pairs, and a second pass relabels the
bands (recomputed, not stored). :func:`clean_mask` chains it into ``fill holes -> drop regions
smaller than n pixels -> label`` (what :func:`scipy.ndimage.binary_fill_holes` and a size filter
do on the whole array) and returns the region figures, writing the mask and labels band by band.

Examples
--------
>>> import numpy as np
>>> m = np.zeros((9, 7), bool); m[1:8, 1:6] = True; m[4, 3] = False; m[0, 6] = True
>>> out = clean_mask(lambda r0, r1: m[r0:r1], m.shape, fill_holes=True, min_area_px=2, rows=2)
>>> out.n, out.counts.tolist(), out.bboxes.tolist()
(1, [35], [[1, 1, 8, 6]])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

__all__ = ["BAND_PIXELS", "BandLabels", "CleanMask", "band_rows", "clean_mask", "write_rows_tiff"]

#: Pixels per band (bounded memory: a few bytes per pixel of one band).
BAND_PIXELS = 1 << 21

#: ``read(row0, row1) -> (row1 - row0, cols)`` array of some rows.
Reader = Callable[[int, int], np.ndarray]


def band_rows(cols: int, *, pixels: int | None = None) -> int:
    """Rows per band so that a band holds about ``pixels`` (default :data:`BAND_PIXELS`) pixels, at least 8 rows."""
    return max(8, int(BAND_PIXELS if pixels is None else pixels) // max(1, int(cols)))


def _resolve(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Union-find over labels ``0..n`` with edges ``a - b``: each label's root, the smallest label of its set."""
    parent = np.arange(n + 1, dtype=np.int64)
    while a.size:
        ra, rb = parent[a], parent[b]
        if np.array_equal(ra, rb):
            break
        lo = np.minimum(ra, rb)
        np.minimum.at(parent, ra, lo)  # hook each root onto the smaller one
        np.minimum.at(parent, rb, lo)
        while True:  # pointer jumping: every label points at its root again
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
    return parent


class BandLabels:
    """Connected components of a binary map read in row bands (== ``scipy.ndimage.label``).

    Parameters
    ----------
    read : callable
        ``read(row0, row1)`` -> the bool rows ``row0 .. row1`` of the map.
    shape : (rows, cols)
    rows : int, optional
        Rows per band (default :func:`band_rows`).
    stats : bool
        Also sum the row / column indices and boxes (``False``: only counts and :attr:`border`).

    Attributes
    ----------
    n : int
        Number of components.
    counts, sum_rows, sum_cols : (n,) arrays
        Pixels per component and the sums of their row / column indices.
    bboxes : (n, 4) int64
        ``row0, col0, row1, col1`` (end exclusive) of each component.
    border : (n,) bool
        The component touches the map's edge.
    """

    def __init__(self, read: Reader, shape: tuple[int, int], *, rows: int | None = None, stats: bool = True) -> None:
        from scipy import ndimage as ndi

        self.read = read
        self.shape = (int(shape[0]), int(shape[1]))
        step = int(rows or band_rows(self.shape[1]))
        self.bands = [(r, min(self.shape[0], r + step)) for r in range(0, self.shape[0], step)]
        self._index = {b: i for i, b in enumerate(self.bands)}
        self._bases: list[int] = []
        total = 0
        parts: list[tuple[np.ndarray, ...]] = []
        seams_a: list[np.ndarray] = []
        seams_b: list[np.ndarray] = []
        prev_last: np.ndarray | None = None
        last_col = self.shape[1] - 1
        for r0, r1 in self.bands:
            lab, n = ndi.label(np.asarray(read(r0, r1), bool))
            self._bases.append(total)
            flat = lab.ravel()
            cnt = np.bincount(flat, minlength=n + 1)[1:]
            if stats and n:
                per_row = np.repeat(np.arange(r0, r1, dtype=np.float64), self.shape[1])
                srow = np.bincount(flat, weights=per_row, minlength=n + 1)[1:]
                del per_row
                per_col = np.tile(np.arange(self.shape[1], dtype=np.float64), r1 - r0)
                scol = np.bincount(flat, weights=per_col, minlength=n + 1)[1:]
                del per_col
                box = np.array([(sl[0].start, sl[1].start, sl[0].stop, sl[1].stop) for sl in ndi.find_objects(lab)],
                               np.int64).reshape(n, 4)  # every label 1..n exists
                box[:, 0] += r0
                box[:, 2] += r0
            else:
                srow = scol = np.zeros(n)
                box = np.zeros((n, 4), np.int64)
            edge = np.zeros(n + 1, bool)
            edge[lab[:, 0]] = True
            edge[lab[:, last_col]] = True
            if r0 == 0:
                edge[lab[0]] = True
            if r1 == self.shape[0]:
                edge[lab[-1]] = True
            parts.append((cnt, srow, scol, box, edge[1:]))
            first = lab[0].astype(np.int64) + total
            if prev_last is not None:
                both = (prev_last > 0) & (lab[0] > 0)
                if both.any():
                    pairs = np.unique(np.stack([prev_last[both], first[both]], 1), axis=0)
                    seams_a.append(pairs[:, 0])
                    seams_b.append(pairs[:, 1])
            prev_last = np.where(lab[-1] > 0, lab[-1].astype(np.int64) + total, 0)
            total += n
        self._total = total
        a = np.concatenate(seams_a) if seams_a else np.zeros(0, np.int64)
        b = np.concatenate(seams_b) if seams_b else np.zeros(0, np.int64)
        self._parent = _resolve(total, a, b)
        roots = np.unique(self._parent[1:])
        #: Final id of every band-local label (0 stays 0): roots numbered 1..n in raster order.
        self._lut = np.zeros(total + 1, np.int64)
        self._lut[roots] = np.arange(1, roots.size + 1)
        self._lut = self._lut[self._parent]
        self.n = int(roots.size)
        ids = self._lut[1:] - 1
        cat = [np.concatenate([p[k] for p in parts]) if parts else np.zeros(0) for k in range(5)]
        self.counts = np.bincount(ids, weights=cat[0], minlength=self.n).astype(np.int64)
        self.sum_rows = np.bincount(ids, weights=cat[1], minlength=self.n)
        self.sum_cols = np.bincount(ids, weights=cat[2], minlength=self.n)
        self.bboxes = np.zeros((self.n, 4), np.int64)
        if self.n:
            self.bboxes[:, :2] = np.iinfo(np.int64).max
            np.minimum.at(self.bboxes[:, 0], ids, cat[3][:, 0])
            np.minimum.at(self.bboxes[:, 1], ids, cat[3][:, 1])
            np.maximum.at(self.bboxes[:, 2], ids, cat[3][:, 2])
            np.maximum.at(self.bboxes[:, 3], ids, cat[3][:, 3])
        self.border = np.bincount(ids, weights=cat[4].astype(np.float64), minlength=self.n) > 0

    def band(self, row0: int, row1: int) -> np.ndarray:
        """Component ids (int64, 0 outside) of the band ``row0 .. row1`` (one of :attr:`bands`), recomputed."""
        from scipy import ndimage as ndi

        base = self._bases[self._index[(row0, row1)]]
        lab, _ = ndi.label(np.asarray(self.read(row0, row1), bool))
        out = lab.astype(np.int64)
        out[out > 0] += base
        return self._lut[out]

    def iter_labels(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(row0, row1, labels)`` of every band, top to bottom (see :meth:`band`)."""
        for r0, r1 in self.bands:
            yield r0, r1, self.band(r0, r1)


@dataclass
class CleanMask:
    """Regions of a cleaned mask (:func:`clean_mask`): their figures, ids 1..n in raster order.

    ``counts`` pixels, ``centroids`` (n, 2) row / column means, ``bboxes`` (n, 4)
    ``row0, col0, row1, col1``; ``mask_pixels`` the mask's pixels.
    """

    n: int
    counts: np.ndarray
    centroids: np.ndarray
    bboxes: np.ndarray

    @property
    def mask_pixels(self) -> int:
        return int(self.counts.sum())


def clean_mask(
    read: Reader,
    shape: tuple[int, int],
    *,
    fill_holes: bool = True,
    min_area_px: int = 0,
    rows: int | None = None,
    on_band: Callable[[int, int, np.ndarray], None] | None = None,
) -> CleanMask:
    """Fill holes, drop small regions and label a binary map read in bands; bounded memory.

    The same as ``scipy.ndimage.binary_fill_holes`` (4-connected background reaching the edge
    is not a hole), then removing 4-connected regions of fewer than ``min_area_px`` pixels,
    then ``scipy.ndimage.label``, on the whole map.

    Parameters
    ----------
    read : callable
        ``read(row0, row1)`` -> bool rows of the raw mask (called a few times per band).
    shape : (rows, cols)
    fill_holes : bool
    min_area_px : int
        Regions with fewer pixels are removed (``<= 1``: keep all).
    rows : int, optional
        Rows per band.
    on_band : callable, optional
        ``on_band(row0, row1, labels)`` with the final int64 region ids of every band, top to
        bottom (write the mask or labels from here).

    Returns
    -------
    CleanMask
    """
    src = read
    if fill_holes:
        bg = BandLabels(lambda r0, r1: ~np.asarray(read(r0, r1), bool), shape, rows=rows, stats=False)
        hole = np.concatenate([[False], ~bg.border])  # background components away from the edge

        def src(r0: int, r1: int) -> np.ndarray:
            return np.asarray(read(r0, r1), bool) | hole[bg.band(r0, r1)]

    fg = BandLabels(src, shape, rows=rows)
    keep = np.ones(fg.n + 1, bool)
    if min_area_px > 1:
        keep[1:] = fg.counts >= int(min_area_px)
    keep[0] = False
    new_id = np.zeros(fg.n + 1, np.int64)
    new_id[keep] = np.arange(1, int(keep.sum()) + 1)
    if on_band is not None:
        for r0, r1, lab in fg.iter_labels():
            on_band(r0, r1, new_id[lab])
    k = keep[1:]
    counts = fg.counts[k]
    cent = np.stack([fg.sum_rows[k], fg.sum_cols[k]], 1) / np.maximum(counts, 1)[:, None] if counts.size else np.zeros((0, 2))
    return CleanMask(n=int(k.sum()), counts=counts, centroids=cent, bboxes=fg.bboxes[k])



def write_rows_tiff(
    path: str,
    read: Reader,
    shape: tuple[int, int],
    dtype: object,
    *,
    tile: int = 256,
    **kwargs: object,
) -> None:
    """Write a ``(rows, cols)`` map read in row strips as a tiled, zlib-compressed TIFF page.

    ``read(row0, row1)`` gives the rows (any array-like); memory is one strip of ``tile`` rows.
    ``kwargs`` go to :func:`tifffile.imwrite` (``resolution``, ``metadata``...). Not atomic by
    itself: write to a temporary path (:func:`napari_pathoseg._atomic.atomic_path`).
    """
    import tifffile

    rows, cols = int(shape[0]), int(shape[1])
    dt = np.dtype(dtype)

    def tiles() -> Iterator[np.ndarray]:
        for r in range(0, rows, tile):
            strip = np.asarray(read(r, min(rows, r + tile)), dt)
            for c in range(0, cols, tile):
                t = np.zeros((tile, tile), dt)
                blk = strip[:, c:c + tile]
                t[:blk.shape[0], :blk.shape[1]] = blk
                yield t

    tifffile.imwrite(path, tiles(), shape=(rows, cols), dtype=dt, tile=(tile, tile), compression="zlib", **kwargs)
