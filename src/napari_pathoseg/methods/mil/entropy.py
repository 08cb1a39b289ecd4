"""Background filter of M4: the information entropy of a tile's grey-level histogram.

M4 drops background tiles whose entropy is below a threshold. Ours is the Shannon entropy, in
bits, of the 256-bin histogram of the tile's grey levels (ITU-R 601 luma), so it lies in 0..8:
0 for a flat tile, about 8 for uniform noise.

:data:`DEFAULT_ENTROPY_THRESHOLD` was picked on the shared data at the lite scale (1.0 µm/px,
64-px tiles; measured by ``python -m napari_pathoseg.methods.mil.entropy ../shared/data``, see
``docs/model_card_slidecls.md``; 64-px tiles at 1.0 µm/px from every tile of Kather 2016,
NCT-CRC and EBHI-Seg): at 3.0 bits it drops 30 of 31 glass tiles (Kather ``08_empty``, NCT
``BACK``, the plain grey glass of mosaics; the one kept ``08_empty`` tile holds tissue debris)
and keeps all 413 tissue tiles other than fat and 22 of 24 fat tiles (mostly white: 4.0 bits
would keep only 19 and drop 3 tissue tiles).
"""

from __future__ import annotations

import numpy as np

__all__ = ["DEFAULT_ENTROPY_THRESHOLD", "entropies", "tile_entropy"]

#: Tiles with a grey-level entropy (bits) below this are background (glass) and dropped.
DEFAULT_ENTROPY_THRESHOLD = 3.0

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _grey(tile: np.ndarray) -> np.ndarray:
    tile = np.asarray(tile)
    if tile.ndim == 2:
        return tile.astype(np.uint8, copy=False)
    if tile.ndim != 3 or tile.shape[-1] not in (3, 4):
        raise ValueError(f"tile_entropy needs an (H, W, 3) RGB tile, got shape {tile.shape}")
    return np.clip(tile[..., :3].astype(np.float32) @ _LUMA + 0.5, 0, 255).astype(np.uint8)


def tile_entropy(tile: np.ndarray) -> float:
    """Shannon entropy (bits, 0..8) of the grey-level histogram of one tile.

    Parameters
    ----------
    tile : (H, W, 3) uint8 ndarray
        RGB tile (an (H, W) grey tile is taken as is).

    Returns
    -------
    float

    Examples
    --------
    >>> tile_entropy(np.full((8, 8, 3), 240, np.uint8))
    0.0
    """
    counts = np.bincount(_grey(tile).ravel(), minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(max(0.0, -(p * np.log2(p)).sum()))


def entropies(batch: np.ndarray) -> np.ndarray:
    """:func:`tile_entropy` of every tile of an (N, H, W, 3) batch: float32 (N,)."""
    return np.array([tile_entropy(t) for t in np.asarray(batch)], np.float32)


def _measure(data: str, *, mpp: float = 1.0, tile: int = 64) -> dict:
    """Entropy of the first ``tile`` px of every tile of the three CRC data sets at ``mpp`` (the figures above)."""
    import csv
    from pathlib import Path

    from PIL import Image

    root = Path(data)
    sets = (("kather2016_texture_tiles", "file", 0.495, "08_empty", "07_adipose"),
            ("crc_tissue_patches_samples", "file", 0.5, "BACK", "ADI"), ("ebhi_seg_crc", "image", 1.0, None, None))
    groups: dict[str, list[float]] = {"glass": [tile_entropy(np.full((tile, tile, 3), 242, np.uint8))], "fat": [],
                                      "tissue": []}
    for folder, col, src_mpp, glass, fat in sets:
        with open(root / folder / "index.csv", newline="", encoding="utf-8") as fh:
            for r in csv.DictReader(fh):
                im = Image.open(root / folder / r[col]).convert("RGB")
                s = src_mpp / mpp
                im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BILINEAR)
                e = tile_entropy(np.asarray(im)[:tile, :tile])
                groups["glass" if r["class"] == glass else "fat" if r["class"] == fat else "tissue"].append(e)
    out = {"counts": {k: len(v) for k, v in groups.items()}, "thresholds": {}}
    for t in (2.5, 3.0, 3.5, 4.0, 4.5):
        out["thresholds"][str(t)] = {"glass_dropped": int(sum(e < t for e in groups["glass"])),
                                     "fat_kept": int(sum(e >= t for e in groups["fat"])),
                                     "tissue_kept": int(sum(e >= t for e in groups["tissue"]))}
    return out


if __name__ == "__main__":  # python -m napari_pathoseg.methods.mil.entropy SHARED_DATA
    import json
    import sys

    print(json.dumps(_measure(sys.argv[1] if len(sys.argv) > 1 else "../shared/data"), indent=1))
