"""Export and import of results: QuPath GeoJSON, per-object measurements, CSV tables.

Pure core: no napari or Qt imports (the napari reader/writers in :mod:`.napari_io` are
plain functions).
"""

from __future__ import annotations

from napari_pathoseg.export.coords import LevelTransform, layer_placement, slide_metadata_from_layer, transform_from_layer
from napari_pathoseg.export.geojson import (  # the stable import point; code in qupath/geometry/*_export/reader/raster
    OBJECT_TYPES,
    Classification,
    ExportError,
    ExportOutputError,
    ExportProgress,
    ExportResult,
    GeoJSONObject,
    iter_export_labels,
    iter_export_shapes,
    iter_geojson,
    labels_to_geometries,
    rasterize,
    read_geojson,
    run_export_labels,
    run_export_shapes,
    shapes_to_geometries,
    write_labels_tiff,
)
from napari_pathoseg.export.measurements import MEASUREMENTS, measure_labels, write_measurements_csv

__all__ = [
    "OBJECT_TYPES",
    "MEASUREMENTS",
    "Classification",
    "ExportError",
    "ExportOutputError",
    "ExportProgress",
    "ExportResult",
    "GeoJSONObject",
    "LevelTransform",
    "iter_export_labels",
    "iter_export_shapes",
    "iter_geojson",
    "labels_to_geometries",
    "layer_placement",
    "measure_labels",
    "rasterize",
    "read_geojson",
    "run_export_labels",
    "run_export_shapes",
    "shapes_to_geometries",
    "slide_metadata_from_layer",
    "transform_from_layer",
    "write_labels_tiff",
    "write_measurements_csv",
]
