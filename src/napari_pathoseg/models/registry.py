"""The model registry: shipped and user-registered models of every task, with their cards.

* Shipped models live in ``napari_pathoseg/models/weights/`` as ``<name>.safetensors`` plus a
  ``<name>.json`` card (:func:`~napari_pathoseg.models.cards.card_from_json`).
* User models are recorded in ``models.json`` under ``$PATHOSEG_HOME`` (or
  ``~/.local/share/napari-pathoseg``) by :func:`register_model`; a damaged file never stops a
  run (:mod:`napari_pathoseg.models._store`), and concurrent registrations are merged under a
  file lock.
* Every model has a task (:data:`napari_pathoseg.models.tasks.TASKS`); :func:`load_model`
  dispatches on it to the task's loader (a ``"module:function"`` imported only then: this
  module imports no method package) and refuses a model of another task than the caller's.

Examples
--------
>>> [c.name for c in list_models(task="nuclei") if c.shipped]  # doctest: +SKIP
['nuclei-lite']
>>> model = load_model("nuclei-lite", task="nuclei")  # doctest: +SKIP
>>> model.predict(tiles)["prob"].shape  # doctest: +SKIP
(4, 128, 128)
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from pathlib import Path
from typing import Any

from napari_pathoseg.errors import CheckpointError, PathosegError
from napari_pathoseg.models import _store
from napari_pathoseg.models.cards import CardError, ModelCard, card_from_checkpoint, card_from_json
from napari_pathoseg.models.checkpoint import read_header
from napari_pathoseg.models.tasks import ModelTaskError, get_loader, get_task

__all__ = [
    "ModelCard",
    "ModelTaskError",
    "load_model",
    "list_models",
    "get_card",
    "register_model",
    "registry_path",
    "WEIGHTS_DIR",
    "DEFAULT_MODEL",
]

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_MODEL = "nuclei-lite"
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")


def __getattr__(name: str) -> Any:
    # NucleusModel moved to methods/nuclei/model.py; imported lazily so that importing the
    # registry never imports a method package.
    if name == "NucleusModel":
        from napari_pathoseg.methods.nuclei.model import NucleusModel

        return NucleusModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def registry_path() -> Path:
    """The user registry file: ``$PATHOSEG_HOME/models.json`` or ``~/.local/share/napari-pathoseg/models.json``."""
    home = os.environ.get("PATHOSEG_HOME")
    base = Path(home) if home else Path.home() / ".local" / "share" / "napari-pathoseg"
    return base / "models.json"


# ---------------------------------------------------------------------------- listing


def _shipped() -> list[ModelCard]:
    out = []
    for f in sorted(WEIGHTS_DIR.glob("*.safetensors")):
        jf = f.with_suffix(".json")
        try:
            if jf.is_file():
                card = card_from_json(jf, checkpoint=f, shipped=True)
            else:
                card = card_from_checkpoint(f, read_header(f, validate=False), shipped=True)
        except CardError:
            try:  # a card lacking derivable fields: fill them from the checkpoint header
                card = card_from_json(jf, checkpoint=f, header=read_header(f, validate=False), shipped=True)
            except PathosegError as exc:
                _store._warn_once(f"shipped model {f.name} skipped: {exc}")
                continue
        except PathosegError as exc:
            _store._warn_once(f"shipped model {f.name} skipped: {exc}")
            continue
        out.append(card)
    return out


def _user_card(entry: dict[str, Any], shipped_names: set[str]) -> ModelCard | None:
    name, reg = entry["name"], registry_path()
    if name in shipped_names:
        _store._warn_once(f"model registry {reg}: skipping {name!r}, the name of a shipped model")
        return None
    d = {k: v for k, v in entry.items() if k != "shipped"}
    try:
        return ModelCard.from_dict(d, source=f"{name!r} in {reg}", shipped=False)
    except CardError:
        pass
    # an older entry (no task, µm/px or input size): derive them from the checkpoint itself
    try:
        header = read_header(entry["path"], validate=False)
        keep = {k: v for k, v in d.items() if k not in ("name", "path") and v is not None}
        return card_from_checkpoint(entry["path"], header, name=name, **keep)
    except PathosegError as exc:
        _store._warn_once(f"model registry {reg}: skipping {name!r} ({exc})")
        return None


def list_models(task: str | None = None) -> list[ModelCard]:
    """Shipped and user-registered models, shipped first.

    Parameters
    ----------
    task : str or None
        Only models of this task (a key of :data:`~napari_pathoseg.models.tasks.TASKS`).

    Returns
    -------
    list of ModelCard
        Each card is also a mapping (``card["name"]``, ``card["path"]``, ``card["shipped"]``,
        ``card["scores"]``...). A damaged registry file gives the shipped models only (with a
        logged warning); malformed entries are skipped.
    """
    if task is not None:
        get_task(task)
    shipped = _shipped()
    names = {c.name for c in shipped}
    user = [c for e in _store.read_entries(registry_path()) if (c := _user_card(e, names)) is not None]
    return [c for c in shipped + user if task is None or c.task == task]


def get_card(name_or_path: str | os.PathLike) -> ModelCard:
    """The card of a registered name or of a checkpoint file (read from its metadata).

    Raises
    ------
    CheckpointError
        An unknown name (the message lists the valid ones), a missing file, a pickle, or a
        checkpoint of an architecture no task knows.
    """
    s = os.fspath(name_or_path)
    p = Path(s).expanduser()
    if p.suffix in _CHECKPOINT_SUFFIXES or p.is_file():
        return card_from_checkpoint(p, read_header(p))
    models = list_models()
    for card in models:
        if card.name == s:
            return card
    raise CheckpointError(f"Unknown model {s!r}; valid names: {[c.name for c in models]} (or give a .safetensors path).")


# ---------------------------------------------------------------------------- loading


def _check_task(card: ModelCard, task: str) -> None:
    if card.task != task:
        want = get_task(task)
        others = [c.name for c in list_models(task=task)]
        raise ModelTaskError(
            f"{card.name!r} is a {card.task} model; {want.consumers} needs a {task} model "
            f"({', '.join(others) if others else 'none registered'})."
        )


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    task: str | None = None,
    device: Any = None,
) -> Any:
    """Load a model by registered name or checkpoint path, with its task's loader.

    Parameters
    ----------
    name_or_path : str or path
        ``"nuclei-lite"`` (shipped), a name from :func:`list_models`, or a ``.safetensors``
        checkpoint written by napari-pathoseg.
    task : str or None
        The task the caller needs (``"nuclei"`` for the Nuclei dock); a model of another task
        is refused. ``None``: whatever the model's card says.
    device : str, torch.device or None
        Default: CUDA / MPS when available, else CPU.

    Returns
    -------
    object
        The task's model; for ``"nuclei"`` a
        :class:`~napari_pathoseg.methods.nuclei.model.NucleusModel` (``.predict(batch)``,
        ``.to_instances``, ``.mpp``, ``.tile_size``, ``.name``, ``.card``).

    Raises
    ------
    CheckpointError
        Unknown name, missing file, a pickle, a config out of its schema, NaN/Inf weights,
        weights that do not fit the stored config; :class:`ModelTaskError` (a subclass) for a
        model of another task or a task without a loader yet.
    """
    if task is not None:
        get_task(task)
    card = get_card(name_or_path)
    if task is not None:
        _check_task(card, task)
    loader = get_loader(card.task)
    return loader(card.path, card=card, device=device)


# ---------------------------------------------------------------------------- registering


def register_model(
    path: str | os.PathLike,
    *,
    name: str,
    task: str | None = None,
    base: str | None = None,
    data: str | None = None,
    scores: dict[str, float] | None = None,
    description: str | None = None,
    classes: list[str] | tuple[str, ...] | None = None,
    command: str | None = None,
    created: str | None = None,
) -> ModelCard:
    """Record a checkpoint under ``name`` in the user registry.

    The checkpoint is checked first (no pickle, a known architecture, a config within its
    schema); its card is built from its metadata plus the options given here. The update
    re-reads ``models.json`` under a file lock and writes it atomically, so concurrent
    registrations all survive; re-registering a name replaces its entry.

    Parameters
    ----------
    path : path
        A ``.safetensors`` checkpoint written by napari-pathoseg.
    name : str
        Registry name; must not be a shipped model's.
    task : str or None
        The task the model is meant for; refused when the checkpoint's architecture serves
        another. ``None``: derived from the checkpoint.
    base, data, scores, description, classes, command, created
        Card fields (fine-tuned from, training data, headline scores, ...); ``created``
        defaults to the checkpoint's, else now.

    Returns
    -------
    ModelCard

    Raises
    ------
    CheckpointError
        An unreadable or untrusted checkpoint, an unknown architecture, a task mismatch
        (:class:`ModelTaskError`) or an invalid card field (:class:`CardError`).
    PathosegError
        ``name`` is a shipped model's, or the registry stays locked by another process.
    """
    path = Path(path).expanduser().resolve()
    if task is not None:
        get_task(task)
    header = read_header(path)
    if any(c.name == name for c in _shipped()):
        raise PathosegError(f"{name!r} is a shipped model name; choose another name.")
    card = card_from_checkpoint(
        path, header, name=name, base=base, data=data, scores=scores, description=description,
        classes=list(classes) if classes is not None else None, command=command, created=created,
    )
    if task is not None and card.task != task:
        raise ModelTaskError(f"{path} holds a {card.task} model ({header['kind']!r}), not a {task} model; "
                             f"register it with task={card.task!r}.")
    if card.created is None:
        now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
        card = ModelCard.from_dict(card.to_dict(), created=now)
    entry = card.to_dict()
    entry.pop("shipped")

    def change(models: list[Any]) -> list[Any]:
        return [m for m in models if not (isinstance(m, dict) and m.get("name") == name)] + [entry]

    _store.update_entries(registry_path(), change)
    logger.info("registered %s model %s -> %s", card.task, name, path)
    return card
