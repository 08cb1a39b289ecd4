"""The labelled tile data sets a mosaic slide is built from: found by their ``index.csv``.

Each supported folder of real labelled H&E tiles (the layouts of ``shared/data``: NCT-CRC-HE-100K
samples, Kather 2016 texture tiles, EBHI-Seg, GlaS, OCDC, WSSS4LUAD) is recognised by the columns
of its ``index.csv``, not by its folder name, so a renamed or held-out copy of the same data set
works too. :func:`load_mosaic_dataset` turns it into a :class:`MosaicDataset`: one
:class:`SourceTile` per image (class, optional mask, mask value -> label id), the label ids of the
label TIFF, which classes are background and tumour, the data set's µm/px (given by the data set
or assumed, and said which) and its licence.

Two kinds:

``"tissue-classes"``
    Patch-class data sets (NCT-CRC, Kather 2016): one class per tile; a cell's label is its class
    id everywhere in the cell.
``"lesion-masks"``
    Data sets with pixel masks (EBHI-Seg, GlaS, OCDC, WSSS4LUAD): label 0 = background (no
    tissue), 1 = tissue the mask leaves unlabelled, 2... = the annotated classes.

Examples
--------
>>> ds = load_mosaic_dataset("shared/data/kather2016_texture_tiles")  # doctest: +SKIP
>>> ds.name, ds.kind, ds.mpp, ds.tumour_classes  # doctest: +SKIP
('kather2016', 'tissue-classes', 0.495, ('01_tumor',))
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from napari_pathoseg.errors import PathosegError

__all__ = ["KINDS", "MosaicDataError", "SourceTile", "MosaicDataset", "load_mosaic_dataset", "find_mosaic_datasets"]

logger = logging.getLogger(__name__)

#: The two kinds of mosaic, by the ground truth their data sets carry.
KINDS = ("tissue-classes", "lesion-masks")

#: Label 0 of every label TIFF.
BACKGROUND = "background"
#: Label 1 of lesion-mask label TIFFs: tissue the source mask leaves unlabelled.
OTHER_TISSUE = "other_tissue"


class MosaicDataError(PathosegError):
    """A folder is not a labelled tile data set a mosaic can be built from."""


@dataclass(frozen=True)
class SourceTile:
    """One labelled source image.

    Attributes
    ----------
    image : str
        Path relative to the data set folder.
    cls : str
        The image's class (patch class, or image-level class of a masked image).
    mask : str or None
        Path of its uint8 mask, relative to the data set folder (lesion-mask data sets).
    lut : tuple of int
        Mask value -> label id; without a mask, ``lut[0]`` is the label of every pixel.
    width, height : int
        Size in source pixels.
    """

    image: str
    cls: str
    mask: str | None
    lut: tuple[int, ...]
    width: int
    height: int


@dataclass(frozen=True)
class MosaicDataset:
    """A labelled tile data set, ready to lay out.

    Attributes
    ----------
    name : str
        Short id (``"nct-crc"``, ``"kather2016"``, ``"ebhi-seg"``, ``"glas"``, ``"ocdc"``, ``"wsss4luad"``).
    kind : {"tissue-classes", "lesion-masks"}
    folder : Path
    mpp : float
        µm per source pixel.
    mpp_note : str
        Where ``mpp`` comes from (the data set, or an assumption).
    licence, citation : str
    non_commercial : bool
        The licence forbids commercial use (or the data set states none: treated as research only).
    tiles : tuple of SourceTile
    labels : dict of int -> str
        Label id -> name in the label TIFF (0 is always ``"background"``).
    background_classes : tuple of str
        Classes of glass (no tissue): used to fill background, never drawn as tissue.
    tumour_classes : tuple of str
        Classes that are tumour by default.
    class_lesion_labels : dict of str -> tuple of int
        Class -> the label ids that mark it in the label TIFF (its class id, or its mask's
        lesion label); :meth:`labels_of` turns tumour classes into tumour label ids.
    """

    name: str
    kind: str
    folder: Path
    mpp: float
    mpp_note: str
    licence: str
    citation: str
    non_commercial: bool
    tiles: tuple[SourceTile, ...]
    labels: dict[int, str]
    background_classes: tuple[str, ...] = ()
    tumour_classes: tuple[str, ...] = ()
    class_lesion_labels: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def classes(self) -> tuple[str, ...]:
        """All classes of the data set, sorted."""
        return tuple(sorted({t.cls for t in self.tiles}))

    @property
    def tissue_classes(self) -> tuple[str, ...]:
        """The classes that can be drawn as tissue (all but the background classes)."""
        return tuple(c for c in self.classes if c not in self.background_classes)

    def labels_of(self, classes: tuple[str, ...] | list[str]) -> tuple[int, ...]:
        """The label ids that mark any of ``classes`` in the label TIFF, sorted."""
        return tuple(sorted({i for c in classes for i in self.class_lesion_labels.get(c, ())}))

    def tiles_of(self, cls: str) -> tuple[SourceTile, ...]:
        """The source tiles of class ``cls``, in index order."""
        return tuple(t for t in self.tiles if t.cls == cls)

    def provenance(self) -> dict[str, object]:
        """The data set's identity for a sidecar: name, folder name, scale, licence, citation."""
        return {
            "name": self.name,
            "kind": self.kind,
            "folder": self.folder.name,
            "source_mpp": self.mpp,
            "source_mpp_note": self.mpp_note,
            "licence": self.licence,
            "non_commercial": self.non_commercial,
            "citation": self.citation,
        }


# ----------------------------------------------------------------------------- readers


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "index.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError) as exc:
        raise MosaicDataError(f"{path}: not a readable image ({exc}); restore the data set's files") from exc


def _tile(folder: Path, image: str, cls: str, mask: str | None, lut: tuple[int, ...], size: tuple[int, int] | None = None) -> SourceTile:
    if not (folder / image).is_file():
        raise MosaicDataError(f"{folder / image} is listed in index.csv but missing; restore the data set")
    if mask is not None and not (folder / mask).is_file():
        raise MosaicDataError(f"{folder / mask} is listed in index.csv but missing; restore the data set")
    w, h = size if size is not None else _image_size(folder / image)
    return SourceTile(image=image, cls=cls, mask=mask, lut=lut, width=int(w), height=int(h))


def _nct(folder: Path, rows: list[dict[str, str]]) -> MosaicDataset:
    classes = sorted({r["class"] for r in rows})
    tissue = [c for c in classes if c != "BACK"]
    ids = {c: i + 1 for i, c in enumerate(tissue)}
    ids["BACK"] = 0
    tiles = tuple(_tile(folder, r["file"], r["class"], None, (ids[r["class"]],)) for r in rows)
    return MosaicDataset(
        name="nct-crc",
        kind="tissue-classes",
        folder=folder,
        mpp=0.5,
        mpp_note="given by the data set (0.5 µm/px)",
        licence="CC BY 4.0",
        citation="J. N. Kather et al., PLoS Medicine 16(1):e1002730, 2019 (NCT-CRC-HE-100K, doi:10.5281/zenodo.1214456)",
        non_commercial=False,
        tiles=tiles,
        labels={0: BACKGROUND, **{i: c for c, i in ids.items() if i}},
        background_classes=("BACK",),
        tumour_classes=tuple(c for c in ("TUM",) if c in ids),
        class_lesion_labels={c: (i,) for c, i in ids.items() if i},
    )


def _kather(folder: Path, rows: list[dict[str, str]]) -> MosaicDataset:
    ids = {r["class"]: int(r["class_id"]) for r in rows}
    empty = tuple(c for c in ids if c.endswith("empty"))
    for c in empty:
        ids[c] = 0
    tumour = tuple(c for c in ids if c.endswith("tumor"))
    tiles = tuple(_tile(folder, r["file"], r["class"], None, (ids[r["class"]],)) for r in rows)
    return MosaicDataset(
        name="kather2016",
        kind="tissue-classes",
        folder=folder,
        mpp=0.495,
        mpp_note="given by the data set (0.495 µm/px)",
        licence="CC BY 4.0",
        citation="J. N. Kather et al., Scientific Reports 6:27988, 2016 (doi:10.5281/zenodo.53169)",
        non_commercial=False,
        tiles=tiles,
        labels={0: BACKGROUND, **{i: c for c, i in sorted(ids.items(), key=lambda kv: kv[1]) if i}},
        background_classes=empty,
        tumour_classes=tumour,
        class_lesion_labels={c: (i,) for c, i in ids.items() if i},
    )


def _ebhi(folder: Path, rows: list[dict[str, str]]) -> MosaicDataset:
    ids = {r["class"]: int(r["class_id"]) + 1 for r in rows}  # 0 background, 1 other tissue
    tiles = tuple(_tile(folder, r["image"], r["class"], r["mask"], (1, ids[r["class"]])) for r in rows)
    tumour = tuple(c for c in ids if c == "adenocarcinoma")
    return MosaicDataset(
        name="ebhi-seg",
        kind="lesion-masks",
        folder=folder,
        mpp=1.0,
        mpp_note="assumed (~1.0 µm/px; EBHI-Seg gives no scale)",
        licence="CC BY 4.0",
        citation="L. Shi et al., Frontiers in Medicine 10:1114673, 2023 (EBHI-Seg, doi:10.6084/m9.figshare.21540159.v1)",
        non_commercial=False,
        tiles=tiles,
        labels={0: BACKGROUND, 1: OTHER_TISSUE, **{i: c for c, i in sorted(ids.items(), key=lambda kv: kv[1])}},
        tumour_classes=tumour,
        class_lesion_labels={c: (i,) for c, i in ids.items()},
    )


def _glas(folder: Path, rows: list[dict[str, str]]) -> MosaicDataset:
    ids = {"benign": 2, "malignant": 3}
    tiles = []
    for r in rows:
        grade = r["grade_glas"].strip().lower()
        if grade not in ids:
            raise MosaicDataError(f"{folder / 'index.csv'}: unknown GlaS grade {r['grade_glas']!r} (expected benign or malignant)")
        tiles.append(
            _tile(folder, f"images/{r['image_id']}.jpg", grade, f"masks/{r['image_id']}.png", (1, ids[grade]), (int(r["width"]), int(r["height"])))
        )
    return MosaicDataset(
        name="glas",
        kind="lesion-masks",
        folder=folder,
        mpp=0.62,
        mpp_note="assumed (0.62 µm/px, GlaS 20x)",
        licence="research use only, commercial use not allowed (GlaS organisers)",
        citation="K. Sirinukunwattana et al., Medical Image Analysis 35:489-502, 2017 (GlaS)",
        non_commercial=True,
        tiles=tuple(tiles),
        labels={0: BACKGROUND, 1: OTHER_TISSUE, 2: "benign_gland", 3: "malignant_gland"},
        tumour_classes=("malignant",),
        class_lesion_labels={"benign": (2,), "malignant": (3,)},
    )


def _ocdc(folder: Path, rows: list[dict[str, str]]) -> MosaicDataset:
    tiles = []
    for r in rows:
        cls = "tumour" if float(r["tumour_fraction"]) > 0 else "non_tumour"
        tiles.append(
            _tile(folder, f"images/{r['image_id']}.jpg", cls, f"masks/{r['image_id']}.png", (1, 2), (int(r["width"]), int(r["height"])))
        )
    return MosaicDataset(
        name="ocdc",
        kind="lesion-masks",
        folder=folder,
        mpp=0.5,
        mpp_note="assumed (~0.5 µm/px, 20x; the tiles carry no scale)",
        licence="CC BY 4.0",
        citation="D. Freire et al., OCDC oral SCC H&E images, Mendeley Data V1, 2022 (doi:10.17632/9bsc36jyrt.1)",
        non_commercial=False,
        tiles=tuple(tiles),
        labels={0: BACKGROUND, 1: OTHER_TISSUE, 2: "tumour"},
        tumour_classes=("tumour",),
        class_lesion_labels={"tumour": (2,), "non_tumour": ()},
    )


def _wsss(folder: Path, rows: list[dict[str, str]]) -> MosaicDataset:
    lut = (0, 2, 3, 4)  # source 0 bg / 1 tumour epithelium / 2 stroma / 3 normal
    tiles = []
    for r in rows:
        cls = "tumour" if float(r["frac_tumor_epithelium"]) > 0 else "non_tumour"
        tiles.append(_tile(folder, r["image"], cls, r["mask"], lut, (int(r["width"]), int(r["height"]))))
    return MosaicDataset(
        name="wsss4luad",
        kind="lesion-masks",
        folder=folder,
        mpp=1.0,
        mpp_note="assumed (~1.0 µm/px; WSSS4LUAD gives no scale)",
        licence="none stated; treated as research only, non-commercial, not redistributable",
        citation="C. Han et al., WSSS4LUAD, arXiv:2204.06455, 2022",
        non_commercial=True,
        tiles=tuple(tiles),
        labels={0: BACKGROUND, 1: OTHER_TISSUE, 2: "tumour_epithelium", 3: "stroma", 4: "normal"},
        tumour_classes=("tumour",),
        class_lesion_labels={"tumour": (2,), "non_tumour": ()},
    )


#: index.csv columns that identify each data set -> its reader.
_SIGNATURES: tuple[tuple[frozenset[str], Callable[[Path, list[dict[str, str]]], MosaicDataset]], ...] = (
    (frozenset({"file", "class", "class_id", "class_name_kather2016"}), _kather),
    (frozenset({"file", "class", "source_dataset"}), _nct),
    (frozenset({"image", "mask", "class", "class_id", "mask_fraction"}), _ebhi),
    (frozenset({"image_id", "grade_glas", "width", "height"}), _glas),
    (frozenset({"image_id", "tumour_fraction", "width", "height"}), _ocdc),
    (frozenset({"image", "mask", "frac_tumor_epithelium", "width", "height"}), _wsss),
)


def _reader_for(folder: Path) -> Callable[[Path, list[dict[str, str]]], MosaicDataset] | None:
    index = folder / "index.csv"
    if not index.is_file():
        return None
    with open(index, newline="", encoding="utf-8") as fh:
        header = set(next(csv.reader(fh), []))
    for columns, reader in _SIGNATURES:
        if columns <= header:
            return reader
    return None


def find_mosaic_datasets(root: str | os.PathLike) -> list[Path]:
    """The sub-folders of ``root`` (and ``root`` itself) that are supported data sets, sorted."""
    root = Path(root)
    cands = [root] + (sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else [])
    return [p for p in cands if _reader_for(p) is not None]


def load_mosaic_dataset(folder: str | os.PathLike, *, kind: str | None = None, mpp: float | None = None) -> MosaicDataset:
    """Read a labelled tile data set (recognised by the columns of its ``index.csv``).

    Parameters
    ----------
    folder : path-like
        The data set's folder (holding ``index.csv``).
    kind : {"tissue-classes", "lesion-masks"}, optional
        Refuse a data set of the other kind.
    mpp : float, optional
        µm per source pixel, replacing the data set's given or assumed scale.

    Returns
    -------
    MosaicDataset

    Raises
    ------
    MosaicDataError
        Not a supported data set (the message lists the supported ones found beneath it), of
        the wrong kind, or with files missing.
    """
    folder = Path(folder).expanduser()
    if kind is not None and kind not in KINDS:
        raise MosaicDataError(f"unknown mosaic kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not folder.is_dir():
        raise MosaicDataError(f"{folder} is not a folder; give a labelled tile data set folder (with index.csv)")
    reader = _reader_for(folder)
    if reader is None:
        found = [p for p in find_mosaic_datasets(folder) if p != folder]
        if kind is not None:
            found = [p for p in found if _reader_for(p)(p, _rows(p)).kind == kind] if found else []
        hint = f"; pass one of: {', '.join(str(p) for p in found)}" if found else ""
        raise MosaicDataError(
            f"{folder} is not a supported labelled tile data set (NCT-CRC, Kather 2016, EBHI-Seg, GlaS, OCDC, WSSS4LUAD index.csv){hint}"
        )
    ds = reader(folder, _rows(folder))
    if not ds.tiles:
        raise MosaicDataError(f"{folder / 'index.csv'} lists no images")
    if kind is not None and ds.kind != kind:
        raise MosaicDataError(f"{folder} is a {ds.kind} data set ({ds.name}), not {kind}; use --kind {ds.kind} or another folder")
    if mpp is not None:
        if not mpp > 0:
            raise MosaicDataError(f"source µm/px must be positive, got {mpp}")
        ds = replace(ds, mpp=float(mpp), mpp_note=f"given by the user ({mpp:g} µm/px)")
    logger.info("%s: %s data set %s, %d tiles, %g µm/px", folder, ds.kind, ds.name, len(ds.tiles), ds.mpp)
    return ds
