"""The review project's on-disk format: file names, versions, states and record types.

A review project is a folder a user can move (only relative paths inside)::

    project.json            format name + version, source, model, tile size, mpp, created
    review.json             threshold and every tile's record (state, edited, score, ...)
    tiles/<id>/image.png    the tile as read (RGB uint8)
    tiles/<id>/normalized.png   the teacher's stain-normalised tile (RGB uint8, pseudo-Y)
    tiles/<id>/mask.png     instance labels (uint16, 0 background, 1..N consecutive)
    tiles/<id>/prob.png     nucleus probability quantised to uint8 (p * 255)

A project of kind ``"tissue"`` (M5's Grad-CAM++ pseudo masks, :mod:`napari_pathoseg.methods.tissue.review`)
stores per tile only ``image.png`` and ``mask.png`` (uint8 class ids, 0 = no label, 1..n the
classes named in ``project.json``); its ``score`` is the stage-1 classifier's confidence.

:class:`ProjectInfo` is ``project.json``, :class:`TileRecord` one entry of ``review.json``;
:class:`TrainingItem` is what an accepted tile gives to training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from napari_pathoseg.errors import PathosegError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KINDS",
    "PROJECT_FILE",
    "REVIEW_FILE",
    "STATES",
    "TILES_DIR",
    "ProjectInfo",
    "ReviewProjectError",
    "TileRecord",
    "TrainingItem",
]

#: Name and version written into ``project.json``; a different version is refused.
FORMAT_NAME = "napari-pathoseg-review"
FORMAT_VERSION = 1
#: Review states of a tile.
STATES = ("pending", "accepted", "rejected")
#: Kinds of project: nucleus instance masks, or tissue class-id masks.
KINDS = ("nuclei", "tissue")
#: The project's description, its review state, and the folder of tile folders.
PROJECT_FILE = "project.json"
REVIEW_FILE = "review.json"
TILES_DIR = "tiles"


class ReviewProjectError(PathosegError):
    """A review project is missing, damaged, of another format version, or misused."""


@dataclass
class ProjectInfo:
    """Contents of ``project.json``.

    Attributes
    ----------
    source : str
        Slide file or image folder, relative to the project folder when possible (posix).
    source_kind : str
        ``"slide"`` or ``"folder"``.
    model : str
        Name or path of the teacher model.
    tile_size : int
        Tile height and width in pixels at ``mpp``.
    mpp : float or None
        Resolution (µm/px) the tiles were cut at, None when unknown.
    created : str
        ISO-8601 UTC creation time.
    level : int
        Slide level the tiles were read from (0 for folders).
    downsample : float
        Level-0 pixels per tile pixel (tile positions are in level-0 pixels).
    kind : str
        ``"nuclei"`` (instance masks, the default) or ``"tissue"`` (class-id masks).
    classes : list of str
        Class names of a tissue project (mask id ``i`` is ``classes[i - 1]``); empty for nuclei.
    """

    source: str
    source_kind: str
    model: str
    tile_size: int
    mpp: float | None
    created: str
    level: int = 0
    downsample: float = 1.0
    kind: str = "nuclei"
    classes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, **asdict(self)}


@dataclass
class TileRecord:
    """Review state and scores of one candidate tile.

    Attributes
    ----------
    tile_id : str
        Folder name under ``tiles/``.
    score : float
        Mean per-pixel confidence (see :func:`tile_score`).
    x, y : int
        Top-left corner in level-0 pixels of the source slide (for a folder source: in the
        source image's pixels).
    height, width : int
        Tile size in level-0 (source) pixels.
    state : str
        ``"pending"``, ``"accepted"`` or ``"rejected"``.
    edited : bool
        The mask was changed by the reviewer.
    n_nuclei : int
        Number of nuclei in the mask.
    confidences : list of float
        Per-nucleus confidence, entry ``i`` for label ``i + 1``.
    source_name : str
        Image file of a folder source (relative to the folder), or "" for a slide.
    """

    tile_id: str
    score: float
    x: int
    y: int
    height: int
    width: int
    state: str = "pending"
    edited: bool = False
    n_nuclei: int = 0
    confidences: list[float] = field(default_factory=list)
    source_name: str = ""

    @property
    def status(self) -> str:
        """``"pending"``, ``"accepted"``, ``"rejected"``, or ``"corrected"`` (accepted after an edit)."""
        return "corrected" if self.state == "accepted" and self.edited else self.state

    @classmethod
    def from_dict(cls, data: dict, *, where: Path) -> TileRecord:
        try:
            rec = cls(
                tile_id=str(data["tile_id"]),
                score=float(data["score"]),
                x=int(data["x"]),
                y=int(data["y"]),
                height=int(data["height"]),
                width=int(data["width"]),
                state=str(data["state"]),
                edited=bool(data["edited"]),
                n_nuclei=int(data["n_nuclei"]),
                confidences=[float(c) for c in data["confidences"]],
                source_name=str(data.get("source_name", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ReviewProjectError(
                f"{where} is damaged: a tile record is incomplete or malformed ({exc!r}); "
                f"restore the file or generate the pseudo-labels again."
            ) from None
        if rec.state not in STATES:
            raise ReviewProjectError(
                f"{where} is damaged: tile {rec.tile_id} has state {rec.state!r}, expected one "
                f"of {STATES}."
            )
        if "/" in rec.tile_id or "\\" in rec.tile_id or rec.tile_id in {"", ".", ".."}:
            raise ReviewProjectError(f"{where} is damaged: invalid tile id {rec.tile_id!r}.")
        return rec


@dataclass
class TrainingItem:
    """One accepted pseudo-labelled tile for training.

    Attributes
    ----------
    image : (H, W, 3) uint8
        The tile as read (X side).
    normalized : (H, W, 3) uint8
        The teacher's stain-normalised tile (pseudo-Y).
    mask : (H, W) uint16
        Instance labels (nucleus mask = ``mask > 0``).
    tile_id : str
    score : float
    """

    image: np.ndarray
    normalized: np.ndarray
    mask: np.ndarray
    tile_id: str
    score: float
