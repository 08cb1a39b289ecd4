"""Fast per-pixel colour mappings: an exact 256³ colour look-up table.

Once a normaliser knows both the source and the target stain parameters, every method
here (Macenko, Vahadane, Reinhard, stain augmentation) is a fixed function of a pixel's
RGB value alone. :class:`ColourMap` evaluates such a function either directly or, for
large images and whole slides, through a table holding the result for all 2^24 colours
(64 MiB, 4 bytes per colour). Applying the table costs one index computation and one
gather per pixel, independent of the method.

The table index of a pixel is read straight from the image bytes: a big-endian 4-byte
view starting at every pixel's first byte gives ``R<<24 | G<<16 | B<<8 | next``, and a
shift by 8 leaves ``R<<16 | G<<8 | B``.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import numpy as np

__all__ = ["ColourMap", "separable_tables"]

logger = logging.getLogger(__name__)

N_COLOURS = 1 << 24
#: Pixels per chunk when applying the table (bounds the temporaries to ~12 MiB).
APPLY_CHUNK = 1 << 20
#: Pixels per chunk of the direct separable evaluation: its float temporaries then stay
#: in the CPU cache (1.5x faster than 1M-pixel chunks).
DIRECT_CHUNK = 1 << 15
#: Below this many pixels a separable map uses three per-channel tables directly.
SMALL_IMAGE = 1 << 17
#: Colours evaluated per chunk when filling a table from a generic function.
BUILD_CHUNK = 1 << 18
#: Generic maps are applied through the table (built on first need, by sampling the
#: function on a grid of 86³ colours, see :meth:`ColourMap._fill_interpolated`) for
#: images of at least this many pixels. Separable maps are evaluated directly (as fast
#: as building a table) unless the table was built explicitly, as whole slides do.
LUT_MIN_PIXELS_GENERIC = 1 << 20
#: Grid step (grey levels) of the sampled function for generic maps; 255 = 85 * 3.
GRID_STEP = 3

PixelFunction = Callable[[np.ndarray], np.ndarray]


def separable_tables(matrix: np.ndarray, *, io_in: float, io_out: float) -> np.ndarray:
    """Per-channel factor tables of a linear optical-density map.

    For ``OD_out = OD_in @ matrix`` with ``OD = -log((I + 1) / io)``, each output
    channel is a product of one factor per input channel:
    ``I_out[c] + 1 = io_out * prod_k ((I_in[k] + 1) / io_in) ** matrix[k, c]``.

    Parameters
    ----------
    matrix : (3, 3) array
        Rows: input channels, columns: output channels.
    io_in, io_out : float

    Returns
    -------
    (3, 3, 256) float32
        ``tables[k, c, v]``; the factor ``io_out`` is folded into ``k = 0``.
    """
    v = (np.arange(256, dtype=np.float64) + 1.0) / float(io_in)
    tables = v[None, None, :] ** np.asarray(matrix, np.float64)[:, :, None]
    tables[0] *= float(io_out)
    return tables.astype(np.float32)


def _to_uint8(values: np.ndarray, *, offset: float) -> np.ndarray:
    """Round float values (minus ``offset``) into 0..255 uint8 (in place on ``values``)."""
    values += 0.5 - offset
    np.clip(values, 0.0, 255.0, out=values)
    return values.astype(np.uint8)


def _interp_weights(n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower node index and weight of the upper node for every level 0..255."""
    v = np.arange(256, dtype=np.float32) / GRID_STEP
    lo = np.minimum(np.floor(v).astype(np.intp), n_nodes - 2)
    return lo, (v - lo).astype(np.float32)


def _packed_index(flat_bytes: np.ndarray, n: int, out: np.ndarray) -> np.ndarray:
    """``R<<16 | G<<8 | B`` of ``n`` pixels stored as contiguous RGB bytes, into int64 ``out``."""
    if n > 1:
        view = np.ndarray((n - 1,), dtype=">u4", buffer=flat_bytes, strides=(3,))
        np.right_shift(view, 8, out=out[: n - 1])
    last = flat_bytes[3 * n - 3 : 3 * n].astype(np.int64)
    out[n - 1] = (last[0] << 16) | (last[1] << 8) | last[2]
    return out[:n]


class ColourMap:
    """A fixed RGB uint8 -> RGB uint8 mapping, applied directly or through a 256³ table.

    Parameters
    ----------
    function : callable, optional
        ``function(pixels (N, 3) uint8) -> (N, 3) uint8``; evaluated on every colour to
        build the table. Not needed when ``tables`` is given.
    tables : (3, 3, 256) float32, optional
        Factor tables of a separable map (see :func:`separable_tables`): each output
        channel is ``prod_k tables[k, c, I[k]] - offset``. Applied directly with 9 small
        look-ups per pixel, and the full table is built by outer products (fast).
    offset : float
        Subtracted after the product of ``tables`` (1.0 for the ``I + 1`` convention).
    name : str
        For logs.

    Notes
    -----
    Thread-safe: the table is built once, under a lock, by the first caller that needs
    it; dask threads can then apply it concurrently. Separable maps get an exact table;
    generic ones a table interpolated from a coarse grid (within a few grey levels).
    """

    def __init__(
        self,
        function: PixelFunction | None = None,
        *,
        tables: np.ndarray | None = None,
        offset: float = 1.0,
        name: str = "colour map",
    ) -> None:
        if function is None and tables is None:
            raise ValueError("ColourMap needs a function or separable tables")
        self._function = function
        self._tables = None if tables is None else np.ascontiguousarray(tables, np.float32)
        self._rg_tables: np.ndarray | None = None
        self._offset = float(offset)
        self.name = name
        self._lut: np.ndarray | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ properties
    @property
    def has_lut(self) -> bool:
        """Whether the 256³ table has been built."""
        return self._lut is not None

    @property
    def lut(self) -> np.ndarray:
        """The ``(2**24,)`` uint32 table (bytes R, G, B, 0 of each mapped colour); built on demand."""
        return self.build_lut()

    @property
    def _rg(self) -> np.ndarray:
        """(R, G) factor tables per output channel, ``(3, 65536)`` float32 (built once)."""
        if self._rg_tables is None:
            t = self._tables
            self._rg_tables = np.stack([(t[0, c][:, None] * t[1, c][None, :]).reshape(-1) for c in range(3)])
        return self._rg_tables

    # ------------------------------------------------------------------ evaluation
    def map_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Evaluate the mapping directly on ``(N, 3)`` uint8 pixels (no 256³ table).

        A separable map uses a (R, G) table per output channel (256 KiB, cache
        resident) times a B table: two look-ups and a product per channel, with the
        (R, G) index read from the pixel bytes (a big-endian 2-byte view).
        """
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8).reshape(-1, 3)
        if self._tables is None:
            return np.asarray(self._function(pixels), dtype=np.uint8).reshape(-1, 3)  # type: ignore[misc]
        n = pixels.shape[0]
        out = np.empty((n, 3), np.uint8)
        if n < SMALL_IMAGE:  # not worth building the (R, G) tables: three look-ups
            t = self._tables
            for c in range(3):
                val = t[0, c][pixels[:, 0]]
                val *= t[1, c][pixels[:, 1]]
                val *= t[2, c][pixels[:, 2]]
                np.clip(val, self._offset - 0.5, 255.0 + self._offset - 0.5, out=val)
                val += 0.5 - self._offset
                out[:, c] = val
            return out
        flat = pixels.reshape(-1)
        for p0 in range(0, n, DIRECT_CHUNK):
            m = min(DIRECT_CHUNK, n - p0)
            rg = np.ndarray((m,), dtype=">u2", buffer=flat[3 * p0 : 3 * (p0 + m)], strides=(3,)).astype(np.intp)
            b = pixels[p0 : p0 + m, 2].astype(np.intp)
            val = np.empty(m, np.float32)
            tmp = np.empty(m, np.float32)
            for c in range(3):
                np.take(self._rg[c], rg, out=val)
                np.take(self._tables[2, c], b, out=tmp)
                val *= tmp
                np.clip(val, self._offset - 0.5, 255.0 + self._offset - 0.5, out=val)
                val += 0.5 - self._offset  # in [0, 255]: truncation rounds
                out[p0 : p0 + m, c] = val
        return out

    def build_lut(self) -> np.ndarray:
        """Build (once) and return the ``(2**24,)`` uint32 table."""
        if self._lut is not None:
            return self._lut
        with self._lock:
            if self._lut is None:
                import time

                t0 = time.perf_counter()
                lut = np.zeros(N_COLOURS, np.uint32)
                lut8 = lut.view(np.uint8).reshape(256, 256, 256, 4)
                if self._tables is not None:
                    for r0 in range(0, 256, 32):
                        for c in range(3):
                            rg = self._rg[c].reshape(256, 256)[r0 : r0 + 32, :, None]
                            slab = rg * self._tables[2, c, None, None, :]
                            lut8[r0 : r0 + 32, :, :, c] = _to_uint8(slab, offset=self._offset)
                else:
                    self._fill_interpolated(lut8)
                self._lut = lut
                logger.debug("%s: built the 256^3 colour table in %.2f s", self.name, time.perf_counter() - t0)
        return self._lut  # type: ignore[return-value]

    def _fill_interpolated(self, lut8: np.ndarray) -> None:
        """Fill the table from the function sampled on a coarse grid, trilinearly.

        The function is evaluated at every ``GRID_STEP``-th level of each channel
        (86³ colours for a step of 3) and interpolated separably along R, B, then G,
        one output R plane at a time (bounded temporaries).
        All mappings here are continuous, so the error is a fraction of a grey level
        except near the kinks of clipping (at most a few levels).
        """
        nodes = np.arange(0, 256, GRID_STEP)
        n = nodes.size
        grid = np.stack(np.meshgrid(nodes, nodes, nodes, indexing="ij"), axis=-1).astype(np.uint8)
        coarse = np.zeros((n * n * n, 4), np.float32)  # RGB + padding byte
        flat = grid.reshape(-1, 3)
        for start in range(0, flat.shape[0], BUILD_CHUNK):
            coarse[start : start + BUILD_CHUNK, :3] = self.map_pixels(flat[start : start + BUILD_CHUNK])
        # values stay in [0.5, 255.5] under interpolation: truncation then rounds
        coarse += 0.5
        coarse = coarse.reshape(n, n, n, 4)
        lo, frac = _interp_weights(n)
        hi = lo + 1
        keep = 1.0 - frac
        wb_lo, wb_hi = keep[None, :, None], frac[None, :, None]
        wg_lo, wg_hi = keep[:, None, None], frac[:, None, None]
        lut32 = lut8.reshape(-1).view(np.uint32).reshape(256, 256 * 256)
        for r in range(256):
            cr = coarse[lo[r]] * keep[r] + coarse[hi[r]] * frac[r]  # (n, n, 4) along R
            cb = cr[:, lo] * wb_lo + cr[:, hi] * wb_hi  # (n, 256, 4) along B
            cg = cb[lo] * wg_lo  # (256, 256, 4) along G
            cg += cb[hi] * wg_hi
            lut32[r] = cg.astype(np.uint8).reshape(-1).view(np.uint32)

    def apply_lut(self, image: np.ndarray) -> np.ndarray:
        """Map ``(..., 3)`` uint8 pixels through the table (building it if needed)."""
        lut = self.build_lut()
        img = np.ascontiguousarray(image, dtype=np.uint8)
        flat = img.reshape(-1)
        n = flat.size // 3
        out = np.empty((n, 3), np.uint8)
        step = min(APPLY_CHUNK, max(n, 1))
        idx = np.empty(step, np.int64)
        packed = np.empty(step, np.uint32)
        for p0 in range(0, n, step):
            m = min(step, n - p0)
            ix = _packed_index(flat[3 * p0 : 3 * (p0 + m)], m, idx)
            np.take(lut, ix, out=packed[:m])
            out[p0 : p0 + m] = packed[:m].view(np.uint8).reshape(m, 4)[:, :3]
        return out.reshape(img.shape)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Map ``(..., 3)`` uint8 pixels: through the table when built (or large and generic).

        Returns
        -------
        (..., 3) uint8
        """
        image = np.asarray(image)
        n = image.size // 3
        if self._lut is not None or (self._tables is None and n >= LUT_MIN_PIXELS_GENERIC):
            return self.apply_lut(image)
        return self.map_pixels(image.reshape(-1, 3)).reshape(image.shape)
