"""The tasks a model can do, their loaders and the checkpoint architectures behind them.

Two small tables drive the registry (:mod:`napari_pathoseg.models.registry`):

* :data:`TASKS` — one :class:`Task` per method: its name (``"nuclei"``, ``"lesion"``,
  ``"tissue"``, ``"malignancy"``, ``"slide"``), default classes, and the **loader** that turns
  a checkpoint into a ready model, named as a ``"module:function"`` string and imported only
  when a model of that task is loaded (the registry never imports method packages up front).
* :data:`ARCHITECTURES` — one :class:`Architecture` per checkpoint ``kind`` (the family
  :func:`~napari_pathoseg.models.checkpoint.save_checkpoint` writes in the header, e.g.
  ``"m2"``): the task its models serve and the **config validator** (again ``"module:function"``)
  that checks a checkpoint's config before any network is built.

Adding a method is a few lines: a loader ``load(path, *, card, device) -> model`` and a validator
``validate(config, *, where) -> object`` in the method's package, then either an entry in the two
tables below or, at run time, :func:`register_loader` and :func:`register_architecture`.

Examples
--------
>>> TASKS["nuclei"].method
'M2'
>>> ARCHITECTURES["m2"].task
'nuclei'
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass, replace
from typing import Any, Callable

from napari_pathoseg.errors import CheckpointError, PathosegError

__all__ = [
    "Task",
    "Architecture",
    "TASKS",
    "ARCHITECTURES",
    "ModelTaskError",
    "get_task",
    "task_of_kind",
    "register_loader",
    "register_architecture",
    "resolve_callable",
    "get_loader",
    "validate_config",
]

logger = logging.getLogger(__name__)


class ModelTaskError(CheckpointError):
    """A model is asked to do a task it was not trained for, or its task has no loader yet."""


@dataclass(frozen=True)
class Task:
    """One task of the registry.

    Attributes
    ----------
    name : str
        Registry key (``"nuclei"``...), stored in every model card.
    method : str
        The method of ``docs/methods.md`` behind it (``"M2"``...).
    title : str
        What the task does, for messages and listings.
    consumers : str
        Who needs a model of this task (the dock and command), for mismatch messages.
    classes : tuple of str
        Default output classes of a card that names none (empty: the card must name them).
    loader : str or None
        ``"module:function"`` building a model, ``function(path, *, card, device)``; ``None``
        until the method's package provides one.
    """

    name: str
    method: str
    title: str
    consumers: str
    classes: tuple[str, ...] = ()
    loader: str | None = None


@dataclass(frozen=True)
class Architecture:
    """A checkpoint family (the header's ``kind``).

    Attributes
    ----------
    kind : str
        Header ``kind`` written by ``save_checkpoint`` (``"m2"``).
    task : str
        The task its models serve.
    validator : str or None
        ``"module:function"`` with ``function(config: dict, *, where: str)`` raising
        :class:`~napari_pathoseg.errors.CheckpointError` for a config out of its schema.
    """

    kind: str
    task: str
    validator: str | None = None


#: Task name -> :class:`Task`. A method's package fills in its ``loader``.
TASKS: dict[str, Task] = {
    "nuclei": Task(
        "nuclei", "M2", "nucleus segmentation and stain normalisation",
        "the Nuclei dock and `pathoseg nuclei`", ("nucleus",),
        loader="napari_pathoseg.methods.nuclei.model:load_nucleus_model",
    ),
    "lesion": Task(
        "lesion", "M3", "multi-scale lesion-region detection",
        "the Lesions dock and `pathoseg lesion`", ("lesion",),
        loader="napari_pathoseg.methods.lesion.model:load_lesion_model",
    ),
    "tissue": Task(
        "tissue", "M5", "weakly supervised tissue-type segmentation",
        "the tissue segmentation", (),  # the classes depend on the organ: every card names them
        loader="napari_pathoseg.methods.tissue.model:load_tissue_model",
    ),
    "malignancy": Task(
        "malignancy", "M1", "malignancy classification and region segmentation",
        "the malignancy classification", ("benign", "malignant"),
        loader="napari_pathoseg.methods.malignancy.model:load_malignancy_model",
    ),
    "slide": Task(
        "slide", "M4", "slide classification with tile heat maps",
        "the slide classification", ("negative", "positive"),
        loader="napari_pathoseg.methods.mil.model:load_slide_classifier",
    ),
}

#: Checkpoint ``kind`` -> :class:`Architecture`.
ARCHITECTURES: dict[str, Architecture] = {
    "m2": Architecture("m2", "nuclei", "napari_pathoseg.methods.nuclei.model:validate_m2_config"),
    "m3": Architecture("m3", "lesion", "napari_pathoseg.methods.lesion.model:validate_m3_config"),
    "m5": Architecture("m5", "tissue", "napari_pathoseg.methods.tissue.model:validate_m5_config"),
    "m4": Architecture("m4", "slide", "napari_pathoseg.methods.mil.model:validate_m4_config"),
    "m1": Architecture("m1", "malignancy", "napari_pathoseg.methods.malignancy.model:validate_m1_config"),
}


def get_task(name: str) -> Task:
    """The :class:`Task` called ``name``; a :class:`ModelTaskError` lists the valid names."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ModelTaskError(f"Unknown task {name!r}; valid tasks: {sorted(TASKS)}.") from None


def task_of_kind(kind: str | None) -> str | None:
    """The task served by checkpoints of ``kind`` (``None`` for an unknown kind)."""
    arch = ARCHITECTURES.get(kind) if isinstance(kind, str) else None
    return arch.task if arch else None


def register_loader(task: str, loader: str | Callable[..., Any]) -> None:
    """Set the loader of ``task`` at run time.

    Parameters
    ----------
    task : str
        A key of :data:`TASKS`.
    loader : str or callable
        ``"module:function"`` (imported when first needed) or the function itself,
        ``loader(path, *, card, device) -> model``.
    """
    t = get_task(task)
    if not (isinstance(loader, str) and ":" in loader) and not callable(loader):
        raise PathosegError(f"A loader is a 'module:function' string or a function, got {loader!r}.")
    TASKS[task] = replace(t, loader=loader)  # type: ignore[arg-type]


def register_architecture(kind: str, *, task: str, validator: str | Callable[..., Any] | None = None) -> None:
    """Declare a checkpoint ``kind`` serving ``task`` (with its config validator)."""
    get_task(task)
    if not isinstance(kind, str) or not kind:
        raise PathosegError(f"A checkpoint kind is a non-empty string, got {kind!r}.")
    ARCHITECTURES[kind] = Architecture(kind, task, validator)  # type: ignore[arg-type]


def resolve_callable(spec: str | Callable[..., Any], *, what: str) -> Callable[..., Any]:
    """Import ``"module:function"`` (or return a callable as is)."""
    if callable(spec):
        return spec
    module, _, attr = str(spec).partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise PathosegError(f"The {what} {spec!r} cannot be imported ({exc}); reinstall napari-pathoseg.") from exc
    if not callable(fn):
        raise PathosegError(f"The {what} {spec!r} is not a function.")
    return fn


def get_loader(task: str) -> Callable[..., Any]:
    """The loader function of ``task``; a :class:`ModelTaskError` when it has none yet."""
    t = get_task(task)
    if t.loader is None:
        ready = sorted(n for n, x in TASKS.items() if x.loader)
        raise ModelTaskError(
            f"No loader for {task} models yet ({t.method}, {t.title}): this version cannot run them; "
            f"tasks with models: {ready}."
        )
    return resolve_callable(t.loader, what=f"{task} model loader")


#: Configs that passed their validator, keyed by (kind, validator, canonical JSON): a config
#: is checked once per process however often its checkpoint is read. Failures are not kept.
_VALID: dict[tuple[str, str, str], Any] = {}


def validate_config(kind: str | None, config: Any, *, where: str) -> Any:
    """Check a checkpoint config against the schema of its architecture ``kind``.

    Unknown kinds have no schema and pass unchanged (the caller refuses a kind it cannot
    build). Returns what the validator returns (e.g. the built config object) or ``None``.
    """
    arch = ARCHITECTURES.get(kind) if isinstance(kind, str) else None
    if arch is None or arch.validator is None:
        return None
    try:
        key = (arch.kind, repr(arch.validator), json.dumps(config, sort_keys=True, allow_nan=True))
    except (TypeError, ValueError):
        key = None
    if key is not None and key in _VALID:
        return _VALID[key]
    validator = resolve_callable(arch.validator, what=f"{kind} config validator")
    result = validator(config, where=where)
    if key is not None:
        if len(_VALID) > 256:
            _VALID.clear()
        _VALID[key] = result
    return result
