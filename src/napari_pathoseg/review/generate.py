"""Teacher pseudo-labels: run a model over unlabelled tiles into a review project.

M2 step S23 (methods.md): a trained teacher runs over unlabelled tiles (:mod:`.sources`); each
tile's quality score is the mean over its pixels of the confidence ``max(p, 1 - p)``
(:func:`~napari_pathoseg.review.scoring.tile_score`); tiles above a threshold are kept, their
stain-normalised images serve as pseudo-Y images and their masks as pseudo-labels, stored in a
:class:`~napari_pathoseg.review.project.ReviewProject` for a pathologist to review.
:func:`generate_pseudolabels` is a generator of progress events ending in
:class:`GenerationDone`; :func:`run_pseudolabels` drives it headless.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathoseg.errors import CancelledError
from napari_pathoseg.events import run_to_end
from napari_pathoseg.review.records import ReviewProjectError
from napari_pathoseg.review.scoring import tile_score
from napari_pathoseg.review.sources import UnlabelledTile, count_folder_tiles, folder_images, folder_tiles, slide_tiles
from napari_pathoseg.review.store import ReviewProject

__all__ = ["GenerationDone", "GenerationProgress", "check_source_outside", "generate_pseudolabels", "run_pseudolabels"]

logger = logging.getLogger(__name__)


@dataclass
class GenerationProgress:
    """Progress of :func:`generate_pseudolabels`: ``done`` of ``total`` tiles processed."""

    done: int
    total: int
    kept: int
    last_score: float | None = None


@dataclass
class GenerationDone:
    """Final event of :func:`generate_pseudolabels`.

    Attributes
    ----------
    project : ReviewProject
        The project, holding the ``kept`` tiles.
    processed, kept : int
        Tiles run through the teacher, and stored.
    cancelled : bool
        Stopped before the end; the tiles finished so far are in the project.
    """

    project: ReviewProject
    processed: int
    kept: int
    cancelled: bool = False

    @property
    def message(self) -> str:
        """What happened, in one line."""
        if self.cancelled:
            return (
                f"Pseudo-label generation stopped after {self.processed} tiles; the {self.kept} "
                f"tiles kept so far are in {self.project.root}."
            )
        return f"Pseudo-labels: {self.kept} of {self.processed} tiles kept in {self.project.root}."


def generate_pseudolabels(
    source: str | os.PathLike | Any,
    out: str | os.PathLike,
    *,
    predict: Callable[[np.ndarray], dict],
    to_instances: Callable[..., np.ndarray],
    model_name: str = "model",
    tile_size: int = 256,
    mpp: float | None = None,
    source_mpp: float | None = None,
    threshold: float = 0.0,
    max_tiles: int | None = None,
    batch_size: int = 4,
    min_tissue: float = 0.5,
    overwrite: bool = False,
    cancel: Any = None,
) -> Iterator[GenerationProgress | GenerationDone]:
    """Run a teacher over unlabelled tiles and store the candidates in a review project.

    Parameters
    ----------
    source : path or Slide
        A slide file (or an open :class:`~napari_pathoseg.wsi.slide.Slide`), or a folder of images.
    out : path
        Project folder to create; not the source nor a folder holding it
        (:func:`check_source_outside`).
    predict : callable
        ``predict(batch (B, H, W, 3) uint8) -> {"prob": (B, H, W) float32,
        "normalized": (B, H, W, 3) uint8, ...}`` (e.g. ``NucleusModel.predict``).
    to_instances : callable
        ``to_instances(prob (H, W)) -> (H, W) int labels`` (e.g. ``NucleusModel.to_instances``;
        an ``extra`` entry of the prediction is passed on as ``extra=`` when present).
    model_name : str
        Recorded in ``project.json``.
    tile_size : int
        Tile size fed to the teacher.
    mpp : float, optional
        Working resolution for a slide (default: level 0); for a folder, with
        ``source_mpp``, the images are rescaled by ``source_mpp / mpp``.
    source_mpp : float, optional
        Resolution of the folder images.
    threshold : float
        Tiles scoring below it are not stored (M2 filtering); 0 keeps all.
    max_tiles : int, optional
        Process at most this many tiles (the first ones in grid/file order).
    batch_size : int
    min_tissue : float
        Minimum tissue fraction of a slide tile.
    overwrite : bool
        Replace a project already in ``out``.
    cancel : threading.Event-like, optional
        When ``cancel.is_set()``, stops after the current batch: the tiles stored so far stay
        in the project, and the last event is a :class:`GenerationDone` with
        ``cancelled=True``.

    Yields
    ------
    GenerationProgress
        After each batch.
    GenerationDone
        Last, with the project (``cancelled`` when stopped early).
    """
    if batch_size < 1 or tile_size < 1:
        raise ReviewProjectError(f"batch_size and tile_size must be >= 1 (got {batch_size}, {tile_size}).")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ReviewProjectError(f"The score threshold must be in [0, 1], got {threshold}.")
    check_source_outside(source, out)
    slide = None
    own_slide = False
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        src_path = Path(source)
        scale = 1.0
        if mpp is not None and source_mpp is not None:
            scale = float(source_mpp) / float(mpp)
        tiles_iter: Iterable[Any] = folder_tiles(src_path, tile_size=tile_size, scale=scale)
        images_list = folder_images(src_path)
        total = count_folder_tiles(images_list, tile_size=tile_size, scale=scale)
        if max_tiles is not None:
            total = min(total, int(max_tiles))
        project = ReviewProject.create(
            out, source=src_path, source_kind="folder", model=model_name, tile_size=tile_size,
            mpp=mpp if mpp is not None else source_mpp, threshold=threshold,
            overwrite=overwrite, downsample=1.0 / scale,
        )
        read = None
        logger.info("pseudo-labelling %d tiles of %d images in %s", total, len(images_list), src_path)
    else:
        if isinstance(source, (str, os.PathLike)):
            from napari_pathoseg.wsi.slide import open_slide

            slide = open_slide(source)
            own_slide = True
            src_path = Path(source)
        else:
            slide = source
            src_path = Path(str(getattr(slide.metadata, "path", "slide")))
        try:
            grid, read, level, downsample = slide_tiles(slide, tile_size=tile_size, mpp=mpp, min_tissue=min_tissue)
            project = ReviewProject.create(
                out, source=src_path, source_kind="slide", model=model_name, tile_size=tile_size,
                mpp=mpp if mpp is not None else slide.mpp, level=level, downsample=downsample,
                threshold=threshold, overwrite=overwrite,
            )
        except BaseException:
            if own_slide:
                slide.close()
            raise
        if max_tiles is not None:
            grid = grid[: int(max_tiles)]
        total = len(grid)
        tiles_iter = grid
        logger.info("pseudo-labelling %d tissue tiles of %s", total, src_path)
    if max_tiles is not None:
        tiles_iter = itertools.islice(tiles_iter, int(max_tiles))
    done = kept = 0
    cancelled = False
    try:
        batch: list[UnlabelledTile] = []
        it = iter(tiles_iter)
        while True:
            if cancel is not None and cancel.is_set():
                project.save()
                cancelled = True
                logger.info("pseudo-label generation stopped after %d tiles (%d kept)", done, kept)
                break
            batch = []
            for item in it:
                batch.append(read(item) if read is not None else item)
                if len(batch) == batch_size:
                    break
            if not batch:
                break
            images = np.stack([t.image for t in batch])  # (B, H, W, 3) uint8
            pred = predict(images)
            prob = np.asarray(pred["prob"], dtype=np.float32)  # (B, H, W)
            norm = np.asarray(pred.get("normalized", images))  # (B, H, W, 3)
            extra = pred.get("extra")
            if prob.shape != images.shape[:3]:
                raise ReviewProjectError(
                    f"The model returned probabilities of shape {prob.shape} for a batch of "
                    f"shape {images.shape}; expected {images.shape[:3]}."
                )
            last = None
            for i, tile in enumerate(batch):
                score = tile_score(prob[i])
                last = score
                if score < threshold:
                    continue
                if extra is not None:
                    labels = to_instances(prob[i], extra=_index_extra(extra, i))
                else:
                    labels = to_instances(prob[i])
                project.add_tile(
                    tile.image, norm[i], prob[i], labels, x=tile.x, y=tile.y, height=tile.height,
                    width=tile.width, source_name=tile.source_name, save=False,
                )
                kept += 1
            done += len(batch)
            project.save()
            yield GenerationProgress(done=done, total=total, kept=kept, last_score=last)
    finally:
        if own_slide and slide is not None:
            slide.close()
    yield GenerationDone(project=project, processed=done, kept=kept, cancelled=cancelled)


def check_source_outside(source: str | os.PathLike | Any, out: str | os.PathLike) -> None:
    """Refuse a project folder ``out`` that is the source or holds it.

    Creating a project over an old one deletes its ``tiles/`` folder: pseudo-labelling a
    project's own tiles (or a slide kept in it) into that project with ``overwrite`` would
    delete the source being read.

    Parameters
    ----------
    source : path or Slide
        A slide file, a folder of images, or an open slide (its ``metadata.path``).
    out : path
        The project folder to create.

    Raises
    ------
    ReviewProjectError
        ``out`` is ``source`` or one of its parent folders.
    """
    if not isinstance(source, (str, os.PathLike)):
        source = getattr(getattr(source, "metadata", None), "path", None)
        if source is None:
            return
    src = Path(source).expanduser().resolve()
    dest = Path(out).expanduser().resolve()
    if src == dest or dest in src.parents:
        raise ReviewProjectError(
            f"The source {source} is inside the project folder {out}; writing the project there "
            "would delete or mix with it. Choose a project folder outside the source."
        )


def _index_extra(extra: Any, i: int) -> Any:
    if isinstance(extra, dict):
        return {k: _index_extra(v, i) for k, v in extra.items()}
    if isinstance(extra, (np.ndarray,)) or hasattr(extra, "__getitem__"):
        return extra[i]
    return extra


def run_pseudolabels(
    source: str | os.PathLike | Any,
    out: str | os.PathLike,
    *,
    progress: Callable[[GenerationProgress], None] | None = None,
    **kwargs: Any,
) -> ReviewProject:
    """Drive :func:`generate_pseudolabels` to the end (headless) and return the project.

    ``kwargs`` are passed on; ``progress`` is called with each progress event.

    Raises
    ------
    napari_pathoseg.errors.CancelledError
        A ``cancel`` passed in ``kwargs`` was set; the message says how many tiles were kept
        and where (they stay in the project).
    """
    def report(event: Any) -> None:
        if progress is not None and not isinstance(event, GenerationDone):
            progress(event)

    done = run_to_end(generate_pseudolabels(source, out, **kwargs), GenerationDone, progress=report)
    if done.cancelled:
        raise CancelledError(done.message)
    return done.project
