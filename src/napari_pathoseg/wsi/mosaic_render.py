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

    Parameters
    ----------
    image : (rows, cols[, 3]) uint8
    scale : float
        Output size is ``round(rows * scale)`` x ``round(cols * scale)``.
    order : {0, 1}
        1 (bilinear, Gaussian anti-aliasing when shrinking) for RGB, 0 (nearest) for masks.

    Returns
    -------
    (round(rows * scale), round(cols * scale)[, 3]) uint8
        ``image`` itself when ``scale`` is 1.
    """
    from skimage.transform import resize

    image = np.asarray(image)
    out_shape = resampled_shape(image.shape[0], image.shape[1], scale)
    if out_shape == image.shape[:2]:
        return image
    res = resize(
        image,
        out_shape + image.shape[2:],
        order=order,
        mode="reflect",
        anti_aliasing=bool(order > 0 and scale < 1),
        preserve_range=True,
    )
    if order == 0:
        return res.astype(image.dtype)
    return np.clip(np.rint(res), 0, 255).astype(np.uint8)


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
    cache_mb : float
        Budget of resampled source images kept in memory.
    """

    def __init__(self, ds: MosaicDataset, layout: MosaicLayout, *, cache_mb: float = 256.0) -> None:
        self.ds, self.layout = ds, layout
        self.cache = _SourceCache(ds, ds.mpp / layout.mpp, int(cache_mb * 2**20))
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
                m = inside[rs, cs] & bool(L.tissue[i, j])
                if rgb:
                    out[rs, cs] = self._glass(i, j, sl, (nr, nc))
                    if m.any():
                        out[rs, cs][m] = self._tissue(i, j, sl, "rgb")[m]
                else:
                    if level == 0:
                        self.inside_px[i, j] += int(m.sum())
                    block = np.zeros((nr, nc), np.uint8)
                    if m.any():
                        t = self.ds.tiles[L.source[i, j]]
                        if t.mask is None:
                            block[m] = t.lut[0]
                        else:
                            block[m] = self._tissue(i, j, sl, "mask")[m]
                    out[rs, cs] = block
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
