"""Tissue masks, tile grids and stitching."""

from __future__ import annotations

import numpy as np
import pytest

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.wsi.slide import Slide, open_slide
from napari_pathoseg.tiling import (
    choose_level,
    read_tile,
    tile_entropy,
    tile_grid,
    tissue_mask,
    write_tiles_csv,
)


def _square_slide(he_image):
    img = np.full((2048, 2048, 3), 243, np.uint8)
    img[512:1536, 512:1536] = he_image
    return Slide.from_array(img, mpp=0.5)


@pytest.mark.parametrize("method", ["otsu", "grey"])
def test_tissue_mask_finds_the_tissue(he_image, method):
    s = _square_slide(he_image)
    mask, ds = tissue_mask(s, method=method, max_size=1024)
    assert ds == pytest.approx(2.0)
    inside = mask[256:768, 256:768].mean()
    outside = np.concatenate([mask[:200].ravel(), mask[-200:].ravel()]).mean()
    assert inside > 0.6 and outside < 0.01


def test_tissue_mask_on_sample(sample_svs):
    with open_slide(sample_svs) as s:
        mask, ds = tissue_mask(s)
        assert 0.2 < mask.mean() < 0.6  # the sample is about one third tissue
        assert ds > 1


def test_blank_slide_has_no_tissue():
    s = Slide.from_array(np.full((600, 600, 3), 245, np.uint8), mpp=0.5)
    mask, _ = tissue_mask(s)
    assert not mask.any()
    assert tile_grid(s, size=128) == []


def test_entropy_orders_background_below_tissue(he_image):
    assert tile_entropy(np.full((64, 64, 3), 240, np.uint8)) == 0.0
    assert tile_entropy(he_image[:256, :256]) > 4.0


def test_tile_grid_overlap_and_mpp(he_image):
    s = _square_slide(he_image)
    tiles = tile_grid(s, level=0, size=256, overlap=0, tissue_only=False)
    assert len(tiles) == 64
    tiles = tile_grid(s, level=0, size=256, overlap=64, tissue_only=False)
    cols = sorted({t.col for t in tiles})
    assert cols[:3] == [0, 192, 384]
    assert max(t.col + t.width for t in tiles) == 2048
    # at 1.0 µm/px the level-1 (ds 2) pyramid level is read as is
    lv, scale = choose_level(s, mpp=1.0)
    assert lv == 1 and scale == 1.0
    t1 = tile_grid(s, mpp=1.0, size=256, tissue_only=True)
    assert all(t.level == 1 for t in t1)
    assert {(t.x0, t.y0) for t in t1} >= {(512, 512), (1024, 1024)}
    # at 0.75 µm/px level 0 is read and down-sampled
    t2 = tile_grid(s, mpp=0.75, size=256, tissue_only=False)
    assert t2[0].level == 0 and t2[0].read_size == 384
    assert read_tile(s, t2[0]).shape == (256, 256, 3)


def test_tile_grid_region_and_errors(he_image):
    s = _square_slide(he_image)
    tiles = tile_grid(s, level=0, size=256, tissue_only=False, region=(512, 512, 512, 512))
    assert len(tiles) == 4 and tiles[0].x0 == 512
    with pytest.raises(PathosegError, match="outside the slide"):
        tile_grid(s, level=0, size=256, tissue_only=False, region=(5000, 5000, 10, 10))
    with pytest.raises(PathosegError, match="overlap"):
        tile_grid(s, size=256, overlap=256)
    no_mpp = Slide.from_array(np.zeros((300, 300, 3), np.uint8))
    with pytest.raises(PathosegError, match="µm per pixel is unknown"):
        tile_grid(no_mpp, mpp=0.5)


def test_tiles_csv(tmp_path, he_image):
    s = _square_slide(he_image)
    tiles = tile_grid(s, level=0, size=512)
    p = write_tiles_csv(tiles, tmp_path / "g.csv")
    lines = p.read_text().splitlines()
    assert lines[0].startswith("index,level,row,col") and len(lines) == len(tiles) + 1
