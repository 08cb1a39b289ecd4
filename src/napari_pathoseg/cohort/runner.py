"""Run an analysis over a cohort of slides on dask.distributed: resumable, failures isolated.

:func:`iter_cohort` is the job behind ``pathoseg batch`` and the Cohort dock. It yields a
:class:`CohortStarted`, one :class:`SlideFinished` per slide as results arrive (in any order),
and finally a :class:`CohortResult`. :func:`run_cohort` drives it headless.

How a run goes
--------------
1. The output folder is locked (one run per folder, ``.pathoseg-batch.lock``).
2. Every slide whose folder holds a verified complete result for the same settings and input
   (:func:`~napari_pathoseg.cohort.outputs.verify_slide`) is ``skipped``, unless ``force``; the
   others are submitted, one dask task per slide (:func:`~napari_pathoseg.cohort.job.run_slide_job`).
3. The cluster: an existing scheduler (``scheduler="tcp://host:8786"``), else a ``LocalCluster``
   of ``workers`` processes (default: one per core the process may use) with
   ``threads_per_worker`` threads each (default 1) and one torch thread per worker thread. A run
   with nothing to compute starts no cluster.
4. ``summary.csv`` is rewritten atomically after every slide.
5. A slide that raises inside the worker is ``failed`` at once with its one-line error (a corrupt
   file stays corrupt); a slide whose worker dies (a crash, the memory limit) is submitted again,
   up to ``retries`` times, then ``failed``.
6. A Stop (``cancel``) cancels the slides not yet finished; they stay ``pending`` and a re-run
   does them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from napari_pathoseg.cohort import outputs
from napari_pathoseg.cohort.job import SlideJob, WorkerWarmup, model_problem, run_slide_job
from napari_pathoseg.cohort.manifest import CohortSlide
from napari_pathoseg.cohort.summary import SUMMARY, new_row, summary_columns, write_summary
from napari_pathoseg.cohort.tasks import get_batch_task
from napari_pathoseg.errors import PathosegError
from napari_pathoseg.events import Cancellable, run_to_end

__all__ = [
    "CohortError",
    "CohortStarted",
    "SlideFinished",
    "CohortResult",
    "iter_cohort",
    "run_cohort",
    "default_workers",
    "available_cores",
    "LOCK",
]

logger = logging.getLogger(__name__)

LOCK = ".pathoseg-batch.lock"

#: ``summary.csv`` is rewritten at most this often while slides finish (and at the end).
SUMMARY_EVERY_S = 2.0


class CohortError(PathosegError):
    """A cohort cannot run (folder in use, scheduler unreachable, bad settings)."""


@dataclass(frozen=True)
class CohortStarted:
    """The run starts: ``to_run`` of ``total`` slides will be computed, ``skipped`` are complete."""

    total: int
    to_run: int
    skipped: int
    workers: int
    threads_per_worker: int
    scheduler: str
    dashboard: str | None
    out_dir: str
    done: int = 0
    message: str = ""
    rows: tuple = ()


@dataclass(frozen=True)
class SlideFinished:
    """One slide ended (``row["status"]`` ``ok`` or ``failed``); counts over the cohort."""

    row: dict
    done: int
    total: int
    ok: int
    failed: int
    skipped: int
    remaining: int
    elapsed_s: float
    eta_s: float | None

    @property
    def message(self) -> str:
        eta = "" if self.eta_s is None else f" · ETA {format_seconds(self.eta_s)}"
        return f"{self.done}/{self.total} slides · {self.failed} failed · {self.remaining} remaining{eta}"


@dataclass
class CohortResult:
    """The end of a run.

    Attributes
    ----------
    rows : list of dict
        One per slide, in manifest order (the rows of ``summary.csv``).
    summary : Path
    out_dir : Path
    n_ok, n_failed, n_skipped, n_pending : int
        ``n_pending``: slides left by a Stop.
    seconds : float
    cancelled : bool
    task, model : str
    scheduler : str
        The scheduler's address ("" when nothing ran).
    workers : int
    timings : dict
        Seconds of the run's phases: ``verify_s`` (resume checks), ``cluster_start_s`` (cluster
        up, or connected), ``model_check_s`` (the model check on a worker: its imports),
        ``first_result_s`` (cluster up to the first slide back: worker
        imports and model load included), ``run_s`` (all slides), ``close_s`` (cluster down),
        ``total_s``.
    """

    rows: list[dict]
    summary: Path
    out_dir: Path
    n_ok: int
    n_failed: int
    n_skipped: int
    n_pending: int
    seconds: float
    cancelled: bool
    task: str
    model: str | None
    scheduler: str = ""
    workers: int = 0
    timings: dict = field(default_factory=dict)


def format_seconds(s: float) -> str:
    """``"1h02m"``, ``"3m20s"``, ``"12s"``."""
    s = max(0, int(round(s)))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def available_cores() -> int:
    """Cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers(threads_per_worker: int = 1) -> int:
    """Workers of the default local cluster: the cores divided by the threads of each worker."""
    return max(1, available_cores() // max(1, int(threads_per_worker)))


# ----------------------------------------------------------------------------- lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    path = folder / LOCK
    me = f"{os.getpid()} {socket.gethostname()}\n"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid_s, _, host = path.read_text().strip().partition(" ")
                pid = int(pid_s)
            except (OSError, ValueError):
                pid, host = -1, ""
            if pid > 0 and (host not in ("", socket.gethostname()) or _pid_alive(pid)):
                raise CohortError(
                    f"{folder} is in use by another batch run (process {pid}{' on ' + host if host else ''}); "
                    "wait for it to end or choose another --out"
                ) from None
            with contextlib.suppress(OSError):
                path.unlink()  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(me)
        break
    else:
        raise CohortError(f"cannot take the lock {path}; remove it if no batch runs there")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if path.read_text() == me:
                path.unlink()


# ----------------------------------------------------------------------------- cluster


class _Cluster:
    """A dask client and, for a local cluster, the cluster itself; :meth:`close` ends both."""

    def __init__(self, client: Any, cluster: Any, address: str, dashboard: str | None, workers: int) -> None:
        self.client, self.cluster, self.address, self.dashboard, self.workers = client, cluster, address, dashboard, workers

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _open_cluster(*, scheduler: str | None, workers: int, threads_per_worker: int, processes: bool,
                  dashboard: str | None, warmup: Any) -> _Cluster:
    """Connect to ``scheduler`` or start a local cluster; ``warmup`` (a worker plugin) on local workers."""
    import dask
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="20s", set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise CohortError(f"cannot reach the dask scheduler at {scheduler} ({exc}); check the address and that it runs") from exc
        try:
            n = len(client.scheduler_info(n_workers=-1).get("workers", {}))
            return _Cluster(client, None, scheduler, _dashboard(client), n)
        except BaseException:
            client.close()
            raise
    # a worker that dies is retried by the runner (retries), not silently by the scheduler; a worker
    # gets a slide only when a thread is free, so a dying worker takes no queued slide with it
    # dask sets MALLOC_TRIM_THRESHOLD_ in its workers, which turns off glibc's adaptive mmap threshold:
    # every large array is then a fresh mmap, and a slide runs ~2x slower (see docs/cohort.md)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0, "distributed.scheduler.worker-saturation": 1.0,
                          "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=threads_per_worker, processes=processes,
            dashboard_address=dashboard, silence_logs=logging.ERROR, host="127.0.0.1" if processes else None,
        )
    try:
        client = Client(cluster, set_as_default=False)
        if warmup is not None:  # imports and model load start on every worker now, in the background
            client.register_plugin(warmup)
        return _Cluster(client, cluster, str(cluster.scheduler_address), _dashboard(client) if dashboard else None, workers)
    except BaseException:
        cluster.close()
        raise


class _Background:
    """``fn(*args, **kwargs)`` in a thread; :meth:`result` joins it and re-raises its error."""

    def __init__(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        import concurrent.futures

        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pathoseg-cohort")
        self._future = self._pool.submit(fn, *args, **kwargs)
        self._pool.shutdown(wait=False)

    def result(self) -> Any:
        return self._future.result()


def _dashboard(client: Any) -> str | None:
    import importlib.util

    if importlib.util.find_spec("bokeh") is None:  # the scheduler serves no dashboard pages without it
        return None
    try:
        info = client.scheduler_info(n_workers=0)
    except Exception:  # noqa: BLE001 - only for the message
        return None
    if "dashboard" not in (info.get("services") or {}):
        return None
    with contextlib.suppress(Exception):
        return str(client.dashboard_link)
    return None


def _lost_worker(exc: BaseException) -> bool:
    """The exception means the worker died or the connection broke (worth a retry)."""
    name = type(exc).__name__
    return name in ("KilledWorker", "CommClosedError", "FutureCancelledError") or isinstance(exc, (OSError, TimeoutError))


# ----------------------------------------------------------------------------- run


def _check_model(task: str, model_task: str, model: str | None) -> None:
    """Refuse, before any slide runs, a model that is neither a checkpoint file nor registered here."""
    problem = model_problem(task, model_task, model)
    if problem:
        raise CohortError(problem)


def _add_columns(columns: list[str], figures: dict[str, Any] | None) -> None:
    """Figures a task reports beyond its declared ones (per-class fractions) become columns too."""
    for k in figures or {}:
        if k not in columns:
            columns.append(k)


def iter_cohort(
    slides: Sequence[CohortSlide],
    *,
    task: str,
    out_dir: str | os.PathLike,
    model: str | None = None,
    workers: int | None = None,
    threads_per_worker: int = 1,
    scheduler: str | None = None,
    processes: bool = True,
    retries: int = 1,
    force: bool = False,
    dashboard: str | None = ":8787",
    cancel: Cancellable | None = None,
    poll_s: float = 0.1,
) -> Iterator[CohortStarted | SlideFinished | CohortResult]:
    """Run ``task`` over ``slides``; yield events, finally a :class:`CohortResult`.

    Parameters
    ----------
    slides : sequence of CohortSlide
        From :func:`~napari_pathoseg.cohort.manifest.read_manifest`.
    task : str
        A batch task (:data:`~napari_pathoseg.cohort.tasks.BATCH_TASKS`).
    out_dir : path
        ``DIR``: ``DIR/<slide-stem>/`` per slide and ``DIR/summary.csv``.
    model : str, optional
        Model name or checkpoint (default: the task's default model).
    workers : int, optional
        Worker processes of the local cluster (default :func:`default_workers`).
    threads_per_worker : int
        Threads of each local worker (one torch thread each).
    scheduler : str, optional
        Address of a running dask scheduler; the local cluster is not started.
    processes : bool
        Local workers as processes (default) or as threads of this process.
    retries : int
        Times a slide whose worker died is submitted again.
    force : bool
        Recompute complete slides too.
    dashboard : str or None
        Dashboard address of the local cluster (None: none).
    cancel : object with ``is_set()``, optional
        Stop: unfinished slides are cancelled and stay ``pending``.

    Raises
    ------
    CohortError, BatchTaskError
        Folder in use, unknown or unavailable task, scheduler unreachable, bad numbers.
    """
    spec = get_batch_task(task)
    if workers is not None and int(workers) < 1:
        raise CohortError(f"workers must be at least 1, got {workers}")
    if int(threads_per_worker) < 1:
        raise CohortError(f"threads per worker must be at least 1, got {threads_per_worker}")
    if int(retries) < 0:
        raise CohortError(f"retries must be 0 or more, got {retries}")
    if not slides:
        raise CohortError("the cohort holds no slides")
    out = Path(out_dir).expanduser().resolve()
    inputs = {s.path for s in slides}
    if out in inputs or (out / SUMMARY) in inputs:
        raise CohortError(f"--out {out} is a slide of the cohort; choose a folder for the results")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CohortError(f"cannot create the output folder {out}: {exc.strerror or exc}") from exc
    model_ref = (model or spec.default_model) if spec.model_task else None
    n_workers = int(workers) if workers else default_workers(threads_per_worker)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    columns = summary_columns(spec.figures, slides)
    summary_path = out / SUMMARY
    local_processes = processes and not scheduler

    with _folder_lock(out):
        rows = [new_row(s) for s in slides]
        jobs: list[SlideJob] = []
        for i, s in enumerate(slides):
            params = {"task": spec.name, "model": model_ref, "mpp": s.mpp,
                      "region": list(s.region) if s.region else None}
            folder = out / s.stem
            if not force:
                ok, why, rec = outputs.verify_slide(folder, params=params, source=s.path)
                if ok and rec is not None:
                    rows[i].update(status="skipped", seconds=rec.get("seconds", ""), worker=rec.get("worker", ""),
                                   **(rec.get("figures") or {}))
                    _add_columns(columns, rec.get("figures"))
                    continue
                if rec is not None:
                    logger.info("%s: recomputed: %s", s.stem, why)
            jobs.append(SlideJob(
                index=i, path=str(s.path), out_dir=str(folder), task=spec.name, runner=str(spec.runner),
                model_task=spec.model_task, model=model_ref, mpp=s.mpp, region=s.region, params=params,
                torch_threads=1 if processes or scheduler else 0,
            ))
        n_skip = len(slides) - len(jobs)
        timings["verify_s"] = time.perf_counter() - t_start

        def result(cancelled: bool, address: str = "", nw: int = 0) -> CohortResult:
            write_summary(summary_path, rows, columns)
            count = {k: sum(r["status"] == k for r in rows) for k in ("ok", "failed", "skipped", "pending")}
            timings["total_s"] = time.perf_counter() - t_start
            return CohortResult(
                rows=rows, summary=summary_path, out_dir=out, n_ok=count["ok"], n_failed=count["failed"],
                n_skipped=count["skipped"], n_pending=count["pending"], seconds=timings["total_s"],
                cancelled=cancelled, task=spec.name, model=model_ref, scheduler=address, workers=nw,
                timings={k: round(v, 3) for k, v in timings.items()},
            )

        starting = None
        run_now = bool(jobs) and not (cancel is not None and cancel.is_set())
        # The model check reads the model registry, which imports torch (1-2 s). With worker processes
        # of our own it runs on a worker (which imports torch anyway) and this process never imports
        # torch; otherwise it runs here in the background while the cluster starts. Either way it
        # ends before anything is written or any slide runs.
        check_on_worker = bool(spec.model_task) and run_now and local_processes
        check = (_Background(_check_model, spec.name, spec.model_task, model_ref)
                 if spec.model_task and not check_on_worker else None)
        if run_now:
            warmup = None if scheduler else WorkerWarmup(
                runner=str(spec.runner), model_task=spec.model_task, model=model_ref,
                torch_threads=1 if processes else 0, fast_exit=local_processes, client_pid=os.getpid())
            t_cluster = time.perf_counter()
            starting = _Background(_open_cluster, scheduler=scheduler, workers=n_workers,
                                   threads_per_worker=int(threads_per_worker), processes=processes,
                                   dashboard=dashboard, warmup=warmup)
        try:
            if check is not None:
                check.result()
            if check_on_worker:
                client = starting.result().client
                timings["cluster_start_s"] = time.perf_counter() - t_cluster
                t_check = time.perf_counter()
                problem = client.submit(model_problem, spec.name, spec.model_task, model_ref, pure=False,
                                        key=f"pathoseg-model-check-{time.time_ns()}").result()
                timings["model_check_s"] = time.perf_counter() - t_check
                if problem:
                    raise CohortError(problem)
        except BaseException:
            if starting is not None:
                with contextlib.suppress(BaseException):
                    starting.result().close()
            raise
        write_summary(summary_path, rows, columns)
        if starting is None:
            if not jobs:
                yield CohortStarted(len(slides), 0, n_skip, 0, threads_per_worker, "", None, str(out),
                                    done=n_skip, message=f"all {n_skip} slides are complete; nothing to run",
                                    rows=tuple(dict(r) for r in rows))
            yield result(bool(jobs))
            return
        cluster = starting.result()
        timings.setdefault("cluster_start_s", time.perf_counter() - t_cluster)
        try:
            nw = cluster.workers
            yield CohortStarted(
                len(slides), len(jobs), n_skip, nw, int(threads_per_worker), cluster.address, cluster.dashboard,
                str(out), done=n_skip, message=f"{len(jobs)} slides to run on {nw} worker(s), {n_skip} complete",
                rows=tuple(dict(r) for r in rows),
            )
            t_run = time.perf_counter()
            yield from _gather(cluster.client, jobs, rows, slides, summary_path, columns, retries=int(retries),
                               cancel=cancel, poll_s=poll_s, n_skip=n_skip, timings=timings,
                               max_in_flight=None if scheduler else nw * int(threads_per_worker))
            timings["run_s"] = time.perf_counter() - t_run
        finally:
            t_close = time.perf_counter()
            cluster.close()
            timings["close_s"] = time.perf_counter() - t_close
        stopped = cancel is not None and cancel.is_set()
        yield result(stopped, cluster.address, nw)


def _gather(client: Any, jobs: list[SlideJob], rows: list[dict], slides: Sequence[CohortSlide], summary_path: Path,
            columns: list[str], *, retries: int, cancel: Cancellable | None, poll_s: float,
            n_skip: int, max_in_flight: int | None, timings: dict[str, float] | None = None,
            summary_every_s: float = SUMMARY_EVERY_S) -> Iterator[SlideFinished]:
    """Submit the jobs, collect them as they finish, retry lost workers; yield one event per slide.

    ``summary.csv`` is rewritten when a slide fails, and otherwise at most every
    ``summary_every_s`` seconds (a cohort of thousands of slides would spend its time rewriting
    the table); the caller writes it once more at the end.
    """
    try:  # distributed.wait's body, run on our client (distributed.wait itself uses the default client)
        from distributed.client import _wait as wait_any
    except ImportError:  # pragma: no cover - a distributed without it: poll
        wait_any = None

    t0 = time.perf_counter()
    attempt: dict[int, int] = {}
    by_key: dict[str, SlideJob] = {}

    def submit(job: SlideJob) -> Any:
        attempt[job.index] = attempt.get(job.index, 0) + 1
        key = f"pathoseg-{job.task}-{job.index}-{slides[job.index].stem}-{attempt[job.index]}-{time.time_ns()}"
        fut = client.submit(run_slide_job, job, key=key, pure=False, retries=0)
        by_key[fut.key] = job
        return fut

    # at most `max_in_flight` slides on the cluster: a worker holds only the slides it runs, so a worker
    # that dies takes no waiting slide with it (None: all at once, e.g. for an adaptive cluster)
    waiting = list(jobs)
    first = waiting if max_in_flight is None else waiting[: max(1, max_in_flight)]
    waiting = waiting[len(first):]
    active = [submit(j) for j in first]
    finished = 0
    total = len(rows)
    last_write = -float("inf")
    while active:
        if cancel is not None and cancel.is_set():
            client.cancel(active)
            for f in active:
                rows[by_key[f.key].index]["error"] = "stopped before it finished"
            for j in waiting:
                rows[j.index]["error"] = "stopped before it ran"
            return
        # wakes as soon as a slide ends (no polling delay), or after poll_s to look at Stop
        try:
            if wait_any is None:  # pragma: no cover
                time.sleep(poll_s)
                ended = {f for f in active if f.done()}
            else:
                ended = client.sync(wait_any, active, timeout=poll_s, return_when="FIRST_COMPLETED").done
        except TimeoutError:
            continue
        ended = [f for f in active if f in ended]  # submission order
        active = [f for f in active if f not in ended]
        for fut in ended:
            job = by_key[fut.key]
            row = rows[job.index]
            if fut.status == "finished":
                out = fut.result()
                row.update(status=out["status"], error=out.get("error", ""), seconds=out.get("seconds", ""),
                           worker=out.get("worker", ""), **(out.get("figures") or {}))
                _add_columns(columns, out.get("figures"))
                for k in ("model_loads", "pid", "model_cached", "peak_rss_mb"):
                    row[k] = out.get(k)
            elif fut.status == "cancelled":  # by someone else on a shared cluster
                row.update(status="failed", error="cancelled on the cluster")
            else:
                exc = fut.exception()
                if _lost_worker(exc) and attempt[job.index] <= retries:
                    logger.warning("%s: its worker was lost (%s); retrying", slides[job.index].stem, type(exc).__name__)
                    active.append(submit(job))
                    continue
                from napari_pathoseg.cohort.job import one_line_error

                n = attempt[job.index]
                if _lost_worker(exc):
                    error = (f"the worker running it died ({n} attempt(s); a crash or the memory limit: "
                             f"see the worker's log) [{type(exc).__name__}]")
                else:
                    error = f"error on the worker ({n} attempt(s)): {one_line_error(exc)}"
                row.update(status="failed", error=error)
            row["attempts"] = attempt[job.index]
            if waiting:
                active.append(submit(waiting.pop(0)))
            finished += 1
            if timings is not None and "first_result_s" not in timings:
                timings["first_result_s"] = time.perf_counter() - t0
            now = time.perf_counter()
            if row["status"] == "failed" or now - last_write >= summary_every_s:
                write_summary(summary_path, rows, columns)
                last_write = now
            done = finished + n_skip
            failed = sum(r["status"] == "failed" for r in rows)
            elapsed = time.perf_counter() - t0
            remaining = total - done
            eta = elapsed / finished * remaining if finished else None
            yield SlideFinished(dict(row), done, total, sum(r["status"] == "ok" for r in rows), failed, n_skip,
                                remaining, elapsed, eta)


def run_cohort(slides: Sequence[CohortSlide], *, progress: Any = None, **kwargs: Any) -> CohortResult:
    """Run :func:`iter_cohort` to its end (``progress(event)`` for every event)."""
    return run_to_end(iter_cohort(slides, **kwargs), CohortResult, progress=progress)
