"""Teacher pseudo-labels and their review project: the public names, in one place.

M2 step S23 (methods.md): a trained teacher runs over unlabelled tiles; each tile's quality
score is the mean over its pixels of the confidence ``max(p, 1 - p)`` of the nucleus
probability ``p``; tiles above a threshold are kept, their stain-normalised images serve as
pseudo-Y images and their masks as pseudo-labels. A pathologist can also review the
candidates (accept, reject, correct the masks) before they go into training.

The code lives in one module per idea:

* :mod:`.records`: the on-disk format (file names, version, states), :class:`ProjectInfo`,
  :class:`TileRecord`, :class:`TrainingItem`, :class:`ReviewProjectError`;
* :mod:`.store`: :class:`ReviewProject`, the project folder (create, open, review, train);
* :mod:`.tile_files`: atomic writes and checked reads of the project's JSON and PNG files;
* :mod:`.scoring`: :func:`tile_score`, :func:`nucleus_confidences`;
* :mod:`.editing`: :func:`split_nucleus`, :func:`merge_nuclei`;
* :mod:`.sources`: :func:`slide_tiles`, :func:`folder_tiles` (unlabelled tiles);
* :mod:`.generate`: :func:`generate_pseudolabels`, :func:`run_pseudolabels`.

No Qt or napari here; the Review dock (:mod:`napari_pathoseg._widgets.review`) drives it.
"""

from __future__ import annotations

from napari_pathoseg.review.editing import merge_nuclei, split_nucleus
from napari_pathoseg.review.generate import GenerationDone, GenerationProgress, generate_pseudolabels, run_pseudolabels
from napari_pathoseg.review.records import (
    FORMAT_NAME,
    FORMAT_VERSION,
    STATES,
    ProjectInfo,
    ReviewProjectError,
    TileRecord,
    TrainingItem,
)
from napari_pathoseg.review.scoring import confidence, nucleus_confidences, tile_score
from napari_pathoseg.review.sources import IMAGE_SUFFIXES, UnlabelledTile, folder_tiles, slide_tiles
from napari_pathoseg.review.store import ReviewProject

# the name methods/nuclei/finetune.py imports (it may import scoring.confidence instead)
_confidence = confidence

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IMAGE_SUFFIXES",
    "STATES",
    "GenerationDone",
    "GenerationProgress",
    "ProjectInfo",
    "ReviewProject",
    "ReviewProjectError",
    "TileRecord",
    "TrainingItem",
    "UnlabelledTile",
    "confidence",
    "folder_tiles",
    "generate_pseudolabels",
    "merge_nuclei",
    "nucleus_confidences",
    "run_pseudolabels",
    "slide_tiles",
    "split_nucleus",
    "tile_score",
]
