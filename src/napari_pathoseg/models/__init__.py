"""Neural networks of napari-pathoseg: M2 (AttCycle) networks, checkpoints, model registry."""

from __future__ import annotations

__all__ = ["m2", "checkpoint", "registry"]
