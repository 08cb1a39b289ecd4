"""Nucleus training data: MoNuSeg train + CPM-15, resampled, split and cropped.

* :func:`load_nuclei_sources` reads every image and instance mask of
  ``monuseg_train`` (40x, ~0.25 um/px) and ``cpm15_nuclei`` (20x ~0.5 um/px for
  image01-07, 40x for image08-15, from its ``index.csv``) and resamples both to
  the model's um/px (area-averaged image, nearest-neighbour labels).
* :func:`split_images` splits the image names 3:1:1 into train / val / test per
  source, seeded; test images are never trained on.
* :func:`split_styles` divides the training images into X (many stain styles)
  and Y (one consistent style) by clustering stain statistics (see
  ``docs/m2.md``).
* :class:`CropSampler` draws random crops with flips / rot90 and HED stain
  augmentation and builds the targets (nucleus mask, boundary, pixel weight).
* :class:`PseudoLabelDataset` wraps ``(image, mask, weight)`` triples (e.g.
  teacher pseudo-labels) into the same :class:`LabelledImage` records.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image
from skimage.color import rgb2lab
from skimage.segmentation import find_boundaries
from skimage.transform import resize

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.training.augment import geometric, hed_perturb

__all__ = [
    "DataError",
    "LabelledImage",
    "M2Data",
    "iter_nuclei_files",
    "load_nuclei_originals",
    "load_nuclei_sources",
    "read_image",
    "read_labels",
    "resample_pair",
    "split_images",
    "split_styles",
    "make_split",
    "load_split",
    "save_split",
    "build_m2_data",
    "CropSampler",
    "PseudoLabelDataset",
    "boundary_target",
]

logger = logging.getLogger(__name__)

MONUSEG_MPP = 0.252  # 40x Aperio, as in the MoNuSeg paper
CPM_MPP = {"20x": 0.5, "40x": 0.25}


class DataError(PathosegError):
    """Training or evaluation data is missing, unreadable or inconsistent."""


@dataclass
class LabelledImage:
    """One labelled image at the model's resolution.

    Attributes
    ----------
    name : str
        ``"<source>/<image id>"``.
    image : (H, W, 3) uint8 ndarray
    labels : (H, W) int32 ndarray
        Instance labels, 0 = background.
    weight : float or (H, W) float32 ndarray
        Per-pixel loss weight (1 for expert masks; pseudo-labels may use less).
    source : str
        ``"monuseg"``, ``"cpm15"`` or ``"pseudo"``.
    mpp : float
        Resolution of ``image`` (um/px).
    """

    name: str
    image: np.ndarray
    labels: np.ndarray
    weight: float | np.ndarray = 1.0
    source: str = ""
    mpp: float = 0.5


@dataclass
class M2Data:
    """The data :func:`napari_pathoseg.methods.nuclei.train.train_m2` consumes.

    ``x_train``: X (varied styles) training images; ``y_train``: Y (one style)
    training images; ``val``: validation images (best epoch by AJI on these).
    """

    x_train: list[LabelledImage]
    y_train: list[LabelledImage]
    val: list[LabelledImage]
    split: dict = field(default_factory=dict)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an RGB image file as (H, W, 3) uint8; RGBA/greyscale are refused."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            mode = im.mode
            arr = np.asarray(im)
    except (OSError, ValueError) as exc:
        raise DataError(f"Cannot read image {path}: {exc}. Give a PNG/TIFF/JPEG RGB image.") from exc
    if mode != "RGB" or arr.ndim != 3 or arr.shape[-1] != 3:
        raise DataError(
            f"Image {path} is {mode} with shape {arr.shape}; an RGB (H, W, 3) image is needed. "
            "Drop the alpha channel / convert greyscale to RGB first."
        )
    return np.ascontiguousarray(arr, dtype=np.uint8)


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """Read a single-channel instance mask (uint8/uint16 PNG/TIFF) as (H, W) int32."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except (OSError, ValueError) as exc:
        raise DataError(f"Cannot read mask {path}: {exc}.") from exc
    if arr.ndim != 2:
        raise DataError(
            f"Mask {path} has shape {arr.shape}; a single-channel instance label image "
            "(0 = background, 1..N nuclei) is needed."
        )
    return arr.astype(np.int32)


def resample_pair(
    image: np.ndarray,
    labels: np.ndarray | None,
    *,
    src_mpp: float,
    dst_mpp: float,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resample an image (area/anti-aliased) and its labels (nearest) to ``dst_mpp``.

    Parameters
    ----------
    image : (H, W, 3) uint8 ndarray
    labels : (H, W) int ndarray or None
    src_mpp, dst_mpp : float
        Source and target micrometres per pixel.

    Returns
    -------
    image : (h, w, 3) uint8 ndarray
    labels : (h, w) int32 ndarray or None
        ``h = round(H * src_mpp / dst_mpp)``, likewise ``w``.
    """
    scale = src_mpp / dst_mpp
    if abs(scale - 1.0) < 0.02:
        return image, None if labels is None else labels.astype(np.int32)
    shape = (max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale)))
    img = resize(image, shape, order=1, anti_aliasing=scale < 1, preserve_range=True)
    img = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    lab = None
    if labels is not None:
        lab = resize(labels, shape, order=0, anti_aliasing=False, preserve_range=True).astype(np.int32)
    return img, lab


def iter_nuclei_files(root: str | os.PathLike) -> list[tuple[str, Path, Path, float, str]]:
    """The labelled nucleus images of the shared data folder.

    Returns
    -------
    list of (name, image path, mask path, um/px, source)
        ``name`` is ``"<source>/<image id>"``; MoNuSeg is 40x (0.252 um/px),
        CPM-15 20x (0.5) or 40x (0.25) as its ``index.csv`` says.
    """
    root = Path(root)
    out: list[tuple[str, Path, Path, float, str]] = []
    mon = root / "monuseg_train"
    if (mon / "index.csv").is_file():
        with open(mon / "index.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                out.append((f"monuseg/{row['image_id']}", mon / "images" / f"{row['image_id']}.png",
                            mon / row["instance_mask_path"], MONUSEG_MPP, "monuseg"))
    cpm = root / "cpm15_nuclei"
    if (cpm / "index.csv").is_file():
        with open(cpm / "index.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                src = CPM_MPP.get(row["magnification"].strip())
                if src is None:
                    raise DataError(f"{cpm / 'index.csv'}: unknown magnification {row['magnification']!r}.")
                out.append((f"cpm15/{row['image_id']}", cpm / "images" / f"{row['image_id']}.png",
                            cpm / "instance_masks" / f"{row['image_id']}.png", src, "cpm15"))
    if not out:
        raise DataError(
            f"No nucleus data under {root}: expected monuseg_train/index.csv and/or "
            "cpm15_nuclei/index.csv. Point --data at the shared data folder."
        )
    return sorted(out)


def load_nuclei_originals(
    root: str | os.PathLike, *, names: Sequence[str] | None = None
) -> list[LabelledImage]:
    """Labelled images at their own resolution (``LabelledImage.mpp`` says which)."""
    items = []
    wanted = None if names is None else set(names)
    for name, ipath, mpath, src, source in iter_nuclei_files(root):
        if wanted is not None and name not in wanted:
            continue
        items.append(LabelledImage(name, read_image(ipath), read_labels(mpath), 1.0, source, src))
    return items


def load_nuclei_sources(
    root: str | os.PathLike, *, mpp: float = 0.5, names: Sequence[str] | None = None
) -> list[LabelledImage]:
    """Load MoNuSeg train and CPM-15 with instance masks, resampled to ``mpp``.

    Parameters
    ----------
    root : path
        The shared data folder holding ``monuseg_train/`` and ``cpm15_nuclei/``.
    mpp : float
        Target micrometres per pixel.
    names : sequence of str or None
        Load only these images (``"<source>/<id>"``).

    Returns
    -------
    list of LabelledImage
        Sorted by name.
    """
    items: list[LabelledImage] = []
    wanted = None if names is None else set(names)
    for name, ipath, mpath, src, source in iter_nuclei_files(root):
        if wanted is not None and name not in wanted:
            continue
        img, lab = resample_pair(read_image(ipath), read_labels(mpath), src_mpp=src, dst_mpp=mpp)
        items.append(LabelledImage(name, img, lab, 1.0, source, mpp))
    return sorted(items, key=lambda it: it.name)


def split_images(names: Sequence[str], *, seed: int = 0, ratios=(3, 1, 1)) -> dict[str, list[str]]:
    """Split image names into train / val / test (3:1:1), per source, seeded.

    Names are ``"<source>/<id>"``; each source is shuffled with
    ``numpy.random.default_rng(seed)`` and cut by ``ratios`` so every split has
    images of every source.

    Returns
    -------
    dict
        ``{"train": [...], "val": [...], "test": [...]}``, each sorted.
    """
    by_source: dict[str, list[str]] = {}
    for n in sorted(names):
        by_source.setdefault(n.split("/", 1)[0], []).append(n)
    rng = np.random.default_rng(seed)
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    total = float(sum(ratios))
    for src in sorted(by_source):
        group = list(by_source[src])
        rng.shuffle(group)
        n = len(group)
        n_val = max(1, round(n * ratios[1] / total)) if n >= 3 else 0
        n_test = max(1, round(n * ratios[2] / total)) if n >= 3 else 0
        out["test"] += group[:n_test]
        out["val"] += group[n_test : n_test + n_val]
        out["train"] += group[n_test + n_val :]
    return {k: sorted(v) for k, v in out.items()}


def stain_features(image: np.ndarray) -> np.ndarray:
    """Stain-style statistics of an image: mean and std of CIELAB over tissue.

    Returns
    -------
    (6,) float64 ndarray
        ``[mean L, mean a, mean b, std L, std a, std b]`` over pixels that are
        not near-white background.
    """
    lab = rgb2lab(image).reshape(-1, 3)
    tissue = lab[:, 0] < 90.0
    if tissue.sum() < 100:
        tissue = np.ones(len(lab), bool)
    sel = lab[tissue]
    return np.concatenate([sel.mean(0), sel.std(0)])


def split_styles(items: Sequence[LabelledImage], *, y_fraction: float = 0.5) -> dict[str, list[str]]:
    """Divide training images into X (varied styles) and Y (one consistent style).

    Every image is described by :func:`stain_features` (standardised over the
    set).  The Y style is the densest point of that space: the image whose
    ``k`` nearest neighbours (``k = round(y_fraction * n) - 1``) are closest on
    average.  It and those neighbours form Y; the rest form X.  Deterministic.

    Returns
    -------
    dict
        ``{"x": [...], "y": [...], "y_anchor": name}``.
    """
    names = [it.name for it in items]
    if len(items) < 2:
        raise DataError("split_styles needs at least 2 training images.")
    feats = np.stack([stain_features(it.image) for it in items])
    feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-8)
    dist = np.linalg.norm(feats[:, None] - feats[None], axis=-1)  # (n, n)
    n_y = max(1, round(y_fraction * len(items)))
    k = max(1, n_y - 1)
    nn_sorted = np.sort(dist, axis=1)[:, 1 : k + 1]
    anchor = int(np.argmin(nn_sorted.mean(1)))
    y_idx = set(np.argsort(dist[anchor])[:n_y].tolist())
    return {
        "x": sorted(names[i] for i in range(len(names)) if i not in y_idx),
        "y": sorted(names[i] for i in y_idx),
        "y_anchor": names[anchor],
    }


def make_split(items: Sequence[LabelledImage], *, seed: int = 0) -> dict:
    """Image split (train/val/test) plus the X/Y style split of the train images."""
    split = split_images([it.name for it in items], seed=seed)
    by_name = {it.name: it for it in items}
    styles = split_styles([by_name[n] for n in split["train"]])
    return {"seed": seed, **split, **styles}


def save_split(split: dict, path: str | os.PathLike) -> Path:
    """Write a split JSON atomically (:mod:`napari_pathoseg._atomic`)."""
    from napari_pathoseg import _atomic

    return _atomic.write_text(path, json.dumps(split, indent=1, sort_keys=True), create_parent=True)


def load_split(path: str | os.PathLike) -> dict:
    """Read a split JSON written by :func:`save_split`."""
    path = Path(path)
    try:
        split = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"Cannot read split file {path}: {exc}.") from exc
    for key in ("train", "val", "test", "x", "y"):
        if key not in split:
            raise DataError(f"Split file {path} lacks {key!r}; regenerate it with make_split.")
    return split


def build_m2_data(
    root: str | os.PathLike,
    *,
    mpp: float = 0.5,
    seed: int = 0,
    split: dict | None = None,
    extra_x: Iterable[LabelledImage] = (),
    extra_y: Iterable[LabelledImage] = (),
) -> M2Data:
    """Load the shared nucleus data and arrange it for M2 training.

    ``split`` (from :func:`make_split` / :func:`load_split`) fixes which
    images go where; without it one is made with ``seed``.  ``extra_x`` /
    ``extra_y`` append e.g. pseudo-labelled images (:class:`PseudoLabelDataset`).
    """
    items = load_nuclei_sources(root, mpp=mpp)
    by_name = {it.name: it for it in items}
    if split is None:
        split = make_split(items, seed=seed)
    missing = [n for k in ("x", "y", "val") for n in split[k] if n not in by_name]
    if missing:
        raise DataError(f"Split names images not found under {root}: {missing[:5]}.")
    overlap = set(split["test"]) & (set(split["x"]) | set(split["y"]) | set(split["val"]))
    if overlap:
        raise DataError(f"Split puts test images into training/validation: {sorted(overlap)}.")
    return M2Data(
        x_train=[by_name[n] for n in split["x"]] + list(extra_x),
        y_train=[by_name[n] for n in split["y"]] + list(extra_y),
        val=[by_name[n] for n in split["val"]],
        split=split,
    )


def boundary_target(labels: np.ndarray) -> np.ndarray:
    """Inner boundaries of every instance, (H, W) float32 in {0, 1}."""
    return find_boundaries(labels, mode="inner").astype(np.float32)


class PseudoLabelDataset:
    """Pseudo-labelled (or any extra) data from ``(image, mask, weight)`` triples.

    Parameters
    ----------
    triples : iterable of (image, mask, weight)
        ``image`` (H, W, 3) uint8 at ``mpp``; ``mask`` (H, W) int instance
        labels (a binary mask is labelled into connected components);
        ``weight`` a float or (H, W) float map (e.g. the teacher's confidence).
    mpp : float
        Resolution of the images.
    name : str
        Prefix of the item names.
    """

    def __init__(self, triples: Iterable, *, mpp: float = 0.5, name: str = "pseudo") -> None:
        from skimage.measure import label as cc_label

        self.items: list[LabelledImage] = []
        for i, (image, mask, weight) in enumerate(triples):
            image = np.asarray(image)
            mask = np.asarray(mask)
            if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
                raise DataError(f"{name}[{i}]: image must be (H, W, 3) uint8, got {image.shape} {image.dtype}.")
            if mask.shape != image.shape[:2]:
                raise DataError(f"{name}[{i}]: mask shape {mask.shape} != image shape {image.shape[:2]}.")
            labels = mask.astype(np.int32)
            if labels.max() <= 1:
                labels = cc_label(labels > 0).astype(np.int32)
            w = weight if np.isscalar(weight) else np.asarray(weight, np.float32)
            self.items.append(LabelledImage(f"{name}/{i:05d}", image, labels, w, "pseudo", mpp))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> LabelledImage:
        return self.items[i]


class CropSampler:
    """Random training crops from a list of :class:`LabelledImage`.

    Parameters
    ----------
    items : sequence of LabelledImage
    crop : int
        Crop side (pixels); images smaller than it are padded white.
    rng : numpy.random.Generator
    stain_augment : callable or None
        ``f(image (h, w, 3) uint8, rng) -> image``; ``None`` disables stain
        augmentation.  The default uses :func:`hed_perturb`.
    """

    def __init__(
        self,
        items: Sequence[LabelledImage],
        *,
        crop: int,
        rng: np.random.Generator,
        stain_augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
    ) -> None:
        if not items:
            raise DataError("CropSampler got no images.")
        self.items = list(items)
        self.crop = crop
        self.rng = rng
        self.stain_augment = stain_augment
        self._bounds = [boundary_target(it.labels) for it in self.items]

    def sample(self, batch: int) -> dict[str, np.ndarray]:
        """Draw ``batch`` crops.

        Returns
        -------
        dict
            ``image`` (B, c, c, 3) uint8, ``nuclei`` (B, c, c) float32,
            ``boundary`` (B, c, c) float32, ``weight`` (B, c, c) float32.
        """
        c = self.crop
        imgs, nuc, bnd, wts = [], [], [], []
        for _ in range(batch):
            i = int(self.rng.integers(len(self.items)))
            it = self.items[i]
            h, w = it.labels.shape
            r = int(self.rng.integers(max(1, h - c + 1)))
            q = int(self.rng.integers(max(1, w - c + 1)))
            img = np.full((c, c, 3), 255, np.uint8)
            lab = np.zeros((c, c), np.int32)
            bd = np.zeros((c, c), np.float32)
            wt = np.zeros((c, c), np.float32)
            hh, ww = min(c, h - r), min(c, w - q)
            img[:hh, :ww] = it.image[r : r + hh, q : q + ww]
            lab[:hh, :ww] = it.labels[r : r + hh, q : q + ww]
            bd[:hh, :ww] = self._bounds[i][r : r + hh, q : q + ww]
            if np.isscalar(it.weight):
                wt[:hh, :ww] = float(it.weight)
            else:
                wt[:hh, :ww] = it.weight[r : r + hh, q : q + ww]
            img, lab, bd, wt = geometric(img, lab, bd, wt, rng=self.rng)
            if self.stain_augment is not None:
                img = self.stain_augment(img, self.rng)
            imgs.append(img)
            nuc.append((lab > 0).astype(np.float32))
            bnd.append(bd)
            wts.append(wt)
        return {
            "image": np.stack(imgs),
            "nuclei": np.stack(nuc),
            "boundary": np.stack(bnd),
            "weight": np.stack(wts),
        }


def default_stain_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """HED perturbation used in training (alpha 0.2, beta 0.02)."""
    return hed_perturb(image, rng=rng, alpha=0.2, beta=0.02)


def stain_issue_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stain augmentation of :mod:`napari_pathoseg.stain.augment` (LUT-based Tellez HED).

    Same idea as :func:`default_stain_augment` (scale U(0.8, 1.2), shift
    U(-0.02, 0.02) OD) through the stain package's implementation.
    """
    from napari_pathoseg.stain.augment import augment_stain

    return augment_stain(image, rng=rng, sigma_scale=0.2, sigma_shift=0.02)


#: Stain augmentations selectable from the command line (``--stain-aug``).
STAIN_AUGMENTATIONS = {"hed": default_stain_augment, "stain": stain_issue_augment, "none": None}
