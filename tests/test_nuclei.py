"""Whole-slide nucleus inference: tiling, seam stitching, outputs and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.methods.nuclei.segment import (
    Progress,
    iter_segment_nuclei,
    segment_nuclei,
    write_labels_tiff,
    write_table_csv,
)
from napari_pathoseg.wsi.slide import Slide, open_slide


class HaematoxylinModel:
    """A small real model: nucleus probability from colour deconvolution (no training).

    Pixel-local, so a tiled run must agree with a single-tile run; instances are the
    connected components of ``prob > 0.5``.
    """

    name = "haematoxylin-threshold"
    mpp = 0.5
    tile_size = 256

    def __init__(self):
        self.calls = 0

    def predict(self, batch):
        from skimage.color import rgb2hed

        self.calls += 1
        hed = np.stack([rgb2hed(t)[..., 0] for t in batch])
        prob = 1.0 / (1.0 + np.exp(-(hed - 0.06) / 0.01))
        return {"prob": prob.astype(np.float32), "normalized": batch.copy(), "extra": None}

    def to_instances(self, prob, extra=None, *, mpp=None):
        from skimage.measure import label
        from skimage.morphology import remove_small_objects

        fg = ndi.binary_opening(prob > 0.5, iterations=1)
        return label(remove_small_objects(fg, max_size=15)).astype(np.int32)


def _match_f1(a, b):
    from napari_pathoseg.metrics import object_f1

    return object_f1(a, b)


def test_tiled_equals_single_tile(sample_svs):
    model = HaematoxylinModel()
    region = (768, 1920, 700, 700)
    with open_slide(sample_svs) as s:
        tiled = segment_nuclei(s, model, region=region, tile=256, overlap=96)
        whole = segment_nuclei(s, model, region=region, tile=704, overlap=0)
    assert tiled.tiles > 4 and whole.tiles == 1
    assert tiled.labels.shape == whole.labels.shape == (700, 700)  # 0.499 ≈ 0.5 µm/px: no resampling
    n_t, n_w = tiled.n_nuclei, whole.n_nuclei
    assert n_w > 50
    # no nucleus split or duplicated at seams: the two agree object by object
    f1 = _match_f1(whole.labels, tiled.labels)
    f1 = f1["f1"] if isinstance(f1, dict) else f1
    assert f1 > 0.97, (f1, n_t, n_w)
    assert abs(n_t - n_w) <= max(2, 0.02 * n_w)
    # ids are unique and consecutive, table matches labels
    ids = np.unique(tiled.labels)
    assert ids[0] == 0 and len(ids) - 1 == n_t
    row = tiled.table[0]
    assert set(row) == {"id", "x", "y", "area_um2", "confidence"}
    # centroid in level-0 coordinates lies inside the region, on its nucleus
    lab = tiled.labels
    rr, cc = int(round(row["y"] - region[1])), int(round(row["x"] - region[0]))
    assert lab[rr, cc] == row["id"] or np.any(lab[max(rr - 2, 0) : rr + 3, max(cc - 2, 0) : cc + 3] == row["id"])


def test_resampled_and_written_on_level0_grid(tmp_path, he_image):
    # a 40x image (0.25 µm/px) is segmented at the model's 0.5 µm/px and written at 0.25
    big = np.repeat(np.repeat(he_image[:400, :400], 2, axis=0), 2, axis=1)
    s = Slide.from_array(big, mpp=0.25)
    model = HaematoxylinModel()
    res = segment_nuclei(s, model, region=(0, 0, 800, 800), tile=256, overlap=64)
    assert res.scale == pytest.approx(2.0) and res.labels.shape == (400, 400)
    p = write_labels_tiff(res, tmp_path / "l.tif")
    import tifffile

    full = tifffile.imread(p)
    assert full.shape == (800, 800) and full.dtype == np.uint32
    np.testing.assert_array_equal(full[::2, ::2], res.labels)
    c = write_table_csv(res, tmp_path / "t.csv")
    assert len(c.read_text().splitlines()) == res.n_nuclei + 1


def test_whole_slide_skips_background_and_memmaps(tmp_path, he_image):
    img = np.full((1600, 1600, 3), 244, np.uint8)
    img[:1024, :1024] = he_image
    s = Slide.from_array(img, mpp=0.5)
    model = HaematoxylinModel()
    events = list(iter_segment_nuclei(s, model, work_dir=tmp_path, batch_size=2))
    progress = [e for e in events if isinstance(e, Progress)]
    res = events[-1]
    assert progress[-1].done == progress[-1].total == res.tiles
    full_grid = 9  # 1600 px with 256-px tiles, 64 overlap: 9 x 9 = 81 without the tissue filter
    assert res.tiles < 81 - full_grid
    assert isinstance(res.labels, np.memmap)
    assert res.labels[1200:, 1200:].max() == 0


def test_cancel_keeps_the_finished_tiles(he_image):
    import threading

    s = Slide.from_array(he_image, mpp=0.5)
    ev = threading.Event()
    model = HaematoxylinModel()
    gen = iter_segment_nuclei(s, model, region=(0, 0, 1024, 1024), cancel=ev, batch_size=1, overlap=64)
    first, one = next(gen), next(gen)
    assert first.done == 0 and one.done == 1
    ev.set()
    events = list(gen)
    res = events[-1]
    assert res.cancelled and res.tiles == 1 and res.tiles_total == 25 and model.calls == 1
    # the nuclei of the one finished tile (top-left, 256 px) are kept; nothing beyond it
    assert res.n_nuclei > 5 and res.labels[:256, :256].max() > 0
    assert res.labels[256:].max() == 0 and res.labels[:, 256:].max() == 0
    assert len(np.unique(res.labels)) - 1 == res.n_nuclei
    assert res.normalized[600:, 600:].min() == 255  # no tile ran there: white
    full = segment_nuclei(s, HaematoxylinModel(), region=(0, 0, 1024, 1024), overlap=64)
    assert not full.cancelled and full.tiles == 25 and full.n_nuclei > res.n_nuclei


def test_region_over_background_runs_no_tile(he_image):
    # a drawn rectangle over glass: the tissue mask skips its tiles (it used to run them all)
    img = np.full((1600, 1600, 3), 244, np.uint8)
    img[:1024, :1024] = he_image
    s = Slide.from_array(img, mpp=0.5)
    model = HaematoxylinModel()
    res = segment_nuclei(s, model, region=(1100, 1100, 500, 500))
    assert res.tiles == 0 and model.calls == 0 and res.n_nuclei == 0 and res.labels.shape == (500, 500)
    res = segment_nuclei(s, model, region=(1100, 1100, 500, 500), tissue_only=False)
    assert res.tiles == 9 and model.calls == 3  # 3 x 3 tiles of 256 px (overlap 64), batches of 4
    # a rectangle across the tissue edge runs only the tiles that reach tissue
    res = segment_nuclei(s, HaematoxylinModel(), region=(700, 0, 900, 900))
    every = segment_nuclei(s, HaematoxylinModel(), region=(700, 0, 900, 900), tissue_only=False)
    assert 0 < res.tiles < every.tiles
    assert res.n_nuclei == every.n_nuclei  # the skipped tiles held no nucleus


def test_bad_input(he_image):
    s = Slide.from_array(he_image, mpp=0.5)
    m = HaematoxylinModel()
    with pytest.raises(PathosegError, match="outside the slide"):
        segment_nuclei(s, m, region=(5000, 5000, 100, 100))
    with pytest.raises(PathosegError, match="positive"):
        segment_nuclei(s, m, region=(0, 0, 0, 100))
    no_mpp = Slide.from_array(he_image)
    with pytest.raises(PathosegError, match="µm per pixel is unknown"):
        segment_nuclei(no_mpp, m)
    res = segment_nuclei(no_mpp, m, mpp=0.5, region=(0, 0, 300, 300))
    assert res.labels.shape == (300, 300)


def test_cli_nuclei_with_shipped_model(tmp_path, capsys, sample_svs):
    from napari_pathoseg.cli.main import main
    from napari_pathoseg.models.registry import WEIGHTS_DIR

    if not (WEIGHTS_DIR / "nuclei-lite.safetensors").exists():
        pytest.fail("the shipped nuclei-lite model is missing")
    out = tmp_path / "labels.tif"
    rc = main([
        "nuclei", str(sample_svs), "--out", str(out), "--region", "768,1920,512,512",
        "--table", str(tmp_path / "n.csv"), "--normalized", str(tmp_path / "norm.tif"),
        "--overlay", str(tmp_path / "ov.png"),
    ])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    # pinned before nuclei moved onto the inference engine: 462 nuclei, identical labels
    assert abs(d["n_nuclei"] - 462) <= 2 and d["tiles"] == 9
    import tifffile

    lab = tifffile.imread(out)
    assert lab.shape == (512, 512) and lab.dtype == np.uint32
    assert len(np.unique(lab)) - 1 == d["n_nuclei"]
    assert tifffile.imread(tmp_path / "norm.tif").shape == (512, 512, 3)
    assert not list(tmp_path.glob(".nuclei-*")), "temporary work files left behind"


def test_cli_nuclei_bad_input(tmp_path, capsys, he_image):
    from PIL import Image

    from napari_pathoseg.cli.main import main

    Image.fromarray(he_image[:300, :300]).save(tmp_path / "img.png")
    rc = main(["nuclei", str(tmp_path / "img.png"), "--out", str(tmp_path / "l.tif")])
    assert rc == 2 and "--mpp" in capsys.readouterr().err
    rc = main(["nuclei", str(tmp_path / "img.png"), "--out", str(tmp_path / "l.tif"), "--mpp", "0.5", "--region", "1,2,3"])
    assert rc == 2 and "x,y,w,h" in capsys.readouterr().err


def test_cli_nuclei_refuses_to_overwrite_its_input(tmp_path, capsys, he_image):
    from PIL import Image

    from napari_pathoseg.cli.main import main

    src = tmp_path / "img.png"
    Image.fromarray(he_image[:300, :300]).save(src)
    before = src.read_bytes()
    for flag in ("--out", "--table", "--overlay", "--normalized"):
        args = ["nuclei", str(src), "--mpp", "0.5", "--out", str(tmp_path / "l.tif")]
        args += [flag, str(src)] if flag != "--out" else []
        if flag == "--out":
            args[args.index("--out") + 1] = str(src)
        rc = main(args)
        err = capsys.readouterr().err
        assert rc == 2 and "also an input" in err and len(err.strip().splitlines()) == 1, (flag, err)
    assert src.read_bytes() == before
    rc = main(["nuclei", str(src), "--mpp", "0.5", "--out", str(tmp_path / "l.tif"), "--table", str(tmp_path / "l.tif")])
    assert rc == 2 and "same file" in capsys.readouterr().err


def test_cli_nuclei_ctrl_c_saves_the_finished_tiles(tmp_path, capsys, monkeypatch, sample_svs):
    import tifffile

    from napari_pathoseg.cli import _driver
    from napari_pathoseg.cli.main import main
    from napari_pathoseg.events import CancelToken

    class CtrlCAfterOneBatch(CancelToken):
        """Ctrl-C pressed while the first batch runs: the second check sees it set."""

        checks = 0

        def is_set(self) -> bool:
            type(self).checks += 1
            return type(self).checks > 1 or super().is_set()

    monkeypatch.setattr(_driver, "CancelToken", CtrlCAfterOneBatch)
    out, table = tmp_path / "l.tif", tmp_path / "n.csv"
    rc = main(["nuclei", str(sample_svs), "--out", str(out), "--table", str(table), "--region", "768,1920,512,512", "--batch", "1"])
    cap = capsys.readouterr()
    assert rc == 130 and cap.out == ""
    assert "stopped after 1 of 9 tiles" in cap.err and str(out) in cap.err and len(cap.err.strip().splitlines()) == 1
    lab = tifffile.imread(out)
    assert lab.shape == (512, 512) and lab[:256, :256].max() > 0 and lab[300:].max() == 0 and lab[:, 300:].max() == 0
    assert len(table.read_text().splitlines()) - 1 == len(np.unique(lab)) - 1
    assert not list(tmp_path.glob(".nuclei-*"))
