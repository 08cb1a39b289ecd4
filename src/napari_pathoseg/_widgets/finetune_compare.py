"""The Fine-tune dock's comparison: the new model and its base segment the view, side by side.

Everything heavy happens in the job (a worker thread): loading each model, segmenting the
view, and preparing the layer data napari draws fast, so that adding a layer on the GUI thread
stays well under 200 ms even for a 4096² view:

* labels are stored in the smallest unsigned type that holds their ids (uint8 / uint16: napari
  draws these directly, while uint32 ids go through a per-pixel colour remapping that took
  ~1-2 s for a 4096² view);
* the base model is drawn as outlines over the new model's filled nuclei; the outlines are
  computed here (napari's ``contour`` would recompute them on the GUI thread, ~1 s).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

__all__ = ["MAX_COMPARE_SIDE", "OverlayLayer", "compare_job", "compare_region", "prepare_labels"]

logger = logging.getLogger(__name__)

#: Largest side (level-0 pixels) of the view compared after training; a larger view is
#: cropped to its centre so the comparison stays quick at any zoom.
MAX_COMPARE_SIDE = 4096


def compare_region(view: tuple[int, int, int, int], *, max_side: int = MAX_COMPARE_SIDE) -> tuple[int, int, int, int]:
    """The centre of a level-0 ``(x, y, w, h)`` view, at most ``max_side`` pixels a side."""
    x, y, w, h = (int(v) for v in view)
    cw, ch = min(w, max_side), min(h, max_side)
    return (x + (w - cw) // 2, y + (h - ch) // 2, cw, ch)


def prepare_labels(labels: Any, *, outline: bool = False) -> np.ndarray:
    """Labels as napari draws them fastest: the smallest unsigned type that holds the ids.

    Parameters
    ----------
    labels : (rows, cols) int array
    outline : bool
        Keep only each object's inner boundary (1 pixel), as napari's ``contour=1`` would
        draw it.

    Returns
    -------
    (rows, cols) uint8, uint16 or uint32 array
    """
    from skimage.segmentation import find_boundaries

    labels = np.asarray(labels)
    top = int(labels.max(initial=0))
    dtype = np.uint8 if top < 1 << 8 else np.uint16 if top < 1 << 16 else np.uint32
    out = labels.astype(dtype, copy=False)
    if outline:
        out = np.where(find_boundaries(labels, mode="inner"), out, 0).astype(dtype, copy=False)
    return out


@dataclass
class OverlayLayer:
    """One model's nuclei over the view, ready to add (an event of :func:`compare_job`).

    Attributes
    ----------
    label : str
        Layer name.
    data : (rows, cols) array
        Prepared by :func:`prepare_labels`.
    result : NucleiResult
        The segmentation (region, scale, table, model name...).
    outline : bool
        ``data`` holds outlines (the base model) rather than filled nuclei.
    """

    label: str
    data: np.ndarray
    result: Any
    outline: bool = False

    @property
    def n_nuclei(self) -> int:
        return int(self.result.n_nuclei)


def compare_job(
    slide: Any,
    models: Sequence[tuple[str, str, bool]],
    region: tuple[int, int, int, int],
    *,
    ended: threading.Event | None = None,
    loader: Callable[[str], Any] | None = None,
) -> Callable[[Any], Iterator[Any]]:
    """The job ``job(token)``: for each ``(layer name, model name or path, outline)`` segment
    ``region`` and yield an :class:`OverlayLayer` (progress events in between).

    A stopped segmentation ends the job without adding its partial layer. ``ended`` is set
    when the job ends, however it ends (the dock waits on it when napari closes).
    """
    from napari_pathoseg.methods.nuclei.segment import NucleiResult, iter_segment_nuclei

    if loader is None:
        from napari_pathoseg.models.registry import load_model

        def loader(ref: str) -> Any:
            return load_model(ref, task="nuclei")

    def job(token: Any) -> Iterator[Any]:
        try:
            for label, ref, outline in models:
                if token is not None and token.is_set():
                    return
                model = loader(ref)
                result = None
                for ev in iter_segment_nuclei(slide, model, region=region, cancel=token, with_normalized=False):
                    if isinstance(ev, NucleiResult):
                        result = ev
                    else:
                        yield ev
                if result is None or getattr(result, "cancelled", False):
                    return
                yield OverlayLayer(label, prepare_labels(result.labels, outline=outline), result, outline)
        finally:
            if ended is not None:
                ended.set()

    return job
