"""M4 slide classification: ``pathoseg mil`` on slides and images, bad input, the batch task.

Plumbing, not accuracy: an untrained lite checkpoint (``release.build_untrained``) whose tile
probabilities are recomputed here from the slide's own pixels.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from napari_pathoseg.cli.main import main


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    from napari_pathoseg.methods.mil.release import build_untrained

    path = tmp_path_factory.mktemp("mil") / "mil-untrained.safetensors"
    build_untrained(path, preset="lite", seed=0)
    return path


@pytest.fixture(scope="module")
def model(untrained):
    from napari_pathoseg.models.registry import load_model

    return load_model(untrained, task="slide", device="cpu")


@pytest.fixture
def tissue_slide(he_image, make_pyramid_tiff):
    """512 x 768 slide at 1 µm/px (the lite scale: tiles are exact level-0 crops): H&E left, glass right."""
    img = np.full((512, 768, 3), 245, np.uint8)
    img[:, :512] = he_image[256:768, 256:768]
    return make_pyramid_tiff("tissue.tif", img, levels=2, tile=256, mpp=1.0), img


def test_cli_slide_call_tiles_and_heatmap(tissue_slide, untrained, model, tmp_path, capsys, one_torch_thread):
    from napari_pathoseg.methods.mil.classify import read_heatmap_tiff
    from napari_pathoseg.methods.mil.pooling import pool
    from napari_pathoseg.wsi.slide import open_slide

    path, _ = tissue_slide
    out, heat = tmp_path / "out.json", tmp_path / "heat.tif"
    assert main(["mil", str(path), "--json", str(out), "--heatmap", str(heat), "--model", str(untrained)]) == 0
    printed = json.loads(capsys.readouterr().out)
    doc = json.loads(out.read_text())
    assert "tiles" not in printed and printed["probability"] == doc["probability"]
    tiles = doc["tiles"]
    t = model.tile_size
    assert doc["model"] == "mil-untrained" and doc["mpp"] == 1.0 and doc["pooling"] == model.pooling
    assert 50 <= len(tiles) <= 64 and doc["n_tiles"] == len(tiles)  # the 8 x 8 tissue tiles (some dropped)
    assert all(tl["x"] + tl["w"] <= 512 + t and tl["w"] == tl["h"] == t for tl in tiles)  # none over the glass
    assert all(tl["x"] % t == 0 and tl["y"] % t == 0 for tl in tiles)  # non-overlapping grid
    # every tile's probability is the network's on that crop of the slide
    with open_slide(path) as s:
        crops = np.stack([s.read_region(level=0, row=tl["y"], col=tl["x"], height=t, width=t) for tl in tiles])
    probs = model.predict_tiles(crops)
    np.testing.assert_allclose([tl["probability"] for tl in tiles], probs, atol=1e-4)
    assert doc["probability"] == pytest.approx(pool(probs, method=model.pooling, k=model.pooling_k), abs=1e-4)
    assert doc["label"] == ("positive" if doc["probability"] >= model.threshold else "negative")
    # the heat map: one pixel per tile, NaN off tissue, its µm/px in the resolution tags
    hm, meta = read_heatmap_tiff(heat)
    assert hm.dtype == np.float32 and hm.shape == (512 // t, 768 // t)
    for tl in tiles:
        assert hm[tl["y"] // t, tl["x"] // t] == pytest.approx(tl["probability"], abs=1e-4)
    assert np.isnan(hm[:, 512 // t:]).all() and np.isfinite(hm).sum() == len(tiles)
    assert meta["level0_pixels_per_pixel"] == pytest.approx(t) and meta["origin_xy"] == [0.0, 0.0]
    # --tissue-mask: fewer tiles read (none over the glass), the same probabilities where both ran
    masked = tmp_path / "masked.json"
    assert main(["mil", str(path), "--json", str(masked), "--model", str(untrained), "--tissue-mask"]) == 0
    mdoc = json.loads(masked.read_text())
    assert mdoc["tiles_run"] < doc["tiles_run"] == (512 // t) * (768 // t)
    by_xy = {(tl["x"], tl["y"]): tl["probability"] for tl in tiles}
    assert mdoc["tiles"] and all(by_xy[(tl["x"], tl["y"])] == tl["probability"] for tl in mdoc["tiles"])
    import tifffile

    with tifffile.TiffFile(heat) as tif:
        num, den = tif.pages[0].tags["XResolution"].value
    assert 1e4 / (num / den) == pytest.approx(t * 1.0, rel=1e-3)  # µm per heat-map pixel


def test_cli_plain_image_needs_mpp_and_tiles_the_image(he_image, untrained, tmp_path, capsys, one_torch_thread):
    png = tmp_path / "crop.png"
    Image.fromarray(he_image[:200, :300]).save(png)
    from napari_pathoseg.methods.mil.classify import is_plain
    from napari_pathoseg.wsi.slide import open_slide

    wide = tmp_path / "wide.png"
    Image.fromarray(np.tile(he_image[:200], (1, 2, 1))).save(wide)  # 200 x 2048: the reader adds coarser levels
    with open_slide(wide) as s:
        assert s.level_count > 1 and is_plain(s)
    out = tmp_path / "o.json"
    assert main(["mil", str(png), "--json", str(out), "--model", str(untrained)]) == 2
    err = capsys.readouterr().err
    assert "µm per pixel is unknown" in err and "--mpp" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert main(["mil", str(png), "--json", str(out), "--model", str(untrained), "--mpp", "1.0"]) == 0
    doc = json.loads(out.read_text())
    assert doc["tiles_run"] == 5 * 4  # every tile of the image (no tissue mask), edges mirrored
    assert all(tl["x"] + tl["w"] <= 300 and tl["y"] + tl["h"] <= 200 for tl in doc["tiles"])  # clipped to the image
    assert doc["n_tiles"] + doc["n_dropped_entropy"] == 20


def test_cli_bad_input_is_one_line(tissue_slide, make_pyramid_tiff, untrained, tmp_path, capsys):
    path, _ = tissue_slide
    blank = make_pyramid_tiff("blank.tif", np.full((512, 512, 3), 243, np.uint8), levels=2, tile=256, mpp=1.0)
    cases = [
        (["mil", str(blank), "--json", str(tmp_path / "b.json"), "--model", str(untrained)], "no tissue to classify"),
        (["mil", str(path), "--json", str(path), "--model", str(untrained)], "--json"),
        (["mil", str(path), "--json", str(tmp_path / "x.json"), "--heatmap", str(tmp_path / "x.json"),
          "--model", str(untrained)], "same file"),
        (["mil", str(path), "--json", str(tmp_path / "n.json"), "--model", "nuclei-lite"], "is a nuclei model"),
        (["mil", str(path), "--json", str(tmp_path / "m.json"), "--model", str(untrained), "--mpp", "-1"], "--mpp"),
    ]
    for argv, match in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert path.stat().st_size > 0 and not (tmp_path / "b.json").exists()


def test_entropy_filter_and_stop_keep_finished_tiles(he_image, model, one_torch_thread):
    from napari_pathoseg.events import CancelToken, Progress
    from napari_pathoseg.methods.mil.classify import ClassifyResult, iter_classify
    from napari_pathoseg.methods.mil.predictor import SlideTilePredictor

    t = model.tile_size
    batch = np.stack([np.full((t, t, 3), 240, np.uint8), he_image[:t, :t]])
    scores = SlideTilePredictor(model).predict(batch)["scores"]
    assert np.isnan(scores[0, 0]) and scores[0, 1] < model.entropy_threshold <= scores[1, 1]
    assert scores[1, 0] == pytest.approx(float(model.predict_tiles(batch[1:])[0]), abs=1e-5)
    token = CancelToken()
    result = None
    for ev in iter_classify(he_image[:512, :512], model=model, mpp=1.0, batch_size=4, cancel=token):
        if isinstance(ev, Progress) and ev.done >= 4:
            token.set()
        result = ev
    assert isinstance(result, ClassifyResult) and result.cancelled
    assert result.tiles_run == 4 and result.tiles_total == 64 and 1 <= result.n_tiles <= 4
    assert np.isfinite(result.heatmap).sum() == result.n_tiles


def test_batch_task_mil_on_two_slides(tmp_path, he_image, make_pyramid_tiff, untrained, one_torch_thread):
    from napari_pathoseg.cohort.manifest import read_manifest
    from napari_pathoseg.cohort.results import slide_results
    from napari_pathoseg.cohort.runner import run_cohort
    from napari_pathoseg.cohort.summary import read_summary

    folder = tmp_path / "slides"
    folder.mkdir()
    for i in range(2):
        make_pyramid_tiff(folder / f"s{i}.tif", he_image[i * 256:(i + 1) * 256, 256:640], levels=1, tile=128, mpp=1.0)
    slides = read_manifest(folder)
    run_cohort(slides, task="mil", out_dir=tmp_path / "o", model=str(untrained), workers=1, processes=False,
               dashboard=None)
    rows = read_summary(tmp_path / "o" / "summary.csv")
    assert [r["status"] for r in rows] == ["ok", "ok"], [r.get("error") for r in rows]
    for r in rows:
        doc = json.loads((tmp_path / "o" / r["slide"].split("/")[-1].rsplit(".", 1)[0] / "mil.json").read_text())
        assert float(r["probability"]) == pytest.approx(doc["probability"], abs=1e-4)
        assert r["call"] == doc["label"] and int(r["n_tiles"]) == len(doc["tiles"]) == doc["n_tiles"]
        assert float(r["top_tile_probability"]) == pytest.approx(max(tl["probability"] for tl in doc["tiles"]), abs=1e-4)
    opened = slide_results(tmp_path / "o", "s0")
    (layer,) = opened.layers
    assert layer.kind == "image" and layer.downsample == pytest.approx(64.0) and layer.levels[0].shape == (4, 6)


def _held_out_kather_mosaics(shared_data, out):
    """A positive and a negative 640² mosaic from the Kather tiles the shipped model never saw.

    ``scripts/make_mil_cohort.py`` splits the source tiles (seed 0, 30 % held out) before any
    training; the same split is rebuilt here and only its test copy is tiled.
    """
    import importlib.util
    from pathlib import Path

    from napari_pathoseg.wsi.mosaic import make_mosaic

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_mil_cohort.py"
    spec = importlib.util.spec_from_file_location("make_mil_cohort", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.split_sources(shared_data, out, test_share=0.3, seed=0)
    src = out / "sources" / "test" / "kather2016_texture_tiles"
    res = {label: make_mosaic(src, out / f"{label}.tif", size=640, mpp=1.0, seed=seed, tumour_fraction=share,
                              cell_um=64.0)
           for label, share, seed in (("positive", 0.3, 7), ("negative", 0.0, 8))}
    assert res["positive"].slide_label == "tumour" and res["negative"].slide_label == "normal"
    return out / "positive.tif", out / "negative.tif"


@pytest.mark.slow
def test_shipped_model_on_held_out_mosaic_slides(shared_data, tmp_path, capsys, one_torch_thread):
    """The shipped slidecls-crc-lite through ``pathoseg mil`` on held-out mosaics: calls and where the tumour is."""
    import csv

    pos, neg = _held_out_kather_mosaics(shared_data, tmp_path)
    docs = {}
    for slide in (pos, neg):
        out = tmp_path / f"{slide.stem}.json"
        assert main(["mil", str(slide), "--json", str(out), "--model", "slidecls-crc-lite"]) == 0
        docs[slide.stem] = json.loads(out.read_text())
    assert docs["positive"]["label"] == "positive" and docs["negative"]["label"] == "negative"
    assert docs["positive"]["probability"] > docs["negative"]["probability"] + 0.2
    # the strongest tiles of the positive slide lie on its hidden tumour cells
    with open(pos.with_name("positive.cells.csv"), newline="") as fh:
        truth = {(int(r["x"]), int(r["y"])): int(r["tumour"]) for r in csv.DictReader(fh)}
    top = sorted(docs["positive"]["tiles"], key=lambda t: -t["probability"])[:5]
    assert sum(truth[(t["x"], t["y"])] for t in top) >= 4


def test_cli_ctrl_c_saves_the_call_of_the_finished_tiles(tissue_slide, untrained, tmp_path, monkeypatch, capsys,
                                                         one_torch_thread):
    from napari_pathoseg.cli import _driver
    from napari_pathoseg.events import CancelToken

    class CtrlCAfterTwoBatches(CancelToken):  # as if Ctrl-C came while the third batch was read
        checks = 0

        def is_set(self) -> bool:
            type(self).checks += 1
            return type(self).checks > 2 or super().is_set()

    monkeypatch.setattr(_driver, "CancelToken", CtrlCAfterTwoBatches)
    path, _ = tissue_slide
    out, heat = tmp_path / "partial.json", tmp_path / "partial.tif"
    argv = ["mil", str(path), "--json", str(out), "--heatmap", str(heat), "--model", str(untrained), "--batch", "16"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "stopped after 32 of 96 tiles" in err and str(out) in err and len(err.strip().splitlines()) == 1
    doc = json.loads(out.read_text())
    assert doc["cancelled"] is True and doc["tiles_run"] == 32 and heat.is_file()
    assert doc["probability"] is not None and len(doc["tiles"]) == doc["n_tiles"] <= 32
