"""Driving long jobs headless.

Every long job in the core is a generator of small progress events ending in one result
event (``train_m2``, ``iter_finetune``, ``iter_segment_nuclei``, ``generate_pseudolabels``):
widgets run it in a background thread and show each event; the plain ``run_*`` functions
drive it to the end with :func:`run_to_end`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, TypeVar

__all__ = ["run_to_end"]

T = TypeVar("T")


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
