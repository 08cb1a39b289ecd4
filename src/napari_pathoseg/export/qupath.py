"""The QuPath object model: object types, classifications and colours, and export events.

Shared by the writers (:mod:`.labels_export`, :mod:`.shapes_export`) and the reader
(:mod:`.reader`); the format is described in ``docs/geojson.md``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from napari_pathoseg.errors import CancelledError
from napari_pathoseg.export._output import ExportError

__all__ = [
    "OBJECT_TYPES",
    "DEFAULT_CLASS_COLORS",
    "Classification",
    "ExportProgress",
    "ExportResult",
    "GeoJSONObject",
    "class_color",
    "check_object_type",
]

#: ``objectType`` values QuPath accepts.
OBJECT_TYPES = ("annotation", "detection", "cell", "tile", "tmaCore", "root")
_OBJECT_TYPE_LOOKUP = {t.lower(): t for t in OBJECT_TYPES}
_OBJECT_TYPE_LOOKUP.update({"tma_core": "tmaCore", "tmacore": "tmaCore"})

#: QuPath's default colours of its built-in classes; other names get a stable hashed colour.
DEFAULT_CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "Tumor": (200, 0, 0),
    "Tumour": (200, 0, 0),
    "Stroma": (150, 200, 150),
    "Immune cells": (160, 90, 160),
    "Necrosis": (50, 50, 50),
    "Other": (255, 200, 0),
    "Region*": (0, 0, 180),
    "Ignore*": (180, 180, 180),
    "Positive": (200, 50, 50),
    "Negative": (112, 112, 225),
    "Nucleus": (200, 0, 0),
}


# ---------------------------------------------------------------------------- classes
def class_color(name: str) -> tuple[int, int, int]:
    """QuPath's colour for a built-in class, else a stable colour derived from the name."""
    if name in DEFAULT_CLASS_COLORS:
        return DEFAULT_CLASS_COLORS[name]
    h = hashlib.md5(name.encode("utf-8")).digest()
    return (64 + h[0] % 192, 64 + h[1] % 192, 64 + h[2] % 192)


def _check_color(color: Any, *, what: str) -> tuple[int, int, int]:
    """(r, g, b) 0-255 ints from 0-255 numbers or 0-1 floats (napari colours)."""
    try:
        arr = np.asarray(color).ravel()
        if arr.dtype.kind not in "iuf":
            raise TypeError
        floats = arr.dtype.kind == "f"
        arr = arr.astype(np.float64)
    except (TypeError, ValueError):
        raise ExportError(f"{what}: colour must be (r, g, b) with values 0-255 (or 0-1 floats), got {color!r}") from None
    if arr.size not in (3, 4) or not np.all(np.isfinite(arr)):
        raise ExportError(f"{what}: colour must be (r, g, b) with values 0-255 (or 0-1 floats), got {color!r}")
    arr = arr[:3]
    if floats and arr.max() <= 1.0:
        arr = arr * 255.0
    if arr.min() < 0 or arr.max() > 255:
        raise ExportError(f"{what}: colour values must be within 0-255, got {color!r}")
    return tuple(int(round(v)) for v in arr)  # type: ignore[return-value]


@dataclass(frozen=True)
class Classification:
    """A QuPath classification: a name and the colour QuPath must always receive with it."""

    name: str
    color: tuple[int, int, int]

    @classmethod
    def of(cls, value: "Classification | str | Mapping[str, Any] | None", color: Any = None) -> "Classification | None":
        """Build from a name (colour from :func:`class_color` unless given), a dict or None."""
        if value is None or isinstance(value, Classification):
            return value
        if isinstance(value, Mapping):
            name = value.get("name")
            color = value.get("color", color)
        else:
            name = value
        if not isinstance(name, str) or not name.strip():
            raise ExportError(f"a class name must be a non-empty string, got {name!r}")
        name = name.strip()
        rgb = class_color(name) if color is None else _check_color(color, what=f"class {name!r}")
        return cls(name=name, color=rgb)

    def to_json(self) -> dict[str, Any]:
        """``{"name": ..., "color": [r, g, b]}``."""
        return {"name": self.name, "color": list(self.color)}


# ---------------------------------------------------------------------------- events
@dataclass(frozen=True)
class ExportProgress:
    """One step of a long export or import."""

    done: int
    total: int
    message: str = ""

    @property
    def fraction(self) -> float:
        """Done / total in [0, 1]."""
        return 1.0 if self.total <= 0 else min(1.0, self.done / self.total)


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote."""

    path: Path
    n_objects: int
    n_skipped: int = 0
    measurements_path: Path | None = None
    seconds: float = 0.0

    @property
    def objects_per_second(self) -> float:
        """Export throughput."""
        return self.n_objects / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "path": str(self.path),
            "n_objects": self.n_objects,
            "n_skipped": self.n_skipped,
            "measurements_path": str(self.measurements_path) if self.measurements_path else None,
            "seconds": round(self.seconds, 3),
            "objects_per_second": round(self.objects_per_second, 1) if self.seconds > 0 else None,
        }


# ---------------------------------------------------------------------------- helpers
def check_object_type(object_type: str) -> str:
    """QuPath's spelling of an object type (case-insensitive), else :class:`ExportError`."""
    ot = _OBJECT_TYPE_LOOKUP.get(str(object_type).lower())
    if ot is None:
        raise ExportError(f"objectType {object_type!r} is not one QuPath accepts; use one of {list(OBJECT_TYPES)}")
    return ot


def stop_if_cancelled(cancel: Any | None) -> None:
    """Raise :class:`~napari_pathoseg.errors.CancelledError` when the token ``cancel`` (``is_set()``) is set."""
    if cancel is not None and cancel.is_set():
        raise CancelledError("export stopped; no file was written")


def drive(gen: Iterator[Any], progress: Callable[[ExportProgress], None] | None, cancel: Callable[[], bool] | None) -> Any:
    """Run an export generator to its result, calling ``progress`` and stopping when ``cancel()``."""
    result = None
    for event in gen:
        if isinstance(event, ExportProgress):
            if progress is not None:
                progress(event)
            if cancel is not None and cancel():
                gen.close()  # type: ignore[attr-defined]
                raise CancelledError("export cancelled; no file was written")
        else:
            result = event
    return result


@dataclass
class GeoJSONObject:
    """One object read from a GeoJSON file.

    Attributes
    ----------
    geometry : shapely geometry
        In the file's QuPath frame (level-0 ``(x, y)``, bounds offset not added).
    object_type : str
        One of :data:`OBJECT_TYPES`.
    classification : Classification or None
    measurements : dict of str -> float
    metadata : dict of str -> str
    id : str or None
    name : str or None
    nucleus_geometry : shapely geometry or None
        Nucleus of a ``cell`` object.
    """

    geometry: Any
    object_type: str = "annotation"
    classification: Classification | None = None
    measurements: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    id: str | None = None
    name: str | None = None
    nucleus_geometry: Any = None

