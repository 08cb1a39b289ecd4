"""Rendering a planned mosaic: any region of the RGB slide or its labels, from resampled source tiles.

:class:`MosaicRenderer` is the tile source of both pyramids a mosaic is written as
(:mod:`napari_pathoseg.wsi.mosaic`). It reads a :class:`~napari_pathoseg.wsi.mosaic_layout.MosaicLayout`
and draws each cell from its source tile, resampled once to the target µm/px
(:func:`resample_tile`) and kept in a byte-budgeted LRU; glass outside the tissue outline comes
from the cell's glass tile (or plain grey). While the level-0 labels are rendered it counts the
pixels of every label and the tissue pixels of every cell, for the ground-truth summaries.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterator

import numpy as np

from napari_pathoseg.wsi.mosaic_layout import MosaicLayout, resampled_shape
from napari_pathoseg.wsi.mosaic_sources import MosaicDataError, MosaicDataset

__all__ = ["resample_tile", "MosaicRenderer"]


def resample_tile(image: np.ndarray, scale: float, *, order: int) -> np.ndarray:
    """Resample a source tile by ``scale`` (source µm/px over target µm/px).

    Both orders map output pixel centres the same way (output ``i`` covers source
    ``(i + 0.5) / scale - 0.5``), so an image and its mask stay aligned.

    Parameters
    ----------
    image : (rows, cols[, 3]) uint8
    scale : float
        Output size is ``round(rows * scale)`` x ``round(cols * scale)`` (half to even).
    order : {0, 1}
        1: bilinear (Pillow; the filter widens when shrinking, so no aliasing) for RGB.
        0: nearest, the source pixel holding each output pixel's centre, for masks and labels.

    Returns
    -------
    (round(rows * scale), round(cols * scale)[, 3]) uint8
        ``image`` itself when the size does not change.

    Examples
    --------
    >>> resample_tile(np.array([[0, 1], [2, 3]], np.uint8), 2.0, order=0)
    array([[0, 0, 1, 1],
           [0, 0, 1, 1],
           [2, 2, 3, 3],
           [2, 2, 3, 3]], dtype=uint8)
    """
    image = np.asarray(image)
    out_h, out_w = resampled_shape(image.shape[0], image.shape[1], scale)
    if (out_h, out_w) == image.shape[:2]:
        return image
    if order == 0:
        rr = np.minimum(((np.arange(out_h) + 0.5) / scale).astype(np.int64), image.shape[0] - 1)
        cc = np.minimum(((np.arange(out_w) + 0.5) / scale).astype(np.int64), image.shape[1] - 1)
        return image[rr[:, None], cc[None, :]]
    if order != 1 or image.dtype != np.uint8:
        raise ValueError(f"resample_tile: order 1 needs uint8 (rows, cols[, 3]) input, got order {order}, {image.dtype}")
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((out_w, out_h), Image.BILINEAR))


class _SourceCache:
    """Resampled source images and masks, least recently used dropped beyond ``budget`` bytes."""

    def __init__(self, ds: MosaicDataset, scale: float, budget: int) -> None:
        self.ds, self.scale, self.budget = ds, scale, budget
        self.items: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()
        self.nbytes = 0

    def get(self, index: int, what: str) -> np.ndarray:
        key = (index, what)
        arr = self.items.get(key)
        if arr is not None:
            self.items.move_to_end(key)
            return arr
        arr = self._load(index, what)
        self.items[key] = arr
        self.nbytes += arr.nbytes
        while self.nbytes > self.budget and len(self.items) > 1:
            _, old = self.items.popitem(last=False)
            self.nbytes -= old.nbytes
        return arr

    def _load(self, index: int, what: str) -> np.ndarray:
        from PIL import Image

        t = self.ds.tiles[index]
        path = self.ds.folder / (t.image if what == "rgb" else t.mask)
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB") if what == "rgb" else im)
        except (OSError, ValueError) as exc:
            raise MosaicDataError(f"{path}: cannot read ({exc}); restore the data set's files") from exc
        if arr.shape[:2] != (t.height, t.width):
            raise MosaicDataError(f"{path}: {arr.shape[1]} x {arr.shape[0]} px, index.csv says {t.width} x {t.height}; fix the index")
        if what == "mask":
            if arr.ndim != 2 or arr.dtype != np.uint8:
                raise MosaicDataError(f"{path}: expected a single-channel uint8 mask, got {arr.shape} {arr.dtype}")
            if int(arr.max()) >= len(t.lut):
                raise MosaicDataError(f"{path}: mask value {int(arr.max())}, expected 0..{len(t.lut) - 1}")
            arr = np.asarray(t.lut, np.uint8)[arr]
        return resample_tile(arr, self.scale, order=1 if what == "rgb" else 0)


def _runs(start: int, step: int, n: int, cell: int, n_cells: int) -> Iterator[tuple[int, slice, int]]:
    """Split the samples ``start + step * t`` (t < n) by cell: (cell index, sample slice, first offset in the cell)."""
    t = 0
    while t < n:
        pos = start + step * t
        i = pos // cell
        if i >= n_cells:
            return
        end = (i + 1) * cell  # first position of the next cell
        t_end = min(n, -(-(end - start) // step))
        yield i, slice(t, t_end), pos - i * cell
        t = t_end


class MosaicRenderer:
    """Render any region of a planned mosaic at any level: RGB (level 0) or labels (any level).

    Level ``k`` pixel ``(r, c)`` shows the level-0 pixel at its centre,
    ``(r * 2**k + 2**(k-1), c * 2**k + 2**(k-1))`` (level 0: itself).

    Parameters
    ----------
    ds : MosaicDataset
    layout : MosaicLayout
    cache_mb : float, optional
        Budget of resampled source images kept in memory. Default: enough for the tiles of two
        rows of cells (rows are drawn in turn, so they are not resampled again), 32-512 MB.
    """

    def __init__(self, ds: MosaicDataset, layout: MosaicLayout, *, cache_mb: float | None = None) -> None:
        self.ds, self.layout = ds, layout
        scale = ds.mpp / layout.mpp
        if cache_mb is None:
            per_tile = np.median([np.prod(resampled_shape(t.height, t.width, scale)) * (4 if t.mask else 3) for t in ds.tiles])
            budget = int(np.clip(2 * layout.n_cols * per_tile, 32 * 2**20, 512 * 2**20))
        else:
            budget = int(cache_mb * 2**20)
        self.cache = _SourceCache(ds, scale, budget)
        #: Level-0 pixels inside the outline per cell, filled by the level-0 label pass.
        self.inside_px = np.zeros((layout.n_rows, layout.n_cols), np.int64)
        #: Level-0 pixels per label id, filled by the level-0 label pass.
        self.label_px = np.zeros(256, np.int64)

    def _samples(self, level: int, row: int, col: int, h: int, w: int) -> tuple[int, int, int]:
        k = 2**level
        off = k // 2 if level else 0
        return row * k + off, col * k + off, k

    def rgb(self, level: int, row: int, col: int, h: int, w: int) -> np.ndarray:
        """The ``(h, w, 3)`` uint8 RGB of ``level`` at ``(row, col)``."""
        return self._render(level, row, col, h, w, rgb=True)

    def labels(self, level: int, row: int, col: int, h: int, w: int) -> np.ndarray:
        """The ``(h, w)`` uint8 labels of ``level`` at ``(row, col)``; level 0 also counts pixels."""
        out = self._render(level, row, col, h, w, rgb=False)
        if level == 0:
            self.label_px += np.bincount(out.ravel(), minlength=256)
        return out

    def _render(self, level: int, row: int, col: int, h: int, w: int, *, rgb: bool) -> np.ndarray:
        L = self.layout
        r0, c0, k = self._samples(level, row, col, h, w)
        inside = L.inside(r0, c0, k, h, w)  # (h, w) bool: within the tissue outline
        out = np.empty((h, w, 3) if rgb else (h, w), np.uint8)
        cp = L.cell_px
        for i, rs, ri in _runs(r0, k, h, cp, L.n_rows):
            nr = rs.stop - rs.start
            for j, cs, cj in _runs(c0, k, w, cp, L.n_cols):
                nc = cs.stop - cs.start
                sl = (slice(ri, ri + k * (nr - 1) + 1, k), slice(cj, cj + k * (nc - 1) + 1, k))
                sub = inside[rs, cs]
                # 0: glass only, 1: cut by the outline, 2: all tissue
                state = 0 if not L.tissue[i, j] else (2 if sub.all() else int(sub.any()))
                view = out[rs, cs]
                if rgb:
                    if state == 2:
                        view[...] = self._tissue(i, j, sl, "rgb")
                        continue
                    view[...] = self._glass(i, j, sl, (nr, nc))
                    if state == 1:
                        np.copyto(view, self._tissue(i, j, sl, "rgb"), where=sub[..., None])
                    continue
                if level == 0 and state:
                    self.inside_px[i, j] += nr * nc if state == 2 else int(sub.sum())
                if state == 0:
                    view[...] = 0
                    continue
                t = self.ds.tiles[L.source[i, j]]
                value = t.lut[0] if t.mask is None else self._tissue(i, j, sl, "mask")
                if state == 2:
                    view[...] = value
                else:
                    view[...] = 0
                    np.copyto(view, value, where=sub)
        return out

    def _tissue(self, i: int, j: int, sl: tuple[slice, slice], what: str) -> np.ndarray:
        L = self.layout
        src = self.cache.get(int(L.source[i, j]), what)
        a, b = int(L.crop[i, j, 0]), int(L.crop[i, j, 1])
        return src[a + sl[0].start : a + sl[0].stop : sl[0].step, b + sl[1].start : b + sl[1].stop : sl[1].step]

    def _glass(self, i: int, j: int, sl: tuple[slice, slice], shape: tuple[int, int]) -> np.ndarray:
        L = self.layout
        g = int(L.glass[i, j])
        if g < 0:
            return np.full(shape + (3,), L.glass_value, np.uint8)
        src = self.cache.get(g, "rgb")
        a, b = int(L.glass_crop[i, j, 0]), int(L.glass_crop[i, j, 1])
        return src[a + sl[0].start : a + sl[0].stop : sl[0].step, b + sl[1].start : b + sl[1].stop : sl[1].step]
