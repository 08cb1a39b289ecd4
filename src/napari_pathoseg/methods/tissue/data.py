"""M5 data: the grey > 210 background rule, patch loading and the WSSS4LUAD held-out split.

WSSS4LUAD (``wsss4luad_tissue_masks``: 67 patches with pixel masks, image-level labels derived
from them as the challenge provides them) is split once, deterministically
(:func:`wsss4luad_split`): patches are grouped by their label vector and, within a group in name
order, position ``i % 4 == 1`` goes to **test**, ``i % 8 == 3`` to **val**, the rest to
**train**: 41 train (37 tumour+stroma, 2 stroma-only, 1 normal-only, the one patch with all three
classes), 9 val (8 tumour+stroma, 1 stroma-only), 17 test (15 tumour+stroma, 1 stroma-only,
1 normal-only). Training reads only the
image-level labels of the train patches; the masks are read for val (best epoch) and test
(the scores in the model card).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.methods.tissue.labels import PatchLabel, parse_vector

__all__ = [
    "WSSS_FOLDER",
    "TissueData",
    "TissueImage",
    "background_mask",
    "grey",
    "load_patches",
    "load_rgb",
    "load_wsss4luad",
    "make_tiles",
    "tile_grid",
    "tile_labels",
    "wsss4luad_split",
]

WSSS_FOLDER = "wsss4luad_tissue_masks"


def grey(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of an (..., 3) RGB array, float32 on 0-255."""
    a = np.asarray(rgb, np.float32)
    return a[..., 0] * 0.299 + a[..., 1] * 0.587 + a[..., 2] * 0.114


def background_mask(rgb: np.ndarray, *, threshold: float = 210.0) -> np.ndarray:
    """M5's background rule: grey level above ``threshold`` (bool, same H x W)."""
    return grey(rgb) > threshold


def load_rgb(path: str | Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 (alpha dropped, grey expanded)."""
    from skimage.io import imread

    try:
        a = np.asarray(imread(str(path)))
    except (OSError, ValueError) as exc:
        raise PathosegError(f"{path}: cannot read the image ({exc}).") from None
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] < 3:
        raise PathosegError(f"{path}: not an RGB image (shape {a.shape}).")
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a[..., :3])


@dataclass
class TissueImage:
    """A patch: ``image`` (H, W, 3) uint8, multi-hot ``labels``, ``mask`` (H, W) uint8 or None, ``name``.

    A tile cut from a larger patch names that patch in ``parent`` and its (y, x) there in ``origin``.
    """

    name: str
    image: np.ndarray
    labels: tuple[int, ...]
    mask: np.ndarray | None = None
    parent: str = ""
    origin: tuple[int, int] = (0, 0)


@dataclass
class TissueData:
    """Training patches (labels only) and validation / test patches (with masks).

    ``tiles`` (when ``tile`` > 0): the training patches cut into ``tile`` px tiles, each with the
    multi-hot label of its own pixels (:func:`make_tiles`); stage 1 trains on them and the pseudo
    masks of a training patch are put together from those of its tiles.
    """

    classes: list[str]
    train: list[TissueImage]
    val: list[TissueImage] = field(default_factory=list)
    test: list[TissueImage] = field(default_factory=list)
    source: str = ""
    tiles: list[TissueImage] = field(default_factory=list)
    tile: int = 0
    min_share: float = 0.05

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for t in self.tiles:
            counts[str(list(t.labels))] = counts.get(str(list(t.labels)), 0) + 1
        return {"source": self.source, "classes": list(self.classes), "train": len(self.train),
                "val": len(self.val), "test": len(self.test), "tile": self.tile, "min_share": self.min_share,
                "tiles": len(self.tiles), "tile_labels": dict(sorted(counts.items())),
                "train_names": [t.name for t in self.train], "val_names": [t.name for t in self.val],
                "test_names": [t.name for t in self.test]}


def _read_index(folder: Path) -> list[dict[str, str]]:
    index = folder / "index.csv"
    if not index.is_file():
        raise PathosegError(f"{folder}: no index.csv; point --data at the shared data folder holding {WSSS_FOLDER}/.")
    with open(index, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def wsss4luad_split(folder: str | Path) -> dict[str, list[str]]:
    """The held-out split of ``wsss4luad_tissue_masks`` (image names per part; see the module docstring)."""
    rows = _read_index(Path(folder))
    groups: dict[str, list[str]] = {}
    for r in rows:
        vec = parse_vector(r["image_level_label_tumor_stroma_normal"], 3, where=f"{folder}/index.csv")
        groups.setdefault(str(vec), []).append(Path(r["image"]).stem)
    split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for _, names in sorted(groups.items()):
        for i, n in enumerate(sorted(names)):
            part = "test" if i % 4 == 1 else "val" if i % 8 == 3 else "train"
            split[part].append(n)
    return {k: sorted(v) for k, v in split.items()}


def tile_grid(height: int, width: int, size: int) -> list[tuple[int, int]]:
    """Origins (y, x) of ``size`` px tiles side by side over an image; the last row / column sits
    flush with the far edge (overlapping its neighbour) so every pixel is covered; one tile when smaller."""

    def starts(n: int) -> list[int]:
        if n <= size:
            return [0]
        s = list(range(0, n - size + 1, size))
        return s if s[-1] == n - size else s + [n - size]

    return [(y, x) for y in starts(height) for x in starts(width)]


def tile_labels(mask: np.ndarray, size: int, *, n_classes: int, min_share: float = 0.05,
                min_tissue: float = 0.25) -> list[tuple[int, int, tuple[int, ...]]]:
    """Multi-hot labels of the ``size`` px tiles of a class mask (0 background, 1..n classes).

    A class is present in a tile when its pixels are at least ``min_share`` of the tile's tissue
    pixels (mask != 0), as WSSS4LUAD derives its patch labels from its masks; tiles whose tissue
    is under ``min_tissue`` of their area are left out. Returns (y, x, labels) per kept tile.
    """
    if not 0.0 <= min_share < 1.0 or not 0.0 <= min_tissue <= 1.0:
        raise PathosegError(f"min_share must be in [0, 1) and min_tissue in [0, 1] (got {min_share}, {min_tissue}).")
    out = []
    for y, x in tile_grid(mask.shape[0], mask.shape[1], size):
        m = mask[y:y + size, x:x + size]
        counts = np.bincount(m.ravel(), minlength=n_classes + 1)[1:n_classes + 1]
        tissue = int(counts.sum())
        if tissue == 0 or tissue < min_tissue * m.size:
            continue
        out.append((y, x, tuple(int(c >= min_share * tissue) for c in counts)))
    return out


def make_tiles(items: Sequence[TissueImage], masks: Sequence[np.ndarray], size: int, *, n_classes: int,
               min_share: float = 0.05) -> list[TissueImage]:
    """Tiles of ``items`` with the labels :func:`tile_labels` derives from ``masks`` (the tiles carry no mask)."""
    tiles = []
    for item, mask in zip(items, masks):
        for y, x, lab in tile_labels(mask, size, n_classes=n_classes, min_share=min_share):
            tiles.append(TissueImage(f"{item.name}_y{y:04d}_x{x:04d}", item.image[y:y + size, x:x + size], lab,
                                     None, parent=item.name, origin=(y, x)))
    return tiles


def load_wsss4luad(folder: str | Path, *, parts: Sequence[str] = ("train", "val", "test"),
                   train_masks: bool = False, tile: int = 0, min_share: float = 0.05) -> TissueData:
    """WSSS4LUAD patches by :func:`wsss4luad_split`: train without masks, val / test with masks.

    ``train_masks=True`` reads the training masks too: only for the fully supervised reference.
    ``tile`` > 0 also cuts the training patches into ``tile`` px tiles whose multi-hot labels are
    derived from the masks (:func:`make_tiles`); only those label vectors leave this function,
    the training masks do not (unless ``train_masks``).
    """
    from napari_pathoseg.methods.tissue.network import LUAD_CLASSES

    folder = Path(folder)
    if (folder / WSSS_FOLDER).is_dir():
        folder = folder / WSSS_FOLDER
    rows = {Path(r["image"]).stem: r for r in _read_index(folder)}
    split = wsss4luad_split(folder)
    out: dict[str, list[TissueImage]] = {"train": [], "val": [], "test": []}
    for part in parts:
        for name in split[part]:
            r = rows[name]
            vec = parse_vector(r["image_level_label_tumor_stroma_normal"], 3, where=f"{folder}/index.csv")
            mask = None
            if part != "train" or train_masks:  # masks only to validate and test (and the reference)
                mask = _load_mask(folder / r["mask"])
            out[part].append(TissueImage(name, load_rgb(folder / r["image"]), vec, mask))
    tiles: list[TissueImage] = []
    if tile and "train" in parts:
        masks = [_load_mask(folder / rows[t.name]["mask"]) for t in out["train"]]
        tiles = make_tiles(out["train"], masks, tile, n_classes=len(LUAD_CLASSES), min_share=min_share)
    return TissueData(list(LUAD_CLASSES), out["train"], out["val"], out["test"], source=str(folder.name),
                      tiles=tiles, tile=int(tile), min_share=float(min_share))


def _load_mask(path: Path) -> np.ndarray:
    from skimage.io import imread

    m = np.asarray(imread(str(path)))
    if m.ndim != 2:
        raise PathosegError(f"{path}: a class mask is a single-channel image (got shape {m.shape}).")
    return m.astype(np.uint8)


def load_patches(labels: Sequence[PatchLabel], classes: Sequence[str], *, val_fraction: float = 0.15,
                 seed: int = 0) -> TissueData:
    """A user's labelled patches (no masks): a seeded ``val_fraction`` is held out for the classifier's loss."""
    if len(labels) < 2:
        raise PathosegError("Training needs at least 2 labelled patches.")
    items = [TissueImage(p.path.stem, load_rgb(p.path), tuple(p.labels)) for p in labels]
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = max(1, round(val_fraction * len(items)))
    val = [items[i] for i in order[:n_val]]
    train = [items[i] for i in order[n_val:]]
    return TissueData(list(classes), train, val, [], source="patch labels")
