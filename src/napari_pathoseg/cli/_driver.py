"""The one CLI job driver: Ctrl-C, cancelled results, errors, JSON, and checked argument types.

Every ``pathoseg`` command module uses this module, so all commands behave alike:

* the result is one JSON document on stdout (:func:`print_json`);
* bad input (any :class:`~napari_pathoseg.errors.PathosegError`) is one line on stderr and exit 2;
* bad argument values are refused by the parser with one line and exit 2 (the type helpers
  below: :func:`positive_float`, :func:`positive_int`, :func:`existing_file`, :func:`device`...);
* Ctrl-C during a long job sets its cancel token: the job stops at its next check, and a job
  that keeps a partial result (finished tiles, a resumable checkpoint) yields it with
  ``cancelled=True``; :func:`drive` then lets the command save what makes sense and raises
  :class:`JobCancelled`, which :func:`call_command` turns into one line on stderr saying what was
  saved and exit 130. A second Ctrl-C aborts at once (exit 130, nothing more is saved).
* a closed stdout (``pathoseg info SLIDE | head``) ends quietly with 141.

Examples
--------
A command that runs a long job (a generator of events ending in one ``Done`` event)::

    def _cmd_segment(args):
        def save_partial(result):
            write_labels(result, args.out)
            return f"labels of the {result.tiles_done} finished tiles saved to {args.out}"

        result = drive(lambda token: iter_segment(slide, cancel=token), Done, on_cancelled=save_partial)
        write_labels(result, args.out)
        print_json({"labels": str(args.out), "n": result.n})
        return 0

    p.add_argument("--batch", type=positive_int, default=4)
    p.add_argument("--mpp", type=positive_float(high=100.0), default=None)
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from napari_pathoseg.errors import CancelledError, PathosegError
from napari_pathoseg.events import CancelToken, run_to_end

__all__ = [
    "JobCancelled",
    "ArgumentParser",
    "drive",
    "sigint_cancels",
    "log_progress",
    "print_json",
    "call_command",
    "positive_float",
    "float_range",
    "fraction",
    "mpp_value",
    "MPP_RANGE",
    "positive_int",
    "nonnegative_int",
    "int_range",
    "existing_path",
    "existing_file",
    "existing_dir",
    "device",
    "EXIT_OK",
    "EXIT_ERROR",
    "EXIT_CANCELLED",
    "EXIT_BROKEN_PIPE",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

EXIT_OK = 0
#: Bad input or bad argument values.
EXIT_ERROR = 2
#: Stopped by Ctrl-C (128 + SIGINT).
EXIT_CANCELLED = 130
#: The reader of stdout went away (128 + SIGPIPE).
EXIT_BROKEN_PIPE = 141


#: OSError numbers that say the machine cannot write (shown as one line, exit 2).
_ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


class JobCancelled(CancelledError):
    """A job stopped on Ctrl-C; the message says what was saved (shown as the one stderr line)."""


# ----------------------------------------------------------------------------- output


def print_json(obj: Any) -> None:
    """Write ``obj`` as indented JSON (paths and other objects as strings) to stdout."""
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
    sys.stdout.flush()


def log_progress(event: Any) -> None:
    """Log an event that has ``done``/``total`` (shown with ``pathoseg -v``); ignore others."""
    done, total = getattr(event, "done", None), getattr(event, "total", None)
    if isinstance(done, int) and isinstance(total, int):
        stage = getattr(event, "stage", "") or type(event).__name__
        message = getattr(event, "message", "") or ""
        logger.info("%s %d/%d %s", stage, done, total, message)


# ----------------------------------------------------------------------------- jobs


@contextlib.contextmanager
def sigint_cancels(token: CancelToken, *, label: str = "pathoseg") -> Iterator[CancelToken]:
    """While the block runs, the first Ctrl-C sets ``token``; a second one raises KeyboardInterrupt.

    At a terminal the first Ctrl-C also prints one line saying the job is stopping.

    Outside the main thread (where Python cannot install signal handlers) the block runs
    with the normal Ctrl-C behaviour.
    """
    if threading.current_thread() is not threading.main_thread():
        yield token
        return

    def _on_sigint(signum: int, frame: Any) -> None:
        if token.is_set():
            raise KeyboardInterrupt
        token.set()
        # at a terminal, say the key was heard; a script reading stderr gets only the final line
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if sys.stderr.isatty():
                sys.stderr.write(f"{label}: stopping after the current step (press Ctrl-C again to abort now)\n")
                sys.stderr.flush()

    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield token
    finally:
        signal.signal(signal.SIGINT, previous)


def drive(
    make_events: Callable[[CancelToken], Iterable[Any]],
    done_type: type[T],
    *,
    on_event: Callable[[Any], Any] | None = log_progress,
    on_cancelled: Callable[[T], str] | None = None,
    label: str = "pathoseg",
) -> T:
    """Run a job's event generator to its result, with Ctrl-C as its Stop button.

    Parameters
    ----------
    make_events : callable
        ``make_events(token)`` returns the job's events; the job checks ``token.is_set()``.
    done_type : type
        The type of the job's final result event.
    on_event : callable, optional
        Called with every event (default: :func:`log_progress`).
    on_cancelled : callable, optional
        Called with a result that came back with ``cancelled=True``: saves what makes sense and
        returns one line saying what was saved. Without it the line says nothing was saved.
    label : str
        Prefix of the line printed on the first Ctrl-C.

    Returns
    -------
    The ``done_type`` event of a job that ran to its end.

    Raises
    ------
    JobCancelled
        The job was stopped and yielded its partial result (after ``on_cancelled`` ran).
    napari_pathoseg.errors.CancelledError
        The job was stopped and keeps nothing.
    KeyboardInterrupt
        Ctrl-C was pressed twice.
    """
    token = CancelToken()
    with sigint_cancels(token, label=label):
        events = make_events(token)
        try:
            result = run_to_end(events, done_type, progress=on_event)
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
    if getattr(result, "cancelled", False):
        if on_cancelled is None:
            raise JobCancelled("stopped before the end; nothing was saved")
        raise JobCancelled(on_cancelled(result))
    return result


def call_command(func: Callable[[argparse.Namespace], Any], args: argparse.Namespace, *, prog: str = "pathoseg") -> int:
    """Run one parsed command and map its outcome to an exit code, never a traceback for the user.

    0 on success (or the command's own code), 2 with one stderr line for a
    :class:`~napari_pathoseg.errors.PathosegError`, 130 with one line for Ctrl-C or a cancelled
    job, 141 (quietly) when stdout was closed. Other exceptions are bugs and propagate.
    """
    try:
        return int(func(args) or 0)
    except CancelledError as exc:
        _err_line(f"{prog}: stopped: {exc}")
        return EXIT_CANCELLED
    except PathosegError as exc:
        _err_line(f"{prog}: error: {exc}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        _err_line(f"{prog}: interrupted")
        return EXIT_CANCELLED
    except BrokenPipeError:
        # the reader went away (`pathoseg info SLIDE | head`): stop quietly, as Unix tools do
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        # the machine, not the input: a full disk, a read-only folder, a file too large...
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        _err_line(f"{prog}: error: {_describe_os_error(exc)}")
        return EXIT_ERROR


def _describe_os_error(exc: OSError) -> str:
    where = f" writing {exc.filename}" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device{where}; free some space or write to another folder"
    if exc.errno == errno.EFBIG:
        return f"file too large for this file system{where}; write to another folder"
    return f"permission denied{where} (read-only or not yours); choose another folder"


def _err_line(text: str) -> None:
    first = " ".join(str(text).split())  # one line, whatever the message holds
    with contextlib.suppress(OSError, ValueError):
        print(first, file=sys.stderr)


# ----------------------------------------------------------------------------- parser


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose errors are one line on stderr (exit 2), not the usage block."""

    def error(self, message: str) -> Any:  # noqa: D102 - argparse API
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(text: str, kind: type, what: str) -> Any:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    return value


def float_range(
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    finite: bool = True,
) -> Callable[[str], float]:
    """An argparse ``type`` accepting a float within ``[low, high]`` (bounds optional)."""
    parts = []
    if low is not None:
        parts.append(f"{'>=' if low_inclusive else '>'} {low:g}")
    if high is not None:
        parts.append(f"{'<=' if high_inclusive else '<'} {high:g}")
    what = "a number" + (" " + " and ".join(parts) if parts else "")

    def parse(text: str) -> float:
        value = _number(text, float, what)
        if finite and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if low is not None and (value < low or (not low_inclusive and value == low)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        if high is not None and (value > high or (not high_inclusive and value == high)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = "float"
    return parse


def positive_float(*, high: float | None = None, finite: bool = True) -> Callable[[str], float]:
    """An argparse ``type`` accepting a float > 0 (and <= ``high`` when given)."""
    return float_range(0.0, high, low_inclusive=False, finite=finite)


#: A float in [0, 1] (fractions, thresholds).
fraction = float_range(0.0, 1.0)

#: Finest and coarsest µm per pixel a command accepts (light microscopy cannot resolve 0.01 µm).
MPP_RANGE = (0.01, 100.0)
#: A µm-per-pixel value within :data:`MPP_RANGE`.
mpp_value = float_range(*MPP_RANGE)


def int_range(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type`` accepting an integer within ``[low, high]`` (bounds optional)."""
    parts = []
    if low is not None:
        parts.append(f">= {low}")
    if high is not None:
        parts.append(f"<= {high}")
    what = "an integer" + (" " + " and ".join(parts) if parts else "")

    def parse(text: str) -> int:
        value = _number(text, int, what)
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = "int"
    return parse


#: An integer >= 1 (sizes, counts, batch sizes).
positive_int = int_range(1)
#: An integer >= 0 (overlaps, levels, seeds).
nonnegative_int = int_range(0)


def existing_path(text: str) -> Path:
    """An argparse ``type`` accepting a path that exists (file or folder)."""
    p = Path(text).expanduser()
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    return p


def existing_file(text: str) -> Path:
    """An argparse ``type`` accepting an existing file."""
    p = existing_path(text)
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file")
    return p


def existing_dir(text: str) -> Path:
    """An argparse ``type`` accepting an existing folder."""
    p = existing_path(text)
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder")
    return p


def device(text: str) -> str:
    """An argparse ``type`` for ``--device``: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, if present here."""
    name = text.strip().lower()
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda, cuda:N or mps, got {text!r}")
    if kind == "cpu":
        return name
    import torch

    if kind == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise argparse.ArgumentTypeError("no CUDA device on this machine; use --device cpu")
        if index and int(index) >= n:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    elif not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError("no Apple MPS device on this machine; use --device cpu")
    return name
