"""Reviewer corrections of a tile's instance mask: split one nucleus, merge several.

Both take and return ``(H, W)`` integer label images without modifying their input; a
misuse (a label that is absent, a nucleus too small to split) raises
:class:`~napari_pathoseg.review.records.ReviewProjectError` with what to do instead.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.segmentation import watershed

from napari_pathoseg.review.records import ReviewProjectError

__all__ = ["merge_nuclei", "split_nucleus"]


def split_nucleus(
    mask: np.ndarray, label: int, *, min_distance: int = 3, parts: int | None = None
) -> tuple[np.ndarray, list[int]]:
    """Split one nucleus by a watershed of its distance transform.

    Seeds are the local maxima of the Euclidean distance transform inside the object; if
    fewer than two are found (a smooth, elongated blob), the two ends of its major axis
    are used instead, so the object is always cut in at least two.

    Parameters
    ----------
    mask : (H, W) int array
        Instance labels (not modified).
    label : int
        Id of the nucleus to split.
    min_distance : int
        Minimum distance in pixels between two seeds.
    parts : int, optional
        Keep at most this many seeds (the deepest ones).

    Returns
    -------
    new_mask : (H, W) array of mask's dtype
        The first part keeps ``label``; the others get new ids above ``mask.max()``.
    ids : list of int
        Ids of all parts, ``label`` first.
    """
    mask = np.asarray(mask)
    obj = mask == label
    if label == 0 or not obj.any():
        raise ReviewProjectError(f"Label {label} is not a nucleus of this mask; pick a label > 0 that is present.")
    if obj.sum() < 4:
        raise ReviewProjectError(f"Nucleus {label} has only {int(obj.sum())} pixels: too small to split.")
    dist = ndi.distance_transform_edt(obj)
    peaks = peak_local_max(
        dist, min_distance=max(1, int(min_distance)), labels=obj.astype(np.int32),
        exclude_border=False, num_peaks=parts if parts else np.inf,
    )
    markers = np.zeros(mask.shape, dtype=np.int32)
    if len(peaks) >= 2:
        for i, (r, c) in enumerate(peaks, start=1):
            markers[r, c] = i
    else:
        rr, cc = np.nonzero(obj)
        coords = np.stack([rr, cc], axis=1).astype(np.float64)
        centred = coords - coords.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        proj = centred @ vt[0]
        lo, hi = np.quantile(proj, [0.1, 0.9])
        markers[rr[proj <= lo], cc[proj <= lo]] = 1
        markers[rr[proj >= hi], cc[proj >= hi]] = 2
    parts_map = watershed(-dist, markers, mask=obj)
    new = mask.copy()
    next_id = int(mask.max()) + 1
    ids = [int(label)]
    for part in range(2, int(parts_map.max()) + 1):
        sel = parts_map == part
        if not sel.any():
            continue
        new[sel] = next_id
        ids.append(next_id)
        next_id += 1
    if len(ids) < 2:
        raise ReviewProjectError(f"Nucleus {label} could not be split; erase or repaint it instead.")
    if np.issubdtype(new.dtype, np.integer) and next_id - 1 > np.iinfo(new.dtype).max:
        raise ReviewProjectError(
            f"Splitting nucleus {label} needs id {next_id - 1}, which a {new.dtype} mask cannot hold."
        )
    return new, ids


def merge_nuclei(mask: np.ndarray, labels: Iterable[int], *, bridge: int = 1) -> tuple[np.ndarray, int]:
    """Merge several nuclei into one (the smallest id), closing the gap between them.

    Parameters
    ----------
    mask : (H, W) int array
        Instance labels (not modified).
    labels : iterable of int
        Ids to merge (at least two present ones).
    bridge : int
        Radius in pixels of a binary closing that fills background pixels between the
        merged parts (other nuclei are never overwritten); 0 disables it.

    Returns
    -------
    new_mask : (H, W) array of mask's dtype
    label : int
        The id of the merged nucleus.
    """
    mask = np.asarray(mask)
    ids = sorted({int(v) for v in labels if int(v) != 0})
    present = [i for i in ids if (mask == i).any()]
    if len(present) < 2:
        raise ReviewProjectError(
            f"Select at least two nuclei present in the mask to merge (got {ids})."
        )
    target = present[0]
    new = mask.copy()
    sel = np.isin(mask, present)
    new[sel] = target
    if bridge > 0:
        structure = ndi.generate_binary_structure(2, 1)
        closed = ndi.binary_closing(sel, structure=structure, iterations=int(bridge))
        new[closed & (mask == 0)] = target
    return new, target
