"""M4's data: tissue tiles of a cohort's slides, pooled by slide label, and the two views.

:func:`slide_tiles` cuts one slide without overlap into ``tile_size`` tiles at the model's
µm/px (from the nearest pyramid level at or finer than it, resampled), drops partial edge
tiles and background tiles (grey-level entropy below the threshold, :mod:`.entropy`), and
returns the tiles with their level-0 boxes. :func:`load_pools` does it for every slide of a
cohort and pools positive-slide and negative-slide tiles separately (:class:`TilePools`),
keeping which slide each tile came from (for the bag baselines and for scoring).

:func:`two_views` / :func:`augment` make M4's augmented views on a batch, in torch: random
horizontal and vertical flips (p 0.5 each), random resized crop (80-100 % of the area, aspect
3:4-4:3, back to the tile size, bilinear), colour jitter (brightness, contrast and saturation
x U(0.8, 1.2), hue rotated by up to ±0.04 turns) and grey-scale (p 0.2). Every random number
comes from the numpy generator passed in, so a resumed run draws the same views.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.methods.mil.cohort_csv import CohortSlide
from napari_pathoseg.methods.mil.entropy import entropies

__all__ = ["SlideTiles", "TilePools", "augment", "load_pools", "slide_tiles", "two_views"]

logger = logging.getLogger(__name__)

#: Band height (tile rows) read at once when cutting a slide.
_BAND_ROWS = 8


@dataclass
class SlideTiles:
    """Tissue tiles of one slide.

    Attributes
    ----------
    tiles : (N, t, t, 3) uint8
    boxes : (N, 4) int64
        ``x, y, w, h`` of each tile in level-0 pixels.
    n_grid : int
        Whole tiles on the grid before the entropy filter.
    """

    tiles: np.ndarray
    boxes: np.ndarray
    n_grid: int


def slide_tiles(path: str | Path, *, mpp: float, tile_size: int, entropy_threshold: float,
                slide_mpp: float | None = None, max_tiles: int | None = None,
                rng: np.random.Generator | None = None) -> SlideTiles:
    """Cut a slide into non-overlapping tissue tiles at ``mpp``.

    Parameters
    ----------
    path : path-like
    mpp : float
        Target µm/px.
    tile_size : int
        Tile side in px at ``mpp``.
    entropy_threshold : float
        Tiles below it (bits) are background.
    slide_mpp : float, optional
        µm/px of level 0 (default: the slide's own).
    max_tiles : int, optional
        Keep at most this many tissue tiles (a seeded random subset, in grid order).
    rng : numpy.random.Generator, optional
        For the subset.

    Returns
    -------
    SlideTiles
    """
    from napari_pathoseg.wsi.slide import open_slide

    with open_slide(path) as slide:
        base = slide_mpp or slide.mpp
        if not base:
            raise PathosegError(f"{path}: no µm/px; give it in the cohort CSV's mpp column or as the default (--mpp).")
        want = mpp / base
        level = 0
        for lv in range(slide.level_count):
            if slide.level_downsample(lv) <= want * 1.001:
                level = lv
        ds = slide.level_downsample(level)
        scale = ds / want  # level px -> target px
        h0, w0 = slide.shape
        th, tw = int(h0 / want) // tile_size, int(w0 / want) // tile_size
        tiles, boxes = [], []
        step0 = tile_size * want  # tile side in level-0 px
        for r0 in range(0, th, _BAND_ROWS):
            nr = min(_BAND_ROWS, th - r0)
            y_lv, h_lv = int(round(r0 * step0 / ds)), int(math.ceil(nr * step0 / ds))
            w_lv = int(math.ceil(tw * step0 / ds))
            band = slide.read_region(level=level, row=y_lv, col=0, height=h_lv, width=w_lv)
            if abs(scale - 1.0) > 1e-6:
                band = np.asarray(Image.fromarray(band).resize((tw * tile_size, nr * tile_size), Image.BILINEAR))
            band = band[: nr * tile_size, : tw * tile_size]
            t = band.reshape(nr, tile_size, tw, tile_size, 3).transpose(0, 2, 1, 3, 4).reshape(-1, tile_size, tile_size, 3)
            keep = entropies(t) >= entropy_threshold
            rr, cc = np.divmod(np.arange(nr * tw), tw)
            rr = rr + r0
            tiles.append(t[keep])
            boxes.append(np.stack([np.round(cc * step0), np.round(rr * step0),
                                   np.full(rr.shape, round(step0)), np.full(rr.shape, round(step0))], 1)[keep])
    tiles_a = np.concatenate(tiles) if tiles else np.zeros((0, tile_size, tile_size, 3), np.uint8)
    boxes_a = np.concatenate(boxes).astype(np.int64) if boxes else np.zeros((0, 4), np.int64)
    if max_tiles is not None and len(tiles_a) > max_tiles:
        pick = np.sort((rng or np.random.default_rng(0)).choice(len(tiles_a), max_tiles, replace=False))
        tiles_a, boxes_a = tiles_a[pick], boxes_a[pick]
    return SlideTiles(np.ascontiguousarray(tiles_a), boxes_a, th * tw)


@dataclass
class TilePools:
    """Tiles of a cohort pooled by slide label.

    Attributes
    ----------
    pos, neg : (N, t, t, 3) uint8
        Tiles of positive / negative slides.
    pos_slide, neg_slide : (N,) int64
        Index (into ``slides``) of each tile's slide.
    slides : list of CohortSlide
    boxes : list of (n, 4) int64
        Level-0 boxes of each slide's tiles (in pool order within the slide).
    """

    pos: np.ndarray
    neg: np.ndarray
    pos_slide: np.ndarray
    neg_slide: np.ndarray
    slides: list[CohortSlide] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return {"slides": len(self.slides), "positive_slides": sum(s.label for s in self.slides),
                "pos_tiles": len(self.pos), "neg_tiles": len(self.neg)}

    def slide_arrays(self) -> list[tuple[CohortSlide, np.ndarray]]:
        """``(slide, tiles)`` per slide (views into the pools)."""
        out = []
        for i, s in enumerate(self.slides):
            pool, idx = (self.pos, self.pos_slide) if s.label else (self.neg, self.neg_slide)
            out.append((s, pool[idx == i]))
        return out


def load_pools(cohort: Iterable[CohortSlide], *, mpp: float, tile_size: int, entropy_threshold: float,
               max_tiles_per_slide: int | None = None, seed: int = 0,
               progress: Callable[[int, int, str], Any] | None = None,
               cancel: Any = None) -> TilePools:
    """Cut every slide of a cohort into tissue tiles and pool them by label.

    Raises
    ------
    PathosegError
        A slide without tissue tiles at this scale, or a pool left empty.
    """
    from napari_pathoseg.errors import CancelledError

    slides = list(cohort)
    rng = np.random.default_rng(seed)
    parts: dict[int, list[np.ndarray]] = {0: [], 1: []}
    owners: dict[int, list[np.ndarray]] = {0: [], 1: []}
    boxes = []
    for i, s in enumerate(slides):
        if cancel is not None and cancel.is_set():
            raise CancelledError("stopped while reading the cohort's slides.")
        st = slide_tiles(s.slide, mpp=mpp, tile_size=tile_size, entropy_threshold=entropy_threshold,
                         slide_mpp=s.mpp, max_tiles=max_tiles_per_slide, rng=rng)
        if len(st.tiles) == 0:
            raise PathosegError(f"{s.slide.name} has no tissue tiles at {mpp} µm/px ({st.n_grid} tiles on its grid, all "
                                "below the entropy threshold); remove it from the cohort or check its µm/px.")
        parts[s.label].append(st.tiles)
        owners[s.label].append(np.full(len(st.tiles), i, np.int64))
        boxes.append(st.boxes)
        if progress is not None:
            progress(i + 1, len(slides), f"{s.slide.name}: {len(st.tiles)} tissue tiles")
    for lab, what in ((1, "positive"), (0, "negative")):
        if not parts[lab]:
            raise PathosegError(f"the cohort has no {what} slide with tissue; M4 needs both.")
    return TilePools(np.concatenate(parts[1]), np.concatenate(parts[0]), np.concatenate(owners[1]),
                     np.concatenate(owners[0]), slides, boxes)


# ------------------------------------------------------------------------------- augmentation

_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_RGB = torch.linalg.inv(_YIQ)
_GREY = torch.tensor([0.299, 0.587, 0.114])


def augment(batch: np.ndarray, rng: np.random.Generator, *, crop: tuple[float, float] = (0.8, 1.0),
            jitter: float = 0.2, hue: float = 0.04, grey_p: float = 0.2) -> torch.Tensor:
    """One augmented view of a uint8 (B, t, t, 3) batch -> float (B, 3, t, t) in about [-1, 1]."""
    x = torch.as_tensor(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float().div_(255.0)
    b, _, h, w = x.shape
    area = rng.uniform(crop[0], crop[1], b)
    ratio = np.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3), b))
    sx = np.minimum(np.sqrt(area * ratio), 1.0)
    sy = np.minimum(np.sqrt(area / ratio), 1.0)
    tx = rng.uniform(-1, 1, b) * (1 - sx)
    ty = rng.uniform(-1, 1, b) * (1 - sy)
    fx = np.where(rng.random(b) < 0.5, -1.0, 1.0)
    fy = np.where(rng.random(b) < 0.5, -1.0, 1.0)
    theta = np.zeros((b, 2, 3), np.float32)
    theta[:, 0, 0], theta[:, 0, 2] = sx * fx, tx
    theta[:, 1, 1], theta[:, 1, 2] = sy * fy, ty
    grid = F.affine_grid(torch.from_numpy(theta), (b, 3, h, w), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    bri = torch.from_numpy(rng.uniform(1 - jitter, 1 + jitter, b).astype(np.float32)).view(b, 1, 1, 1)
    con = torch.from_numpy(rng.uniform(1 - jitter, 1 + jitter, b).astype(np.float32)).view(b, 1, 1, 1)
    sat = torch.from_numpy(rng.uniform(1 - jitter, 1 + jitter, b).astype(np.float32))
    ang = torch.from_numpy(rng.uniform(-hue, hue, b).astype(np.float32)) * 2 * math.pi
    grey_flag = torch.from_numpy(rng.random(b) < grey_p)
    x = x * bri
    mean = (x * _GREY.view(1, 3, 1, 1)).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * con + mean
    # hue rotation and saturation in YIQ: one 3x3 matrix per tile
    c, s = torch.cos(ang), torch.sin(ang)
    m = torch.zeros(b, 3, 3)
    m[:, 0, 0] = 1.0
    m[:, 1, 1], m[:, 1, 2] = c * sat, -s * sat
    m[:, 2, 1], m[:, 2, 2] = s * sat, c * sat
    m[grey_flag] = torch.diag(torch.tensor([1.0, 0.0, 0.0]))
    full = _RGB @ m @ _YIQ  # (b, 3, 3)
    x = torch.einsum("bij,bjhw->bihw", full, x)
    return x.clamp_(0.0, 1.0).mul_(2.0).sub_(1.0)


def two_views(batch: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """M4's two independently augmented views of a batch."""
    return augment(batch, rng), augment(batch, rng)
