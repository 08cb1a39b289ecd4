"""Options of a fine-tuning run (:class:`FinetuneConfig`) and its error type.

Shared by :mod:`~napari_pathoseg.methods.nuclei.finetune_data` (what the student trains on) and
:mod:`~napari_pathoseg.methods.nuclei.finetune` (the run).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from napari_pathoseg.errors import PathosegError

__all__ = ["FinetuneError", "FinetuneConfig", "parse_strong", "SAME_AS_BASE", "DEFAULT_FRESH_PRESET"]

#: ``preset`` value (besides ``None``) meaning "the base model's own architecture".
SAME_AS_BASE = "base"
#: Student preset of a run without a base model.
DEFAULT_FRESH_PRESET = "transcycle-lite"


class FinetuneError(PathosegError):
    """A fine-tuning run cannot start: bad options, missing data or an unusable base model."""


@dataclass(frozen=True)
class FinetuneConfig:
    """Options of a fine-tuning run (saved as ``finetune.json`` in ``out_dir``).

    Attributes
    ----------
    out_dir : str
        Folder for checkpoints and history; a run already there is resumed.
    name : str
        Name under which the finished model is registered.
    base : str or None
        Base model: a registered name (``"nuclei-lite"``) or a ``.safetensors`` checkpoint. The
        student starts from its weights (every tensor whose name and shape match); ``None``
        starts fresh.
    preset : str or None
        Student architecture. ``None`` (or ``"base"``, the default): the base model's own
        architecture and config, so the run fine-tunes the base; ``"transcycle-lite"`` without a
        base. Another preset (``"transcycle-lite"``, ``"transcycle"``, ``"attcycle-lite"``,
        ``"attcycle"``) takes only the base's matching weights (the Done event says how many).
    strong : tuple of str
        Strong-label folders (``images/`` + ``instance_masks/``, a ``monuseg_train`` /
        ``cpm15_nuclei`` folder, or the shared data root).
    strong_mpp : float or None
        µm/px of plain ``images/`` folders (default: the student's µm/px).
    projects : tuple of str
        Review project folders whose accepted tiles are used as pseudo-labels.
    include_pending : bool
        Also use pending tiles scoring at least ``min_score`` (M2 without human review).
    min_score : float or None
        Tile-score threshold for ``include_pending`` (default: each project's own threshold).
    pseudo_weight : {"confidence", "uniform"}
        Per-pixel weight of pseudo-labels (teacher confidence, or 1).
    split : str or None
        A split JSON (:func:`napari_pathoseg.methods.nuclei.datasets.save_split`): its ``test``
        images are never used, its ``val`` images validate, its ``x`` / ``y`` lists place the
        others. Without it ``val_fraction`` of the strong images (at least one) are held out for
        validation, seeded.
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
    threads : int, "auto" or None
        torch CPU threads (None: every core the process may use; ``"auto"``: the same, but 1
        while the machine is busier than its cores).
    register : bool
        Register the best checkpoint under ``name`` when the run finishes.
    min_aji : float
        Registration floor: a run whose best validation AJI is below it is not registered (the
        Done event says why) unless ``force_register``.
    force_register : bool
        Register even below ``min_aji``.
    """

    out_dir: str
    name: str = "student"
    base: str | None = "nuclei-lite"
    preset: str | None = None
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
    threads: int | str | None = None
    register: bool = True
    min_aji: float = 0.05
    force_register: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "strong", tuple(str(s) for s in self.strong))
        object.__setattr__(self, "projects", tuple(str(p) for p in self.projects))
        if self.preset in ("", SAME_AS_BASE):
            object.__setattr__(self, "preset", None)
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
        if not 0.0 <= self.min_aji <= 1.0:
            raise FinetuneError(f"min_aji (the registration floor) must be in [0, 1], got {self.min_aji}.")
        if self.threads is not None and self.threads != "auto" and not (isinstance(self.threads, int) and self.threads >= 1):
            raise FinetuneError(f"threads must be a number >= 1 or 'auto', got {self.threads!r}.")

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


def parse_strong(folders: Sequence[str] | str) -> tuple[str, ...]:
    """Split a ``;``/newline-separated string (as typed in the dock) into folder paths."""
    if isinstance(folders, str):
        parts = [p.strip() for chunk in folders.splitlines() for p in chunk.split(";")]
        return tuple(p for p in parts if p)
    return tuple(str(f) for f in folders)
