"""The run folder of a training run: its lock, what it already holds, and resumable state.

Files (see :mod:`napari_pathoseg.training.engine`):

* ``last.safetensors`` - the resumable state: the task's modules, every optimiser
  (``opt_<name>`` tensors; their parameter groups in the JSON metadata), the torch (and CUDA)
  random state (``rng``), the task's extra tensors (``state``), and in the metadata the
  position (``epoch``, ``step``), the numpy random state, the best value so far and the history;
* ``best.safetensors`` - the best epoch's modules, its validation metrics and ``epoch``;
* ``history.json`` - one record per finished epoch;
* ``.pathoseg-train.lock`` - present while a process trains into the folder (its pid inside).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import Any

import torch

from napari_pathoseg.errors import PathosegError

__all__ = [
    "TrainingError",
    "RunLockedError",
    "RunExistsError",
    "RunLock",
    "LAST",
    "BEST",
    "HISTORY",
    "LOCK",
    "existing_run",
    "optimizer_tensors",
    "load_optimizer",
    "rng_tensors",
    "restore_rng",
]

logger = logging.getLogger(__name__)

LAST = "last.safetensors"
BEST = "best.safetensors"
HISTORY = "history.json"
LOCK = ".pathoseg-train.lock"


class TrainingError(PathosegError):
    """A training run cannot start or continue (bad options, a busy or occupied run folder)."""


class RunLockedError(TrainingError):
    """Another live process trains into the same run folder."""


class RunExistsError(TrainingError):
    """The run folder already holds a run and neither resume nor force was asked for."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _read_lock(path: Path) -> tuple[int, str]:
    try:
        text = path.read_text().split()
    except OSError:
        return -1, ""
    try:
        return int(text[0]), (text[1] if len(text) > 1 else "")
    except (IndexError, ValueError):
        return -1, ""


class RunLock:
    """One training process per run folder: ``O_CREAT | O_EXCL`` lock file holding ``pid host``.

    A lock whose pid is dead (on this host) is stale and taken over. Use as a context manager or
    call :meth:`acquire` / :meth:`release`.

    Raises
    ------
    RunLockedError
        A live process (this one included) holds the lock.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK
        self.held = False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise TrainingError(f"cannot create the lock {self.path}: {exc.strerror or exc}") from exc
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{os.getpid()} {socket.gethostname()}\n")
        except OSError as exc:  # e.g. a full disk: no half-written lock is left behind
            with contextlib.suppress(OSError):
                self.path.unlink()
            raise TrainingError(f"cannot write the lock {self.path}: {exc.strerror or exc}") from exc
        return True

    def acquire(self) -> "RunLock":
        for _ in range(3):
            if self._create():
                self.held = True
                return self
            pid, host = _read_lock(self.path)
            same_host = host in ("", socket.gethostname())
            if pid > 0 and (_pid_alive(pid) or not same_host):
                who = "this process" if pid == os.getpid() and same_host else f"process {pid}" + (f" on {host}" if not same_host else "")
                raise RunLockedError(
                    f"{self.path.parent} is in use by a training run ({who}); wait for it to end, stop it, "
                    "or choose another output folder."
                )
            # stale (dead pid, or unreadable): move it aside atomically, check we moved that one
            aside = self.path.with_name(f"{LOCK}.stale-{os.getpid()}")
            try:
                os.replace(self.path, aside)
            except FileNotFoundError:
                continue
            moved_pid, _ = _read_lock(aside)
            if moved_pid != pid and _pid_alive(moved_pid):
                with contextlib.suppress(OSError):  # we took a live lock created meanwhile: give it back
                    os.replace(aside, self.path)
                raise RunLockedError(f"{self.path.parent} is in use by a training run (process {moved_pid}).")
            with contextlib.suppress(OSError):
                aside.unlink()
            logger.warning("took over the stale training lock of dead process %d in %s", pid, self.path.parent)
        raise RunLockedError(f"cannot take the training lock {self.path}; remove it if no training runs there.")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        pid, _ = _read_lock(self.path)
        if pid == os.getpid():
            with contextlib.suppress(OSError):
                self.path.unlink()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def existing_run(folder: str | os.PathLike) -> dict[str, Any] | None:
    """Describe the run a folder holds (None when it holds none).

    Returns
    -------
    dict or None
        ``{"files": [...], "epoch": int or None, "epochs": int or None, "finished": bool}``.
    """
    from napari_pathoseg.models.checkpoint import read_header

    folder = Path(folder)
    files = [n for n in (LAST, BEST, HISTORY) if (folder / n).is_file()]
    if not files:
        return None
    info: dict[str, Any] = {"files": files, "epoch": None, "epochs": None, "finished": False}
    if LAST in files:
        try:
            meta = read_header(folder / LAST)["meta"]
        except PathosegError:
            return info
        info["epoch"], info["epochs"] = meta.get("epoch"), meta.get("epochs")
        info["finished"] = bool(meta.get("finished", False))
    return info


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimiser's state as flat tensors ``"<param index>:<name>"`` plus its JSON param groups."""
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{idx}:{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    return tensors, sd["param_groups"]


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    """Inverse of :func:`optimizer_tensors`."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        idx, _, name = key.partition(":")
        state.setdefault(int(idx), {})[name] = v
    groups = [dict(g) for g in groups]
    for g in groups:
        for k in ("betas",):
            if k in g and isinstance(g[k], list):
                g[k] = tuple(g[k])
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as exc:
        raise TrainingError(f"the saved optimiser state does not fit ({exc}); resume with the same task options.") from exc


def rng_tensors() -> dict[str, torch.Tensor]:
    """torch's CPU (and, when present, every CUDA device's) random state."""
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`rng_tensors` (CUDA states only when the devices are there)."""
    if "torch" in tensors:
        torch.set_rng_state(tensors["torch"].to(torch.uint8))
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda")), key=lambda k: int(k[4:]))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([t.to(torch.uint8) for t in cuda])

