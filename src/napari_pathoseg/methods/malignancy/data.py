"""M1 training data: image labels (N1) plus a few malignant-region masks (N2).

Two sources give the same :class:`LabelTable` (one :class:`LabelItem` per image, each in a
part ``train`` / ``val`` / ``test``):

**The built-in table** (:func:`shared_table`) from the shared data folder:

=================================  ==================================  =================  ========  ===============
data set (folder)                  malignant (1)                       benign (0)         µm/px     held out by
=================================  ==================================  =================  ========  ===============
EBHI-Seg (``ebhi_seg_crc``)        adenocarcinoma, high-grade IN;      normal, polyp,     1.0       specimen id
                                   mask = the annotated tumour glands  low-grade IN,
                                                                       serrated adenoma
GlaS (``glas_subset``)             ``malignant`` grade (no mask)       ``benign`` grade   0.62      patient id
Kather 2016 (``kather2016_...``)   01_tumor                            the 7 other        0.495     patient slide
                                                                       classes
NCT-CRC (``crc_tissue_patches_``)  TUM                                 the 8 other        0.5       image (random)
                                                                       classes
WSSS4LUAD (``wsss4luad_...``)      patches with tumour epithelium;     (none listed)      1.0       patch; the 4
                                   mask = class 1 (tumour epithelium)                               label-only
                                                                                                    examples by slide
OCDC (``ocdc_oral_scc_...``)       tiles with tumour; mask = tumour    (none)             0.5       never: one slide,
                                                                                                    training only
=================================  ==================================  =================  ========  ===============

Groups (specimens, patients, slides, patches) are shuffled with a fixed seed per data set and
20 % go to ``test``, 15 % to ``val`` (at least one group each when a data set has three or
more), the rest to ``train``. OCDC comes from a single slide, so it cannot be held out and is
training data only. GlaS malignant images are not in the issue's list but are adenocarcinoma,
so they are used as malignant (label only).

**N2 is kept few**, as M1 intends: of the training images that have a mask, a seeded subset
keeps it, :data:`MASK_FRACTION` (12 %) of all training images, spread over the data sets in
proportion to their masked images; the other masks are dropped (those images stay image-label
examples). Held-out masks are all used, for B's Dice.

**The user's labels** (:func:`user_table`): a CSV (``image,label[,mask][,mpp]``, paths
relative to the CSV, ``label`` in benign / malignant / 0 / 1) or a folder with ``benign/`` and
``malignant/`` subfolders; optional ``masks`` folder whose files are named like their images
(same stem), non-zero = malignant region. Everything is checked before anything is written:
missing or unreadable images, masks of another size, masks of benign images, masks without an
image, a single class. ``val_fraction`` of each class (seeded) is held out for validation.

Images are resampled to the model's µm/px (:func:`load_samples`; anti-aliased bilinear for
RGB, nearest for masks).
"""

from __future__ import annotations

import csv
import logging
import os
import re
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from napari_pathoseg.errors import PathosegError

__all__ = [
    "LabelItem",
    "LabelTable",
    "Sample",
    "LabelError",
    "shared_table",
    "user_table",
    "load_samples",
    "MASK_FRACTION",
    "SHARED",
    "IMAGE_SUFFIXES",
]

logger = logging.getLogger(__name__)

#: Share of the training images that keep their malignant-region mask (N2 / (N1 + N2)).
MASK_FRACTION = 0.12
#: Held-out fractions of each data set's groups.
FRACTIONS = {"test": 0.2, "val": 0.15}
#: Folder names of the shared data sets.
SHARED = {
    "ebhi": "ebhi_seg_crc",
    "glas": "glas_subset",
    "kather": "kather2016_texture_tiles",
    "nct": "crc_tissue_patches_samples",
    "wsss": "wsss4luad_tissue_masks",
    "ocdc": "ocdc_oral_scc_tumour_subset",
}
#: µm per pixel of each data set (given by its README or the issue; EBHI and WSSS assumed).
SOURCE_MPP = {"ebhi": 1.0, "glas": 0.62, "kather": 0.495, "nct": 0.5, "wsss": 1.0, "ocdc": 0.5}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_LABELS = {"benign": 0, "malignant": 1, "0": 0, "1": 1}


class LabelError(PathosegError):
    """The user's labels, images or masks cannot be used as given."""


@dataclass(frozen=True)
class LabelItem:
    """One labelled image.

    Attributes
    ----------
    key : str
        ``dataset/relative path``.
    dataset : str
    image : Path
    label : int
        1 = malignant, 0 = benign.
    mpp : float
        µm per pixel of the file.
    group : str
        Specimen / patient / slide the image comes from (the split unit).
    part : str
        ``train``, ``val`` or ``test``.
    mask : Path or None
        The malignant-region mask, when one exists.
    mask_value : int or None
        Mask pixel value of the malignant region (``None``: any non-zero).
    use_mask : bool
        The mask is used (for training: one of the few N2 masks; held out: always).
    """

    key: str
    dataset: str
    image: Path
    label: int
    mpp: float
    group: str
    part: str = "train"
    mask: Path | None = None
    mask_value: int | None = None
    use_mask: bool = False


@dataclass
class LabelTable:
    """The labelled images of a run, with their parts."""

    items: list[LabelItem]
    source: str
    notes: list[str] = field(default_factory=list)

    def part(self, name: str) -> list[LabelItem]:
        return [it for it in self.items if it.part == name]

    def summary(self) -> dict[str, Any]:
        """Counts per part: images, malignant, benign, masks used (JSON)."""
        out: dict[str, Any] = {}
        for p in ("train", "val", "test"):
            its = self.part(p)
            if its:
                out[p] = {"images": len(its), "malignant": sum(i.label for i in its),
                          "benign": sum(1 - i.label for i in its), "masks": sum(i.use_mask for i in its),
                          "datasets": {d: sum(1 for i in its if i.dataset == d) for d in sorted({i.dataset for i in its})}}
        return out

    def describe(self) -> str:
        """One line for cards and history."""
        s = self.summary()
        parts = ", ".join(f"{p} {v['images']} ({v['malignant']} malignant, {v['masks']} masks)" for p, v in s.items())
        return f"{self.source}: {parts}"


@dataclass
class Sample:
    """One image at the model's scale: ``image`` (H, W, 3) uint8, ``mask`` (H, W) uint8 {0, 1} or None."""

    key: str
    dataset: str
    label: int
    image: np.ndarray
    mask: np.ndarray | None


# ------------------------------------------------------------------------------------ reading
def _read(path: Path, *, what: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im)
    except FileNotFoundError:
        raise LabelError(f"{what} {path} does not exist; fix the label file or add the file.") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise LabelError(f"{what} {path} cannot be read ({exc}); replace or remove it.") from None


def read_rgb(path: Path) -> np.ndarray:
    a = _read(path, what="image")
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] < 3:
        raise LabelError(f"image {path} is not an RGB image (shape {a.shape}); give RGB H&E images.")
    a = a[..., :3]
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8) if a.max() <= 255 else (a / (a.max() / 255.0)).astype(np.uint8)
    return a


def read_mask(path: Path, value: int | None = None) -> np.ndarray:
    a = _read(path, what="mask")
    if a.ndim == 3:
        a = a[..., :3].max(axis=2)
    return ((a == value) if value is not None else (a > 0)).astype(np.uint8)


def _image_size(path: Path, *, what: str) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size  # (w, h)
    except FileNotFoundError:
        raise LabelError(f"{what} {path} does not exist; fix the label file or add the file.") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise LabelError(f"{what} {path} cannot be read ({exc}); replace or remove it.") from None


# ------------------------------------------------------------------------------------ built-in table
def _csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise PathosegError(f"{path} is missing: pass --data-root pointing at the shared data folder.")
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _shared_records(root: Path) -> list[LabelItem]:
    out: list[LabelItem] = []

    def add(ds: str, rel: str, label: int, group: str, mask: str | None = None, value: int | None = None) -> None:
        folder = root / SHARED[ds]
        out.append(LabelItem(f"{ds}/{rel}", ds, folder / rel, label, SOURCE_MPP[ds], f"{ds}:{group}",
                             mask=(folder / mask) if mask else None, mask_value=value))

    for r in _csv(root / SHARED["ebhi"] / "index.csv"):
        mal = r["class"] in ("adenocarcinoma", "hgin")
        add("ebhi", r["image"], int(mal), r["specimen_id"], r["mask"] if mal else None)
    for r in _csv(root / SHARED["glas"] / "index.csv"):
        add("glas", f"images/{r['image_id']}.jpg", int(r["grade_glas"] == "malignant"), r["patient_id"])
    for r in _csv(root / SHARED["kather"] / "index.csv"):
        add("kather", r["file"], int(r["class"] == "01_tumor"), r["patient_slide"])
    for r in _csv(root / SHARED["nct"] / "index.csv"):
        add("nct", r["file"], int(r["class"] == "TUM"), r["file"])
    for r in _csv(root / SHARED["wsss"] / "index.csv"):
        if float(r["frac_tumor_epithelium"]) > 0:
            add("wsss", r["image"], 1, r["image"], r["mask"], 1)
    examples = root / SHARED["wsss"] / "training_examples_image_level_labels"
    for p in sorted(examples.glob("*.png")) if examples.is_dir() else []:
        m = re.match(r"(\d+)-\d+-\d+-\[(\d), (\d), (\d)\]", p.name)
        if m and m.group(2) == "1":
            add("wsss", f"{examples.name}/{p.name}", 1, f"slide{m.group(1)}")
    for r in _csv(root / SHARED["ocdc"] / "index.csv"):
        if float(r["tumour_fraction"]) > 0:
            add("ocdc", f"images/{r['image_id']}.jpg", 1, "1009009", f"masks/{r['image_id']}.png")
    return out


def _split_groups(groups: list[str], rng: np.random.Generator) -> dict[str, str]:
    groups = sorted(set(groups))
    order = [groups[i] for i in rng.permutation(len(groups))]
    n = len(order)
    n_test = max(1, int(round(FRACTIONS["test"] * n))) if n >= 3 else 0
    n_val = max(1, int(round(FRACTIONS["val"] * n))) if n >= 3 else 0
    return {g: ("test" if i < n_test else "val" if i < n_test + n_val else "train") for i, g in enumerate(order)}


def _keep_few_masks(items: list[LabelItem], *, fraction: float, rng: np.random.Generator) -> list[LabelItem]:
    """Training items keep their mask for a seeded ``fraction`` of all training images; held-out masks all kept."""
    train = [i for i, it in enumerate(items) if it.part == "train"]
    cand = [i for i in train if items[i].mask is not None]
    budget = min(len(cand), int(round(fraction * len(train))))
    by_ds: dict[str, list[int]] = {}
    for i in cand:
        by_ds.setdefault(items[i].dataset, []).append(i)
    keep: set[int] = set()
    share = {d: budget * len(v) / max(1, len(cand)) for d, v in by_ds.items()}
    quota = {d: int(np.floor(s)) for d, s in share.items()}
    for d in sorted(share, key=lambda d: share[d] - quota[d], reverse=True)[: budget - sum(quota.values())]:
        quota[d] += 1
    for d, idx in sorted(by_ds.items()):
        pick = rng.permutation(len(idx))[: quota[d]]
        keep.update(idx[j] for j in pick)
    return [replace(it, use_mask=(it.mask is not None and (it.part != "train" or i in keep)))
            for i, it in enumerate(items)]


def shared_table(data_root: str | os.PathLike, *, seed: int = 0, mask_fraction: float = MASK_FRACTION) -> LabelTable:
    """The built-in M1 table from the shared data folder (see the module text), split by group.

    Parameters
    ----------
    data_root : path
        The shared data folder (holding ``ebhi_seg_crc`` ...).
    seed : int
        Seed of the group split and of the choice of the few training masks.
    mask_fraction : float
        Share of the training images that keep their mask (N2).
    """
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise PathosegError(f"{root} is not a folder: pass --data-root pointing at the shared data folder.")
    items = _shared_records(root)
    parts: dict[str, str] = {}
    for ds in SHARED:
        groups = [it.group for it in items if it.dataset == ds]
        if ds == "ocdc":
            parts.update({g: "train" for g in groups})  # one slide: cannot be held out
            continue
        rng = np.random.default_rng([seed, zlib.crc32(ds.encode())])
        parts.update(_split_groups(groups, rng))
    items = [replace(it, part=parts[it.group]) for it in items]
    items = _keep_few_masks(items, fraction=mask_fraction, rng=np.random.default_rng([seed, 7]))
    return LabelTable(items, source=f"shared data ({', '.join(SHARED.values())}; split seed {seed}, "
                      f"{mask_fraction:.0%} of training images keep a mask)")


# ------------------------------------------------------------------------------------ user table
def _parse_label(value: str, where: str) -> int:
    v = str(value).strip().lower()
    if v not in _LABELS:
        raise LabelError(f"{where}: label {value!r} is not benign, malignant, 0 or 1; fix the label file.")
    return _LABELS[v]


def _from_csv(path: Path, image_mpp: float | None) -> list[LabelItem]:
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
            fields = [f.strip() for f in (csv.DictReader(open(path, newline="")).fieldnames or [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LabelError(f"{path} cannot be read as a CSV ({exc}); give a CSV with columns image,label.") from None
    if "image" not in fields or "label" not in fields:
        raise LabelError(f"{path} has columns {fields}; it needs image and label (and optionally mask, mpp).")
    items = []
    for n, row in enumerate(rows, start=2):
        where = f"{path.name} line {n}"
        img = (row.get("image") or "").strip()
        if not img:
            raise LabelError(f"{where}: empty image path; fix the label file.")
        label = _parse_label(row.get("label", ""), where)
        mpp = image_mpp
        if (row.get("mpp") or "").strip():
            try:
                mpp = float(row["mpp"])
            except ValueError:
                mpp = float("nan")
            if not np.isfinite(mpp) or mpp <= 0:
                raise LabelError(f"{where}: mpp {row['mpp']!r} is not a positive number; fix the label file.")
        mask = (row.get("mask") or "").strip()
        items.append(LabelItem(f"user/{img}", "user", path.parent / img, label, mpp or 0.0, img,
                               mask=(path.parent / mask) if mask else None))
    return items


def _from_folder(path: Path, image_mpp: float | None) -> list[LabelItem]:
    subs = {d.name.lower(): d for d in path.iterdir() if d.is_dir()}
    if "benign" not in subs and "malignant" not in subs:
        raise LabelError(f"{path} has no benign/ or malignant/ subfolder; give a CSV or a folder with both.")
    items = []
    for name, label in (("benign", 0), ("malignant", 1)):
        d = subs.get(name)
        for p in sorted(d.iterdir()) if d else []:
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                rel = f"{d.name}/{p.name}"
                items.append(LabelItem(f"user/{rel}", "user", p, label, image_mpp or 0.0, rel))
    return items


def _attach_masks(items: list[LabelItem], masks: Path) -> list[LabelItem]:
    if not masks.is_dir():
        raise LabelError(f"mask folder {masks} does not exist; give a folder of masks named like their images.")
    files = {p.stem: p for p in sorted(masks.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    by_stem: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_stem.setdefault(it.image.stem, []).append(i)
    orphans = sorted(s for s in files if s not in by_stem)
    if orphans:
        raise LabelError(f"mask(s) {orphans[:3]} in {masks} name no labelled image; rename or remove them.")
    out = list(items)
    for stem, p in files.items():
        for i in by_stem[stem]:
            if out[i].mask is not None and out[i].mask != p:
                raise LabelError(f"{out[i].image.name} has two masks ({out[i].mask} and {p}); keep one.")
            out[i] = replace(out[i], mask=p)
    return out


def user_table(labels: str | os.PathLike, *, masks: str | os.PathLike | None = None, image_mpp: float | None = None,
               model_mpp: float = 1.0, val_fraction: float = 0.2, seed: int = 0) -> LabelTable:
    """The user's labels and masks, checked (nothing is written), split into train / val.

    Parameters
    ----------
    labels : path
        A CSV (``image,label[,mask][,mpp]``) or a folder with ``benign/`` and ``malignant/``.
    masks : path, optional
        Folder of masks named like their images (same stem; non-zero = malignant region).
    image_mpp : float, optional
        µm/px of images whose CSV row gives none (default: the model's, no resampling).
    model_mpp : float
        The model's µm/px (the default for ``image_mpp``).
    val_fraction : float
        Share of each class held out for validation (seeded; at least one image of each class
        and, with masks, one masked image).
    seed : int

    Raises
    ------
    LabelError
        Missing or unreadable images or masks, a mask whose size differs from its image, a mask
        of an image labelled benign, a mask naming no image, one class only, too few images.
    """
    path = Path(labels).expanduser()
    if path.is_file():
        items = _from_csv(path, image_mpp)
    elif path.is_dir():
        items = _from_folder(path, image_mpp)
    else:
        raise LabelError(f"labels {path} does not exist; give a CSV file or a folder with benign/ and malignant/.")
    if masks is not None:
        items = _attach_masks(items, Path(masks).expanduser())
    items = [replace(it, mpp=it.mpp or model_mpp) for it in items]
    missing = [str(it.image) for it in items if not it.image.is_file()]
    if missing:
        raise LabelError(f"{len(missing)} labelled image(s) do not exist, e.g. {missing[0]}; fix the label file.")
    for it in items:
        w, h = _image_size(it.image, what="image")
        if it.mask is None:
            continue
        if it.label == 0:
            raise LabelError(f"{it.mask.name} is a mask for {it.image.name}, which is labelled benign; "
                             "masks outline malignant regions: fix the label or remove the mask.")
        mw, mh = _image_size(it.mask, what="mask")
        if (mw, mh) != (w, h):
            raise LabelError(f"mask {it.mask.name} is {mw} x {mh} px but its image {it.image.name} is {w} x {h} px; "
                             "masks must have their image's size.")
    classes = {it.label for it in items}
    if len(classes) < 2:
        have = "no images" if not items else f"only {'malignant' if 1 in classes else 'benign'} images"
        raise LabelError(f"{path} has {have}; M1 needs benign and malignant examples.")
    rng = np.random.default_rng([seed, 11])
    parts = ["train"] * len(items)
    for label in (0, 1):
        idx = [i for i, it in enumerate(items) if it.label == label]
        if len(idx) < 2:
            raise LabelError(f"{path} has {len(idx)} {('benign', 'malignant')[label]} image; "
                             "give at least 2 of each class (one is held out for validation).")
        n_val = min(len(idx) - 1, max(1, int(round(val_fraction * len(idx)))))
        masked = [i for i in idx if items[i].mask is not None]
        order = [idx[j] for j in rng.permutation(len(idx))]
        if len(masked) >= 2:  # one masked image held out so B can be validated
            first = next(i for i in order if items[i].mask is not None)
            order.remove(first)
            order.insert(0, first)
        for i in order[:n_val]:
            parts[i] = "val"
    items = [replace(it, part=p, use_mask=it.mask is not None) for it, p in zip(items, parts)]
    return LabelTable(items, source=f"{path.name} ({'masks: ' + Path(masks).name if masks else 'no masks'})")


# ------------------------------------------------------------------------------------ loading
def load_samples(items: Iterable[LabelItem], *, mpp: float, masks: bool = True) -> list[Sample]:
    """Read ``items`` resampled to ``mpp`` (masks only where ``use_mask`` and ``masks``)."""
    from napari_pathoseg.methods.malignancy.model import resample

    out = []
    for it in items:
        f = it.mpp / mpp
        img = resample(read_rgb(it.image), f)
        m = None
        if masks and it.use_mask and it.mask is not None:
            m = resample(read_mask(it.mask, it.mask_value), f, order=0)
            if m.shape != img.shape[:2]:
                raise LabelError(f"mask {it.mask} does not match its image {it.image} in size; masks must have "
                                 "their image's size.")
        out.append(Sample(it.key, it.dataset, it.label, img, m))
    return out
