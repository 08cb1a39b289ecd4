"""Teacher pseudo-labels: generation, scoring, filtering and the on-disk review project.

M2 step S23 (methods.md): a trained teacher runs over unlabelled tiles; each tile's quality
score is the mean over its pixels of the confidence ``max(p, 1 - p)`` of the nucleus
probability ``p``; tiles above a threshold are kept, their stain-normalised images serve as
pseudo-Y images and their masks as pseudo-labels. Here a pathologist can also review the
candidates (accept, reject, correct the masks) before they go into training.

A :class:`ReviewProject` is a folder a user can move (only relative paths inside)::

    project.json            format name + version, source, model, tile size, mpp, created
    review.json             threshold and every tile's record (state, edited, score, ...)
    tiles/<id>/image.png    the tile as read (RGB uint8)
    tiles/<id>/normalized.png   the teacher's stain-normalised tile (RGB uint8, pseudo-Y)
    tiles/<id>/mask.png     instance labels (uint16, 0 background, 1..N consecutive)
    tiles/<id>/prob.png     nucleus probability quantised to uint8 (p * 255)

Every file is written atomically (temporary file in the same folder, then ``os.replace``), so
a crash while saving leaves either the old or the new version, never a damaged one.

No Qt or napari here; the Review dock (:mod:`napari_pathoseg._widgets.review`) drives it.
"""

from __future__ import annotations

import datetime as _dt
import io
import itertools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.segmentation import relabel_sequential, watershed
from skimage.transform import resize

from napari_pathoseg.errors import CancelledError, PathosegError
from napari_pathoseg.events import run_to_end

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
    "folder_tiles",
    "generate_pseudolabels",
    "merge_nuclei",
    "nucleus_confidences",
    "run_pseudolabels",
    "slide_tiles",
    "split_nucleus",
    "tile_score",
]

logger = logging.getLogger(__name__)

#: Name and version written into ``project.json``; a different version is refused.
FORMAT_NAME = "napari-pathoseg-review"
FORMAT_VERSION = 1
#: Review states of a tile.
STATES = ("pending", "accepted", "rejected")
#: File suffixes read as images from a folder source.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

_PROJECT_FILE = "project.json"
_REVIEW_FILE = "review.json"
_TILES_DIR = "tiles"
_TMP_PREFIX = ".tmp-"


class ReviewProjectError(PathosegError):
    """A review project is missing, damaged, of another format version, or misused."""


# --------------------------------------------------------------------------------------------
# atomic file writing


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, json.dumps(obj, indent=1, allow_nan=False).encode("utf-8"))


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReviewProjectError(
            f"{path} is missing: this folder is not a complete review project. Open the "
            f"project folder that contains {_PROJECT_FILE}, or generate the pseudo-labels again."
        ) from None
    except OSError as exc:
        raise ReviewProjectError(f"Cannot read {path}: {exc}.") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReviewProjectError(
            f"{path} is damaged (not valid JSON: {exc.msg} at line {exc.lineno}); restore it "
            f"from a backup or generate the pseudo-labels again."
        ) from None


def _read_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im)
    except FileNotFoundError:
        raise ReviewProjectError(
            f"{path} is missing from the review project; restore it or generate the "
            f"pseudo-labels again."
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ReviewProjectError(
            f"{path} is damaged and cannot be read as PNG ({exc}); restore it or regenerate."
        ) from exc


# --------------------------------------------------------------------------------------------
# scores and mask editing


def _confidence(prob: np.ndarray) -> np.ndarray:
    p = np.asarray(prob, dtype=np.float32)
    return np.maximum(p, 1.0 - p)


def tile_score(prob: np.ndarray) -> float:
    """Quality score of a tile: the mean over its pixels of ``max(p, 1 - p)``.

    Parameters
    ----------
    prob : (H, W) float array
        Nucleus probability in [0, 1].

    Returns
    -------
    float
        In [0.5, 1]; 1 means the teacher is certain of every pixel.

    Examples
    --------
    >>> tile_score(np.array([[0.0, 1.0], [0.5, 0.9]]))
    0.85
    """
    if np.asarray(prob).size == 0:
        raise ReviewProjectError("Cannot score an empty probability map.")
    return round(float(_confidence(prob).mean(dtype=np.float64)), 6)


def nucleus_confidences(prob: np.ndarray, labels: np.ndarray) -> list[float]:
    """Per-nucleus confidence: the mean of ``max(p, 1 - p)`` over each nucleus.

    Parameters
    ----------
    prob : (H, W) float array
        Nucleus probability in [0, 1].
    labels : (H, W) int array
        Instance labels, 0 background, 1..N consecutive.

    Returns
    -------
    list of float
        Entry ``i`` is the confidence of label ``i + 1`` (N entries, rounded to 4
        decimals); a label with no pixels gets 0.
    """
    labels = np.asarray(labels)
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return []
    means = ndi.mean(_confidence(prob), labels=labels, index=np.arange(1, n + 1))
    return [round(float(m), 4) if np.isfinite(m) else 0.0 for m in np.atleast_1d(means)]


def split_nucleus(
    mask: np.ndarray, label: int, *, min_distance: int = 3, parts: int | None = None
) -> tuple[np.ndarray, list[int]]:
    """Split one nucleus by a watershed of its distance transform.

    Seeds are the local maxima of the Euclidean distance transform inside the object; if
    fewer than two are found (a smooth, elongated blob), the two ends of its major axis
    are used instead, so the object is always cut in at least two.

    Parameters
    ----------
    mask : (H, W) int array
        Instance labels (not modified).
    label : int
        Id of the nucleus to split.
    min_distance : int
        Minimum distance in pixels between two seeds.
    parts : int, optional
        Keep at most this many seeds (the deepest ones).

    Returns
    -------
    new_mask : (H, W) array of mask's dtype
        The first part keeps ``label``; the others get new ids above ``mask.max()``.
    ids : list of int
        Ids of all parts, ``label`` first.
    """
    mask = np.asarray(mask)
    obj = mask == label
    if label == 0 or not obj.any():
        raise ReviewProjectError(f"Label {label} is not a nucleus of this mask; pick a label > 0 that is present.")
    if obj.sum() < 4:
        raise ReviewProjectError(f"Nucleus {label} has only {int(obj.sum())} pixels: too small to split.")
    dist = ndi.distance_transform_edt(obj)
    peaks = peak_local_max(
        dist, min_distance=max(1, int(min_distance)), labels=obj.astype(np.int32),
        exclude_border=False, num_peaks=parts if parts else np.inf,
    )
    markers = np.zeros(mask.shape, dtype=np.int32)
    if len(peaks) >= 2:
        for i, (r, c) in enumerate(peaks, start=1):
            markers[r, c] = i
    else:
        rr, cc = np.nonzero(obj)
        coords = np.stack([rr, cc], axis=1).astype(np.float64)
        centred = coords - coords.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        proj = centred @ vt[0]
        lo, hi = np.quantile(proj, [0.1, 0.9])
        markers[rr[proj <= lo], cc[proj <= lo]] = 1
        markers[rr[proj >= hi], cc[proj >= hi]] = 2
    parts_map = watershed(-dist, markers, mask=obj)
    new = mask.copy()
    next_id = int(mask.max()) + 1
    ids = [int(label)]
    for part in range(2, int(parts_map.max()) + 1):
        sel = parts_map == part
        if not sel.any():
            continue
        new[sel] = next_id
        ids.append(next_id)
        next_id += 1
    if len(ids) < 2:
        raise ReviewProjectError(f"Nucleus {label} could not be split; erase or repaint it instead.")
    if np.issubdtype(new.dtype, np.integer) and next_id - 1 > np.iinfo(new.dtype).max:
        raise ReviewProjectError(
            f"Splitting nucleus {label} needs id {next_id - 1}, which a {new.dtype} mask cannot hold."
        )
    return new, ids


def merge_nuclei(mask: np.ndarray, labels: Iterable[int], *, bridge: int = 1) -> tuple[np.ndarray, int]:
    """Merge several nuclei into one (the smallest id), closing the gap between them.

    Parameters
    ----------
    mask : (H, W) int array
        Instance labels (not modified).
    labels : iterable of int
        Ids to merge (at least two present ones).
    bridge : int
        Radius in pixels of a binary closing that fills background pixels between the
        merged parts (other nuclei are never overwritten); 0 disables it.

    Returns
    -------
    new_mask : (H, W) array of mask's dtype
    label : int
        The id of the merged nucleus.
    """
    mask = np.asarray(mask)
    ids = sorted({int(v) for v in labels if int(v) != 0})
    present = [i for i in ids if (mask == i).any()]
    if len(present) < 2:
        raise ReviewProjectError(
            f"Select at least two nuclei present in the mask to merge (got {ids})."
        )
    target = present[0]
    new = mask.copy()
    sel = np.isin(mask, present)
    new[sel] = target
    if bridge > 0:
        structure = ndi.generate_binary_structure(2, 1)
        closed = ndi.binary_closing(sel, structure=structure, iterations=int(bridge))
        new[closed & (mask == 0)] = target
    return new, target


# --------------------------------------------------------------------------------------------
# records


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
    """

    source: str
    source_kind: str
    model: str
    tile_size: int
    mpp: float | None
    created: str
    level: int = 0
    downsample: float = 1.0

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


# --------------------------------------------------------------------------------------------
# the project


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
    ) -> ReviewProject:
        """Start an empty project in ``root`` (created if needed).

        Raises
        ------
        ReviewProjectError
            ``root`` already holds a project (or other files) and ``overwrite`` is False.
        """
        root = Path(root)
        if source_kind not in {"slide", "folder"}:
            raise ReviewProjectError(f"source_kind must be 'slide' or 'folder', got {source_kind!r}.")
        if root.exists() and not root.is_dir():
            raise ReviewProjectError(f"{root} is a file; choose a folder for the review project.")
        if root.is_dir() and any(root.iterdir()):
            if not (root / _PROJECT_FILE).exists():
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
        )
        proj = cls(root, info, {}, threshold)
        proj.save()  # the (empty) review first: it never lists tiles that are gone
        _atomic_write_json(root / _PROJECT_FILE, info.to_dict())
        if overwrite and (root / _TILES_DIR).is_dir():
            shutil.rmtree(root / _TILES_DIR)
        logger.info("created review project %s", root)
        return proj

    @classmethod
    def open(cls, root: str | os.PathLike) -> ReviewProject:
        """Reopen a project folder; raises :class:`ReviewProjectError` if it is not usable."""
        root = Path(root)
        if not root.is_dir():
            raise ReviewProjectError(f"{root} is not a folder; choose a review project folder.")
        meta = _read_json(root / _PROJECT_FILE)
        where = root / _PROJECT_FILE
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
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ReviewProjectError(f"{where} is damaged: missing or malformed field {exc!r}.") from None
        rpath = root / _REVIEW_FILE
        review = _read_json(rpath)
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
        for tmp in list(self.root.glob(_TMP_PREFIX + "*")) + list(
            (self.root / _TILES_DIR).glob(f"*/{_TMP_PREFIX}*")
        ):
            try:
                tmp.unlink()
                logger.info("removed leftover temporary file %s", tmp)
            except OSError:
                pass

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
        _atomic_write_bytes(self.root / _REVIEW_FILE, body.encode("utf-8"))

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
        return self.root / _TILES_DIR / tile_id

    def read_image(self, tile_id: str) -> np.ndarray:
        """(H, W, 3) uint8 tile as read from the source."""
        return _read_png(self.tile_dir(tile_id) / "image.png")

    def read_normalized(self, tile_id: str) -> np.ndarray:
        """(H, W, 3) uint8 teacher's stain-normalised tile (pseudo-Y)."""
        return _read_png(self.tile_dir(tile_id) / "normalized.png")

    def read_mask(self, tile_id: str) -> np.ndarray:
        """(H, W) uint16 instance labels."""
        return _read_png(self.tile_dir(tile_id) / "mask.png").astype(np.uint16, copy=False)

    def read_prob(self, tile_id: str) -> np.ndarray:
        """(H, W) float32 nucleus probability (quantised to 1/255)."""
        return _read_png(self.tile_dir(tile_id) / "prob.png").astype(np.float32) / 255.0

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
        image = _check_rgb(image, "image")
        normalized = _check_rgb(normalized, "normalized")
        prob = np.clip(np.asarray(prob, dtype=np.float32), 0.0, 1.0)
        labels = np.asarray(labels)
        shape = image.shape[:2]
        if normalized.shape[:2] != shape or prob.shape != shape or labels.shape != shape:
            raise ReviewProjectError(
                f"Tile arrays disagree in shape: image {image.shape}, normalized "
                f"{normalized.shape}, prob {prob.shape}, labels {labels.shape}."
            )
        mask = _to_uint16_labels(labels)
        tile_id = f"{len(self._records):06d}"
        while tile_id in self._records:
            tile_id = f"{int(tile_id) + 1:06d}"
        d = self.root / _TILES_DIR / tile_id
        _atomic_write_bytes(d / "image.png", _png_bytes(image))
        _atomic_write_bytes(d / "normalized.png", _png_bytes(normalized))
        _atomic_write_bytes(d / "prob.png", _png_bytes(np.round(prob * 255).astype(np.uint8)))
        _atomic_write_bytes(d / "mask.png", _png_bytes(mask))
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
        is flagged ``edited``.
        """
        rec = self.record(tile_id)
        mask = np.asarray(mask)
        if mask.shape != (self._tile_shape(rec)):
            raise ReviewProjectError(
                f"The edited mask of tile {tile_id} has shape {mask.shape}; expected "
                f"{self._tile_shape(rec)}."
            )
        labels = _to_uint16_labels(mask)
        _atomic_write_bytes(self.tile_dir(tile_id) / "mask.png", _png_bytes(labels))
        rec.edited = True
        rec.n_nuclei = int(labels.max())
        rec.confidences = nucleus_confidences(self.read_prob(tile_id), labels)
        self._changed(tile_id)
        self.save()
        return rec

    def _tile_shape(self, rec: TileRecord) -> tuple[int, int]:
        with Image.open(self.tile_dir(rec.tile_id) / "prob.png") as im:
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
                w = _confidence(self.read_prob(item.tile_id))
            yield item.image, item.mask, w


def _relative_source(source: Path, root: Path) -> str:
    try:
        return Path(os.path.relpath(source.resolve(), root.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return source.resolve().as_posix()


def _check_rgb(array: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(array)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ReviewProjectError(f"{name} must be an (H, W, 3) RGB array, got shape {a.shape}.")
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.size and a.max() <= 1.0:
            a = a * 255.0
        a = np.clip(np.round(a), 0, 255).astype(np.uint8)
    return a


def _to_uint16_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ReviewProjectError(f"A mask must be a 2-D label image, got shape {labels.shape}.")
    if not np.issubdtype(labels.dtype, np.integer):
        if np.issubdtype(labels.dtype, np.bool_):
            labels = ndi.label(labels)[0]
        else:
            raise ReviewProjectError(f"A mask must hold integer labels, got dtype {labels.dtype}.")
    if labels.size and labels.min() < 0:
        raise ReviewProjectError("A mask must not hold negative labels.")
    seq = relabel_sequential(labels.astype(np.int64, copy=False))[0]
    if seq.size and seq.max() > np.iinfo(np.uint16).max:
        raise ReviewProjectError(f"A tile mask holds {seq.max()} nuclei; at most 65535 fit a uint16 PNG.")
    return seq.astype(np.uint16)


# --------------------------------------------------------------------------------------------
# unlabelled tile sources


@dataclass
class UnlabelledTile:
    """A tile to pseudo-label.

    Attributes
    ----------
    image : (H, W, 3) uint8
        Pixels at the working resolution (H = W = tile size).
    x, y : int
        Top-left corner in level-0 (source) pixels.
    height, width : int
        Extent in level-0 (source) pixels.
    source_name : str
        Image file name for a folder source, "" for a slide.
    """

    image: np.ndarray
    x: int
    y: int
    height: int
    width: int
    source_name: str = ""


def _fit_tile(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an (h, w, 3) uint8 array to (size, size, 3) uint8."""
    if image.shape[:2] == (size, size):
        return image
    out = resize(image, (size, size), order=1, preserve_range=True, anti_aliasing=True)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def slide_tiles(
    slide: Any, *, tile_size: int = 256, mpp: float | None = None, min_tissue: float = 0.5
) -> tuple[list[Any], Callable[[Any], UnlabelledTile], int, float]:
    """Tissue tiles of a slide at ``mpp`` (see :func:`napari_pathoseg.tiling.tile_grid`).

    Parameters
    ----------
    slide : napari_pathoseg.wsi.slide.Slide
    tile_size : int
        Tile size in pixels at the working resolution.
    mpp : float, optional
        Working resolution in µm/px; the finest level at least this fine is read and each
        window resampled to ``tile_size``. None reads level 0 as is.
    min_tissue : float
        Minimum tissue fraction of a kept tile.

    Returns
    -------
    grid : list of Tile
    read : callable
        ``read(tile) -> UnlabelledTile`` reads one tile (memory bounded by the tile size).
    level : int
        Level read.
    downsample : float
        Level-0 pixels per working pixel.
    """
    from napari_pathoseg.tiling import choose_level, read_tile, tile_grid

    level, scale = choose_level(slide, mpp=mpp)
    downsample = float(slide.level_downsample(level)) / scale
    grid = tile_grid(slide, mpp=mpp, level=None if mpp is not None else 0, size=tile_size,
                     overlap=0, tissue_only=True, min_tissue=min_tissue)

    def read(tile: Any) -> UnlabelledTile:
        n = tile.read_size or max(tile.height, tile.width)
        extent = int(round(n * tile.downsample))  # level-0 pixels
        return UnlabelledTile(
            image=_fit_tile(np.asarray(read_tile(slide, tile))[..., :3], tile_size),
            x=int(tile.x0), y=int(tile.y0), height=extent, width=extent,
        )

    return grid, read, level, downsample


def folder_tiles(
    folder: str | os.PathLike, *, tile_size: int = 256, scale: float = 1.0
) -> Iterator[UnlabelledTile]:
    """Cut every image of a folder into non-overlapping tiles.

    Parameters
    ----------
    folder : path
        Folder of RGB images (png, jpg, tif, ...), read in sorted order (not recursive).
    tile_size : int
        Tile size at the working resolution.
    scale : float
        Working pixels per source pixel (``source_mpp / working_mpp``); images are resized
        by it first. Partial tiles at the right/bottom edge are padded with white.

    Yields
    ------
    UnlabelledTile
        Positions in the source image's pixels.
    """
    for path in _folder_images(Path(folder)):
        try:
            with Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise ReviewProjectError(f"Cannot read the image {path} ({exc}); remove it from the folder.") from exc
        if scale != 1.0:
            rgb = resize(rgb, (max(1, round(rgb.shape[0] * scale)), max(1, round(rgb.shape[1] * scale))),
                         order=1, preserve_range=True, anti_aliasing=scale < 1).round().astype(np.uint8)
        rows, cols = rgb.shape[:2]
        src = round(tile_size / scale)
        for r in range(0, rows, tile_size):
            for c in range(0, cols, tile_size):
                tile = np.full((tile_size, tile_size, 3), 255, dtype=np.uint8)
                part = rgb[r : r + tile_size, c : c + tile_size]
                tile[: part.shape[0], : part.shape[1]] = part
                yield UnlabelledTile(
                    image=tile, x=round(c / scale), y=round(r / scale), height=src, width=src,
                    source_name=path.name,
                )


def _count_folder_tiles(files: Sequence[Path], *, tile_size: int, scale: float) -> int:
    """Number of tiles :func:`folder_tiles` yields (reads image headers only)."""
    total = 0
    for path in files:
        try:
            with Image.open(path) as im:
                cols, rows = im.size
        except (OSError, ValueError) as exc:
            raise ReviewProjectError(f"Cannot read the image {path} ({exc}); remove it from the folder.") from exc
        rows, cols = max(1, round(rows * scale)), max(1, round(cols * scale))
        total += -(-rows // tile_size) * -(-cols // tile_size)
    return total


def _folder_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ReviewProjectError(f"{folder} is not a folder of images.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ReviewProjectError(
            f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); choose a folder of tiles."
        )
    return files


# --------------------------------------------------------------------------------------------
# generation


@dataclass
class GenerationProgress:
    """Progress of :func:`generate_pseudolabels`: ``done`` of ``total`` tiles processed."""

    done: int
    total: int
    kept: int
    last_score: float | None = None


@dataclass
class GenerationDone:
    """Final event of :func:`generate_pseudolabels`."""

    project: ReviewProject
    processed: int
    kept: int


def generate_pseudolabels(
    source: str | os.PathLike | Any,
    out: str | os.PathLike,
    *,
    predict: Callable[[np.ndarray], dict],
    to_instances: Callable[..., np.ndarray],
    model_name: str = "model",
    tile_size: int = 256,
    mpp: float | None = None,
    source_mpp: float | None = None,
    threshold: float = 0.0,
    max_tiles: int | None = None,
    batch_size: int = 4,
    min_tissue: float = 0.5,
    overwrite: bool = False,
    cancel: Any = None,
) -> Iterator[GenerationProgress | GenerationDone]:
    """Run a teacher over unlabelled tiles and store the candidates in a review project.

    Parameters
    ----------
    source : path or Slide
        A slide file (or an open :class:`~napari_pathoseg.wsi.slide.Slide`), or a folder of images.
    out : path
        Project folder to create.
    predict : callable
        ``predict(batch (B, H, W, 3) uint8) -> {"prob": (B, H, W) float32,
        "normalized": (B, H, W, 3) uint8, ...}`` (e.g. ``NucleusModel.predict``).
    to_instances : callable
        ``to_instances(prob (H, W)) -> (H, W) int labels`` (e.g. ``NucleusModel.to_instances``;
        an ``extra`` entry of the prediction is passed on as ``extra=`` when present).
    model_name : str
        Recorded in ``project.json``.
    tile_size : int
        Tile size fed to the teacher.
    mpp : float, optional
        Working resolution for a slide (default: level 0); for a folder, with
        ``source_mpp``, the images are rescaled by ``source_mpp / mpp``.
    source_mpp : float, optional
        Resolution of the folder images.
    threshold : float
        Tiles scoring below it are not stored (M2 filtering); 0 keeps all.
    max_tiles : int, optional
        Process at most this many tiles (the first ones in grid/file order).
    batch_size : int
    min_tissue : float
        Minimum tissue fraction of a slide tile.
    overwrite : bool
        Replace a project already in ``out``.
    cancel : threading.Event-like, optional
        When ``cancel.is_set()``, stops after the current batch (the tiles stored so far
        stay in the project) and raises :class:`~napari_pathoseg.errors.CancelledError`.

    Yields
    ------
    GenerationProgress
        After each batch.
    GenerationDone
        Last, with the project.
    """
    if batch_size < 1 or tile_size < 1:
        raise ReviewProjectError(f"batch_size and tile_size must be >= 1 (got {batch_size}, {tile_size}).")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ReviewProjectError(f"The score threshold must be in [0, 1], got {threshold}.")
    slide = None
    own_slide = False
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        src_path = Path(source)
        scale = 1.0
        if mpp is not None and source_mpp is not None:
            scale = float(source_mpp) / float(mpp)
        tiles_iter: Iterable[Any] = folder_tiles(src_path, tile_size=tile_size, scale=scale)
        images_list = _folder_images(src_path)
        total = _count_folder_tiles(images_list, tile_size=tile_size, scale=scale)
        if max_tiles is not None:
            total = min(total, int(max_tiles))
        project = ReviewProject.create(
            out, source=src_path, source_kind="folder", model=model_name, tile_size=tile_size,
            mpp=mpp if mpp is not None else source_mpp, threshold=threshold,
            overwrite=overwrite, downsample=1.0 / scale,
        )
        read = None
        logger.info("pseudo-labelling %d tiles of %d images in %s", total, len(images_list), src_path)
    else:
        if isinstance(source, (str, os.PathLike)):
            from napari_pathoseg.wsi.slide import open_slide

            slide = open_slide(source)
            own_slide = True
            src_path = Path(source)
        else:
            slide = source
            src_path = Path(str(getattr(slide.metadata, "path", "slide")))
        try:
            grid, read, level, downsample = slide_tiles(slide, tile_size=tile_size, mpp=mpp, min_tissue=min_tissue)
        except BaseException:
            if own_slide:
                slide.close()
            raise
        if max_tiles is not None:
            grid = grid[: int(max_tiles)]
        total = len(grid)
        tiles_iter = grid
        project = ReviewProject.create(
            out, source=src_path, source_kind="slide", model=model_name, tile_size=tile_size,
            mpp=mpp if mpp is not None else slide.mpp, level=level, downsample=downsample,
            threshold=threshold, overwrite=overwrite,
        )
        logger.info("pseudo-labelling %d tissue tiles of %s", total, src_path)
    if max_tiles is not None:
        tiles_iter = itertools.islice(tiles_iter, int(max_tiles))
    done = kept = 0
    try:
        batch: list[UnlabelledTile] = []
        it = iter(tiles_iter)
        while True:
            if cancel is not None and cancel.is_set():
                project.save()
                raise CancelledError(
                    f"Pseudo-label generation stopped after {done} tiles; the {kept} tiles kept so "
                    f"far are in {project.root}."
                )
            batch = []
            for item in it:
                batch.append(read(item) if read is not None else item)
                if len(batch) == batch_size:
                    break
            if not batch:
                break
            images = np.stack([t.image for t in batch])  # (B, H, W, 3) uint8
            pred = predict(images)
            prob = np.asarray(pred["prob"], dtype=np.float32)  # (B, H, W)
            norm = np.asarray(pred.get("normalized", images))  # (B, H, W, 3)
            extra = pred.get("extra")
            if prob.shape != images.shape[:3]:
                raise ReviewProjectError(
                    f"The model returned probabilities of shape {prob.shape} for a batch of "
                    f"shape {images.shape}; expected {images.shape[:3]}."
                )
            last = None
            for i, tile in enumerate(batch):
                score = tile_score(prob[i])
                last = score
                if score < threshold:
                    continue
                if extra is not None:
                    labels = to_instances(prob[i], extra=_index_extra(extra, i))
                else:
                    labels = to_instances(prob[i])
                project.add_tile(
                    tile.image, norm[i], prob[i], labels, x=tile.x, y=tile.y, height=tile.height,
                    width=tile.width, source_name=tile.source_name, save=False,
                )
                kept += 1
            done += len(batch)
            project.save()
            yield GenerationProgress(done=done, total=total, kept=kept, last_score=last)
    finally:
        if own_slide and slide is not None:
            slide.close()
    yield GenerationDone(project=project, processed=done, kept=kept)


def _index_extra(extra: Any, i: int) -> Any:
    if isinstance(extra, dict):
        return {k: _index_extra(v, i) for k, v in extra.items()}
    if isinstance(extra, (np.ndarray,)) or hasattr(extra, "__getitem__"):
        return extra[i]
    return extra


def run_pseudolabels(
    source: str | os.PathLike | Any,
    out: str | os.PathLike,
    *,
    progress: Callable[[GenerationProgress], None] | None = None,
    **kwargs: Any,
) -> ReviewProject:
    """Drive :func:`generate_pseudolabels` to the end (headless) and return the project.

    ``kwargs`` are passed on; ``progress`` is called with each progress event.
    """
    def report(event: Any) -> None:
        if progress is not None and not isinstance(event, GenerationDone):
            progress(event)

    return run_to_end(generate_pseudolabels(source, out, **kwargs), GenerationDone, progress=report).project
