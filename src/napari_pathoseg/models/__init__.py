"""Model checkpoints (safetensors + JSON config) and the model registry."""

from __future__ import annotations

__all__ = ["checkpoint", "registry"]
