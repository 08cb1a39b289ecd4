"""Exceptions raised by the napari-pathoseg core.

Every error the core raises for bad input derives from :class:`PathosegError`, so
widgets can catch one type and show its message to the user.
"""

from __future__ import annotations

__all__ = [
    "PathosegError",
    "SlideError",
    "CheckpointError",
    "GeoJSONError",
    "StainError",
    "CancelledError",
]


class PathosegError(Exception):
    """Base class of all errors napari-pathoseg raises for bad input or state."""


class SlideError(PathosegError):
    """A slide cannot be opened or read (unsupported, corrupt, truncated, absurd)."""


class CheckpointError(PathosegError):
    """A model checkpoint is untrusted, damaged or does not match the model."""


class GeoJSONError(PathosegError):
    """A GeoJSON file is malformed or does not fit the slide."""


class StainError(PathosegError):
    """Stain estimation or normalisation cannot succeed on this input."""


class CancelledError(PathosegError):
    """A long-running job was cancelled by the user."""
