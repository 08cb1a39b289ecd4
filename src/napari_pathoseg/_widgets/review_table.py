"""The Review dock's tile table and score threshold.

* :class:`TileTable`: one row per candidate tile (id, score, nuclei, state, edited, x, y),
  sortable by any column (numbers sort as numbers); a plain ``A`` / ``R`` key press in the
  table asks for the current tile to be accepted / rejected (:attr:`TileTable.state_key`),
  before the table's own keyboard search sees the key;
* the threshold slider's scale: slider value ``v`` <-> tile-score threshold
  ``0.5 + 0.5 * v / SLIDER_STEPS`` (:func:`threshold_to_slider`, :func:`slider_to_threshold`);
* :func:`is_plain_key`: a key press without Shift / Ctrl / Alt / Meta, written with the scoped
  Qt enums so that it runs the same under PyQt5, PyQt6 and PySide6 (PyQt6's modifiers are
  an :class:`enum.Flag`, which ``int`` refuses).
"""

from __future__ import annotations

from typing import Any, Iterable

from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QKeyEvent
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QTableWidget, QTableWidgetItem, QWidget

__all__ = [
    "COLUMNS",
    "SLIDER_STEPS",
    "TileTable",
    "is_plain_key",
    "slider_to_threshold",
    "threshold_to_slider",
]

COLUMNS = ("tile", "score", "nuclei", "state", "edited", "x", "y")
#: Columns holding numbers (right-aligned).
_NUMERIC = frozenset({1, 2, 5, 6})
#: Resolution of the threshold slider: 0.5 .. 1.0 in this many steps.
SLIDER_STEPS = 1000

#: Modifiers that make a key press a shortcut chord rather than a plain key (the keypad
#: modifier is not one of them: ``A`` typed on any keyboard is plain).
_CHORD = (
    Qt.KeyboardModifier.ShiftModifier
    | Qt.KeyboardModifier.ControlModifier
    | Qt.KeyboardModifier.AltModifier
    | Qt.KeyboardModifier.MetaModifier
)
#: Plain keys of the table and the review state each one sets.
STATE_KEYS = {Qt.Key.Key_A: "accepted", Qt.Key.Key_R: "rejected"}


def is_plain_key(event: QKeyEvent) -> bool:
    """True when ``event`` was pressed without Shift, Ctrl, Alt or Meta (any Qt binding)."""
    return not (event.modifiers() & _CHORD)


def threshold_to_slider(threshold: float) -> int:
    """Slider value of a tile-score ``threshold`` (clipped to 0.5 .. 1.0)."""
    return int(round(min(max((threshold - 0.5) / 0.5, 0.0), 1.0) * SLIDER_STEPS))


def slider_to_threshold(value: int) -> float:
    """Tile-score threshold of a slider ``value`` (0 -> 0.5, which keeps every tile)."""
    return round(0.5 + 0.5 * value / SLIDER_STEPS, 4)


class TileTable(QTableWidget):
    """The candidate tiles of a review project, one row each, sortable by any column.

    Signals
    -------
    state_key : str
        ``"accepted"`` / ``"rejected"``: a plain A / R was pressed in the table.
    """

    state_key = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(0, len(COLUMNS), parent)
        self.setHorizontalHeaderLabels(list(COLUMNS))
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.verticalHeader().setVisible(False)
        self.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        # click a header to sort (e.g. by nuclei: the most confident tiles are often near-empty);
        # the default is by score, highest first; A / R / the next-tile step follow the table's order
        self.setSortingEnabled(True)
        self.sortByColumn(COLUMNS.index("score"), Qt.SortOrder.DescendingOrder)
        self.setMinimumHeight(180)

    # ------------------------------------------------------------------ rows
    def fill(self, records: Iterable[Any], *, select: str | None = None) -> None:
        """Replace the rows by ``records`` (sorted by the current sort column); select ``select``.

        No selection signal is emitted.
        """
        records = list(records)
        blocked = self.blockSignals(True)
        try:
            self.setSortingEnabled(False)  # rows must not move while they are filled
            self.setRowCount(0)
            self.setRowCount(len(records))
            for row, rec in enumerate(records):
                self._fill_row(row, rec)
            self.setSortingEnabled(True)
            row = self.row_of(select) if select is not None else None
            if row is not None:
                self.selectRow(row)
        finally:
            self.blockSignals(blocked)

    def _fill_row(self, row: int, rec: Any) -> None:
        # numbers are stored as numbers, so sorting by a column sorts them numerically
        values = (rec.tile_id, round(float(rec.score), 4), int(rec.n_nuclei), rec.state,
                  "yes" if rec.edited else "", int(rec.x), int(rec.y))
        for col, value in enumerate(values):
            item = QTableWidgetItem()
            item.setData(Qt.ItemDataRole.DisplayRole, value)
            if col in _NUMERIC:
                item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            self.setItem(row, col, item)

    def update_record(self, rec: Any) -> None:
        """Rewrite the cells of ``rec``'s row in place (no signal, the row does not move)."""
        row = self.row_of(rec.tile_id)
        if row is None:
            return
        blocked = self.blockSignals(True)
        sorting = self.isSortingEnabled()
        try:
            self.setSortingEnabled(False)  # keep the row in place while its cells change
            self._fill_row(row, rec)
        finally:
            self.setSortingEnabled(sorting)
            self.blockSignals(blocked)

    def tile_ids(self) -> list[str]:
        """Ids of the rows, top to bottom."""
        return [self.item(r, 0).text() for r in range(self.rowCount())]

    def row_of(self, tile_id: str) -> int | None:
        """Row of ``tile_id``, or None when it is not in the table."""
        for r in range(self.rowCount()):
            if self.item(r, 0).text() == tile_id:
                return r
        return None

    def selected_tile(self) -> str | None:
        """Id of the selected row, or None."""
        rows = self.selectionModel().selectedRows()
        return self.item(rows[0].row(), 0).text() if rows else None

    # ------------------------------------------------------------------ keys
    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802 (Qt name)
        """A / R set the current tile's state (before the table's keyboard search)."""
        state = STATE_KEYS.get(event.key()) if is_plain_key(event) else None
        if state is None:
            super().keyPressEvent(event)
            return
        event.accept()
        self.state_key.emit(state)
