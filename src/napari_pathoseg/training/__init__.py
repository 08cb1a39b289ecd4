"""The shared training machinery: augmentation and losses (no Qt, no napari)."""

from __future__ import annotations

__all__ = ["augment", "losses"]
