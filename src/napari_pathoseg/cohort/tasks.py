"""The analyses ``pathoseg batch`` can run: one table, task name -> the function that runs a slide.

Each analysis declares its batch task here, in :data:`BATCH_TASKS`, with the function that runs
one slide as a ``"module:function"`` string. The cohort runner imports it lazily, on the worker
that runs the slide, so this table imports no method package.

A slide runner has this signature::

    def run(slide, *, model, out_dir, region, mpp, work_dir, cancel) -> SlideOutput

* ``slide`` - the opened :class:`~napari_pathoseg.wsi.slide.Slide` (the worker opened it by path);
* ``model`` - the task's model, loaded once per worker (``None`` for a task without a model);
* ``out_dir`` - the slide's folder ``DIR/<slide-stem>/`` (exists); every file is written there
  atomically (:mod:`napari_pathoseg._atomic`);
* ``region`` - level-0 ``(x, y, w, h)`` or ``None`` (the whole slide's tissue);
* ``mpp`` - declared µm per level-0 pixel or ``None``;
* ``work_dir`` - a scratch folder removed after the slide (memory-mapped intermediate results);
* ``cancel`` - a token with ``is_set()`` (never set on a cluster; set by a local Stop).

It returns :class:`SlideOutput`: the key figures (the columns of ``summary.csv`` declared in
``figures`` below) and the files it wrote. Raising a
:class:`~napari_pathoseg.errors.PathosegError` marks the slide failed with that one line.

Adding an analysis: write its runner in the method's package (or in ``cohort/``) and add one
entry to :data:`BATCH_TASKS` (or call :func:`register_batch_task` at run time).

Examples
--------
>>> get_batch_task("nuclei").figures[:2]
('n_nuclei', 'tissue_mm2')
>>> available_tasks()[0]
'nuclei'
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from napari_pathoseg.errors import PathosegError

__all__ = [
    "BatchTask",
    "BatchTaskError",
    "SlideOutput",
    "BATCH_TASKS",
    "get_batch_task",
    "available_tasks",
    "register_batch_task",
    "resolve_runner",
]

logger = logging.getLogger(__name__)


class BatchTaskError(PathosegError):
    """A batch task is unknown or not available in this version."""


@dataclass
class SlideOutput:
    """What a slide runner returns.

    Attributes
    ----------
    figures : dict
        Key figures (numbers or short text) named as in the task's ``figures``.
    files : dict
        Output name -> path of every file written into the slide's folder.
    """

    figures: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchTask:
    """One analysis ``pathoseg batch`` can run.

    Attributes
    ----------
    name : str
        ``--task`` value.
    title : str
        What it does.
    runner : str or None
        ``"module:function"`` running one slide; ``None``: not available in this version.
    model_task : str or None
        The registry task of its models (``models/tasks.py``), ``None`` for a task without model.
    default_model : str or None
        Model used when ``--model`` is not given.
    figures : tuple of str
        Key-figure columns of ``summary.csv``.
    layers : tuple of (file key, kind)
        Outputs the Cohort dock opens over the slide: ``"labels"`` or ``"image"`` TIFFs.
    """

    name: str
    title: str
    runner: str | None = None
    model_task: str | None = None
    default_model: str | None = None
    figures: tuple[str, ...] = ()
    layers: tuple[tuple[str, str], ...] = ()

    @property
    def available(self) -> bool:
        return self.runner is not None


#: Task name -> :class:`BatchTask`. A method plugs into ``pathoseg batch`` by filling its ``runner``.
BATCH_TASKS: dict[str, BatchTask] = {
    "nuclei": BatchTask(
        "nuclei", "nucleus instances (M2): labels TIFF, per-nucleus CSV, count and density",
        runner="napari_pathoseg.cohort.nuclei:run_nuclei_slide",
        model_task="nuclei", default_model="nuclei-lite",
        figures=("n_nuclei", "tissue_mm2", "nuclei_per_mm2", "mean_area_um2", "tiles"),
        layers=(("labels", "labels"),),
    ),
    "lesion": BatchTask(
        "lesion", "lesion regions (M3): mask, probability map, lesion area and fraction of the tissue",
        runner="napari_pathoseg.cohort.lesion:run_lesion_slide",
        model_task="lesion", default_model="lesion-lite",
        figures=("lesion_mm2", "tissue_mm2", "lesion_fraction", "n_regions", "tiles"),
        layers=(("mask", "labels"), ("probability", "image")),
    ),
    "tissue": BatchTask(
        "tissue", "tissue types (M5): class map, per-class areas and fractions of the tissue",
        runner="napari_pathoseg.cohort.tissue:run_tissue_slide",
        model_task="tissue", default_model=None,
        figures=("tissue_mm2",),  # then <class>_fraction, <class>_mm2 for the model's classes
        layers=(("labels", "labels"),),
    ),
    "malignancy": BatchTask(
        "malignancy", "malignancy (M1): slide probability and call, tile heat map, malignant region and its area",
        runner="napari_pathoseg.cohort.malignancy:run_malignancy_slide",
        model_task="malignancy", default_model="malignancy-lite",
        figures=("probability", "call", "malignant_area_mm2", "malignant_fraction", "tissue_mm2", "tiles"),
        layers=(("mask", "labels"), ("heatmap", "image")),
    ),
    "mil": BatchTask(
        "mil", "slide classification by MIL (M4): probability, call and tile heat map",
        runner="napari_pathoseg.cohort.mil:run_mil_slide",
        model_task="slide", default_model="slidecls-crc-lite",
        figures=("probability", "call", "n_tiles", "top_tile_probability"),
        layers=(("heatmap", "image"),),
    ),
}


def available_tasks() -> list[str]:
    """Names of the tasks this version can run, in table order."""
    return [n for n, t in BATCH_TASKS.items() if t.available]


def get_batch_task(name: str) -> BatchTask:
    """The runnable :class:`BatchTask` called ``name``.

    Raises
    ------
    BatchTaskError
        Unknown name, or a task declared but not available yet; the message lists the tasks
        that exist.
    """
    task = BATCH_TASKS.get(name) if isinstance(name, str) else None
    if task is None:
        raise BatchTaskError(f"unknown task {name!r}; tasks that run: {', '.join(available_tasks())}")
    if not task.available:
        raise BatchTaskError(
            f"the {name} analysis is not available yet in this version ({task.title}); "
            f"tasks that run: {', '.join(available_tasks())}"
        )
    return task


def register_batch_task(task: BatchTask) -> None:
    """Add or replace a batch task at run time (its runner module must import on the workers)."""
    if not isinstance(task, BatchTask) or not task.name:
        raise BatchTaskError(f"a batch task is a BatchTask with a name, got {task!r}")
    if task.runner is not None and ":" not in task.runner:
        raise BatchTaskError(f"a runner is a 'module:function' string, got {task.runner!r}")
    BATCH_TASKS[task.name] = task


def resolve_runner(spec: str) -> Callable[..., SlideOutput]:
    """Import a runner ``"module:function"`` (on the worker)."""
    from napari_pathoseg.models.tasks import resolve_callable

    return resolve_callable(spec, what="batch runner")
