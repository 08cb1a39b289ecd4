"""Cohorts of slides: every analysis in batch on dask.distributed (``pathoseg batch``, the Cohort dock).

* :mod:`.manifest` - read a manifest CSV or a folder of slides;
* :mod:`.tasks` - the table of batch tasks (task name -> the function that runs one slide);
* :mod:`.job` - one slide on a worker (model cached per worker, errors isolated);
* :mod:`.outputs` - the per-slide record that makes resume verify completeness;
* :mod:`.summary` - ``summary.csv``;
* :mod:`.runner` - :func:`iter_cohort` / :func:`run_cohort` on a local cluster or a scheduler;
* :mod:`.progress` - the terminal progress bar.

See ``docs/cohort.md``.
"""

import importlib
from typing import Any

#: Public name -> the submodule that defines it. Imported on first use, so reading the task
#: table (``pathoseg --help``, the Cohort dock's task list) does not import dask.distributed.
_WHERE = {
    "CohortSlide": "manifest",
    "ManifestError": "manifest",
    "read_manifest": "manifest",
    "CohortError": "runner",
    "CohortResult": "runner",
    "CohortStarted": "runner",
    "SlideFinished": "runner",
    "iter_cohort": "runner",
    "run_cohort": "runner",
    "BATCH_TASKS": "tasks",
    "BatchTask": "tasks",
    "BatchTaskError": "tasks",
    "SlideOutput": "tasks",
    "available_tasks": "tasks",
    "get_batch_task": "tasks",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CohortSlide",
    "ManifestError",
    "read_manifest",
    "CohortError",
    "CohortResult",
    "CohortStarted",
    "SlideFinished",
    "iter_cohort",
    "run_cohort",
    "BATCH_TASKS",
    "BatchTask",
    "BatchTaskError",
    "SlideOutput",
    "available_tasks",
    "get_batch_task",
]
