"""Fast GeoJSON text of features: UUIDs, JSON encoding (orjson or the standard library),
feature and property byte strings, and the streaming ``FeatureCollection`` writer.

The writer puts every feature on its own line, features are joined by ``,\n``; the
document is only moved into place when the export finished (:class:`~._output.StreamedFile`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from napari_pathoseg.export._output import StreamedFile
from napari_pathoseg.export.qupath import Classification

__all__ = ["FeatureCollectionWriter"]


def _uuid_strings(n: int) -> list[bytes]:
    """``n`` random (version 4) UUIDs as ASCII bytes."""
    if n == 0:
        return []
    raw = np.frombuffer(os.urandom(16 * n), dtype=np.uint8).reshape(n, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    hexes = raw.tobytes().hex().encode("ascii")
    out = []
    for k in range(n):
        h = hexes[32 * k : 32 * k + 32]
        out.append(b"-".join((h[:8], h[8:12], h[12:16], h[16:20], h[20:])))
    return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


_STD_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default)

try:  # orjson writes numpy arrays directly and ~5-10x faster; the standard library is the fallback
    import orjson as _orjson

    _ORJSON_OPTS = _orjson.OPT_SERIALIZE_NUMPY

    def _dumps(obj: Any) -> bytes:
        return _orjson.dumps(obj, option=_ORJSON_OPTS)

except ImportError:  # pragma: no cover - depends on the environment

    def _dumps(obj: Any) -> bytes:
        return _STD_ENCODER.encode(obj).encode("utf-8")


_POLY_OPEN = b'{"type":"Polygon","coordinates":['
_MULTI_OPEN = b'{"type":"MultiPolygon","coordinates":['
_CLOSE2 = b"]}"


def _properties_prefix(
    object_type: str, classification: Classification | None, metadata: Mapping[str, str] | None,
    name: str | None = None,
) -> bytes:
    """The constant part of a feature's properties (without the closing brace)."""
    props: dict[str, Any] = {"objectType": object_type}
    if name:
        props["name"] = str(name)
    if classification is not None:
        props["classification"] = classification.to_json()
    props["isLocked"] = False
    if metadata:
        props["metadata"] = {str(k): str(v) for k, v in metadata.items()}
    return _dumps(props)[:-1]


def _measurements_text(values: Mapping[str, float]) -> bytes:
    clean = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
    return _dumps(clean)


def _feature_text(uid: bytes, geometry_text: bytes, prefix: bytes, measurements: bytes | None) -> bytes:
    props = prefix
    if measurements is not None:
        props += b',"measurements":' + measurements
    return b'{"type":"Feature","id":"' + uid + b'","geometry":' + geometry_text + b',"properties":' + props + b"}}"


class FeatureCollectionWriter(StreamedFile):
    """Writes a FeatureCollection feature by feature to a temp file, then moves it into place.

    Parameters
    ----------
    path : Path
        Destination.
    members : mapping, optional
        Extra top-level members written before ``features`` (e.g. the slide record of
        :mod:`~napari_pathoseg.export.slide_record`).
    """

    def __init__(self, path: Path, *, members: Mapping[str, Any] | None = None) -> None:
        super().__init__(path, mode="wb")
        head = b'{"type":"FeatureCollection",'
        for key, value in (members or {}).items():  # foreign members (RFC 7946 6.1), before the features
            head += _dumps(str(key)) + b":" + _dumps(value) + b","
        self._fh.write(head + b'"features":[\n')
        self.n = 0

    def write(self, feature_texts: Sequence[bytes]) -> None:
        """Append features (their GeoJSON bytes)."""
        if not feature_texts:
            return
        if self.n:
            self._fh.write(b",\n")
        self._fh.write(b",\n".join(feature_texts))
        self.n += len(feature_texts)

    def commit(self) -> Path:
        """Close the collection and move the file into place."""
        self._fh.write(b"\n]}\n")
        return super().commit()
