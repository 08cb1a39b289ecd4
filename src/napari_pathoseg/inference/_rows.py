"""Row-streamed outputs: what lets a whole-slide map use memory bounded by the tiles in flight.

The engine runs tiles in row-major order, so once a batch is done every output row above the
next tile's first row is final. A sink accumulates into a :class:`RowBand` (the few rows tiles
can still touch, in memory) and moves final rows to a :class:`RowStore` (the whole output: an
array in memory, or a ``.npy`` file written with ``os.pwrite``, never memory-mapped while it is
written, so the page cache, not the process, holds it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RowBand", "RowStore"]

#: Rows per block when a run of rows no tile touched is written out (at most).
FILL_ROWS = 256

#: Values per such block (rows x cols x channels): the block shrinks as the slide widens, so
#: memory stays flat however wide the output is.
FILL_VALUES = 1 << 20


class RowStore:
    """A ``(rows, cols[, C])`` array written once, in row strips, from top to bottom.

    Parameters
    ----------
    shape : tuple of int
        Full shape.
    dtype : numpy dtype
    path : path, optional
        A ``.npy`` file to write (then :meth:`array` memory-maps it once it is complete);
        without it the array lives in memory.
    """

    def __init__(self, shape: Sequence[int], dtype: Any, *, path: str | os.PathLike | None = None) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.path = Path(path) if path is not None else None
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._mem: np.ndarray | None = None
        self._fd: int | None = None
        self._offset = 0
        self._array: np.ndarray | None = None
        if self.path is None:
            self._mem = np.zeros(self.shape, self.dtype)
            return
        with open(self.path, "wb") as fh:
            header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
            np.lib.format.write_array_header_2_0(fh, header)
            self._offset = fh.tell()
            fh.truncate(self._offset + self._row_bytes * self.shape[0])  # sparse until written
        self._fd = os.open(self.path, os.O_RDWR)

    def write(self, row: int, block: np.ndarray) -> None:
        """Write ``block`` (``(n, cols[, C])``) as rows ``row .. row + n``."""
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if self._mem is not None:
            self._mem[row : row + block.shape[0]] = block
        else:
            os.pwrite(self._fd, block.tobytes(), self._offset + row * self._row_bytes)

    def read(self, row0: int, row1: int) -> np.ndarray:
        """Rows ``row0 .. row1`` (a copy read from the file, or a view of the array in memory)."""
        row0, row1 = max(0, row0), min(self.shape[0], row1)
        if self._mem is not None:
            return self._mem[row0:row1]
        fd = self._fd if self._fd is not None else os.open(self.path, os.O_RDONLY)
        try:
            raw = os.pread(fd, (row1 - row0) * self._row_bytes, self._offset + row0 * self._row_bytes)
        finally:
            if fd is not self._fd:
                os.close(fd)
        return np.frombuffer(raw, self.dtype).reshape((row1 - row0,) + self.shape[1:])

    def close(self) -> None:
        """Stop writing (the file stays; :meth:`read` and :meth:`array` keep working)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def array(self) -> np.ndarray:
        """The whole output: the in-memory array, or a writable memory map of the file."""
        if self._mem is not None:
            return self._mem
        if self._array is None:
            self.close()
            self._array = np.load(self.path, mmap_mode="r+")
        return self._array


class RowBand:
    """The rows of some accumulators that tiles can still touch, from ``top`` down.

    Parameters
    ----------
    rows : int
        Rows of the full output.
    parts : sequence of (tail_shape, dtype, fill)
        One accumulator per entry, each ``(rows,) + tail_shape`` in full, kept in memory only
        from ``top`` to the lowest row asked for so far.

    The rows live in a buffer at an offset that moves down as rows are released (no copy);
    when the buffer runs out, the live rows move back to its start.
    """

    def __init__(self, rows: int, parts: Sequence[tuple[tuple[int, ...], Any, float]]) -> None:
        self.rows = int(rows)
        self.top = 0
        self.height = 0  # rows held from ``top``
        self._off = 0  # buffer row of ``top``
        self._parts = [(tuple(t), np.dtype(d), f) for t, d, f in parts]
        self._buf = [np.full((0,) + t, f, d) for t, d, f in self._parts]
        row_values = max([int(np.prod(t, dtype=np.int64)) for t, _, _ in self._parts] or [1])
        self._fill_rows = max(1, min(FILL_ROWS, FILL_VALUES // max(1, row_values)))
        #: Most rows the buffer ever held.
        self.peak = 0

    def window(self, row0: int, row1: int) -> list[np.ndarray]:
        """Views of rows ``row0 .. row1`` of every accumulator (``row0 >= top``)."""
        if row0 < self.top:
            raise ValueError(f"rows from {row0} were already released (top is {self.top}); tiles must come in row order")
        need = min(row1, self.rows) - self.top
        if need > self.height:
            cap = self._buf[0].shape[0]
            if self._off + need > cap:
                new_cap = max(cap, need)  # steady state: one tile row plus the next, no slack
                grown = []
                for (tail, dtype, fill), old in zip(self._parts, self._buf):
                    arr = old if new_cap == cap else np.full((new_cap,) + tail, fill, dtype)
                    live = old[self._off : self._off + self.height].copy()
                    arr[: self.height] = live
                    arr[self.height :] = fill
                    grown.append(arr)
                self._buf, self._off = grown, 0
                self.peak = max(self.peak, new_cap)
            self.height = need
        return [b[self._off + row0 - self.top : self._off + row1 - self.top] for b in self._buf]

    def pop(self, upto: int) -> Iterator[tuple[int, list[np.ndarray]]]:
        """Release rows ``top .. upto``: yield ``(row0, blocks)`` strips of them, top to bottom.

        The blocks are the buffer's own rows (use them before asking for more rows); rows
        never asked for come back as fresh fill blocks, so a long run of untouched rows costs
        no memory. Blocks have at most :data:`FILL_ROWS` rows and :data:`FILL_VALUES` values,
        so what a sink does with them costs the same however wide the output is.
        """
        upto = min(int(upto), self.rows)
        while self.top < upto:
            k = min(upto - self.top, self._fill_rows)
            if self.height > 0:
                k = min(k, self.height)
                blocks = [b[self._off : self._off + k] for b in self._buf]
                self._off += k
                self.height -= k
            else:
                blocks = [np.full((k,) + t, f, dt) for t, dt, f in self._parts]
            row0 = self.top
            self.top += k
            yield row0, blocks
