"""A small live plot of a training run, drawn with QPainter (no plotting library).

:class:`LossPlot` shows the per-step loss (left axis, orange), the per-epoch validation AJI
(right axis 0..1, blue points) and, when the run fine-tunes a model, that base model's AJI on
the same validation images as a dashed line, so the new model is seen against its base.
"""

from __future__ import annotations

import math
from typing import Any

from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QWidget

__all__ = ["LossPlot"]


class LossPlot(QWidget):
    """Per-step loss, per-epoch validation AJI and the base model's AJI.

    Attributes
    ----------
    steps : list of (global step, loss)
    epochs : list of (global step at the epoch's end, AJI)
    base_aji : float or None
        The base model's validation AJI (dashed line), None without a base.
    note : str
        A short state shown in the corner ("validating…").
    """

    LOSS_COLOR = QColor(230, 120, 40)
    AJI_COLOR = QColor(60, 160, 230)
    BASE_COLOR = QColor(170, 170, 170)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.steps: list[tuple[int, float]] = []
        self.epochs: list[tuple[int, float]] = []
        self.base_aji: float | None = None
        self.note = ""
        self.total_steps = 1
        self.setMinimumHeight(130)
        self.setToolTip(
            "orange: segmentation loss per step; blue: validation AJI per epoch (right axis, 0-1); "
            "dashed: the base model's AJI on the same validation images"
        )

    # ------------------------------------------------------------------ data
    def clear(self, total_steps: int = 1) -> None:
        """Forget the curves; the x axis spans ``total_steps``."""
        self.steps, self.epochs, self.base_aji, self.note = [], [], None, ""
        self.total_steps = max(1, int(total_steps))
        self.update()

    def add_step(self, step: int, loss: float) -> None:
        """Add the loss of global step ``step`` (non-finite values are skipped)."""
        if math.isfinite(loss):
            self.steps.append((int(step), float(loss)))
            self.update()

    def add_epoch(self, step: int, aji: float) -> None:
        """Add an epoch's validation AJI at global step ``step``."""
        if math.isfinite(aji):
            self.epochs.append((int(step), float(aji)))
            self.update()

    def set_base(self, aji: float | None) -> None:
        """Show the base model's validation AJI (None hides it)."""
        self.base_aji = float(aji) if aji is not None and math.isfinite(aji) else None
        self.update()

    def set_note(self, text: str) -> None:
        """A short state in the top-right corner ("" clears it)."""
        self.note = text
        self.update()

    @property
    def best_aji(self) -> float | None:
        """The best validation AJI so far."""
        return max((v for _, v in self.epochs), default=None)

    # ------------------------------------------------------------------ drawing
    def paintEvent(self, event: Any) -> None:  # noqa: N802 (Qt name)
        p = QPainter(self)
        try:
            p.setRenderHint(QPainter.RenderHint.Antialiasing)
            w, h = self.width(), self.height()
            left, right, top, bottom = 34, 30, 8, 18
            pw, ph = max(1, w - left - right), max(1, h - top - bottom)
            p.fillRect(self.rect(), QColor(38, 41, 48))
            p.setPen(QPen(QColor(120, 120, 120), 1))
            p.drawRect(left, top, pw, ph)
            p.setPen(QColor(200, 200, 200))
            n = max(self.total_steps, max((s for s, _ in self.steps), default=1))
            p.drawText(left, h - 4, "0")
            p.drawText(left + pw - 30, h - 4, f"{n} steps")
            lmax = max((v for _, v in self.steps), default=1.0) or 1.0
            p.drawText(2, top + 10, f"{lmax:.2g}")
            p.drawText(w - right + 3, top + 10, "1.0")
            p.drawText(w - right + 3, top + ph, "0")
            if self.note:
                p.drawText(left + pw - 8 * len(self.note), top + 12, self.note)

            def pt(step: float, frac: float) -> QPointF:
                return QPointF(left + pw * step / n, top + ph * (1.0 - min(max(frac, 0.0), 1.0)))

            if self.base_aji is not None:
                pen = QPen(self.BASE_COLOR, 1.5)
                pen.setStyle(Qt.PenStyle.DashLine)
                p.setPen(pen)
                p.drawLine(pt(0, self.base_aji), pt(n, self.base_aji))
            if self.steps:
                p.setPen(QPen(self.LOSS_COLOR, 1.5))
                p.drawPolyline(QPolygonF([pt(s, v / lmax) for s, v in self.steps]))
            text = []
            if self.epochs:
                p.setPen(QPen(self.AJI_COLOR, 2))
                pts = [pt(s, v) for s, v in self.epochs]
                if len(pts) > 1:
                    p.drawPolyline(QPolygonF(pts))
                p.setBrush(self.AJI_COLOR)
                for q in pts:
                    p.drawEllipse(q, 3, 3)
                text.append(f"val AJI {self.epochs[-1][1]:.3f} (best {self.best_aji:.3f})")
            if self.base_aji is not None:
                text.append(f"base {self.base_aji:.3f}")
            if text:
                p.setPen(QColor(220, 220, 220))
                p.drawText(left + 4, top + 12, " · ".join(text))
        finally:
            p.end()
