"""``pathoseg batch``: run an analysis over a cohort of slides on dask.distributed.

A progress bar on stderr (slides done / failed / remaining, ETA, the dashboard address when the
cluster has one), one JSON document on stdout at the end. The exit code is 0 when every slide is
ok or skipped, 1 when any slide failed (the count on stderr), 2 for bad input, 130 on Ctrl-C
(unfinished slides stay pending; a re-run does them). See ``docs/cohort.md``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from napari_pathoseg.cli._driver import drive, existing_path, int_range, nonnegative_int, print_json

__all__ = ["add_commands", "EXIT_FAILED_SLIDES"]

#: Exit code when the run ended but some slides failed.
EXIT_FAILED_SLIDES = 1


def _cmd_batch(args: argparse.Namespace) -> int:
    from napari_pathoseg.cohort.manifest import read_manifest
    from napari_pathoseg.cohort.progress import TerminalProgress
    from napari_pathoseg.cohort.runner import CohortResult, iter_cohort
    from napari_pathoseg.cohort.tasks import get_batch_task

    get_batch_task(args.task)  # an unavailable task is refused before the manifest is read
    if not logging.getLogger().isEnabledFor(logging.INFO):  # dask's own chatter only with -v
        logging.getLogger("distributed").setLevel(logging.ERROR)
    slides = read_manifest(args.manifest)
    bar = TerminalProgress(sys.stderr)

    def stopped(result: CohortResult) -> str:
        bar(result)
        return (f"{result.n_ok} slides done, {result.n_pending} left pending in {result.summary}; "
                "run the same command again to finish them")

    result = drive(
        lambda token: iter_cohort(
            slides, task=args.task, out_dir=args.out, model=args.model, workers=args.workers,
            threads_per_worker=args.threads_per_worker, scheduler=args.scheduler, processes=not args.in_process,
            retries=args.retries, force=args.force, dashboard=None if args.no_dashboard else args.dashboard,
            cancel=token,
        ),
        CohortResult,
        on_event=bar,
        on_cancelled=stopped,
        label="pathoseg batch",
    )
    info: dict[str, Any] = {
        "task": result.task,
        "model": result.model,
        "out": str(result.out_dir),
        "summary": str(result.summary),
        "slides": len(result.rows),
        "ok": result.n_ok,
        "failed": result.n_failed,
        "skipped": result.n_skipped,
        "seconds": round(result.seconds, 3),
        "scheduler": result.scheduler,
        "workers": result.workers,
        "failures": [{"slide": r["slide"], "error": r["error"]} for r in result.rows if r["status"] == "failed"],
    }
    print_json(info)
    if result.n_failed:
        print(f"pathoseg batch: {result.n_failed} of {len(result.rows)} slides failed (see {result.summary})",
              file=sys.stderr)
        return EXIT_FAILED_SLIDES
    return 0


def add_commands(subparsers: Any) -> None:
    """Register ``pathoseg batch``."""
    from napari_pathoseg.cohort.tasks import BATCH_TASKS

    p = subparsers.add_parser(
        "batch", help="run an analysis over a cohort of slides (dask.distributed; resumable)",
        description="Run an analysis over every slide of a manifest CSV or folder, on a local dask cluster or an "
                    "existing scheduler. Complete slides are skipped (verified); failed slides do not stop the run.",
    )
    p.add_argument("manifest", type=existing_path, help="manifest CSV (slide[,mpp,label,region]) or a folder of slides")
    p.add_argument("--task", required=True, choices=list(BATCH_TASKS), help="the analysis")
    p.add_argument("--out", required=True, help="output folder: DIR/<slide>/ per slide and DIR/summary.csv")
    p.add_argument("--model", default=None, help="model name or .safetensors checkpoint (default: the task's)")
    p.add_argument("--workers", type=int_range(1, 1024), default=None,
                   help="local worker processes (default: one per core / threads per worker)")
    p.add_argument("--threads-per-worker", type=int_range(1, 256), default=1,
                   help="threads of each local worker, one torch thread each (default 1)")
    p.add_argument("--scheduler", default=None, help="address of a running dask scheduler (tcp://host:8786)")
    p.add_argument("--in-process", action="store_true", help="local workers as threads of this process")
    p.add_argument("--retries", type=nonnegative_int, default=1, help="re-runs of a slide whose worker died (default 1)")
    p.add_argument("--force", action="store_true", help="recompute slides that are already complete")
    p.add_argument("--dashboard", default=":8787", help="dashboard address of the local cluster (default :8787)")
    p.add_argument("--no-dashboard", action="store_true", help="no dashboard")
    p.set_defaults(func=_cmd_batch)
