"""The slide an exported GeoJSON belongs to, recorded in the file so it opens over that slide.

A GeoJSON written over a known slide carries one extra top-level member (a GeoJSON
"foreign member", RFC 7946 section 6.1, which QuPath ignores) before ``features``::

    {"type":"FeatureCollection",
     "pathoseg":{"slide":{"name":"CMU-1.svs","mpp_x":0.499,"mpp_y":0.499,"bounds_x":0,"bounds_y":0,
                          "level_dimensions":[[46000,32914],...],"level_downsamples":[1.0,4.0,...]}},
     "features":[...]}

The coordinates stay QuPath's level-0 pixels; the record says how many µm a pixel is and
where the bounds offset is, so the napari reader can give its layers ``scale = (mpp, mpp)``
in µm like the slide layer. Only the slide's file name is recorded, never its folder.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping

from napari_pathoseg.errors import GeoJSONError
from napari_pathoseg.export.coords import metadata_as_dict

__all__ = ["MEMBER", "slide_record", "collection_members", "slide_from_members", "check_same_slide"]

logger = logging.getLogger(__name__)

#: Name of the top-level member holding the record.
MEMBER = "pathoseg"


def slide_record(slide_metadata: Any | None) -> dict[str, Any] | None:
    """The ``{"slide": {...}}`` record of a slide, or None when nothing useful is known.

    Parameters
    ----------
    slide_metadata : SlideMetadata, dict or None

    Returns
    -------
    dict or None
        ``{"slide": {"name", "mpp_x", "mpp_y", "bounds_x", "bounds_y", "level_dimensions",
        "level_downsamples"}}`` (keys whose value is unknown are left out); None when the
        metadata has neither a resolution nor level dimensions.
    """
    meta = metadata_as_dict(slide_metadata)
    rec: dict[str, Any] = {}
    if meta.get("path"):
        rec["name"] = Path(str(meta["path"])).name
    for key in ("mpp_x", "mpp_y"):
        if meta.get(key):
            rec[key] = float(meta[key])
    for key in ("bounds_x", "bounds_y"):
        rec[key] = int(meta.get(key) or 0)
    if meta.get("level_dimensions"):
        rec["level_dimensions"] = [[int(w), int(h)] for w, h in meta["level_dimensions"]]
    if meta.get("level_downsamples"):
        rec["level_downsamples"] = [float(d) for d in meta["level_downsamples"]]
    if not ("mpp_x" in rec or "mpp_y" in rec or "level_dimensions" in rec):
        return None
    return {"slide": rec}


def collection_members(slide_metadata: Any | None) -> dict[str, Any] | None:
    """The top-level members an export writes for ``slide_metadata`` (None: no record)."""
    rec = slide_record(slide_metadata)
    return {MEMBER: rec} if rec else None


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GeoJSONError(f"{where} must be a finite number, got {value!r}; remove the {MEMBER!r} member or open the file over its slide")
    return float(value)


def slide_from_members(members: Mapping[str, Any], *, path: str | Path = "") -> dict[str, Any] | None:
    """Slide metadata (a dict :class:`~napari_pathoseg.export.coords.LevelTransform` accepts) from a file's record.

    Parameters
    ----------
    members : mapping
        Top-level members of the GeoJSON (:func:`~napari_pathoseg.export.reader.read_members`).
    path : path-like
        The file, for messages.

    Returns
    -------
    dict or None
        None when the file has no record (a foreign GeoJSON).

    Raises
    ------
    GeoJSONError
        The record is malformed.
    """
    rec = members.get(MEMBER)
    if rec is None:
        return None
    where = f"{path}: {MEMBER}.slide"
    if not isinstance(rec, Mapping) or not isinstance(rec.get("slide"), Mapping):
        raise GeoJSONError(f"{where} is missing or not an object; remove the {MEMBER!r} member or open the file over its slide")
    slide = rec["slide"]
    out: dict[str, Any] = {"bounds_x": 0, "bounds_y": 0}
    if isinstance(slide.get("name"), str):
        out["path"] = slide["name"]
    for key in ("mpp_x", "mpp_y"):
        if slide.get(key) is not None:
            v = _number(slide[key], f"{where}.{key}")
            if v <= 0:
                raise GeoJSONError(f"{where}.{key} must be positive, got {v}; remove the {MEMBER!r} member or open the file over its slide")
            out[key] = v
    for key in ("bounds_x", "bounds_y"):
        if slide.get(key) is not None:
            out[key] = _number(slide[key], f"{where}.{key}")
    dims = slide.get("level_dimensions")
    if dims is not None:
        if not isinstance(dims, list) or not all(isinstance(d, list) and len(d) == 2 for d in dims) or not dims:
            raise GeoJSONError(f"{where}.level_dimensions must be a list of [width, height]; remove the {MEMBER!r} member")
        out["level_dimensions"] = [[_number(w, f"{where}.level_dimensions"), _number(h, f"{where}.level_dimensions")] for w, h in dims]
    ds = slide.get("level_downsamples")
    if ds is not None:
        if not isinstance(ds, list) or not ds:
            raise GeoJSONError(f"{where}.level_downsamples must be a list of numbers; remove the {MEMBER!r} member")
        out["level_downsamples"] = [_number(d, f"{where}.level_downsamples") for d in ds]
    else:
        out["level_downsamples"] = [1.0]
    return out


def check_same_slide(recorded: Mapping[str, Any] | None, slide_metadata: Any | None, *, path: str | Path = "") -> bool:
    """Whether the slide a file was exported over has the level-0 size of ``slide_metadata``.

    Logs a warning when they differ (the objects will likely be misplaced); True when
    either side is unknown.
    """
    meta = metadata_as_dict(slide_metadata)
    if not recorded or not recorded.get("level_dimensions") or not meta.get("level_dimensions"):
        return True
    a = [int(v) for v in recorded["level_dimensions"][0]]
    b = [int(v) for v in meta["level_dimensions"][0]]
    if a != b:
        logger.warning(
            "%s was exported over %s (%d x %d px) but is opened over a slide of %d x %d px; the objects may be misplaced",
            path, recorded.get("path", "another slide"), a[0], a[1], b[0], b[1],
        )
        return False
    return True
