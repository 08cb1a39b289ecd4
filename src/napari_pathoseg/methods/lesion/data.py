"""M3 training data: the four lesion data sets at the model's scales, split, stain-normalised.

Lesion masks (1 = lesion) per data set (folders of the shared data, found by name):

=====================  ==========================================  ==========  ===============
data set               lesion                                      µm/px       held out by
=====================  ==========================================  ==========  ===============
``ebhi_seg_crc``       the annotated glands of every class except  1.0 (assumed)  specimen
                       ``normal``; ``normal`` images: no lesion
``glas_subset``        the glands of ``malignant``-grade images;   0.62 (20x)  patient
                       benign images: no lesion
``ocdc_oral_scc_...``  the tumour mask                             0.5 (assumed)  tile (one slide!)
``wsss4luad_...``      tumour epithelium (class 1)                 1.0 (assumed)  patch
=====================  ==========================================  ==========  ===============

Every image is resampled to the high-resolution scale ``mpp / hires_factor`` (lite: 1 µm/px;
anti-aliased bilinear for RGB, nearest for masks) and Vahadane-normalised to the reference
(its own stain estimated on the image). The low-resolution view (``mpp``, lite 2 µm/px) is the
``hires_factor`` x ``hires_factor`` block mean, so both views are exactly aligned.

The split (train / val / test) is made once from a fixed seed over groups (specimens,
patients, tiles, patches) and stored as JSON; the test part is never used for training or
model selection.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from napari_pathoseg.errors import PathosegError, StainError

__all__ = [
    "LesionImage",
    "LesionData",
    "DATASETS",
    "SOURCE_MPP",
    "make_split",
    "load_lesion_data",
    "block_mean",
    "fit_reference",
    "REFERENCE",
]

logger = logging.getLogger(__name__)

#: Folder names of the four data sets in the shared data folder.
DATASETS = {
    "ebhi": "ebhi_seg_crc",
    "glas": "glas_subset",
    "ocdc": "ocdc_oral_scc_tumour_subset",
    "wsss": "wsss4luad_tissue_masks",
}
#: µm per pixel of each data set (given or assumed; see each folder's README and docs/lesion.md).
SOURCE_MPP = {"ebhi": 1.0, "glas": 0.62, "ocdc": 0.5, "wsss": 1.0}
#: Share of training blocks drawn from each data set.
WEIGHTS = {"ebhi": 0.4, "wsss": 0.3, "glas": 0.15, "ocdc": 0.15}
#: The stain reference: one training image (EBHI-Seg adenocarcinoma, a well-stained H&E biopsy).
REFERENCE = ("ebhi", "images/adenocarcinoma/GT2001837-1-400-005.png")
#: Held-out fractions of the groups of each data set (test, val).
FRACTIONS = {"test": 0.2, "val": 0.15}


@dataclass
class LesionImage:
    """One image of the training data at the high-resolution scale.

    Attributes
    ----------
    key : str
        ``dataset/relative image path``.
    dataset : str
        ``ebhi``, ``glas``, ``ocdc`` or ``wsss``.
    image : (H, W, 3) uint8
        Stain-normalised RGB at ``mpp / hires_factor``; H and W multiples of the factor.
    mask : (H, W) uint8
        1 = lesion.
    """

    key: str
    dataset: str
    image: np.ndarray
    mask: np.ndarray


@dataclass
class LesionData:
    """The split, loaded data: ``train``, ``val``, ``test`` lists of :class:`LesionImage`."""

    train: list[LesionImage]
    val: list[LesionImage]
    test: list[LesionImage]
    split: dict[str, Any]
    stain_failures: list[str]

    def summary(self) -> dict[str, Any]:
        """Counts per part and data set (JSON)."""
        out: dict[str, Any] = {}
        for part in ("train", "val", "test"):
            items = getattr(self, part)
            out[part] = {d: sum(1 for x in items if x.dataset == d) for d in DATASETS}
        out["stain_failures"] = len(self.stain_failures)
        return out


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _read_mask(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def _records(data_dir: Path) -> Iterator[tuple[str, str, str, str]]:
    """``(dataset, image rel path, mask rel path, group)`` of every usable image."""
    for ds, folder in DATASETS.items():
        root = data_dir / folder
        index = root / "index.csv"
        if not index.is_file():
            raise PathosegError(f"{index} is missing: pass --data pointing at the shared data folder.")
        with open(index, newline="") as fh:
            for row in csv.DictReader(fh):
                if ds == "ebhi":
                    yield ds, row["image"], row["mask"], f"spec{row['specimen_id']}"
                elif ds == "glas":
                    yield ds, f"images/{row['image_id']}.jpg", f"masks/{row['image_id']}.png", f"pat{row['patient_id']}"
                elif ds == "ocdc":
                    yield ds, f"images/{row['image_id']}.jpg", f"masks/{row['image_id']}.png", row["image_id"]
                else:
                    yield ds, row["image"], row["mask"], row["image"]


def _glas_grades(data_dir: Path) -> dict[str, str]:
    with open(data_dir / DATASETS["glas"] / "index.csv", newline="") as fh:
        return {f"images/{r['image_id']}.jpg": r["grade_glas"] for r in csv.DictReader(fh)}


def make_split(data_dir: str | Path, *, seed: int = 0) -> dict[str, Any]:
    """Split every data set by its groups into train / val / test (seeded, JSON-able).

    Returns
    -------
    dict
        ``{"seed", "fractions", "parts": {"train": [keys], "val": [...], "test": [...]}}``; a key
        is ``dataset/image path``. Each data set keeps at least one group in test and in val.
    """
    data_dir = Path(data_dir)
    groups: dict[str, dict[str, list[str]]] = {}
    for ds, img, _mask, group in _records(data_dir):
        groups.setdefault(ds, {}).setdefault(group, []).append(f"{ds}/{img}")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for ds in sorted(groups):
        names = sorted(groups[ds])
        order = [names[i] for i in rng.permutation(len(names))]
        n_test = max(1, round(FRACTIONS["test"] * len(order)))
        n_val = max(1, round(FRACTIONS["val"] * len(order)))
        for i, g in enumerate(order):
            part = "test" if i < n_test else "val" if i < n_test + n_val else "train"
            parts[part].extend(groups[ds][g])
    ref = f"{REFERENCE[0]}/{REFERENCE[1]}"
    for part in ("val", "test"):  # the stain reference is a training image
        if ref in parts[part]:
            parts[part].remove(ref)
            parts["train"].append(ref)
    return {"seed": seed, "fractions": dict(FRACTIONS), "parts": {k: sorted(v) for k, v in parts.items()}}


def block_mean(a: np.ndarray, f: int) -> np.ndarray:
    """Mean over non-overlapping ``f`` x ``f`` blocks of the first two axes (sizes divisible by ``f``)."""
    if f == 1:
        return a.astype(np.float32)
    h, w = a.shape[:2]
    return a.reshape(h // f, f, w // f, f, *a.shape[2:]).mean(axis=(1, 3), dtype=np.float32)


def _resample(img: np.ndarray, mask: np.ndarray, scale: float, f: int) -> tuple[np.ndarray, np.ndarray]:
    """Resample by ``scale`` (output px per input px) and crop to multiples of ``f``."""
    from skimage.transform import resize

    h, w = img.shape[:2]
    oh, ow = max(f, round(h * scale)), max(f, round(w * scale))
    if (oh, ow) != (h, w):
        img = resize(img, (oh, ow), order=1, anti_aliasing=scale < 1, preserve_range=True)
        img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        mask = resize(mask, (oh, ow), order=0, anti_aliasing=False, preserve_range=True).astype(np.uint8)
    oh, ow = (oh // f) * f, (ow // f) * f
    return np.ascontiguousarray(img[:oh, :ow]), np.ascontiguousarray(mask[:oh, :ow])


def _lesion_mask(ds: str, img_rel: str, raw: np.ndarray, grades: dict[str, str]) -> np.ndarray:
    if ds == "ebhi":
        lesion = not img_rel.startswith("images/normal/")
        return ((raw > 0) & lesion).astype(np.uint8)
    if ds == "glas":
        return ((raw > 0) & (grades.get(img_rel) == "malignant")).astype(np.uint8)
    if ds == "ocdc":
        return (raw > 0).astype(np.uint8)
    return (raw == 1).astype(np.uint8)  # WSSS4LUAD: 1 = tumour epithelium


def stain_normalizer() -> Any:
    """The Vahadane normaliser M3 uses (estimates on up to 20,000 tissue pixels, 8,192 for the basis)."""
    from napari_pathoseg.stain.vahadane import VahadaneNormalizer

    return VahadaneNormalizer(fit_samples=8192, max_samples=20000, n_iter=50)


def fit_reference(data_dir: str | Path) -> Any:
    """The normaliser fitted to :data:`REFERENCE` (at its own resolution)."""
    ds, rel = REFERENCE
    norm = stain_normalizer()
    norm.fit(_read_rgb(Path(data_dir) / DATASETS[ds] / rel), what="stain reference", reference=f"{DATASETS[ds]}/{rel}")
    return norm


def load_lesion_data(
    data_dir: str | Path,
    *,
    split: dict[str, Any],
    mpp: float,
    hires_factor: int,
    normalizer: Any | None,
    parts: tuple[str, ...] = ("train", "val", "test"),
    progress: Any = None,
) -> LesionData:
    """Load the images of ``split`` at ``mpp / hires_factor`` µm/px, stain-normalised.

    Parameters
    ----------
    data_dir : path
        The shared data folder.
    split : dict
        :func:`make_split` output.
    mpp : float
        The model's (low-resolution) µm per pixel.
    hires_factor : int
        Scale ratio of the high-resolution view.
    normalizer : StainNormalizer or None
        Fitted reference normaliser; an image whose stain cannot be estimated (too little
        tissue, not H&E-like) is kept as it is and listed in ``stain_failures``.
    parts : tuple of str
        Which parts to load.
    progress : callable or None
        Called with ``(done, total)``.
    """
    data_dir = Path(data_dir)
    grades = _glas_grades(data_dir)
    masks = {f"{ds}/{img}": (ds, img, m) for ds, img, m, _g in _records(data_dir)}
    hi_mpp = mpp / hires_factor
    out: dict[str, list[LesionImage]] = {p: [] for p in ("train", "val", "test")}
    failures: list[str] = []
    todo = [(p, k) for p in parts for k in split["parts"][p]]
    for n, (part, key) in enumerate(todo):
        if key not in masks:
            raise PathosegError(f"{key} of the split is not in {data_dir}: use the split made for this data folder.")
        ds, img_rel, mask_rel = masks[key]
        root = data_dir / DATASETS[ds]
        img = _read_rgb(root / img_rel)
        mask = _lesion_mask(ds, img_rel, _read_mask(root / mask_rel), grades)
        img, mask = _resample(img, mask, SOURCE_MPP[ds] / hi_mpp, hires_factor)
        if normalizer is not None:
            try:
                img = normalizer.transform(img, source=normalizer.estimate(img, what=key), what=key)
            except StainError as exc:
                failures.append(key)
                logger.info("stain estimate failed, kept as is: %s", exc)
        out[part].append(LesionImage(key, ds, img, mask))
        if progress is not None:
            progress(n + 1, len(todo))
    return LesionData(out["train"], out["val"], out["test"], split, failures)


def save_split(split: dict[str, Any], path: str | Path) -> None:
    """Write a split as JSON, atomically."""
    from napari_pathoseg._atomic import write_text

    write_text(Path(path), json.dumps(split, indent=1) + "\n")


def load_split(path: str | Path) -> dict[str, Any]:
    """Read a :func:`make_split` JSON (a clear error when damaged)."""
    try:
        d = json.loads(Path(path).read_text())
        assert all(isinstance(d["parts"][p], list) for p in ("train", "val", "test"))
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
        raise PathosegError(f"{path} is not a lesion split file ({exc}); delete it to make a new one.") from None
    return d
