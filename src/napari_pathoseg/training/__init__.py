"""Training of the nucleus models: data, augmentation, losses, loops (no Qt, no napari)."""

from __future__ import annotations

__all__ = ["augment", "datasets", "losses", "loop"]
