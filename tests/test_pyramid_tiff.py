"""The streaming pyramidal-TIFF writer shared by synthetic slides and stain normalisation."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from napari_pathoseg.events import CancelToken

from napari_pathoseg.errors import CancelledError, PathosegError
from napari_pathoseg.wsi.pyramid_tiff import level_shapes, write_tiled_pyramid
from napari_pathoseg.wsi.slide import open_slide
from napari_pathoseg.wsi.synth import write_pyramid_tiff


def _image(rows: int, cols: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (rows, cols, 3), dtype=np.uint8)
    return img


def test_level_shapes_round_up_and_stop():
    assert level_shapes((1000, 3001), coarsest=1024) == [(1000, 3001), (500, 1501), (250, 751)]
    assert level_shapes((5, 3), n_levels=5) == [(5, 3), (3, 2), (2, 1), (1, 1)]


def test_derived_levels_are_2x_means_and_lossless_with_zlib(tmp_path):
    img = _image(300, 200)
    path = tmp_path / "p.tif"
    shapes = write_tiled_pyramid(path, lambda k, r, c, h, w: img[r : r + h, c : c + w], shape=(300, 200), n_levels=3, tile=64, compression="zlib", mpp=0.25)
    assert shapes == [(300, 200), (150, 100), (75, 50)]
    s = open_slide(path)
    assert s.metadata.level_dimensions == ((200, 300), (100, 150), (50, 75))
    assert s.metadata.mpp_x == pytest.approx(0.25)
    np.testing.assert_array_equal(s.read_region(level=0, row=0, col=0, height=300, width=200), img)
    lvl1 = s.read_region(level=1, row=0, col=0, height=150, width=100).astype(int)
    want = img.astype(int).reshape(150, 2, 100, 2, 3).sum(axis=(1, 3))
    np.testing.assert_array_equal(lvl1, (want + 2) // 4)
    # odd sizes: the last row/column is replicated before averaging
    lvl2 = s.read_region(level=2, row=0, col=0, height=75, width=50)
    assert lvl2.shape == (75, 50, 3)
    assert not list(tmp_path.glob(".*")), "scratch files or temp outputs were left behind"


def test_source_levels_are_asked_for_and_checked(tmp_path):
    asked = set()

    def read(k, r, c, h, w):
        asked.add(k)
        return np.full((h, w, 3), 40 * (k + 1), np.uint8)

    path = tmp_path / "s.tif"
    write_tiled_pyramid(path, read, shape=(130, 70), derive_levels=False, n_levels=3, tile=32, compression=None)
    assert asked == {0, 1, 2}
    s = open_slide(path)
    assert int(s.read_region(level=2, row=5, col=5, height=1, width=1)[0, 0, 0]) == 120

    with pytest.raises(PathosegError, match="expected"):
        write_tiled_pyramid(tmp_path / "bad.tif", lambda k, r, c, h, w: np.zeros((h, w), np.uint8), shape=(64, 64), tile=32)
    assert not (tmp_path / "bad.tif").exists()


def test_cancel_and_bad_options_leave_nothing(tmp_path):
    img = _image(256, 256)
    stop = threading.Event()
    seen = []

    def progress(p):
        seen.append(p.done)
        if p.done == 3:
            stop.set()

    with pytest.raises(CancelledError, match="cancelled"):
        write_tiled_pyramid(tmp_path / "c.tif", lambda k, r, c, h, w: img[r : r + h, c : c + w], shape=(256, 256), tile=64, progress=progress, cancel=stop)
    assert seen == [1, 2, 3]
    assert list(tmp_path.iterdir()) == []
    token = CancelToken()  # the shared contract: anything with is_set()
    token.set()
    with pytest.raises(CancelledError, match="cancelled"):
        write_tiled_pyramid(tmp_path / "c.tif", lambda k, r, c, h, w: img[r : r + h, c : c + w], shape=(256, 256), tile=64, cancel=token)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PathosegError, match="multiple of 16"):
        write_tiled_pyramid(tmp_path / "t.tif", lambda *a: None, shape=(64, 64), tile=40)
    with pytest.raises(PathosegError, match="compression"):
        write_tiled_pyramid(tmp_path / "t.tif", lambda *a: None, shape=(64, 64), compression="lzw9")


def test_write_pyramid_tiff_keeps_its_contract(tmp_path):
    img = _image(600, 700)
    p = write_pyramid_tiff(tmp_path / "t.tif", img, levels=2, tile=256, compression="zlib")
    s = open_slide(p)
    assert s.metadata.level_dimensions == ((700, 600), (350, 300))
    np.testing.assert_array_equal(s.read_region(level=0, row=100, col=200, height=50, width=60), img[100:150, 200:260])
    with pytest.raises(PathosegError):
        write_pyramid_tiff(tmp_path / "x.tif", img[..., 0])


def test_leftovers_of_a_killed_write_are_removed_and_scratch_is_named_for_it(tmp_path):
    """A killed run leaves the temporary output and the scratch files of derived levels; the
    next write of the same output removes them, and scratch files live only while writing."""
    import os
    import time

    from napari_pathoseg._atomic import OutputError

    img = _image(256, 256)
    path = tmp_path / "k.tif"
    old = time.time() - 3600
    leftovers = [tmp_path / ".k.tif.abc123.tmp-pathoseg", tmp_path / ".k.tif.level1.def456.tmp-pathoseg"]
    for p in leftovers:
        p.write_bytes(b"half written")
        os.utime(p, (old, old))
    seen_scratch = []

    def read(k, r, c, h, w):
        seen_scratch.append(sorted(p.name for p in tmp_path.glob(".k.tif.level*")))
        return img[r : r + h, c : c + w]

    write_tiled_pyramid(path, read, shape=(256, 256), n_levels=3, tile=64, compression="zlib")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.tif"]
    # while level 0 is written, the scratch file of level 1 (and no leftover) sits beside the output
    (name,) = seen_scratch[0]
    assert name.startswith(".k.tif.level1.") and name.endswith(".tmp-pathoseg") and "def456" not in name
    with pytest.raises(OutputError, match="does not exist"):
        write_tiled_pyramid(tmp_path / "no" / "k.tif", read, shape=(64, 64), tile=64)
