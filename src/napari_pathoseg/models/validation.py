"""Checks that run before a checkpoint becomes a network: config schemas, sizes, weights.

A checkpoint's config comes from a file a user may have been sent, so it is checked before it
is used: every key must be known, every value of the right type and within bounds
(:class:`Record` of :class:`Int`, :class:`Float`, :class:`Choice`...), and the network it
describes must stay a sensible size (:func:`count_parameters` builds it on PyTorch's ``meta``
device, which allocates nothing, and :data:`MAX_PARAMETERS` caps it). Weights must be finite
floating-point numbers (:func:`check_finite`).

Examples
--------
>>> schema = Record({"width": Int(1, 64), "mpp": Float(0.0, 100.0, low_open=True)})
>>> validate({"width": 16, "mpp": 0.5}, schema, where="demo")
>>> validate({"width": 0}, schema, where="demo")
Traceback (most recent call last):
...
napari_pathoseg.models.validation.ConfigSchemaError: demo: config width = 0 is out of range (1..64); the checkpoint was edited or damaged: use the original file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from napari_pathoseg.errors import CheckpointError

__all__ = [
    "ConfigSchemaError",
    "Spec",
    "Int",
    "Float",
    "Bool",
    "Choice",
    "Text",
    "Seq",
    "Nullable",
    "Record",
    "Scalar",
    "validate",
    "count_parameters",
    "check_finite",
    "MAX_PARAMETERS",
    "MAX_FEATURE_BYTES",
]

#: Largest network (parameters, all modules of a checkpoint together) a config may describe:
#: 1e9 float32 parameters are 4 GB; the method-sized M2 student has ~0.4e9.
MAX_PARAMETERS = 1_000_000_000
#: Largest single feature map (bytes, one tile, float32) a config may imply.
MAX_FEATURE_BYTES = 1 << 30

_FIX = "the checkpoint was edited or damaged: use the original file"


class ConfigSchemaError(CheckpointError):
    """A checkpoint config breaks its schema (unknown key, wrong type, out of bounds, too big)."""


def _fail(where: str, key: str, msg: str) -> ConfigSchemaError:
    return ConfigSchemaError(f"{where}: config {key} {msg}; {_FIX}.")


class Spec:
    """Base of the schema nodes: ``check(value, where, key)`` raises :class:`ConfigSchemaError`."""

    def check(self, value: Any, where: str, key: str) -> None:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class Int(Spec):
    """An integer (not a bool) in ``low..high``."""

    low: int
    high: int

    def check(self, value: Any, where: str, key: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(where, key, f"= {value!r} must be an integer")
        if not self.low <= value <= self.high:
            raise _fail(where, key, f"= {value!r} is out of range ({self.low}..{self.high})")


@dataclass(frozen=True)
class Float(Spec):
    """A finite number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""

    low: float
    high: float
    low_open: bool = False

    def check(self, value: Any, where: str, key: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(where, key, f"= {value!r} must be a number")
        if not math.isfinite(value):
            raise _fail(where, key, f"= {value!r} must be finite")
        low_ok = value > self.low if self.low_open else value >= self.low
        if not (low_ok and value <= self.high):
            bracket = "(" if self.low_open else "["
            raise _fail(where, key, f"= {value!r} is out of range {bracket}{self.low:g}, {self.high:g}]")


@dataclass(frozen=True)
class Bool(Spec):
    """``true`` or ``false``."""

    def check(self, value: Any, where: str, key: str) -> None:
        if not isinstance(value, bool):
            raise _fail(where, key, f"= {value!r} must be true or false")


@dataclass(frozen=True)
class Text(Spec):
    """A string of at most ``max_len`` printable characters."""

    max_len: int = 128

    def check(self, value: Any, where: str, key: str) -> None:
        if not isinstance(value, str):
            raise _fail(where, key, f"= {value!r} must be a string")
        if len(value) > self.max_len or not value.isprintable():
            raise _fail(where, key, f"is not a short printable string (at most {self.max_len} characters)")


@dataclass(frozen=True)
class Choice(Spec):
    """One of ``choices`` (a tuple, or a function returning them, evaluated when checked)."""

    choices: tuple[str, ...] | Callable[[], Iterable[str]]

    def check(self, value: Any, where: str, key: str) -> None:
        valid = tuple(self.choices() if callable(self.choices) else self.choices)
        if not isinstance(value, str) or value not in valid:
            raise _fail(where, key, f"= {value!r} is not one of {sorted(valid)}")


@dataclass(frozen=True)
class Seq(Spec):
    """A list of ``min_len..max_len`` items, each checked by ``item``."""

    item: Spec
    min_len: int = 0
    max_len: int = 64

    def check(self, value: Any, where: str, key: str) -> None:
        if not isinstance(value, (list, tuple)):
            raise _fail(where, key, f"= {value!r} must be a list")
        if not self.min_len <= len(value) <= self.max_len:
            raise _fail(where, key, f"has {len(value)} entries; {self.min_len}..{self.max_len} allowed")
        for i, v in enumerate(value):
            self.item.check(v, where, f"{key}[{i}]")


@dataclass(frozen=True)
class Nullable(Spec):
    """``null`` or a value checked by ``spec``."""

    spec: Spec

    def check(self, value: Any, where: str, key: str) -> None:
        if value is not None:
            self.spec.check(value, where, key)


@dataclass(frozen=True)
class Scalar(Spec):
    """Any short JSON scalar or short list of them (numbers finite, ``|x| <= limit``).

    The check given to keys a schema allows but does not describe in detail.
    """

    limit: float = 1e6

    def check(self, value: Any, where: str, key: str) -> None:
        if value is None or isinstance(value, bool):
            return
        if isinstance(value, (int, float)):
            Float(-self.limit, self.limit).check(value, where, key)
        elif isinstance(value, str):
            Text(256).check(value, where, key)
        elif isinstance(value, (list, tuple)):
            Seq(self, 0, 64).check(value, where, key)
        else:
            raise _fail(where, key, f"has an unexpected {type(value).__name__} value")


@dataclass(frozen=True)
class Record(Spec):
    """A JSON object with known keys (missing keys take the model's defaults).

    Parameters
    ----------
    fields : dict
        Key -> :class:`Spec`.
    allowed : callable or None
        Returns every key the model accepts; keys it names without a spec in ``fields`` get
        ``default``. ``None``: exactly the keys of ``fields``. Any other key is refused.
    default : Spec
        Check of allowed keys without their own spec.
    """

    fields: Mapping[str, Spec]
    allowed: Callable[[], Iterable[str]] | None = None
    default: Spec = field(default_factory=Scalar)

    def check(self, value: Any, where: str, key: str) -> None:
        if not isinstance(value, Mapping):
            raise _fail(where, key, f"must be a JSON object, got {type(value).__name__}")
        names = set(self.fields) | (set(self.allowed()) if self.allowed else set())
        unknown = sorted(str(k) for k in value if k not in names)
        if unknown:
            raise _fail(where, key, f"has unknown keys {unknown} (valid: {sorted(names)})")
        for k, v in value.items():
            self.fields.get(k, self.default).check(v, where, f"{key}.{k}" if key else str(k))


def validate(config: Any, schema: Spec, *, where: str) -> None:
    """Check ``config`` against ``schema``; raises :class:`ConfigSchemaError` naming the key."""
    schema.check(config, str(where), "")


def count_parameters(build: Callable[[], Any]) -> int:
    """Parameters of the module(s) ``build()`` returns, built on the ``meta`` device.

    Nothing is allocated, so a config describing an absurd network is measured safely.
    ``build`` returns one ``torch.nn.Module`` or an iterable of them.
    """
    import torch

    with torch.device("meta"):
        built = build()
    modules = [built] if isinstance(built, torch.nn.Module) else list(built)
    return int(sum(p.numel() for m in modules for p in m.parameters()))


def check_finite(tensors: Mapping[str, Any], *, where: str) -> None:
    """Refuse NaN/Inf in floating tensors and complex tensors (``name -> torch.Tensor``)."""
    import torch

    def bad(name: str) -> CheckpointError:
        return CheckpointError(
            f"{where}: tensor {name} holds NaN or infinite values (training diverged or the file is "
            "damaged); use an earlier checkpoint."
        )

    # checked in batches of ~16 M values (one op per batch, not one per tensor: small models have
    # hundreds of small tensors); a failing batch is searched tensor by tensor to name the culprit
    batch: list[tuple[str, Any]] = []
    size = 0

    def flush() -> None:
        nonlocal size
        if batch and not bool(torch.isfinite(torch.cat([t.reshape(-1) for _, t in batch])).all()):
            raise bad(next(n for n, t in batch if not bool(torch.isfinite(t).all())))
        batch.clear()
        size = 0

    for name, t in tensors.items():
        if t.is_complex():
            raise CheckpointError(f"{where}: tensor {name} is complex ({t.dtype}); {_FIX}.")
        if t.is_floating_point() and t.numel():
            batch.append((name, t))
            size += t.numel()
            if size >= 1 << 24:
                flush()
    flush()
