"""Fine-tune an M2 student on strong labels plus reviewed pseudo-labels (M2 step S3).

:func:`iter_finetune` is the one place that assembles the training data of a
fine-tuning run:

* strong labels: folders laid out like ``../shared/data`` datasets
  (``images/<id>.png`` + ``instance_masks/<id>.png``; ``monuseg_train`` and
  ``cpm15_nuclei`` are read through their ``index.csv``, the shared data root
  through both), resampled to the student's µm/px;
* pseudo-labels: the accepted tiles of one or more review projects
  (:class:`~napari_pathoseg.review.project.ReviewProject`); each tile goes to
  the X side as read, and its teacher-normalised image (pseudo-Y) goes to the
  Y side, both with the reviewed mask and the teacher's confidence as weight.

It then initialises the student (from the base checkpoint when its
architecture is the student's, else fresh), runs
:func:`napari_pathoseg.methods.nuclei.train.train_m2` (a checkpoint every epoch,
the best by validation AJI kept, resumable, stoppable), and finally registers
the best checkpoint with :func:`napari_pathoseg.models.registry.register_model`.

Files in ``out_dir``: ``finetune.json`` (the run's config), ``last.safetensors``,
``best.safetensors``, ``history.json`` (see :mod:`napari_pathoseg.methods.nuclei.train`).
No Qt or napari here; the Fine-tune dock (:mod:`napari_pathoseg._widgets.finetune`)
drives it in a worker thread.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from napari_pathoseg.errors import CheckpointError, PathosegError
from napari_pathoseg.events import run_to_end

__all__ = [
    "FinetuneConfig",
    "FinetuneError",
    "FinetuneStage",
    "FinetuneDone",
    "FinetuneData",
    "FinetuneEvent",
    "load_strong_folder",
    "load_pseudo_items",
    "build_finetune_data",
    "student_config",
    "iter_finetune",
    "run_finetune",
    "parse_strong",
]

logger = logging.getLogger(__name__)

#: File suffixes read as images / masks in a strong-label folder.
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
#: Folder names under ``../shared/data`` whose ``index.csv`` gives per-image µm/px and mask paths.
INDEXED_DATASETS = {"monuseg_train": "monuseg", "cpm15_nuclei": "cpm15"}


class FinetuneError(PathosegError):
    """A fine-tuning run cannot start: bad options, missing data or an unusable base model."""


@dataclass(frozen=True)
class FinetuneConfig:
    """Options of a fine-tuning run (saved as ``finetune.json`` in ``out_dir``).

    Attributes
    ----------
    out_dir : str
        Folder for checkpoints and history; a run with an existing
        ``last.safetensors`` there resumes.
    name : str
        Name under which the finished model is registered.
    base : str or None
        Base model: a registered name (``"nuclei-lite"``) or a ``.safetensors``
        checkpoint.  Its weights initialise the student when the architectures
        match; ``None`` starts fresh.
    preset : str
        Student preset (``"transcycle-lite"``, ``"transcycle"``,
        ``"attcycle-lite"``, ``"attcycle"``).
    strong : tuple of str
        Strong-label folders (``images/`` + ``instance_masks/``, a
        ``monuseg_train`` / ``cpm15_nuclei`` folder, or the shared data root).
    strong_mpp : float or None
        µm/px of plain ``images/`` folders (default: the student's µm/px).
    projects : tuple of str
        Review project folders whose accepted tiles are used as pseudo-labels.
    include_pending : bool
        Also use pending tiles scoring at least ``min_score`` (M2 without
        human review).
    min_score : float or None
        Tile-score threshold for ``include_pending`` (default: each
        project's own threshold).
    pseudo_weight : {"confidence", "uniform"}
        Per-pixel weight of pseudo-labels (teacher confidence, or 1).
    split : str or None
        A split JSON (:func:`napari_pathoseg.methods.nuclei.datasets.save_split`):
        its ``test`` images are never used, its ``val`` images validate, its
        ``x`` / ``y`` lists place the others.  Without it ``val_fraction`` of
        the strong images (at least one) are held out for validation, seeded.
    val_fraction : float
        Share of strong images used for validation when no split is given.
    epochs, steps_per_epoch, batch_size : int
        Training length (a resumed run continues up to ``epochs``).
    lr : float
        Learning rate of the generators (Adam).
    seed : int
        Seeds the split, crops and weights.
    device : str or None
        ``"cpu"``, ``"cuda"``, ``"mps"`` or None for the best available.
    register : bool
        Register the best checkpoint under ``name`` when the run finishes.
    """

    out_dir: str
    name: str = "student"
    base: str | None = "nuclei-lite"
    preset: str = "transcycle-lite"
    strong: tuple[str, ...] = ()
    strong_mpp: float | None = None
    projects: tuple[str, ...] = ()
    include_pending: bool = False
    min_score: float | None = None
    pseudo_weight: str = "confidence"
    split: str | None = None
    val_fraction: float = 0.2
    epochs: int = 10
    steps_per_epoch: int = 100
    batch_size: int = 4
    lr: float = 2e-4
    seed: int = 0
    device: str | None = None
    register: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "strong", tuple(str(s) for s in self.strong))
        object.__setattr__(self, "projects", tuple(str(p) for p in self.projects))
        if not str(self.name).strip() or "/" in self.name or "\\" in self.name:
            raise FinetuneError(f"Model name {self.name!r} is empty or holds a slash; choose a plain name.")
        if self.epochs < 1 or self.steps_per_epoch < 1 or self.batch_size < 1:
            raise FinetuneError(
                f"epochs, steps_per_epoch and batch_size must be >= 1 (got {self.epochs}, "
                f"{self.steps_per_epoch}, {self.batch_size})."
            )
        if not self.lr > 0:
            raise FinetuneError(f"The learning rate must be > 0, got {self.lr}.")
        if not 0.0 < self.val_fraction < 1.0:
            raise FinetuneError(f"val_fraction must be in (0, 1), got {self.val_fraction}.")
        if self.pseudo_weight not in ("confidence", "uniform"):
            raise FinetuneError(f"pseudo_weight must be 'confidence' or 'uniform', got {self.pseudo_weight!r}.")
        if self.strong_mpp is not None and not self.strong_mpp > 0:
            raise FinetuneError(f"strong_mpp must be > 0, got {self.strong_mpp}.")
        if self.min_score is not None and not 0.0 <= self.min_score <= 1.0:
            raise FinetuneError(f"min_score must be in [0, 1], got {self.min_score}.")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["strong"] = list(self.strong)
        d["projects"] = list(self.projects)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise FinetuneError(f"Unknown fine-tune options {unknown}; valid: {sorted(names)}.")
        d = dict(d)
        d["strong"] = tuple(d.get("strong", ()))
        d["projects"] = tuple(d.get("projects", ()))
        return cls(**d)


@dataclass
class FinetuneStage:
    """A preparation stage started (``"data"``, ``"init"``, ``"train"``, ``"register"``)."""

    stage: str
    message: str


@dataclass
class FinetuneDone:
    """Last event of :func:`iter_finetune`.

    Attributes
    ----------
    best_checkpoint, last_checkpoint : Path or None
    best_metrics : dict
        Validation metrics of the best epoch (``aji``, ``f1``, ``dice``, ...).
    cancelled : bool
        Stopped by the cancel token; ``last_checkpoint`` resumes it.
    registered : dict or None
        The registry entry (None when cancelled or ``register=False``).
    history : list of dict
        One entry per epoch (losses, validation metrics, seconds).
    initialised_from : str or None
        Base checkpoint the student started from (None: fresh or resumed).
    """

    best_checkpoint: Path | None
    last_checkpoint: Path | None
    best_metrics: dict[str, Any]
    cancelled: bool = False
    registered: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    initialised_from: str | None = None


@dataclass
class FinetuneData:
    """Assembled training data: the :class:`M2Data` plus counts for the record."""

    m2: Any  # napari_pathoseg.methods.nuclei.datasets.M2Data
    n_strong: int
    n_pseudo: int
    description: str


# the training-loop events pass through unchanged
FinetuneEvent = Any  # FinetuneStage | StepEvent | EpochEvent | FinetuneDone


# ------------------------------------------------------------------------------------------
# data


def _files_by_stem(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}


def load_strong_folder(
    folder: str | os.PathLike, *, mpp: float, src_mpp: float | None = None
) -> list[Any]:
    """Load a strong-label folder as :class:`LabelledImage` records at ``mpp``.

    Parameters
    ----------
    folder : path
        One of: the shared data root (holding ``monuseg_train/`` and/or
        ``cpm15_nuclei/``); one of those dataset folders (read through its
        ``index.csv``: per-image µm/px and mask path); or any folder with
        ``images/`` and ``instance_masks/`` (masks matched by file stem).
    mpp : float
        µm/px the student works at; images are resampled to it.
    src_mpp : float or None
        µm/px of a plain ``images/`` folder (default: ``mpp``, no resampling).

    Returns
    -------
    list of LabelledImage
        Names ``"<source>/<id>"`` (the shared datasets use the names of the
        shipped split: ``monuseg/...``, ``cpm15/...``).

    Raises
    ------
    FinetuneError
        The folder is missing, holds no labelled image, or a mask does not fit.
    """
    from napari_pathoseg.methods.nuclei.datasets import (
        LabelledImage,
        iter_nuclei_files,
        read_image,
        read_labels,
        resample_pair,
    )

    folder = Path(folder)
    if not folder.is_dir():
        raise FinetuneError(f"Strong-label folder {folder} does not exist; choose a folder with images/ and instance_masks/.")
    entries: list[tuple[str, Path, Path, float, str]] = []
    if any((folder / d / "index.csv").is_file() for d in INDEXED_DATASETS):
        entries = iter_nuclei_files(folder)
    elif folder.name in INDEXED_DATASETS and (folder / "index.csv").is_file():
        prefix = INDEXED_DATASETS[folder.name] + "/"
        entries = [e for e in iter_nuclei_files(folder.parent) if e[0].startswith(prefix)]
    else:
        img_dir, mask_dir = folder / "images", folder / "instance_masks"
        if not img_dir.is_dir() or not mask_dir.is_dir():
            raise FinetuneError(
                f"{folder} has no images/ and instance_masks/ sub-folders; a strong-label folder holds "
                "RGB images in images/ and instance masks of the same file names in instance_masks/."
            )
        masks = _files_by_stem(mask_dir)
        src = float(src_mpp) if src_mpp is not None else float(mpp)
        for stem, ipath in _files_by_stem(img_dir).items():
            if stem in masks:
                entries.append((f"{folder.name}/{stem}", ipath, masks[stem], src, folder.name))
    items = []
    for name, ipath, mpath, src, source in entries:
        image, labels = read_image(ipath), read_labels(mpath)
        if labels.shape != image.shape[:2]:
            raise FinetuneError(f"Mask {mpath} is {labels.shape} but image {ipath} is {image.shape[:2]}; fix the mask.")
        img, lab = resample_pair(image, labels, src_mpp=src, dst_mpp=mpp)
        items.append(LabelledImage(name, img, lab, 1.0, source, mpp))
    if not items:
        raise FinetuneError(f"No labelled image in {folder}: no image in images/ has a mask of the same name.")
    logger.info("strong labels: %d images from %s", len(items), folder)
    return items


def load_pseudo_items(
    project: Any,
    *,
    mpp: float,
    include_pending: bool = False,
    min_score: float | None = None,
    weight: str = "confidence",
) -> tuple[list[Any], list[Any]]:
    """Accepted tiles of a review project as X items and pseudo-Y items.

    Parameters
    ----------
    project : ReviewProject or path
    mpp : float
        The student's µm/px; tiles of a project made at another resolution are
        resampled to it.
    include_pending, min_score, weight
        As in :meth:`ReviewProject.training_triples`.

    Returns
    -------
    x_items, y_items : list of LabelledImage
        ``x_items[i]`` is tile ``i`` as read; ``y_items[i]`` its
        teacher-normalised image (pseudo-Y); both with the tile's mask and
        weight (the teacher's per-pixel confidence, 1 for edited tiles).
    """
    from napari_pathoseg.review.project import ReviewProject, _confidence
    from napari_pathoseg.methods.nuclei.datasets import LabelledImage, resample_pair

    if not isinstance(project, ReviewProject):
        project = ReviewProject.open(project)
    src_mpp = project.info.mpp if project.info.mpp is not None else mpp
    x_items, y_items = [], []
    for item in project.accepted_training_items(include_pending=include_pending, min_score=min_score):
        w: float | np.ndarray = 1.0
        if weight == "confidence" and not project.record(item.tile_id).edited:
            w = _confidence(project.read_prob(item.tile_id)).astype(np.float32)
        img, lab = resample_pair(item.image, item.mask.astype(np.int32), src_mpp=src_mpp, dst_mpp=mpp)
        norm, _ = resample_pair(item.normalized, None, src_mpp=src_mpp, dst_mpp=mpp)
        if not np.isscalar(w) and w.shape != lab.shape:
            w, _ = resample_pair(np.repeat(w[..., None], 3, -1), None, src_mpp=src_mpp, dst_mpp=mpp)
            w = np.asarray(w[..., 0], np.float32)
        name = f"pseudo:{project.root.name}/{item.tile_id}"
        x_items.append(LabelledImage(name, img, lab, w, "pseudo", mpp))
        y_items.append(LabelledImage(name + ":normalized", norm, lab, w, "pseudo", mpp))
    logger.info("pseudo-labels: %d tiles from %s", len(x_items), project.root)
    return x_items, y_items


def build_finetune_data(config: FinetuneConfig, *, mpp: float) -> FinetuneData:
    """Assemble strong and pseudo-labelled data into X / Y / validation sets.

    Strong images go to X or Y as the split says (or by stain style,
    :func:`~napari_pathoseg.methods.nuclei.datasets.split_styles`); pseudo tiles go
    to X, their normalised images to Y.  Validation uses strong images only.

    Raises
    ------
    FinetuneError
        No data, no strong image for validation, or a split naming missing images.
    """
    from napari_pathoseg.methods.nuclei.datasets import M2Data, load_split, split_styles

    if not config.strong and not config.projects:
        raise FinetuneError("No training data: choose strong-label folders and/or a review project.")
    strong: list[Any] = []
    for folder in config.strong:
        strong += load_strong_folder(folder, mpp=mpp, src_mpp=config.strong_mpp)
    names = [it.name for it in strong]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise FinetuneError(f"Strong-label folders hold the same images twice ({dup[:3]}); choose each once.")
    px, py = [], []
    for proj in config.projects:
        x, y = load_pseudo_items(
            proj, mpp=mpp, include_pending=config.include_pending, min_score=config.min_score,
            weight=config.pseudo_weight,
        )
        px += x
        py += y
    if config.projects and not px:
        logger.warning("the review project(s) hold no accepted tiles; training on strong labels only")
    if not strong:
        raise FinetuneError(
            "Validation needs strong labels (the best epoch is chosen by AJI against expert masks); "
            "add at least one strong-label folder."
        )
    by_name = {it.name: it for it in strong}
    split: dict[str, Any]
    if config.split:
        split = load_split(config.split)
        test = set(split["test"])
        val = [by_name[n] for n in split["val"] if n in by_name]
        train = [it for it in strong if it.name not in test and it.name not in set(split["val"])]
        xs, ys = set(split["x"]), set(split["y"])
        x_train = [it for it in train if it.name in xs]
        y_train = [it for it in train if it.name in ys]
        rest = [it for it in train if it.name not in xs and it.name not in ys]
        if rest and len(rest) >= 2:
            st = split_styles(rest)
            x_train += [by_name[n] for n in st["x"]]
            y_train += [by_name[n] for n in st["y"]]
        elif rest:
            x_train += rest
        if not val:
            raise FinetuneError(
                f"None of the validation images of {config.split} is among the strong labels; "
                "add their folder or drop the split."
            )
        logger.info("split %s: %d test images left out", config.split, len(test & set(by_name)))
    else:
        rng = np.random.default_rng(config.seed)
        order = [strong[i] for i in rng.permutation(len(strong))]
        n_val = max(1, int(round(config.val_fraction * len(strong))))
        if len(strong) == 1:
            logger.warning("only one strong image: it is used for both training and validation")
            val, train = list(strong), list(strong)
        else:
            val, train = order[:n_val], order[n_val:]
        if len(train) >= 2:
            st = split_styles(train)
            x_train = [by_name[n] for n in st["x"]]
            y_train = [by_name[n] for n in st["y"]]
        else:
            x_train, y_train = list(train), list(train)
        split = {
            "seed": config.seed, "val": sorted(it.name for it in val), "test": [],
            "train": sorted(it.name for it in train), "x": sorted(it.name for it in x_train),
            "y": sorted(it.name for it in y_train),
        }
    n_strong = len({it.name for it in list(x_train) + list(y_train)})
    x_train = list(x_train) + px
    y_train = list(y_train) + py
    if not x_train or not y_train:
        raise FinetuneError("Not enough training images for both the X and the Y side; add strong labels or accepted tiles.")
    desc = f"{n_strong} strong images ({', '.join(config.strong) or '-'})"
    if config.projects:
        desc += f" + {len(px)} pseudo-labelled tiles ({', '.join(config.projects)})"
    split = dict(split, pseudo=[it.name for it in px])
    return FinetuneData(
        m2=M2Data(x_train=x_train, y_train=y_train, val=list(val), split=split),
        n_strong=n_strong,
        n_pseudo=len(px),
        description=desc,
    )


# ------------------------------------------------------------------------------------------
# model


def student_config(preset: str) -> Any:
    """The :class:`~napari_pathoseg.methods.nuclei.attcycle.M2Config` of a student preset.

    Raises
    ------
    FinetuneError
        Unknown preset; the message lists the valid ones.
    """
    import napari_pathoseg.methods.nuclei.transcycle  # noqa: F401  (registers the TransCycle presets)
    from napari_pathoseg.methods.nuclei.attcycle import PRESETS, get_preset

    if preset not in PRESETS:
        raise FinetuneError(f"Unknown student preset {preset!r}; valid presets: {sorted(PRESETS)}.")
    return get_preset(preset)


def _base_path(base: str) -> Path:
    from napari_pathoseg.models.registry import list_models

    p = Path(base).expanduser()
    if p.suffix == ".safetensors" or p.is_file():
        if not p.is_file():
            raise FinetuneError(f"Base checkpoint {p} does not exist; choose a .safetensors file or a model name.")
        return p
    for m in list_models():
        if m["name"] == base:
            return Path(m["path"])
    names = [m["name"] for m in list_models()]
    raise FinetuneError(f"Unknown base model {base!r}; valid names: {names} (or give a .safetensors path).")


def _write_initial_checkpoint(
    path: Path, config: Any, base: Path, *, lr: float, seed: int
) -> list[str]:
    """Write a position-0 resume checkpoint of ``train_m2`` holding the base weights.

    ``train_m2`` resumes from ``out_dir/last.safetensors``; a checkpoint at
    epoch 0, step 0 with the base model's weights, fresh optimisers and the
    seeded RNG states is exactly a fresh run that starts from those weights.

    Returns
    -------
    list of str
        The modules taken from the base (``G_X2Y`` always; ``G_Y2X``, ``D_X``,
        ``D_Y`` when the base has them).
    """
    import torch

    from napari_pathoseg.models.checkpoint import load_checkpoint, load_state_strict, save_checkpoint
    from napari_pathoseg.methods.nuclei.attcycle import M2Model

    tensors, _, meta = load_checkpoint(base, expected_kind="m2")
    if "G_X2Y" not in tensors:
        raise CheckpointError(f"{base} has no G_X2Y weights; it is not an M2 nucleus model.")
    torch.manual_seed(seed)  # the same initialisation a fresh train_m2 run makes
    model = M2Model(config)
    used = []
    for name in ("G_X2Y", "G_Y2X", "D_X", "D_Y"):
        if name in tensors:
            load_state_strict(getattr(model, name), tensors[name], what=name, path=base)
            used.append(name)
    opt_g = torch.optim.Adam(model.generator_parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(model.discriminator_parameters(), lr=lr / 2, betas=(0.5, 0.999))
    state = dict(
        epoch=0,
        step=0,
        best_metrics={},
        history=[],
        numpy_rng=np.random.default_rng(seed).bit_generator.state,
        opt_g_groups=opt_g.state_dict()["param_groups"],
        opt_d_groups=opt_d.state_dict()["param_groups"],
        initialised_from=str(base),
        base_meta={k: v for k, v in meta.items() if k in ("val_metrics", "instance_method", "epoch")},
    )
    state_dicts = {name: getattr(model, name).state_dict() for name in ("G_X2Y", "G_Y2X", "D_X", "D_Y")}
    state_dicts["rng"] = {"torch": torch.get_rng_state()}
    save_checkpoint(path, state_dicts, config.to_dict(), state)
    return used


def _write_json(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_SCORE_KEYS = ("aji", "aji_plus", "dice", "f1", "pq", "miou", "best_aji", "distance_aji", "distance_f1", "distance_dice")


# ------------------------------------------------------------------------------------------
# the run


def iter_finetune(
    config: FinetuneConfig,
    *,
    cancel: Any = None,
    data: FinetuneData | None = None,
    stain_augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None | str = "default",
) -> Iterator[FinetuneEvent]:
    """Fine-tune a student; a generator of progress events ending in :class:`FinetuneDone`.

    Parameters
    ----------
    config : FinetuneConfig
    cancel : object with ``is_set()`` or None
        Checked after every training step; when set, the step finishes, a
        resumable checkpoint is saved (``last.safetensors``) and a cancelled
        :class:`FinetuneDone` ends the run (nothing is registered).
    data : FinetuneData or None
        Pre-assembled data (default: :func:`build_finetune_data` from ``config``).
    stain_augment : callable, None or "default"
        HED augmentation of X crops (``"default"``: the training default).

    Yields
    ------
    FinetuneStage
        ``"data"``, ``"init"``, ``"train"`` and (at the end) ``"register"``.
    StepEvent, EpochEvent
        From :func:`napari_pathoseg.methods.nuclei.train.train_m2` (losses per step;
        losses, validation metrics and checkpoint per epoch).
    FinetuneDone
        Last.

    Raises
    ------
    FinetuneError, CheckpointError
        Bad options or data, a base model that cannot be read, or an
        ``out_dir`` holding a run of another preset.

    Examples
    --------
    >>> cfg = FinetuneConfig(out_dir="runs/ft", strong=("/data/monuseg_train",),
    ...                      projects=("review",), epochs=2)  # doctest: +SKIP
    >>> done = run_finetune(cfg)  # doctest: +SKIP
    """
    from napari_pathoseg.models.checkpoint import read_header
    from napari_pathoseg.methods.nuclei.attcycle import M2Config
    from napari_pathoseg.models.registry import register_model
    from napari_pathoseg.methods.nuclei.datasets import default_stain_augment
    from napari_pathoseg.methods.nuclei.train import DoneEvent, train_m2

    student = student_config(config.preset)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last_path = out / "last.safetensors"
    resuming = last_path.is_file()
    if resuming:
        saved = M2Config.from_dict(read_header(last_path)["config"])
        if saved != student:
            raise FinetuneError(
                f"{out} holds a run of the {saved.preset!r} preset, not {config.preset!r}; choose another "
                "output folder or the same preset to resume it."
            )
    base_path = _base_path(config.base) if config.base else None
    yield FinetuneStage("data", "loading strong labels and pseudo-labels")
    if data is None:
        data = build_finetune_data(config, mpp=student.mpp)
    logger.info("fine-tune data: %s; %d validation images", data.description, len(data.m2.val))
    cfg_file = out / "finetune.json"
    if resuming and cfg_file.is_file():
        try:
            before = json.loads(cfg_file.read_text())
        except (OSError, ValueError):
            before = {}
        changed = sorted(k for k, v in config.to_dict().items() if before.get(k, v) != v and k != "epochs")
        if changed:
            logger.warning("resuming %s with changed options %s", out, changed)
    started = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    _write_json(cfg_file, dict(config.to_dict(), started=started, data=data.description))

    initialised_from = None
    if not resuming and base_path is not None:
        header = read_header(base_path)
        if header["kind"] != "m2":
            raise FinetuneError(f"Base {base_path} holds a {header['kind']!r} model, not an M2 nucleus model.")
        base_cfg = M2Config.from_dict(header["config"])
        if base_cfg == student:
            yield FinetuneStage("init", f"initialising the student from {base_path.name}")
            used = _write_initial_checkpoint(last_path, student, base_path, lr=config.lr, seed=config.seed)
            initialised_from = str(base_path)
            logger.info("student initialised from %s (%s)", base_path, ", ".join(used))
        else:
            yield FinetuneStage(
                "init",
                f"base {base_path.name} is a {base_cfg.preset!r} model; the {student.preset!r} student starts fresh",
            )
    elif resuming:
        yield FinetuneStage("init", f"resuming from {last_path}")

    yield FinetuneStage("train", f"training on {data.description}")
    meta = {
        "finetune": {
            "name": config.name, "base": config.base, "data": data.description, "started": started,
            "n_strong": data.n_strong, "n_pseudo": data.n_pseudo, "preset": config.preset,
        }
    }
    augment = default_stain_augment if stain_augment == "default" else stain_augment
    done: DoneEvent | None = None
    for ev in train_m2(
        student, data.m2, out_dir=out, epochs=config.epochs, lr=config.lr, seed=config.seed,
        resume=True, cancel=cancel, steps_per_epoch=config.steps_per_epoch, batch_size=config.batch_size,
        device=config.device, stain_augment=augment, meta=meta,
    ):
        if isinstance(ev, DoneEvent):
            done = ev
        else:
            yield ev
    assert done is not None
    registered = None
    if not done.cancelled and config.register and done.best_checkpoint is not None:
        yield FinetuneStage("register", f"registering {config.name}")
        scores = {k: float(done.best_metrics[k]) for k in _SCORE_KEYS if k in done.best_metrics}
        registered = register_model(
            done.best_checkpoint, name=config.name, base=config.base, data=data.description, scores=scores
        )
        registered = dict(registered, date=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat())
        logger.info("registered %s -> %s", config.name, done.best_checkpoint)
    yield FinetuneDone(
        best_checkpoint=done.best_checkpoint,
        last_checkpoint=done.last_checkpoint,
        best_metrics=dict(done.best_metrics),
        cancelled=done.cancelled,
        registered=registered,
        history=list(done.history),
        initialised_from=initialised_from,
    )


def run_finetune(
    config: FinetuneConfig,
    *,
    progress: Callable[[Any], None] | None = None,
    cancel: Any = None,
    **kwargs: Any,
) -> FinetuneDone:
    """Run :func:`iter_finetune` to the end (headless); ``progress(event)`` sees every event."""
    return run_to_end(iter_finetune(config, cancel=cancel, **kwargs), FinetuneDone, progress=progress)


def parse_strong(folders: Sequence[str] | str) -> tuple[str, ...]:
    """Split a ``;``/newline-separated string (as typed in the dock) into folder paths."""
    if isinstance(folders, str):
        parts = [p.strip() for chunk in folders.splitlines() for p in chunk.split(";")]
        return tuple(p for p in parts if p)
    return tuple(str(f) for f in folders)
