"""What the Export dock writes: one export task per checked layer, and the job that runs them.

* :func:`plan_exports` turns the dock's choices (layers, classes, colours, slide, probability
  layer, measurements, object type) into :class:`ExportTask` s, one ``.geojson`` per layer;
* the Confidence measurement needs, per labels layer, the model's probability map or a
  per-nucleus confidence: :func:`confidence_source` finds either the chosen probability layer or
  the nucleus table the Nuclei dock keeps in the labels layer's metadata, and
  :func:`table_confidence_map` turns that table into a lazy probability map (each nucleus' pixels
  hold its confidence), so the writer's mean over a nucleus is the table's value;
* :func:`export_job` is the job ``job(token)`` of the dock's
  :class:`~napari_pathoseg._widgets._jobs.JobController`: it runs the tasks one after the other,
  yields :class:`ExportStep` progress and each :class:`ExportResult`, and returns the results;
  Stop ends it between chunks (the file being written is removed).

No Qt here: the dock reads its widgets and calls these.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from napari_pathoseg.errors import CancelledError
from napari_pathoseg.export.coords import slide_metadata_from_layer, transform_from_layer
from napari_pathoseg.export.geojson import (
    Classification,
    ExportProgress,
    ExportResult,
    iter_export_labels,
    iter_export_shapes,
)

__all__ = [
    "ConfidenceSource",
    "ExportStep",
    "ExportTask",
    "confidence_source",
    "export_job",
    "plan_exports",
    "table_confidence_map",
]

logger = logging.getLogger(__name__)

#: Measurements read from the slide's pixels.
STAIN_MEASUREMENTS = ("hematoxylin", "eosin")


@dataclass
class ExportTask:
    """One layer to write: ``kind`` ("labels" / "shapes"), output ``path``, the data and the
    keyword arguments of :func:`iter_export_labels` / :func:`iter_export_shapes`."""

    kind: str
    layer_name: str
    path: Path
    data: Any
    kwargs: dict[str, Any] = field(default_factory=dict)
    confidence: str = ""  # where the confidence of this layer comes from ("" when not measured)


@dataclass(frozen=True)
class ExportStep:
    """Progress of an export job: ``done`` of ``total`` chunks of layer ``index`` of ``n_layers``."""

    index: int
    n_layers: int
    done: int
    total: int
    detail: str = ""

    @property
    def message(self) -> str:
        """Status line text."""
        return f"layer {self.index + 1}/{self.n_layers}: {self.detail}"


@dataclass(frozen=True)
class ConfidenceSource:
    """Where a labels layer's per-nucleus confidence comes from.

    Attributes
    ----------
    probability : array or None
        A ``(rows, cols)`` probability map of the labels' shape (None: no source).
    description : str
        For tooltips and the status line.
    """

    probability: Any
    description: str


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "layer"


def _level0(data: Any, multiscale: bool) -> Any:
    return data[0] if multiscale else data


def _table_confidences(metadata: Mapping[str, Any], features: Any = None) -> tuple[np.ndarray, np.ndarray] | None:
    """``(ids, confidences)`` of a nucleus table: ``metadata["table"]`` (rows or columns) or
    the layer's features (``confidence`` beside ``id`` / ``index`` / ``label``)."""
    table = metadata.get("table") if metadata is not None else None
    columns: Mapping[str, Any] | None = None
    if isinstance(table, Mapping):
        columns = table
    elif isinstance(table, Sequence) and not isinstance(table, str) and len(table) and isinstance(table[0], Mapping):
        if "confidence" in table[0]:
            key = next((k for k in ("id", "label", "index") if k in table[0]), None)
            if key is not None:
                return (np.array([int(r[key]) for r in table], dtype=np.int64),
                        np.array([float(r["confidence"]) for r in table], dtype=np.float32))
        return None
    elif features is not None and hasattr(features, "columns") and len(features):
        columns = {c: np.asarray(features[c]) for c in features.columns}
    if not columns or "confidence" not in columns:
        return None
    key = next((k for k in ("id", "label", "index") if k in columns), None)
    if key is None:
        return None
    return np.asarray(columns[key], dtype=np.int64), np.asarray(columns["confidence"], dtype=np.float32)


def table_confidence_map(labels: Any, ids: Sequence[int], confidences: Sequence[float]) -> Any:
    """A lazy ``(rows, cols)`` float32 map: each nucleus' pixels hold its confidence.

    Parameters
    ----------
    labels : (rows, cols) int array (numpy, memmap or dask)
    ids, confidences : sequences of the same length
        Per-nucleus confidence (e.g. the Nuclei dock's table).

    Returns
    -------
    dask.array.Array
        NaN on the background and on labels missing from the table (e.g. painted later), so
        those objects get no Confidence value rather than a wrong one.
    """
    import dask.array as da

    ids = np.asarray(ids, dtype=np.int64)
    conf = np.asarray(confidences, dtype=np.float32)
    lut = np.full(int(ids.max(initial=0)) + 1, np.nan, dtype=np.float32)
    keep = ids > 0
    lut[ids[keep]] = conf[keep]

    def lookup(block: np.ndarray) -> np.ndarray:
        block = np.asarray(block)
        out = np.full(block.shape, np.nan, dtype=np.float32)
        inside = (block > 0) & (block < lut.size)
        out[inside] = lut[block[inside].astype(np.int64)]
        return out

    arr = labels if isinstance(labels, da.Array) else da.from_array(labels, chunks=(2048, 2048))
    return arr.map_blocks(lookup, dtype=np.float32)


def confidence_source(layer: Any, prob_layer: Any = None) -> ConfidenceSource:
    """The confidence of ``layer``'s objects: ``prob_layer``'s map, else the layer's nucleus table."""
    if prob_layer is not None:
        return ConfidenceSource(_level0(prob_layer.data, prob_layer.multiscale),
                                f"the mean of {prob_layer.name!r} over each object")
    found = _table_confidences(getattr(layer, "metadata", {}) or {}, getattr(layer, "features", None))
    if found is None:
        return ConfidenceSource(None, "")
    ids, conf = found
    data = _level0(layer.data, getattr(layer, "multiscale", False))
    return ConfidenceSource(table_confidence_map(data, ids, conf), "the per-nucleus confidence of the Nuclei dock's table")


def plan_exports(
    out: str | Path,
    layers: Sequence[tuple[Any, str, tuple[int, int, int] | None]],
    *,
    slide_layer: Any = None,
    prob_layer: Any = None,
    measure: Sequence[str] = (),
    object_type: str = "auto",
    model: str = "",
) -> list[ExportTask]:
    """One :class:`ExportTask` per ``(layer, class name, colour)``.

    With several layers each goes to ``<out stem>_<layer name>.geojson``. Stain measurements
    need the slide and are dropped without one; Confidence is measured on the labels layers
    that have a source (:func:`confidence_source`) and dropped on the others.
    """
    from napari.layers import Labels

    out = Path(out)
    if out.suffix.lower() != ".geojson":
        out = out.with_suffix(".geojson")
    slide = slide_layer.metadata.get("pathoseg_slide") if slide_layer is not None else None
    measure = [m for m in measure if slide is not None or m not in STAIN_MEASUREMENTS]
    metadata = {"model": model} if model else None
    slide_meta = slide_metadata_from_layer(slide_layer.metadata) if slide_layer is not None else None
    tasks = []
    for layer, cls_name, color in layers:
        meta = slide_meta or slide_metadata_from_layer(layer.metadata)
        transform = transform_from_layer(scale=layer.scale, translate=layer.translate, slide_metadata=meta)
        cls = Classification.of(cls_name, color) if cls_name else None
        path = out if len(layers) == 1 else out.with_name(f"{out.stem}_{_safe_name(layer.name)}.geojson")
        if isinstance(layer, Labels):
            layer_measure, prob, source = list(measure), None, ""
            if "confidence" in layer_measure:
                found = confidence_source(layer, prob_layer)
                prob, source = found.probability, found.description
                if prob is None:
                    layer_measure.remove("confidence")
            kwargs = dict(
                slide=slide, slide_metadata=meta, transform=transform,
                object_type="detection" if object_type == "auto" else object_type, classification=cls,
                measure=layer_measure, probability=prob, metadata=metadata,
            )
            tasks.append(ExportTask("labels", layer.name, path, _level0(layer.data, layer.multiscale), kwargs, source))
        else:
            kwargs = dict(
                shape_types=list(layer.shape_type), slide_metadata=meta, transform=transform,
                object_type="annotation" if object_type == "auto" else object_type, classification=cls,
                measure=bool(measure), metadata=metadata,
            )
            tasks.append(ExportTask("shapes", layer.name, path, [np.asarray(d) for d in layer.data], kwargs))
    return tasks


def export_job(tasks: Sequence[ExportTask]) -> Callable[[Any], Iterator[Any]]:
    """The job ``job(token)``: exports ``tasks`` in order; yields :class:`ExportStep` and each
    :class:`ExportResult`; returns the list of results.

    Raises
    ------
    CancelledError
        The token was set: the file being written is removed (those finished stay).
    """

    def job(token: Any) -> Iterator[Any]:
        results: list[ExportResult] = []
        for index, task in enumerate(tasks):
            run = iter_export_labels if task.kind == "labels" else iter_export_shapes
            gen = run(task.path, task.data, **task.kwargs)
            try:
                for event in gen:
                    if token is not None and token.is_set():
                        gen.close()  # removes the temporary file
                        raise CancelledError(f"export cancelled; {task.path} was not written")
                    if isinstance(event, ExportProgress):
                        yield ExportStep(index, len(tasks), event.done, event.total, event.message)
                    elif isinstance(event, ExportResult):
                        results.append(event)
                        yield event
            finally:
                gen.close()
        return results

    return job
