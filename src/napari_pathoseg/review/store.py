"""The review project on disk: :class:`ReviewProject`, a folder of pseudo-labelled tiles.

The folder layout and record types are in :mod:`.records`; the files are written atomically
and read with clear errors by :mod:`.tile_files`. Every change (a state, an edited mask, the
threshold) is saved at once; a crash while saving leaves either the old or the new version of
a file, never a damaged one, and leftover temporary files are removed when the project is
opened. No Qt or napari here; the Review dock (:mod:`napari_pathoseg._widgets.review`) drives it.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from napari_pathoseg._atomic import write_bytes
from napari_pathoseg.review.records import (
    FORMAT_NAME,
    FORMAT_VERSION,
    KINDS,
    PROJECT_FILE,
    REVIEW_FILE,
    STATES,
    TILES_DIR,
    ProjectInfo,
    ReviewProjectError,
    TileRecord,
    TrainingItem,
)
from napari_pathoseg.review.scoring import confidence, nucleus_confidences, tile_score
from napari_pathoseg.review.tile_files import (
    check_rgb,
    read_json,
    read_png,
    remove_temp_files,
    to_uint16_labels,
    write_json,
    write_png,
)

__all__ = ["ReviewProject"]

logger = logging.getLogger(__name__)


class ReviewProject:
    """A folder of pseudo-labelled tiles and their review state.

    Create one with :meth:`create` (or :func:`generate_pseudolabels`), reopen it with
    :meth:`open`. Every change is saved at once, atomically.

    Examples
    --------
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp()) / "proj"
    >>> proj = ReviewProject.create(root, source=root.parent, source_kind="folder",
    ...                             model="otsu", tile_size=4, mpp=None)
    >>> prob = np.full((4, 4), 0.9, np.float32)
    >>> rec = proj.add_tile(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8),
    ...                     prob, np.ones((4, 4), np.uint16), x=0, y=0)
    >>> proj.set_state(rec.tile_id, "accepted").state
    'accepted'
    >>> ReviewProject.open(root).counts()["accepted"]
    1
    """

    def __init__(self, root: Path, info: ProjectInfo, records: dict[str, TileRecord], threshold: float) -> None:
        self.root = Path(root)
        self.info = info
        self._records = records
        self._threshold = float(threshold)
        self._json: dict[str, str] = {}  # tile id -> cached JSON of its record

    # ---- create / open ------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        root: str | os.PathLike,
        *,
        source: str | os.PathLike,
        source_kind: str,
        model: str,
        tile_size: int,
        mpp: float | None,
        level: int = 0,
        downsample: float = 1.0,
        threshold: float = 0.0,
        overwrite: bool = False,
        kind: str = "nuclei",
        classes: Sequence[str] = (),
    ) -> ReviewProject:
        """Start an empty project in ``root`` (created if needed).

        ``kind="tissue"`` makes a project of class-id masks named by ``classes``
        (:meth:`add_class_tile`); the default ``"nuclei"`` one of instance masks (:meth:`add_tile`).

        Raises
        ------
        ReviewProjectError
            ``root`` already holds a project (or other files) and ``overwrite`` is False.
        """
        root = Path(root)
        if source_kind not in {"slide", "folder"}:
            raise ReviewProjectError(f"source_kind must be 'slide' or 'folder', got {source_kind!r}.")
        if kind not in KINDS:
            raise ReviewProjectError(f"kind must be one of {KINDS}, got {kind!r}.")
        if kind == "tissue" and not 1 <= len(classes) <= 255:
            raise ReviewProjectError("A tissue review project needs 1 to 255 class names.")
        if root.exists() and not root.is_dir():
            raise ReviewProjectError(f"{root} is a file; choose a folder for the review project.")
        if root.is_dir() and any(root.iterdir()):
            if not (root / PROJECT_FILE).exists():
                raise ReviewProjectError(
                    f"{root} is not empty and is not a review project; choose an empty or new folder."
                )
            if not overwrite:
                raise ReviewProjectError(
                    f"{root} already holds a review project; open it, or choose another folder."
                )
        root.mkdir(parents=True, exist_ok=True)
        info = ProjectInfo(
            source=_relative_source(Path(source), root),
            source_kind=source_kind,
            model=str(model),
            tile_size=int(tile_size),
            mpp=None if mpp is None else float(mpp),
            created=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            level=int(level),
            downsample=float(downsample),
            kind=kind,
            classes=[str(c) for c in classes],
        )
        proj = cls(root, info, {}, threshold)
        proj.save()  # the (empty) review first: it never lists tiles that are gone
        write_json(root / PROJECT_FILE, info.to_dict())
        if overwrite and (root / TILES_DIR).is_dir():
            shutil.rmtree(root / TILES_DIR)
        logger.info("created review project %s", root)
        return proj

    @classmethod
    def open(cls, root: str | os.PathLike) -> ReviewProject:
        """Reopen a project folder; raises :class:`ReviewProjectError` if it is not usable."""
        root = Path(root)
        if not root.is_dir():
            raise ReviewProjectError(f"{root} is not a folder; choose a review project folder.")
        meta = read_json(root / PROJECT_FILE)
        where = root / PROJECT_FILE
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise ReviewProjectError(
                f"{where} is not a napari-pathoseg review project (format "
                f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT_NAME!r})."
            )
        version = meta.get("version")
        if version != FORMAT_VERSION:
            raise ReviewProjectError(
                f"{where} has review-project format version {version!r}; this napari-pathoseg "
                f"reads version {FORMAT_VERSION}. Open it with the napari-pathoseg version that "
                f"wrote it, or generate the pseudo-labels again."
            )
        try:
            info = ProjectInfo(
                source=str(meta["source"]),
                source_kind=str(meta["source_kind"]),
                model=str(meta["model"]),
                tile_size=int(meta["tile_size"]),
                mpp=None if meta["mpp"] is None else float(meta["mpp"]),
                created=str(meta["created"]),
                level=int(meta.get("level", 0)),
                downsample=float(meta.get("downsample", 1.0)),
                kind=str(meta.get("kind", "nuclei")),
                classes=[str(c) for c in meta.get("classes", [])],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ReviewProjectError(f"{where} is damaged: missing or malformed field {exc!r}.") from None
        if info.kind not in KINDS or (info.kind == "tissue" and not info.classes):
            raise ReviewProjectError(
                f"{where} names project kind {info.kind!r} (classes {info.classes}); this napari-pathoseg "
                f"reads {KINDS} (a tissue project with its class names). Export the project again."
            )
        rpath = root / REVIEW_FILE
        review = read_json(rpath)
        if not isinstance(review, dict) or not isinstance(review.get("tiles"), list):
            raise ReviewProjectError(f"{rpath} is damaged: expected an object with a 'tiles' list.")
        if review.get("version") != FORMAT_VERSION:
            raise ReviewProjectError(
                f"{rpath} has format version {review.get('version')!r}, expected {FORMAT_VERSION}."
            )
        records: dict[str, TileRecord] = {}
        for item in review["tiles"]:
            if not isinstance(item, dict):
                raise ReviewProjectError(f"{rpath} is damaged: a tile record is not an object.")
            rec = TileRecord.from_dict(item, where=rpath)
            records[rec.tile_id] = rec
        try:
            threshold = float(review.get("threshold", 0.0))
        except (TypeError, ValueError):
            raise ReviewProjectError(f"{rpath} is damaged: threshold is not a number.") from None
        proj = cls(root, info, records, threshold)
        proj._clean_temp_files()
        return proj

    def _clean_temp_files(self) -> None:
        """Remove temporary files left by a process killed while saving."""
        remove_temp_files(self.root)

    # ---- saving --------------------------------------------------------------------------
    def save(self) -> None:
        """Write ``review.json`` (atomically).

        Each record's JSON is cached until the project changes it, so saving after one
        accept / reject stays fast with thousands of tiles.
        """
        head = json.dumps(
            {"format": FORMAT_NAME, "version": FORMAT_VERSION, "threshold": self._threshold},
            allow_nan=False,
        )
        parts = []
        for tid, rec in self._records.items():
            text = self._json.get(tid)
            if text is None:
                text = json.dumps(dict(vars(rec)), separators=(",", ":"), allow_nan=False)
                self._json[tid] = text
            parts.append(text)
        body = head[:-1] + ', "tiles": [\n' + ",\n".join(parts) + "\n]}\n"
        write_bytes(self.root / REVIEW_FILE, body.encode("utf-8"), create_parent=True)

    def _changed(self, tile_id: str) -> None:
        self._json.pop(tile_id, None)

    # ---- properties ----------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        """Score threshold: tiles scoring at least this much are kept (saved on change)."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise ReviewProjectError(f"The score threshold must be in [0, 1], got {value}.")
        if value != self._threshold:
            self._threshold = value
            self.save()

    @property
    def source_path(self) -> Path:
        """The slide or image folder the tiles came from, resolved against the project folder."""
        p = Path(self.info.source)
        return p if p.is_absolute() else (self.root / p).resolve()

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, tile_id: object) -> bool:
        return tile_id in self._records

    def record(self, tile_id: str) -> TileRecord:
        """The record of ``tile_id``; raises :class:`ReviewProjectError` for unknown ids.

        Read it; change it only through :meth:`set_state` and :meth:`save_mask`.
        """
        try:
            return self._records[tile_id]
        except KeyError:
            raise ReviewProjectError(f"No tile {tile_id!r} in the review project {self.root}.") from None

    def tiles(
        self,
        *,
        sort_by: str = "score",
        descending: bool = True,
        min_score: float | None = None,
        states: Sequence[str] | None = None,
    ) -> list[TileRecord]:
        """Tile records, filtered and sorted.

        Parameters
        ----------
        sort_by : {"score", "n_nuclei", "tile_id", "state", "x", "y"}
        descending : bool
        min_score : float, optional
            Keep tiles whose score is at least this; ``None`` keeps all (use
            ``min_score=project.threshold`` for the kept tiles).
        states : sequence of str, optional
            Keep only these states.
        """
        keys = {"score", "n_nuclei", "tile_id", "state", "x", "y"}
        if sort_by not in keys:
            raise ReviewProjectError(f"Cannot sort tiles by {sort_by!r}; choose one of {sorted(keys)}.")
        if states is not None:
            bad = set(states) - set(STATES)
            if bad:
                raise ReviewProjectError(f"Unknown tile states {sorted(bad)}; valid: {STATES}.")
        out = [
            r
            for r in self._records.values()
            if (min_score is None or r.score >= min_score) and (states is None or r.state in states)
        ]
        out.sort(key=lambda r: (getattr(r, sort_by), r.tile_id), reverse=descending)
        return out

    def counts(self, *, min_score: float | None = None) -> dict[str, int]:
        """Number of tiles per state (and ``"total"``), optionally only those scoring >= min_score."""
        out = {s: 0 for s in STATES}
        for r in self._records.values():
            if min_score is None or r.score >= min_score:
                out[r.state] += 1
        out["total"] = sum(out[s] for s in STATES)
        return out

    # ---- tile data -----------------------------------------------------------------------
    def tile_dir(self, tile_id: str) -> Path:
        self.record(tile_id)
        return self.root / TILES_DIR / tile_id

    def read_image(self, tile_id: str) -> np.ndarray:
        """(H, W, 3) uint8 tile as read from the source."""
        return read_png(self.tile_dir(tile_id) / "image.png")

    def read_normalized(self, tile_id: str) -> np.ndarray:
        """(H, W, 3) uint8 teacher's stain-normalised tile (pseudo-Y)."""
        return read_png(self.tile_dir(tile_id) / "normalized.png")

    def read_mask(self, tile_id: str) -> np.ndarray:
        """(H, W) uint16 instance labels."""
        return read_png(self.tile_dir(tile_id) / "mask.png").astype(np.uint16, copy=False)

    def read_prob(self, tile_id: str) -> np.ndarray:
        """(H, W) float32 nucleus probability (quantised to 1/255)."""
        return read_png(self.tile_dir(tile_id) / "prob.png").astype(np.float32) / 255.0

    def add_tile(
        self,
        image: np.ndarray,
        normalized: np.ndarray,
        prob: np.ndarray,
        labels: np.ndarray,
        *,
        x: int,
        y: int,
        height: int | None = None,
        width: int | None = None,
        source_name: str = "",
        save: bool = True,
    ) -> TileRecord:
        """Store a new candidate tile and return its record.

        Parameters
        ----------
        image, normalized : (H, W, 3) uint8
        prob : (H, W) float in [0, 1]
        labels : (H, W) int, instance labels (relabelled to 1..N)
        x, y : int
            Top-left corner in level-0 (source) pixels.
        height, width : int, optional
            Extent in level-0 pixels (default: the tile size times the project downsample).
        source_name : str
            Image file of a folder source.
        save : bool
            Rewrite ``review.json`` now (generation batches this).
        """
        image = check_rgb(image, "image")
        normalized = check_rgb(normalized, "normalized")
        prob = np.clip(np.asarray(prob, dtype=np.float32), 0.0, 1.0)
        labels = np.asarray(labels)
        shape = image.shape[:2]
        if normalized.shape[:2] != shape or prob.shape != shape or labels.shape != shape:
            raise ReviewProjectError(
                f"Tile arrays disagree in shape: image {image.shape}, normalized "
                f"{normalized.shape}, prob {prob.shape}, labels {labels.shape}."
            )
        mask = to_uint16_labels(labels)
        tile_id = f"{len(self._records):06d}"
        while tile_id in self._records:
            tile_id = f"{int(tile_id) + 1:06d}"
        d = self.root / TILES_DIR / tile_id
        write_png(d / "image.png", image)
        write_png(d / "normalized.png", normalized)
        write_png(d / "prob.png", np.round(prob * 255).astype(np.uint8))
        write_png(d / "mask.png", mask)
        ds = self.info.downsample
        rec = TileRecord(
            tile_id=tile_id,
            score=tile_score(prob),
            x=int(x),
            y=int(y),
            height=int(height if height is not None else round(shape[0] * ds)),
            width=int(width if width is not None else round(shape[1] * ds)),
            n_nuclei=int(mask.max()),
            confidences=nucleus_confidences(prob, mask),
            source_name=source_name,
        )
        self._records[tile_id] = rec
        if save:
            self.save()
        return rec

    def add_class_tile(self, image: np.ndarray, mask: np.ndarray, *, score: float, name: str,
                       save: bool = True) -> TileRecord:
        """Store a tissue pseudo mask (kind ``"tissue"``) and return its record.

        Parameters
        ----------
        image : (H, W, 3) uint8
            The patch.
        mask : (H, W) int
            Class ids: 0 = no label, 1..n = ``info.classes``.
        score : float
            The classifier's confidence in the mask (the review order: lowest first).
        name : str
            The patch's name (kept as the record's ``source_name``).
        save : bool
            Rewrite ``review.json`` now (an export batches this).
        """
        image = check_rgb(image, "image")
        ids = self._class_ids(mask, image.shape[:2], what=f"the pseudo mask of {name}")
        tile_id = f"{len(self._records):06d}"
        while tile_id in self._records:
            tile_id = f"{int(tile_id) + 1:06d}"
        d = self.root / TILES_DIR / tile_id
        write_png(d / "image.png", image)
        write_png(d / "mask.png", ids)
        h, w = ids.shape
        rec = TileRecord(tile_id=tile_id, score=float(score), x=0, y=0, height=h, width=w,
                         n_nuclei=int(np.count_nonzero(np.bincount(ids.ravel())[1:])), source_name=str(name))
        self._records[tile_id] = rec
        if save:
            self.save()
        return rec

    def _class_ids(self, mask: np.ndarray, shape: tuple[int, ...], *, what: str) -> np.ndarray:
        """``mask`` as uint8 class ids of a tissue project, checked against ``shape`` and the classes."""
        if self.info.kind != "tissue":
            raise ReviewProjectError(f"{self.root} holds nucleus masks; class masks go in a tissue project.")
        m = np.asarray(mask)
        if m.shape != tuple(shape) or not (np.issubdtype(m.dtype, np.integer) or m.dtype == bool):
            raise ReviewProjectError(f"{what} must be an integer (H, W) = {tuple(shape)} mask, got {m.dtype} {m.shape}.")
        n = len(self.info.classes)
        if m.size and (int(m.min()) < 0 or int(m.max()) > n):
            raise ReviewProjectError(
                f"{what} holds class ids {int(m.min())}..{int(m.max())}; use 0 (no label) to {n} "
                f"({', '.join(self.info.classes)})."
            )
        return m.astype(np.uint8)

    def set_state(self, tile_id: str, state: str) -> TileRecord:
        """Mark a tile pending, accepted or rejected (saved at once)."""
        if state not in STATES:
            raise ReviewProjectError(f"Unknown tile state {state!r}; use one of {STATES}.")
        rec = self.record(tile_id)
        if rec.state != state:
            rec.state = state
            self._changed(tile_id)
            self.save()
        return rec

    def save_mask(self, tile_id: str, mask: np.ndarray) -> TileRecord:
        """Replace a tile's mask with a reviewer's edit (relabelled 1..N; saved atomically).

        The per-nucleus confidences are recomputed from the stored probability and the tile
        is flagged ``edited``. In a tissue project the class ids are kept as they are and the
        tile becomes accepted and edited (status ``"corrected"``).
        """
        rec = self.record(tile_id)
        mask = np.asarray(mask)
        if self.info.kind == "tissue":  # class ids, kept as they are; an edited mask is "corrected"
            ids = self._class_ids(mask, self._tile_shape(rec), what=f"The edited mask of tile {tile_id}")
            write_png(self.tile_dir(tile_id) / "mask.png", ids)
            rec.edited, rec.state = True, "accepted"
            rec.n_nuclei = int(np.count_nonzero(np.bincount(ids.ravel())[1:]))
            self._changed(tile_id)
            self.save()
            return rec
        if mask.shape != (self._tile_shape(rec)):
            raise ReviewProjectError(
                f"The edited mask of tile {tile_id} has shape {mask.shape}; expected "
                f"{self._tile_shape(rec)}."
            )
        labels = to_uint16_labels(mask)
        write_png(self.tile_dir(tile_id) / "mask.png", labels)
        rec.edited = True
        rec.n_nuclei = int(labels.max())
        rec.confidences = nucleus_confidences(self.read_prob(tile_id), labels)
        self._changed(tile_id)
        self.save()
        return rec

    def _tile_shape(self, rec: TileRecord) -> tuple[int, int]:
        with Image.open(self.tile_dir(rec.tile_id) / "mask.png") as im:
            w, h = im.size
        return (h, w)

    def accepted_training_items(
        self, *, include_pending: bool = False, min_score: float | None = None
    ) -> Iterator[TrainingItem]:
        """Yield the accepted tiles as (image, pseudo-Y, mask) for student training.

        Parameters
        ----------
        include_pending : bool
            Also yield pending tiles scoring at least the threshold (M2 without human
            review: every kept tile is used). Rejected tiles are never yielded.
        min_score : float, optional
            Threshold for ``include_pending`` (default: the project's threshold).

        Yields
        ------
        TrainingItem
            image (H, W, 3) uint8, normalized (H, W, 3) uint8, mask (H, W) uint16.
        """
        if self.info.kind != "nuclei":
            raise ReviewProjectError(f"{self.root} holds tissue class masks, not nuclei; train on it with "
                                     "pathoseg tissue-train --reviewed PROJECT.")
        thr = self._threshold if min_score is None else float(min_score)
        for rec in self.tiles(sort_by="tile_id", descending=False):
            if rec.state == "accepted" or (include_pending and rec.state == "pending" and rec.score >= thr):
                yield TrainingItem(
                    image=self.read_image(rec.tile_id),
                    normalized=self.read_normalized(rec.tile_id),
                    mask=self.read_mask(rec.tile_id),
                    tile_id=rec.tile_id,
                    score=rec.score,
                )

    def training_triples(
        self,
        *,
        include_pending: bool = False,
        min_score: float | None = None,
        weight: str = "confidence",
    ) -> Iterator[tuple[np.ndarray, np.ndarray, float | np.ndarray]]:
        """Yield ``(image, mask, weight)`` triples for the training datasets.

        The form :class:`napari_pathoseg.methods.nuclei.datasets.PseudoLabelDataset` takes.

        Parameters
        ----------
        include_pending, min_score
            As in :meth:`accepted_training_items`.
        weight : {"confidence", "uniform"}
            ``"confidence"``: the teacher's per-pixel confidence ``max(p, 1 - p)`` as an
            (H, W) float32 map, except for tiles the reviewer edited (weight 1.0, the
            correction is trusted); ``"uniform"``: 1.0 for every tile.

        Yields
        ------
        image : (H, W, 3) uint8
        mask : (H, W) uint16 instance labels
        weight : float or (H, W) float32
        """
        if weight not in {"confidence", "uniform"}:
            raise ReviewProjectError(f"weight must be 'confidence' or 'uniform', got {weight!r}.")
        for item in self.accepted_training_items(include_pending=include_pending, min_score=min_score):
            w: float | np.ndarray = 1.0
            if weight == "confidence" and not self.record(item.tile_id).edited:
                w = confidence(self.read_prob(item.tile_id))
            yield item.image, item.mask, w


def _relative_source(source: Path, root: Path) -> str:
    try:
        return Path(os.path.relpath(source.resolve(), root.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return source.resolve().as_posix()
