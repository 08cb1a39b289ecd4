"""Driving long jobs headless.

Every long job in the core is a generator of small progress events ending in one result
event (``train_m2``, ``iter_finetune``, ``iter_segment_nuclei``, ``generate_pseudolabels``):
widgets run it in a background thread and show each event; the plain ``run_*`` functions
drive it to the end with :func:`run_to_end`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, TypeVar

__all__ = ["run_to_end", "Progress", "CancelToken", "Cancellable"]

T = TypeVar("T")


class Cancellable(Protocol):
    """Anything with ``is_set()``: a :class:`CancelToken`, a :class:`threading.Event`."""

    def is_set(self) -> bool: ...


class CancelToken:
    """A thread-safe cancel flag: the GUI (or Ctrl-C) sets it, the job checks it between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        """Ask the job to stop at its next check."""
        self._event.set()

    def is_set(self) -> bool:
        """True once :meth:`set` was called."""
        return self._event.is_set()


@dataclass(frozen=True)
class Progress:
    """Progress of a job: ``done`` of ``total`` units (tiles, steps...), in ``stage``."""

    done: int
    total: int
    message: str = ""
    stage: str = ""


def run_to_end(events: Iterable[Any], done_type: type[T], *, progress: Callable[[Any], Any] | None = None) -> T:
    """Consume ``events`` and return the last one of type ``done_type``.

    ``progress(event)``, when given, is called with every event, the final one included.

    Raises
    ------
    RuntimeError
        The job ended without producing a ``done_type`` event (a bug in the job).
    """
    result: T | None = None
    for ev in events:
        if progress is not None:
            progress(ev)
        if isinstance(ev, done_type):
            result = ev
    if result is None:
        raise RuntimeError(f"the job ended without a {done_type.__name__}")
    return result
