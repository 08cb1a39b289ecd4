"""The whole-slide inference engine: tiling, stitching, skipping, resampling, cancel, sinks."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from napari_pathoseg.errors import CancelledError, PathosegError
from napari_pathoseg.events import CancelToken, Progress
from napari_pathoseg.inference import (
    ContextInput,
    InferenceResult,
    Instances,
    ProbabilityMap,
    TileScores,
    iter_predict,
    run_predict,
)
from napari_pathoseg.wsi.slide import Slide, open_slide

HAEM = (60, 40, 120)  # a haematoxylin-dark purple


def _gaussian(size: int = 9, sigma: float = 2.0) -> np.ndarray:
    ax = np.arange(size) - size // 2
    g = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * sigma**2))
    return (g / g.sum()).astype(np.float32)


class Haematoxylin:
    """A real predictor without training: haematoxylin and eosin densities by colour
    deconvolution (fixed stain matrix), optionally smoothed by a fixed 9x9 Gaussian
    convolution (torch, zero padding: a receptive field of 4 px, so tiles differ from the
    whole image near their edges), squashed to probabilities.

    Outputs ``prob`` (B, H, W), ``maps`` (B, 2, H, W), ``scores`` (B, 2) tile means.
    """

    tile_size = 128
    classes = ("haematoxylin", "eosin")

    def __init__(self, *, mpp: float = 0.5, smooth: bool = True) -> None:
        self.mpp = mpp
        self.name = "haematoxylin"
        self.calls = 0
        self.tiles = 0
        self.conv = None
        if smooth:
            self.conv = torch.nn.Conv2d(2, 2, 9, padding=4, groups=2, bias=False)
            with torch.no_grad():
                self.conv.weight.copy_(torch.from_numpy(np.stack([_gaussian()[None]] * 2)))

    def predict(self, batch):
        from skimage.color import rgb2hed

        assert batch.dtype == np.uint8 and batch.ndim == 4 and batch.shape[-1] == 3
        self.calls += 1
        self.tiles += len(batch)
        he = np.stack([rgb2hed(t)[..., :2] for t in batch]).astype(np.float32)  # (B, H, W, 2)
        x = torch.from_numpy(he).permute(0, 3, 1, 2)  # (B, 2, H, W)
        if self.conv is not None:
            with torch.inference_mode():
                x = self.conv(x)
        p = torch.sigmoid((x - 0.05) / 0.02).numpy()
        return {"prob": p[:, 0], "maps": p, "scores": p.mean(axis=(2, 3))}


def _label(prob, extra=None):
    from skimage.measure import label

    return label(prob > 0.5).astype(np.int32)


def _discs(shape, centres, radius):
    img = np.full(shape + (3,), 245, np.uint8)
    rr, cc = np.indices(shape)
    for y, x in centres:
        img[(rr - y) ** 2 + (cc - x) ** 2 <= radius**2] = HAEM
    return img


# ----------------------------------------------------------------------------- stitching


def test_stitched_map_equals_the_untiled_prediction(he_image):
    img = he_image[:640, :640]  # 3 x 3 tiles of 256 px (overlap 64) end exactly on its edges
    pred = Haematoxylin()
    whole = pred.predict(img[None])["maps"][0].transpose(1, 2, 0)  # (H, W, 2)
    runs = {}
    for blend, overlap in (("core", 64), ("feather", 64), ("mean", 0)):
        res = run_predict(img, pred, [ProbabilityMap("maps", blend=blend)], mpp=0.5, tile=256, overlap=overlap, batch_size=3)
        m = res.outputs["maps"]
        assert m.array.shape == (640, 640, 2) and m.coverage == 1.0
        runs[blend] = np.abs(m.array - whole)
    # each pixel from the tile that owns it, 32 px from any inner tile edge: exact
    assert runs["core"].max() < 1e-5
    # feathered averaging: the tiles' edge errors (4 px of zero padding) weigh almost nothing
    assert runs["feather"].max() < 0.02 and runs["feather"].mean() < 1e-4
    # without overlap the seams show: the test can tell a seam
    assert runs["mean"].max() > 0.2 and runs["mean"].max() > 4 * runs["feather"].max()
    seam_cols = runs["mean"][:, 252:260].max()
    assert seam_cols > 0.2 and runs["feather"][:, 180:270].max() < 0.02


def test_prefetch_and_batches_do_not_change_the_result(he_image):
    outs = []
    for prefetch, batch in ((True, 4), (False, 1)):
        res = run_predict(he_image[:600, :700], Haematoxylin(), [ProbabilityMap("prob", dtype=np.float16)], mpp=0.5,
                          tile=128, overlap=32, batch_size=batch, prefetch=prefetch)
        outs.append(np.asarray(res.outputs["prob"].array))
        assert res.tiles == res.tiles_total == 6 * 7 and res.timings["network_s"] > 0
    assert outs[0].dtype == np.float16
    np.testing.assert_array_equal(outs[0], outs[1])


# ----------------------------------------------------------------------------- tissue


def _tissue_corner(he_image):
    img = np.full((1600, 1600, 3), 244, np.uint8)
    img[:1024, :1024] = he_image
    return Slide.from_array(img, mpp=0.5)


def test_tissue_only_skips_background_tiles_inside_a_region(he_image):
    s = _tissue_corner(he_image)
    region = (768, 768, 640, 640)  # a rectangle across the tissue's corner
    pred = Haematoxylin(smooth=False)
    res = run_predict(s, pred, [ProbabilityMap("prob"), TileScores("scores")], region=region, tile=128, overlap=16)
    every = run_predict(s, Haematoxylin(smooth=False), [ProbabilityMap("prob")], region=region, tile=128, overlap=16,
                        tissue_only=False)
    assert res.plan.grid_size == every.tiles == 36
    assert 0 < res.tiles < 20 and pred.tiles == res.tiles  # skipped tiles never reach the network
    # on the tissue the two runs agree; the skipped tiles (glass) are left at the fill value
    a, b = res.outputs["prob"].array, every.outputs["prob"].array
    np.testing.assert_allclose(a[:200, :200], b[:200, :200], atol=1e-6)
    assert a[400:, 400:].max() == 0 and res.outputs["prob"].coverage < 0.6
    # a rectangle wholly on glass runs nothing
    pred = Haematoxylin()
    none = run_predict(s, pred, [ProbabilityMap("prob")], region=(1200, 1200, 400, 400), overlap=16)
    assert none.tiles == 0 and pred.calls == 0 and none.outputs["prob"].array.shape == (400, 400)
    # an image array runs every tile unless asked
    arr = run_predict(np.asarray(s.pyramid[0][1000:1300, 1000:1300]), Haematoxylin(), [ProbabilityMap("prob")], mpp=0.5, tile=128, overlap=16)
    assert arr.tiles == 9


# ----------------------------------------------------------------------------- cancel


def test_cancel_keeps_the_finished_tiles(he_image):
    token = CancelToken()
    pred = Haematoxylin()
    sinks = [ProbabilityMap("prob", blend="core"), TileScores("scores"), Instances(_label, name="objects")]
    gen = iter_predict(he_image, pred, sinks, mpp=0.5, tile=256, overlap=64, batch_size=1, cancel=token)
    events = [next(gen), next(gen), next(gen)]
    assert [e.done for e in events] == [0, 1, 2] and all(isinstance(e, Progress) for e in events)
    token.set()
    rest = list(gen)
    assert len(rest) == 1 and isinstance(rest[0], InferenceResult)
    res = rest[0]
    assert res.cancelled and res.tiles == 2 and res.tiles_total == 25 and pred.calls <= 3
    full = run_predict(he_image, Haematoxylin(), [ProbabilityMap("prob", blend="core"), Instances(_label, name="objects")],
                       mpp=0.5, tile=256, overlap=64)
    part, whole = res.outputs["prob"].array, full.outputs["prob"].array
    # tiles (0, 0) and (0, 192) own rows 0..224, columns 0..416: kept exactly, the rest empty
    np.testing.assert_array_equal(part[:224, :416], whole[:224, :416])
    assert part[224:].max() == 0 and part[:, 416:].max() == 0
    assert res.outputs["scores"].scores.shape == (2, 2)
    lab = res.outputs["objects"].labels
    assert lab[:224, :416].max() > 0 and lab[260:].max() == 0
    assert len(res.outputs["objects"].table) == len(np.unique(lab)) - 1


# ----------------------------------------------------------------------------- resolution


@pytest.mark.parametrize("model_mpp", [1.0, 0.75])
def test_resampling_puts_objects_at_their_level0_position(tmp_path, make_pyramid_tiff, model_mpp):
    # 0.25 µm/px slide with 3 levels; nuclei-like discs, some across tile seams
    centres = [(300, 300), (1000, 520), (515, 1030), (1500, 1500), (1790, 260)]
    img = _discs((2000, 2000), centres, radius=14)
    path = make_pyramid_tiff("discs.tif", img, levels=3, mpp=0.25, compression="zlib")
    with open_slide(path) as s:
        res = run_predict(s, Haematoxylin(mpp=model_mpp, smooth=False), [Instances(_label), ProbabilityMap("prob", dtype=np.uint8)],
                          tile=128, overlap=32, tissue_only=False)
    f = model_mpp / 0.25
    assert res.scale == pytest.approx(f) and res.plan.level == (2 if f == 4 else 1)
    assert res.outputs["prob"].array.dtype == np.uint8 and res.outputs["prob"].array.max() >= 250
    table = res.outputs["labels"].table
    assert len(table) == len(centres)  # none split or duplicated at seams
    found = sorted((t["y"], t["x"]) for t in table)
    for (y, x), t in zip(sorted(centres), found):
        assert abs(t[0] - y) < 1.5 and abs(t[1] - x) < 1.5, (y, x, t)
    area = np.pi * 14**2 * 0.25**2
    for t in table:
        assert t["area_um2"] == pytest.approx(area, rel=0.2) and t["confidence"] > 0.9


def test_tile_scores_heat_map_is_placed_on_the_tiles(he_image):
    img = np.full((1024, 1024, 3), 245, np.uint8)
    img[600:900, 100:400] = he_image[:300, :300]
    s = Slide.from_array(img, mpp=0.5)
    res = run_predict(s, Haematoxylin(), [TileScores("scores", classes=("haematoxylin", "eosin"))], tile=256, overlap=64)
    sc = res.outputs["scores"]
    hm = sc.heatmap
    assert hm.shape == (5, 5, 2) and sc.cell == 192 and sc.origin == (32.0, 32.0)
    assert np.isnan(hm[..., 0]).sum() == 25 - res.tiles > 0  # glass tiles did not run
    i, j = np.unravel_index(np.nanargmax(hm[..., 0]), hm.shape[:2])
    cx, cy = sc.origin[0] + (j + 0.5) * sc.cell, sc.origin[1] + (i + 0.5) * sc.cell
    assert 100 <= cx <= 400 and 600 <= cy <= 900  # the hottest cell is over the tissue
    table = sc.table
    assert len(table) == res.tiles and set(table[0]) == {"x", "y", "width", "height", "haematoxylin", "eosin"}
    best = max(table, key=lambda r: r["haematoxylin"])
    assert best["width"] == 256 and best["x"] <= 250 and best["x"] + 256 >= 250 and best["y"] <= 750 <= best["y"] + 256


class ContextDarkness:
    """Per tile: where the dark pixels of its wider context window are (mean row, col)."""

    mpp = 0.5
    tile_size = 128
    classes = ("row", "col")
    context = (ContextInput(mpp=2.0, size=64),)

    def predict(self, batch, context):
        (ctx,) = context
        assert ctx.shape == (len(batch), 64, 64, 3)
        dark = ctx.mean(axis=-1) < 150
        rr, cc = np.indices(dark.shape[1:])
        n = np.maximum(dark.sum(axis=(1, 2)), 1)
        pos = np.stack([(dark * rr).sum(axis=(1, 2)) / n, (dark * cc).sum(axis=(1, 2)) / n, dark.sum(axis=(1, 2))], 1)
        return {"scores": pos}


def test_context_input_is_centred_on_the_tile():
    img = _discs((2048, 2048), [(900, 700)], radius=20)
    s = Slide.from_array(img, mpp=0.5)
    res = run_predict(s, ContextDarkness(), [TileScores("scores")], region=(512, 768, 384, 384), tile=128, overlap=0, tissue_only=False)
    sc = res.outputs["scores"]
    assert res.tiles == 9
    for (r, c), (row, col, n) in zip(sc.tiles, sc.scores):
        if n < 50:
            continue
        # the context is 64 px at 4x the level-0 pixel, centred on the tile's centre
        x0 = 512 + c + 64 - 32 * 4
        y0 = 768 + r + 64 - 32 * 4
        assert abs(row - ((900 - y0) / 4 - 0.5)) < 0.75 and abs(col - ((700 - x0) / 4 - 0.5)) < 0.75


# ----------------------------------------------------------------------------- outputs


def test_probability_map_streams_to_a_pyramid_tiff(tmp_path, he_image):
    import tifffile

    work = tmp_path / "work"
    res = run_predict(he_image, Haematoxylin(), [ProbabilityMap("prob", dtype=np.uint8), ProbabilityMap("maps", dtype=np.float16)],
                      mpp=0.5, tile=256, overlap=64, work_dir=work)
    prob, maps = res.outputs["prob"], res.outputs["maps"]
    assert isinstance(prob.array, np.memmap) and (work / "prob.npy").is_file() and (work / "maps.npy").is_file()
    # rows are streamed out: the run held one tile row (256 px), not the whole map
    assert prob.peak_rows == 256
    p = prob.write_pyramid(tmp_path / "prob.tif", levels=3)
    with open_slide(p) as s:
        assert s.metadata.level_dimensions[0] == (1024, 1024) and s.level_count == 3
        assert s.mpp == pytest.approx(0.5, rel=1e-3)
    with tifffile.TiffFile(p) as t:
        level0 = t.pages[0].asarray()
    np.testing.assert_array_equal(level0[..., 0], prob.array)  # lossless grey = p x 255
    np.testing.assert_array_equal(level0[..., 1], prob.array)
    q = maps.write_pyramid(tmp_path / "maps.tif", colors=[(255, 0, 0), (0, 0, 255)])
    rgb = tifffile.imread(q)
    v = maps.values()
    expect = np.clip(np.rint(v @ np.array([[255, 0, 0], [0, 0, 255]], np.float32)), 0, 255)
    np.testing.assert_array_equal(rgb, expect.astype(np.uint8))
    with pytest.raises(PathosegError, match="channel 2 does not exist"):
        maps.write_pyramid(tmp_path / "x.tif", channel=2)
    token = CancelToken()
    token.set()
    with pytest.raises(CancelledError):
        prob.write_pyramid(tmp_path / "stopped.tif", cancel=token)
    assert not (tmp_path / "stopped.tif").exists()


def test_tall_region_memory_is_a_band_of_rows(he_image):
    img = np.concatenate([he_image] * 2, axis=0)[:, :200]  # 2048 x 200
    res = run_predict(img, Haematoxylin(smooth=False), [ProbabilityMap("prob"), Instances(_label)], mpp=0.5, tile=128, overlap=32)
    m = res.outputs["prob"]
    # batches of 4 span two tile rows (2 tiles a row), but each row is released before the
    # next one's tiles are added: one tile row in memory
    assert m.array.shape == (2048, 200) and m.peak_rows == 128
    assert res.outputs["labels"].labels.shape == (2048, 200) and res.outputs["labels"].labels.max() > 100


# ----------------------------------------------------------------------------- bad input


def test_bad_input(he_image):
    pred = Haematoxylin()
    with pytest.raises(PathosegError, match="µm per pixel is unknown"):
        run_predict(he_image, pred, [ProbabilityMap()])
    with pytest.raises(PathosegError, match="overlap"):
        run_predict(he_image, pred, [ProbabilityMap()], mpp=0.5, tile=128, overlap=64)
    with pytest.raises(PathosegError, match="outside the slide"):
        run_predict(he_image, pred, [ProbabilityMap()], mpp=0.5, overlap=16, region=(5000, 0, 10, 10))
    with pytest.raises(PathosegError, match="distinct names"):
        run_predict(he_image, pred, [ProbabilityMap("prob"), ProbabilityMap("prob")], mpp=0.5, overlap=16)
    with pytest.raises(PathosegError, match="RGB image array"):
        run_predict(he_image[..., 0], pred, [ProbabilityMap()], mpp=0.5)
    with pytest.raises(PathosegError, match="blend"):
        ProbabilityMap(blend="max")
    with pytest.raises(PathosegError, match="no 'logits' map"):
        run_predict(he_image[:200, :200], pred, [Instances(_label, key="logits")], mpp=0.5, overlap=16)
    assert run_predict(he_image[:200, :200], pred, [ProbabilityMap("absent")], mpp=0.5, overlap=16).outputs["absent"] is None
    ev = threading.Event()
    ev.set()
    res = run_predict(he_image, pred, [ProbabilityMap()], mpp=0.5, overlap=16, cancel=ev)
    assert res.cancelled and res.tiles == 0 and res.outputs["prob"].array.max() == 0


@pytest.mark.parametrize("fill_holes,min_area", [(True, 0), (True, 6), (False, 6), (False, 0)])
def test_band_labelling_equals_scipy_on_the_whole_map(fill_holes, min_area):
    """Bands of 1-9 rows (many seams): mask, labels, sizes, boxes and centroids == scipy on the whole array."""
    from scipy import ndimage as ndi

    from napari_pathoseg.inference.bands import clean_mask

    rng = np.random.default_rng(3)
    for trial in range(8):
        h, w = (int(v) for v in rng.integers(6, 60, 2))
        p = ndi.gaussian_filter(rng.random((h, w)), rng.uniform(0.6, 2.5))
        m = p > np.quantile(p, rng.uniform(0.3, 0.7))
        ref = ndi.binary_fill_holes(m) if fill_holes else m
        if min_area > 1:
            lab, _ = ndi.label(ref)
            keep = np.bincount(lab.ravel()) >= min_area
            keep[0] = False
            ref = keep[lab]
        ref_lab, n = ndi.label(ref)
        got = np.full((h, w), -1, np.int64)

        def on_band(r0, r1, lab, got=got):
            got[r0:r1] = lab

        out = clean_mask(lambda r0, r1, m=m: m[r0:r1], (h, w), fill_holes=fill_holes, min_area_px=min_area,
                         rows=int(rng.integers(1, 10)), on_band=on_band)
        np.testing.assert_array_equal(got, ref_lab, err_msg=f"trial {trial}")
        assert out.n == n and out.mask_pixels == int(ref.sum())
        if n:
            np.testing.assert_array_equal(out.counts, np.bincount(ref_lab.ravel())[1:])
            boxes = [[s[0].start, s[1].start, s[0].stop, s[1].stop] for s in ndi.find_objects(ref_lab)]
            np.testing.assert_array_equal(out.bboxes, boxes)
            np.testing.assert_allclose(out.centroids, ndi.center_of_mass(ref, ref_lab, range(1, n + 1)))
