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

from napari_pathoseg.cohort.manifest import CohortSlide, ManifestError, read_manifest
from napari_pathoseg.cohort.runner import CohortError, CohortResult, CohortStarted, SlideFinished, iter_cohort, run_cohort
from napari_pathoseg.cohort.tasks import BATCH_TASKS, BatchTask, BatchTaskError, SlideOutput, available_tasks, get_batch_task

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
