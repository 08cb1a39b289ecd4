"""Whole-slide inference: one tiled engine (:mod:`.engine`) and its output sinks (:mod:`.sinks`)."""

from napari_pathoseg.inference.engine import (
    ContextInput,
    InferenceResult,
    Predictor,
    TilePlan,
    iter_predict,
    plan_tiles,
    read_window,
    run_predict,
)
from napari_pathoseg.inference.predictors import StainDensityPredictor
from napari_pathoseg.inference.sinks import (
    Instances,
    InstancesResult,
    MapResult,
    ProbabilityMap,
    ScoresResult,
    Sink,
    TileScores,
    paste_owned,
)

__all__ = [
    "ContextInput",
    "InferenceResult",
    "Predictor",
    "TilePlan",
    "iter_predict",
    "plan_tiles",
    "read_window",
    "run_predict",
    "Instances",
    "InstancesResult",
    "MapResult",
    "ProbabilityMap",
    "ScoresResult",
    "Sink",
    "TileScores",
    "paste_owned",
    "StainDensityPredictor",
]
