"""One slide of a cohort, as it runs on a dask worker.

:func:`run_slide_job` is the function the cohort runner submits, once per slide. On the worker
it opens the slide by path, takes the task's model from the worker's cache (loaded once per
worker process, shared by its threads), runs the task's slide runner with a scratch folder
inside the slide's output folder, hashes the outputs and writes the slide's record
(:mod:`.outputs`) last. It never raises for a bad slide: any error becomes a ``failed`` row with
one line, so one bad slide cannot stop a cohort. Only a dying worker (a crash, the memory limit)
surfaces on the client, which retries the slide.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from distributed.diagnostics.plugin import WorkerPlugin

__all__ = [
    "SlideJob",
    "WorkerWarmup",
    "run_slide_job",
    "cached_model",
    "model_loads",
    "model_problem",
    "peak_rss_mb",
    "one_line_error",
    "worker_name",
    "warm_worker",
]

logger = logging.getLogger(__name__)

_CACHE: dict[tuple[str, str], Any] = {}
_CACHE_LOCK = threading.Lock()
_LOADS = {"n": 0}
_THREADS_SET = {"done": False}


@dataclass(frozen=True)
class SlideJob:
    """Everything a worker needs for one slide (plain data, sent to the worker).

    Attributes
    ----------
    index : int
        Position in the cohort.
    path : str
        The slide file (visible from the worker).
    out_dir : str
        The slide's folder ``DIR/<stem>/``.
    task : str
        Batch task name.
    runner : str
        ``"module:function"`` of the task's slide runner.
    model_task, model : str or None
        Registry task and model name / checkpoint path (None: no model).
    mpp : float or None
    region : (x, y, w, h) or None
    params : dict
        The settings recorded with the result (resume compares them).
    torch_threads : int
        Intra-op torch threads of each worker thread (1).
    """

    index: int
    path: str
    out_dir: str
    task: str
    runner: str
    model_task: str | None
    model: str | None
    mpp: float | None
    region: tuple[int, int, int, int] | None
    params: dict
    torch_threads: int = 1


def one_line_error(exc: BaseException) -> str:
    """A one-line message: the text of a PathosegError, ``Type: text`` for anything else."""
    from napari_pathoseg.errors import PathosegError

    text = " ".join(str(exc).split())
    if isinstance(exc, PathosegError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_LOCAL = {"n": 0, "config": None}


@contextlib.contextmanager
def _local_dask() -> Iterator[None]:
    """The slide's dask arrays are computed in the calling thread, not sent back to the cluster.

    ``dask.config.set`` is process-wide, not per thread: with several worker threads the first
    slide to start sets the synchronous scheduler and the last one to end restores the config,
    so no thread ever computes on the cluster from inside a task.
    """
    import dask

    with _CACHE_LOCK:
        if _LOCAL["n"] == 0:
            _LOCAL["config"] = dask.config.set(scheduler="synchronous")
        _LOCAL["n"] += 1
    try:
        yield
    finally:
        with _CACHE_LOCK:
            _LOCAL["n"] -= 1
            if _LOCAL["n"] == 0 and _LOCAL["config"] is not None:
                _LOCAL["config"].__exit__(None, None, None)
                _LOCAL["config"] = None


def worker_name() -> str:
    """The dask worker's address, or ``pid N`` outside a worker."""
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"pid {os.getpid()}"


def _set_threads(n: int) -> None:
    """One torch intra-op thread per worker thread (once per process); ``n <= 0`` leaves torch as it is."""
    if _THREADS_SET["done"] or n <= 0:
        return
    _THREADS_SET["done"] = True
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    torch.set_num_threads(max(1, int(n)))


def peak_rss_mb() -> float | None:
    """Peak resident memory of this (worker) process so far, MB (None where unknown)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)


def model_loads() -> int:
    """How many models this process loaded (the cache makes it one per task and model)."""
    return _LOADS["n"]


def cached_model(model_task: str, model: str) -> tuple[Any, bool]:
    """The model ``model`` of ``model_task``, loaded once per process; ``(model, was_cached)``."""
    key = (model_task, model)
    with _CACHE_LOCK:  # two worker threads never load the same model twice
        if key in _CACHE:
            return _CACHE[key], True
        from napari_pathoseg.models.registry import load_model

        loaded = load_model(model, task=model_task, device="cpu")
        _CACHE[key] = loaded
        _LOADS["n"] += 1
        return loaded, False


def model_problem(task: str, model_task: str, model: str | None) -> str:
    """Why ``model`` cannot run ``task`` here ("" when it can): neither a checkpoint file nor registered.

    The cohort runner asks this before any slide runs, on a worker when it started the workers
    (the registry imports torch, which the client process then never needs).
    """
    from napari_pathoseg.errors import PathosegError
    from napari_pathoseg.models.registry import list_models

    try:
        names = [str(m["name"]) for m in list_models(task=model_task)]
    except PathosegError:
        names = []
    if model is not None and (model in names or Path(model).expanduser().is_file()):
        return ""
    listed = ", ".join(names) if names else "none registered yet"
    what = f"no {model_task} model named {model!r}" if model else f"the {task} task has no default model"
    return f"{what}; pass --model NAME or a .safetensors checkpoint ({model_task} models: {listed})"


def warm_worker(*, runner: str, model_task: str | None, model: str | None, torch_threads: int) -> None:
    """Import what a slide needs and load the model into this process's cache (best effort).

    Run in a background thread of a worker as soon as it starts, so the imports (torch alone
    takes 1-2 s) and the model load overlap the client's own start-up; a slide that starts
    meanwhile waits for the same imports (Python's import lock) and the same cache entry
    (:func:`cached_model`), it never loads anything twice. Errors are only logged: the slide
    that needs the module or the model reports them.
    """
    from napari_pathoseg.cohort.tasks import resolve_runner

    t0 = time.perf_counter()
    try:
        _set_threads(torch_threads)
        import napari_pathoseg.wsi.slide  # noqa: F401 - the import is the point
        resolve_runner(runner)
        if model is not None and model_task is not None:
            cached_model(model_task, model)
    except Exception as exc:  # noqa: BLE001 - best effort; the slide reports the error
        logger.info("worker warm-up: %s", one_line_error(exc))
    logger.debug("worker warm-up took %.2f s", time.perf_counter() - t0)


def _exit_now() -> None:
    """The last step of a worker process we started: leave without finalising the interpreter.

    Registered with :mod:`atexit` (so it runs first, after the worker has closed and every
    result was delivered). Finalising a process that imported torch takes 1-4 s, which the
    cohort's caller would wait for when the local cluster closes.
    """
    import sys

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(0)


class WorkerWarmup(WorkerPlugin):
    """A dask worker plugin: warm each worker up in the background (:func:`warm_worker`).

    With ``fast_exit`` (only for the worker processes of a local cluster the runner started
    and closes itself) the worker process also ends with :func:`os._exit` once it has closed,
    instead of finalising the interpreter. Never in the client's own process.

    Parameters
    ----------
    runner, model_task, model, torch_threads
        As in :class:`SlideJob`.
    fast_exit : bool
    client_pid : int
        The process of the client (no fast exit there, e.g. for in-process workers).
    """

    name = "pathoseg-warmup"
    idempotent = False

    def __init__(self, *, runner: str, model_task: str | None, model: str | None, torch_threads: int,
                 fast_exit: bool, client_pid: int) -> None:
        self.runner = runner
        self.model_task = model_task
        self.model = model
        self.torch_threads = int(torch_threads)
        self.fast_exit = bool(fast_exit)
        self.client_pid = int(client_pid)

    def setup(self, worker: Any = None) -> None:
        """Start the warm-up thread (and arm the fast exit); returns at once."""
        if self.fast_exit and os.getpid() != self.client_pid:
            import atexit

            atexit.register(_exit_now)
        threading.Thread(
            target=warm_worker, name="pathoseg-warmup", daemon=True,
            kwargs={"runner": self.runner, "model_task": self.model_task, "model": self.model,
                    "torch_threads": self.torch_threads},
        ).start()



def run_slide_job(job: SlideJob) -> dict[str, Any]:
    """Run one slide; return its row for ``summary.csv`` (``status`` ``ok`` or ``failed``)."""
    from napari_pathoseg.cohort import outputs
    from napari_pathoseg.cohort.tasks import resolve_runner
    from napari_pathoseg.wsi.slide import open_slide

    t0 = time.perf_counter()
    folder = Path(job.out_dir)
    row: dict[str, Any] = {"index": job.index, "status": "failed", "error": "", "worker": worker_name()}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        outputs.clear_record(folder)
        outputs.clean_work_dirs(folder)
        _set_threads(job.torch_threads)
        runner = resolve_runner(job.runner)
        model, cached = (None, True)
        if job.model is not None and job.model_task is not None:
            model, cached = cached_model(job.model_task, job.model)
        row["model_cached"] = cached
        with _local_dask(), open_slide(job.path) as slide, \
                tempfile.TemporaryDirectory(prefix=outputs.WORK_PREFIX, dir=folder) as wd:
            out = runner(slide, model=model, out_dir=folder, region=job.region, mpp=job.mpp, work_dir=wd, cancel=None)
        files = {k: Path(v) for k, v in out.files.items()}
        seconds = time.perf_counter() - t0
        record = {
            "status": "ok",
            "task": job.task,
            "slide": str(job.path),
            "params": job.params,
            "source": outputs.source_record(job.path),
            "figures": out.figures,
            "files": {k: os.path.relpath(p, folder) for k, p in files.items()},
            "outputs": [outputs.file_record(p, folder=folder) for p in files.values()],
            "seconds": round(seconds, 3),
            "worker": row["worker"],
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        outputs.write_record(folder, record)
        row.update(status="ok", figures=out.figures, files=record["files"])
    except Exception as exc:  # noqa: BLE001 - one bad slide must not stop the cohort
        row["error"] = one_line_error(exc)
        logger.info("slide %s failed: %s", job.path, row["error"], exc_info=True)
    row["seconds"] = round(time.perf_counter() - t0, 3)
    row["peak_rss_mb"] = peak_rss_mb()
    row["model_loads"] = model_loads()
    row["pid"] = os.getpid()
    return row
