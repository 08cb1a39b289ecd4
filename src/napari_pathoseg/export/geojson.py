"""QuPath-compatible GeoJSON: the stable import point of the export and import functions.

The code lives in modules of one idea each:

* :mod:`.qupath` - object types, classifications and colours, events and results;
* :mod:`.geometry` - traced rings and napari shapes to valid geometries;
* :mod:`.labels_export` - streaming export of label images (numpy or dask, any level);
* :mod:`.shapes_export` - export of napari shapes;
* :mod:`.reader` - streaming import of QuPath GeoJSON (0.4+ and older forms);
* :mod:`.raster` - rasterising objects into label images and tiled TIFFs;
* :mod:`._encode` / :mod:`._output` - feature text, and the atomic files an export writes.

Coordinates go through :class:`~napari_pathoseg.export.coords.LevelTransform` only.
The format is described in ``docs/geojson.md``.
"""

from __future__ import annotations

from napari_pathoseg.export._output import ExportError, ExportOutputError
from napari_pathoseg.export.coords import LevelTransform
from napari_pathoseg.export.geometry import labels_to_geometries, rings_to_geometries, shapes_to_geometries
from napari_pathoseg.export.labels_export import MAX_OBJECT_PIXELS, iter_export_labels, run_export_labels
from napari_pathoseg.export.qupath import (
    DEFAULT_CLASS_COLORS,
    OBJECT_TYPES,
    Classification,
    ExportProgress,
    ExportResult,
    GeoJSONObject,
    class_color,
)
from napari_pathoseg.export.raster import iter_label_tiles, rasterize, write_labels_tiff
from napari_pathoseg.export.reader import iter_geojson, read_geojson, slide_extent
from napari_pathoseg.export.shapes_export import iter_export_shapes, run_export_shapes

__all__ = [
    "OBJECT_TYPES",
    "DEFAULT_CLASS_COLORS",
    "MAX_OBJECT_PIXELS",
    "ExportError",
    "ExportOutputError",
    "Classification",
    "ExportProgress",
    "ExportResult",
    "GeoJSONObject",
    "LevelTransform",
    "class_color",
    "rings_to_geometries",
    "labels_to_geometries",
    "shapes_to_geometries",
    "iter_export_labels",
    "run_export_labels",
    "iter_export_shapes",
    "run_export_shapes",
    "iter_geojson",
    "read_geojson",
    "slide_extent",
    "rasterize",
    "iter_label_tiles",
    "write_labels_tiff",
]
