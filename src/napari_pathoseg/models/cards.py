"""Model cards: what a model does, at what scale, trained on what, and how well it scores.

A :class:`ModelCard` is read from the JSON card shipped beside a ``.safetensors`` file
(:func:`card_from_json`), from a checkpoint's own metadata (:func:`card_from_checkpoint`), or
from an entry of the user registry (:meth:`ModelCard.from_dict`), and is validated on the way:
a card missing a required field either gets it derived (the task from the checkpoint's
architecture, the classes from the task, µm/px and input size from the checkpoint's config)
or is refused with a :class:`CardError` naming the field.

A card is also a read-only mapping of its JSON form, so ``card["name"]``, ``card.get("scores")``
and ``dict(card)`` work as the registry's plain dicts always did.

Examples
--------
>>> card = ModelCard.from_dict({"name": "demo", "task": "nuclei", "mpp": 0.5, "tile_size": 128,
...                             "path": "demo.safetensors"})
>>> card.classes, card["mpp"]
(('nucleus',), 0.5)
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from napari_pathoseg.errors import CheckpointError
from napari_pathoseg.models.tasks import TASKS, get_task, task_of_kind

__all__ = ["ModelCard", "CardError", "card_from_json", "card_from_checkpoint", "REQUIRED"]

#: Fields every card has after derivation.
REQUIRED = ("name", "task", "classes", "mpp", "tile_size", "path")
#: Other names older cards use for a field.
_ALIASES = {"val": "val_scores", "test": "test_scores", "architecture": "kind", "base_model": "base"}


class CardError(CheckpointError):
    """A model card is malformed or misses a field that cannot be derived."""


@dataclass(frozen=True, eq=False)
class ModelCard(Mapping):
    """The description of one model.

    Attributes
    ----------
    name : str
        Registry name (``"nuclei-lite"``).
    task : str
        A key of :data:`napari_pathoseg.models.tasks.TASKS`.
    path : pathlib.Path
        The ``.safetensors`` checkpoint.
    classes : tuple of str
        Output classes (``("nucleus",)``).
    mpp : float
        Micrometres per pixel the model works at.
    tile_size : int
        Input size (pixels) the model was trained on and prefers.
    kind : str or None
        Checkpoint architecture family (``"m2"``).
    preset : str or None
        Architecture preset (``"attcycle-lite"``).
    description, data, command : str
        What it is, the training data, the training command.
    scores : dict
        Headline scores, metric -> finite float (test scores when measured, else validation).
    val_scores, test_scores : dict
        Validation and test results as stored (may be nested).
    created : str or None
        ISO 8601 date of the model.
    base : str or None
        The model it was fine-tuned from.
    shipped : bool
        Bundled with napari-pathoseg (``True``) or registered by the user.
    extra : dict
        Any other field of the card (``instance_method``, per-image scores...).
    """

    name: str
    task: str
    path: Path
    classes: tuple[str, ...]
    mpp: float
    tile_size: int
    kind: str | None = None
    preset: str | None = None
    description: str = ""
    data: str | None = None
    command: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    val_scores: dict[str, Any] = field(default_factory=dict)
    test_scores: dict[str, Any] = field(default_factory=dict)
    created: str | None = None
    base: str | None = None
    shipped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ mapping view
    def to_dict(self, *, extra: bool = True) -> dict[str, Any]:
        """JSON-ready dict (``path`` as a string, ``classes`` as a list); ``extra`` merges the other fields."""
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d["path"] = str(self.path)
        d["classes"] = list(self.classes)
        if extra:
            d.update({k: v for k, v in self.extra.items() if k not in d})
        return d

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ModelCard):
            return self.to_dict() == other.to_dict()
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ModelCard(name={self.name!r}, task={self.task!r}, mpp={self.mpp}, tile_size={self.tile_size}, path={str(self.path)!r})"

    # ------------------------------------------------------------------ validation
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str | None = None, **overrides: Any) -> "ModelCard":
        """Validate a card dict (plus ``overrides``) and build the card.

        Missing ``classes`` come from the task; other required fields must be present.

        Raises
        ------
        CardError
            Naming the card (``source``) and the field.
        """
        if not isinstance(d, Mapping):
            raise CardError(f"Model card {source or ''} must be a JSON object, got {type(d).__name__}.")
        raw = {_ALIASES.get(k, k): v for k, v in d.items() if k not in _ALIASES or _ALIASES[k] not in d}
        raw.update(overrides)
        where = source or repr(raw.get("name", "?"))
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = dict(raw.pop("extra", None) or {})
        extra.update({k: raw.pop(k) for k in list(raw) if k not in known})
        missing = [k for k in REQUIRED if raw.get(k) is None and k != "classes"]
        if missing:
            raise CardError(f"Model card {where} has no {', '.join(missing)}; add {_hint(missing[0])} to the card.")
        task = raw["task"]
        if not isinstance(task, str) or task not in TASKS:
            raise CardError(f"Model card {where}: task {task!r} is not one of {sorted(TASKS)}.")
        classes = raw.get("classes")
        if classes is None:
            classes = get_task(task).classes
            if not classes:
                raise CardError(f"Model card {where}: {task} models must name their classes; add \"classes\": [...].")
        return cls(
            name=_name(raw["name"], where),
            task=task,
            path=Path(_text(raw["path"], "path", where)),
            classes=_classes(classes, where),
            mpp=_positive(raw["mpp"], "mpp", where, integer=False),
            tile_size=int(_positive(raw["tile_size"], "tile_size", where, integer=True)),
            kind=_opt_text(raw.get("kind"), "kind", where),
            preset=_opt_text(raw.get("preset"), "preset", where),
            description=_opt_text(raw.get("description"), "description", where) or "",
            data=_opt_text(raw.get("data"), "data", where),
            command=_opt_text(raw.get("command"), "command", where),
            scores=_scores(raw.get("scores"), where),
            val_scores=_object(raw.get("val_scores"), "val", where),
            test_scores=_object(raw.get("test_scores"), "test", where),
            created=_date(raw.get("created"), where),
            base=_opt_text(raw.get("base"), "base", where),
            shipped=bool(raw.get("shipped", False)),
            extra=extra,
        )


def _hint(key: str) -> str:
    return {
        "task": f'"task" (one of {sorted(TASKS)})',
        "mpp": '"mpp" (µm per pixel the model works at, e.g. 0.5)',
        "tile_size": '"tile_size" (input size in pixels)',
        "path": '"path" (the .safetensors checkpoint)',
        "name": '"name"',
    }[key]


def _text(v: Any, key: str, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise CardError(f"Model card {where}: {key} must be a non-empty string, got {v!r}.")
    return v


def _opt_text(v: Any, key: str, where: str) -> str | None:
    return None if v is None else _text(v, key, where) if v != "" else ""


def _name(v: Any, where: str) -> str:
    s = _text(v, "name", where)
    if len(s) > 100 or not s.isprintable() or s.strip() != s or any(c in s for c in "/\\"):
        raise CardError(f"Model card {where}: name {s!r} must be a short name without slashes or outer spaces.")
    return s


def _classes(v: Any, where: str) -> tuple[str, ...]:
    if isinstance(v, str) or not isinstance(v, (list, tuple)) or not v:
        raise CardError(f"Model card {where}: classes must be a non-empty list of names, got {v!r}.")
    out = tuple(v)
    if not all(isinstance(c, str) and c for c in out) or len(set(out)) != len(out):
        raise CardError(f"Model card {where}: classes must be distinct non-empty names, got {list(out)!r}.")
    return out


def _positive(v: Any, key: str, where: str, *, integer: bool) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    if ok and integer:
        ok = float(v).is_integer()
    if not ok:
        kind = "a positive integer" if integer else "a finite number > 0"
        raise CardError(f"Model card {where}: {key} must be {kind}, got {v!r}.")
    return float(v)


def _scores(v: Any, where: str) -> dict[str, float]:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise CardError(f"Model card {where}: scores must be an object metric -> number, got {type(v).__name__}.")
    out = {}
    for k, x in v.items():
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise CardError(f"Model card {where}: score {k!r} must be a finite number, got {x!r}.")
        out[str(k)] = float(x)
    return out


def _object(v: Any, key: str, where: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise CardError(f"Model card {where}: {key} must be a JSON object, got {type(v).__name__}.")
    return dict(v)


def _date(v: Any, where: str) -> str | None:
    if v is None:
        return None
    try:
        _dt.datetime.fromisoformat(str(v))
    except ValueError:
        raise CardError(f"Model card {where}: created must be an ISO 8601 date, got {v!r}.") from None
    return str(v)


def _numeric_only(d: Any) -> dict[str, float]:
    """The finite numeric entries of a metrics dict (a derived card keeps only those)."""
    if not isinstance(d, Mapping):
        return {}
    return {
        str(k): float(x) for k, x in d.items()
        if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    }


# ---------------------------------------------------------------------------- sources


def card_from_json(json_path: str | os.PathLike, *, checkpoint: str | os.PathLike, header: Mapping[str, Any] | None = None,
                   shipped: bool = False) -> ModelCard:
    """The card in ``json_path`` describing ``checkpoint``.

    Fields the JSON lacks are derived from the checkpoint ``header``
    (:func:`~napari_pathoseg.models.checkpoint.read_header`), when given: the task from its
    architecture, µm/px and input size from its config. The name defaults to the file stem.

    Raises
    ------
    CardError
        Unreadable JSON, or a field that is invalid or cannot be derived.
    """
    json_path = Path(json_path)
    try:
        d = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CardError(f"Model card {json_path} is unreadable ({exc}); reinstall or fix it.") from exc
    if not isinstance(d, dict):
        raise CardError(f"Model card {json_path} must be a JSON object.")
    d = dict(d, path=str(checkpoint), shipped=shipped)
    d.setdefault("name", Path(checkpoint).stem)
    if header is not None:
        _fill_from_header(d, header)
    return ModelCard.from_dict(d, source=str(json_path))


def _fill_from_header(d: dict[str, Any], header: Mapping[str, Any]) -> None:
    config = header.get("config") or {}
    kind = header.get("kind")
    d.setdefault("kind", kind)
    if d.get("task") is None:
        d["task"] = task_of_kind(kind)
    for key in ("mpp", "tile_size", "preset"):
        if d.get(key) is None and config.get(key) is not None:
            d[key] = config[key]


def card_from_checkpoint(path: str | os.PathLike, header: Mapping[str, Any], *, name: str | None = None,
                         shipped: bool = False, **overrides: Any) -> ModelCard:
    """The card of a checkpoint from its own metadata (``header`` from ``read_header``).

    Uses ``meta["card"]`` when the checkpoint carries one (released models do), then the
    training metadata (``command``, ``val_metrics``, ``created``, a fine-tune's ``base``), then
    the config (µm/px, input size, preset) and the architecture (task). ``overrides`` (not
    ``None``) win; ``name`` defaults to the file's stem.

    Raises
    ------
    CardError
        When the task cannot be derived (an unknown architecture) or a field is invalid.
    """
    path = Path(path)
    meta = header.get("meta") or {}
    stored = meta.get("card") if isinstance(meta.get("card"), Mapping) else {}
    finetune = meta.get("finetune") if isinstance(meta.get("finetune"), Mapping) else {}
    d: dict[str, Any] = dict(stored)
    for key in ("task", "classes", "description", "data", "command", "created"):
        if d.get(key) is None and meta.get(key) is not None:
            d[key] = meta[key]
    if d.get("data") is None and finetune.get("data") is not None:
        d["data"] = finetune["data"]
    if d.get("base") is None and (meta.get("base") or finetune.get("base")) is not None:
        d["base"] = meta.get("base") or finetune.get("base")
    if d.get("created") is None and finetune.get("started") is not None:
        d["created"] = finetune["started"]
    if "val" not in d and "val_scores" not in d and isinstance(meta.get("val_metrics"), Mapping):
        d["val_scores"] = dict(meta["val_metrics"])
    d["scores"] = _numeric_only(d.get("scores"))
    _fill_from_header(d, header)
    if d.get("task") is None:
        raise CardError(
            f"{path} holds a {header.get('kind')!r} model, which no task knows; "
            f"known architectures serve {sorted(TASKS)}."
        )
    d.update({k: v for k, v in overrides.items() if v is not None})
    d.update(name=name or path.stem, path=str(path), shipped=shipped)
    return ModelCard.from_dict(d, source=str(path))
