"""Mosaic slides from real labelled tiles: geometry, pixels, ground truth, determinism, safety, CLI."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_pathoseg._atomic import OutputError
from napari_pathoseg.errors import CancelledError, PathosegError
from napari_pathoseg.events import CancelToken, Progress
from napari_pathoseg.wsi.mosaic import MosaicResult, iter_make_mosaic, make_mosaic, mosaic_paths
from napari_pathoseg.wsi.mosaic_render import resample_tile
from napari_pathoseg.wsi.mosaic_sources import MosaicDataError, load_mosaic_dataset

KATHER = "kather2016_texture_tiles"
EBHI = "ebhi_seg_crc"
WSSS = "wsss4luad_tissue_masks"


def _cells(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _level(path: Path, k: int) -> np.ndarray:
    with tifffile.TiffFile(path) as t:
        return t.pages[k].asarray()


@pytest.fixture(scope="module")
def kather_mosaic(shared_data, tmp_path_factory) -> MosaicResult:
    """A 1200 x 1000 tissue-class mosaic, lossless so pixels can be compared exactly."""
    out = tmp_path_factory.mktemp("kather") / "k.tif"
    return make_mosaic(shared_data / KATHER, out, size=(1000, 1200), mpp=0.5, seed=3, tumour_fraction=0.3, compression="zlib")


@pytest.fixture(scope="module")
def ebhi_mosaic(shared_data, tmp_path_factory) -> MosaicResult:
    """A 1040² lesion-mask mosaic (two levels) (EBHI-Seg, ~1 µm/px sources upsampled to 0.5)."""
    out = tmp_path_factory.mktemp("ebhi") / "e.tif"
    return make_mosaic(shared_data / EBHI, out, kind="lesion-masks", size=1040, mpp=0.5, seed=1, tumour_fraction=0.4, compression="zlib")


def test_slide_opens_at_mpp_with_levels_and_labels_on_the_same_grid(kather_mosaic):
    from napari_pathoseg.wsi.pyramid_tiff import level_shapes
    from napari_pathoseg.wsi.slide import open_slide

    res = kather_mosaic
    with open_slide(res.slide) as s:
        assert s.mpp == pytest.approx(0.5, rel=1e-6)
        assert s.metadata.level_dimensions == ((1200, 1000), (600, 500))
    shapes = level_shapes((1000, 1200))
    with tifffile.TiffFile(res.labels) as t:
        assert [p.shape for p in t.pages] == shapes
        assert all(p.dtype == np.uint8 for p in t.pages)
        assert t.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        x_res = t.pages[0].tags["XResolution"].value
        assert x_res[0] / x_res[1] == pytest.approx(1e4 / 0.5)
    # every file of the mosaic is there, and nothing else (no temporary files left)
    assert sorted(p.name for p in res.slide.parent.iterdir()) == sorted(p.name for p in mosaic_paths(res.slide).values())


def test_cell_pixels_equal_the_resampled_source_tile(kather_mosaic, shared_data):
    res = kather_mosaic
    slide = _level(res.slide, 0)
    folder = shared_data / KATHER
    full = [r for r in _cells(res.cells) if r["source"] and float(r["tissue_fraction"]) == 1.0]
    assert len(full) >= 5
    scale = 0.495 / 0.5
    for row in full[:5]:
        x, y, w, h = (int(row[k]) for k in ("x", "y", "w", "h"))
        src = np.asarray(Image.open(folder / row["source"]).convert("RGB"))
        expected = resample_tile(src, scale, order=1)
        cy, cx = int(row["crop_y"]), int(row["crop_x"])
        np.testing.assert_array_equal(slide[y : y + h, x : x + w], expected[cy : cy + h, cx : cx + w])
    # the resampling agrees with skimage's rescale (same size rule; bilinear, anti-aliased)
    from skimage.transform import rescale

    ref = rescale(src.astype(float), scale, order=1, channel_axis=-1, anti_aliasing=True, preserve_range=True)
    assert ref.shape == expected.shape
    assert np.abs(ref - expected)[2:-2, 2:-2].mean() < 1.0


def test_cells_csv_matches_labels_and_sidecar(kather_mosaic):
    res = kather_mosaic
    labels = _level(res.labels, 0)
    side = json.loads(res.sidecar.read_text())
    ids = {name: int(i) for i, name in side["label_ids"].items()}
    rows = _cells(res.cells)
    assert len(rows) == res.n_cells == side["grid"][0] * side["grid"][1]
    counted: dict[str, int] = {}
    for row in rows:
        x, y, w, h = (int(row[k]) for k in ("x", "y", "w", "h"))
        box = labels[y : y + h, x : x + w]
        counted[row["class"]] = counted.get(row["class"], 0) + 1
        if row["class"] == "background":
            assert not box.any()
            continue
        # a tissue cell is its class id inside the outline, background outside it
        assert set(np.unique(box)) <= {0, ids[row["class"]]}
        assert (box > 0).mean() == pytest.approx(float(row["tissue_fraction"]), abs=1e-4)
        assert row["tumour"] == ("1" if row["class"] == "01_tumor" else "0")
    assert counted == side["cells_by_class"] == res.cells_by_class
    assert side["label_pixels"] == {side["label_ids"][str(i)]: int(n) for i, n in enumerate(np.bincount(labels.ravel())) if n}
    # every used source is listed with its licence
    assert side["dataset"]["licence"] == "CC BY 4.0" and side["dataset"]["name"] == "kather2016"
    assert {s["file"] for s in side["sources"]} >= {r["source"] for r in rows if r["source"]}
    # proportions: 30 % of tissue cells are tumour, gathered in regions
    n_tissue = sum(v for k, v in counted.items() if k != "background")
    assert counted["01_tumor"] == round(0.3 * n_tissue)


def test_tissue_mask_finds_the_outline(kather_mosaic):
    from napari_pathoseg.tiling import tissue_mask
    from napari_pathoseg.wsi.slide import open_slide

    labels = _level(kather_mosaic.labels, 1) > 0
    with open_slide(kather_mosaic.slide) as s:
        mask, ds = tissue_mask(s, max_size=600)
    assert ds == 2.0 and mask.shape == labels.shape
    iou = (mask & labels).sum() / (mask | labels).sum()
    assert iou > 0.7, iou
    # glass stays at the edge
    assert not labels[:5].any() and not labels[-5:].any()


def test_lesion_labels_align_with_the_source_masks(ebhi_mosaic, shared_data):
    res = ebhi_mosaic
    folder = shared_data / EBHI
    slide, labels = _level(res.slide, 0), _level(res.labels, 0)
    side = json.loads(res.sidecar.read_text())
    assert side["label_ids"]["1"] == "other_tissue" and side["label_ids"]["7"] == "adenocarcinoma"
    scale = 1.0 / 0.5
    tissue = [r for r in _cells(res.cells) if r["source"] and float(r["tissue_fraction"]) > 0.2]
    assert any(r["class"] == "adenocarcinoma" for r in tissue)
    for row in tissue:
        x, y, w, h = (int(row[k]) for k in ("x", "y", "w", "h"))
        cy, cx = int(row["crop_y"]), int(row["crop_x"])
        mask = np.asarray(Image.open(folder / row["source"].replace("images/", "masks/")))
        image = np.asarray(Image.open(folder / row["source"]).convert("RGB"))
        class_id = int([i for i, n in side["label_ids"].items() if n == row["class"]][0])
        # independently of the resampler: each slide pixel's centre mapped back into the source
        rr = np.clip(((np.arange(h) + cy + 0.5) / scale).astype(int), 0, mask.shape[0] - 1)
        cc = np.clip(((np.arange(w) + cx + 0.5) / scale).astype(int), 0, mask.shape[1] - 1)
        box = labels[y : y + h, x : x + w]
        inside = box > 0  # within the tissue outline
        expected = np.where(mask[rr][:, cc] > 0, class_id, 1)
        assert (box == expected)[inside].all()
        # the RGB of the same cell shows the same place of the source image
        def diff(shift: int) -> float:
            r2, c2 = np.clip(rr + shift, 0, image.shape[0] - 1), np.clip(cc + shift, 0, image.shape[1] - 1)
            return float(np.abs(slide[y : y + h, x : x + w].astype(int) - image[r2][:, c2].astype(int))[inside].mean())

        assert diff(0) < 12.0 and diff(0) < 0.6 * diff(1), (diff(0), diff(1))
    # coarser label levels take the label at each pixel's centre
    lv1 = _level(res.labels, 1)
    np.testing.assert_array_equal(lv1, labels[1::2, 1::2])
    assert res.slide_label == "tumour"
    assert res.tumour_area_um2 == pytest.approx(res.label_pixels["adenocarcinoma"] * 0.25)


def test_same_seed_same_bytes_other_seed_differs(shared_data, tmp_path):
    def make(sub: str, seed: int) -> dict[str, Path]:
        (tmp_path / sub).mkdir()
        make_mosaic(shared_data / KATHER, tmp_path / sub / "m.tif", size=512, mpp=0.5, seed=seed, tumour_fraction=0.2)
        return mosaic_paths(tmp_path / sub / "m.tif")

    a, b, c = make("a", 7), make("b", 7), make("c", 8)
    for role in a:
        assert a[role].read_bytes() == b[role].read_bytes(), role
    assert a["slide"].read_bytes() != c["slide"].read_bytes()
    assert a["cells"].read_bytes() != c["cells"].read_bytes()


def test_slide_label_rule(shared_data, tmp_path):
    normal = make_mosaic(shared_data / KATHER, tmp_path / "n.tif", size=512, mpp=0.5, seed=2, tumour_fraction=0.0)
    assert normal.slide_label == "normal" and normal.tumour_area_um2 == 0
    assert "01_tumor" not in normal.cells_by_class and "01_tumor" not in normal.label_pixels
    side = json.loads((tmp_path / "n.mosaic.json").read_text())
    assert side["slide_label"] == "normal" and ">= 10000 µm²" in side["slide_label_rule"]
    # the same tumour slide is 'tumour' or 'normal' by the recorded area threshold
    t = make_mosaic(shared_data / KATHER, tmp_path / "t.tif", size=512, mpp=0.5, seed=2, tumour_fraction=0.5)
    area = t.label_pixels["01_tumor"] * 0.25
    assert t.slide_label == "tumour" and t.tumour_area_um2 == pytest.approx(area)
    high = make_mosaic(shared_data / KATHER, tmp_path / "h.tif", size=512, mpp=0.5, seed=2, tumour_fraction=0.5, min_tumour_um2=area + 1)
    assert high.slide_label == "normal" and high.tumour_area_um2 == pytest.approx(area)


def test_refuses_existing_outputs_and_the_data_folder(kather_mosaic, shared_data, tmp_path):
    before = kather_mosaic.slide.read_bytes()
    with pytest.raises(OutputError, match="already exists.*--force"):
        make_mosaic(shared_data / KATHER, kather_mosaic.slide, size=512, seed=9)
    assert kather_mosaic.slide.read_bytes() == before
    # a sidecar alone is enough to refuse
    (tmp_path / "s.mosaic.json").write_text("{}")
    with pytest.raises(OutputError):
        make_mosaic(shared_data / KATHER, tmp_path / "s.tif", size=512)
    assert not (tmp_path / "s.tif").exists()
    res = make_mosaic(shared_data / KATHER, tmp_path / "s.tif", size=512, overwrite=True)
    assert json.loads(res.sidecar.read_text())["seed"] == 0
    with pytest.raises(MosaicDataError, match="inside the data set"):
        make_mosaic(shared_data / KATHER, shared_data / KATHER / "m.tif", size=512)
    assert not (shared_data / KATHER / "m.tif").exists()


def test_cancel_leaves_nothing(shared_data, tmp_path):
    token = CancelToken()
    events = iter_make_mosaic(shared_data / KATHER, tmp_path / "c.tif", size=1024, mpp=0.5, cancel=token)
    seen = []
    with pytest.raises(CancelledError):
        for ev in events:
            seen.append(ev)
            token.set()
    assert seen and isinstance(seen[0], Progress)
    assert list(tmp_path.iterdir()) == []


def test_wsss_multiclass_masks_keep_their_classes(shared_data, tmp_path):
    res = make_mosaic(shared_data / WSSS, tmp_path / "w.tif", size=768, mpp=1.0, seed=0, tumour_fraction=0.5, compression="zlib")
    labels = _level(res.labels, 0)
    assert set(np.unique(labels)) <= {0, 2, 3, 4}  # WSSS masks label every tissue pixel: no 'other tissue'
    assert (labels == 2).any() and (labels == 3).any()
    side = json.loads(res.sidecar.read_text())
    assert side["dataset"]["non_commercial"] is True and "do not redistribute" in side["licence_note"]
    assert side["tumour_label_ids"] == [2]


def test_data_set_errors(shared_data, tmp_path):
    with pytest.raises(MosaicDataError, match="lesion-masks"):
        load_mosaic_dataset(shared_data / EBHI, kind="tissue-classes")
    with pytest.raises(MosaicDataError, match=KATHER):
        load_mosaic_dataset(shared_data, kind="tissue-classes")
    ds = load_mosaic_dataset(shared_data / KATHER)
    assert ds.mpp == 0.495 and ds.background_classes == ("08_empty",) and ds.tumour_classes == ("01_tumor",)
    with pytest.raises(MosaicDataError, match="02_stroma"):
        make_mosaic(ds, tmp_path / "x.tif", size=512, classes=["stroma"])
    with pytest.raises(MosaicDataError, match="no non-tumour class"):
        make_mosaic(shared_data / "ocdc_oral_scc_tumour_subset", tmp_path / "o.tif", size=512, tumour_fraction=0.5)
    with pytest.raises(PathosegError):
        make_mosaic(ds, tmp_path / "x.png", size=512)
    assert list(tmp_path.iterdir()) == []


def _cli(argv: list[str]) -> int:
    from napari_pathoseg.cli import mosaic as cli_mosaic
    from napari_pathoseg.cli._driver import ArgumentParser, call_command

    parser = ArgumentParser(prog="pathoseg")
    cli_mosaic.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return call_command(args.func, args, prog="pathoseg mosaic")


def test_cli_prints_json_and_refuses_existing_output(shared_data, tmp_path, capsys):
    argv = ["mosaic", "--data", str(shared_data / KATHER), "--kind", "tissue-classes", "--out", str(tmp_path / "m.tif"),
            "--size", "640x512", "--mpp", "0.5", "--seed", "4", "--classes", "01_tumor", "02_stroma=3", "--tumour-fraction", "0.25"]  # fmt: skip
    assert _cli(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["shape"] == [512, 640] and out["slide_label"] in ("tumour", "normal")
    assert set(out["cells_by_class"]) <= {"01_tumor", "02_stroma", "background"}
    assert Path(out["sidecar"]).is_file()
    assert _cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and "\n" not in err and "Traceback" not in err
    # the real entry point finds the command by itself
    from napari_pathoseg.cli.main import main

    assert main(["mosaic", "--data", str(shared_data / KATHER), "--info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["classes"]["01_tumor"] > 0 and info["label_ids"]["0"] == "background"


def test_cli_parsers():
    from napari_pathoseg.cli.mosaic import parse_classes, parse_size

    assert parse_size("8192") == (8192, 8192)
    assert parse_size("1000x600") == (600, 1000)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("12")
    assert parse_classes(["TUM=2", "STR"]) == {"TUM": 2.0, "STR": 1.0}
    with pytest.raises(PathosegError):
        parse_classes(["TUM=-1"])


def test_plan_proportions_outline_and_cell_size(shared_data):
    from napari_pathoseg.wsi.mosaic_layout import plan_mosaic

    ds = load_mosaic_dataset(shared_data / KATHER)
    lay = plan_mosaic(ds, size=2048, mpp=0.5, seed=0, classes={"02_stroma": 3, "04_lympho": 1}, tumour_fraction=0.25, outline=False)
    assert lay.tissue.all() and lay.cell_px == 148  # 150 px at 0.495 -> 148.5 -> 148 at 0.5
    names, counts = np.unique(np.array(lay.classes)[lay.cls.ravel()], return_counts=True)
    n = dict(zip(names.tolist(), counts.tolist()))
    total = lay.n_cells
    assert n["01_tumor"] == round(0.25 * total)
    assert abs(n["02_stroma"] - 3 * n["04_lympho"]) <= 3
    # tumour cells form regions: most tumour cells touch another tumour cell
    tum = lay.cls == lay.classes.index("01_tumor")
    neighbours = np.zeros_like(tum)
    neighbours[1:] |= tum[:-1]
    neighbours[:-1] |= tum[1:]
    neighbours[:, 1:] |= tum[:, :-1]
    neighbours[:, :-1] |= tum[:, 1:]
    assert (neighbours & tum).sum() > 0.8 * tum.sum()
    with pytest.raises(MosaicDataError, match="lower --cell-um"):
        plan_mosaic(ds, size=2048, mpp=0.5, cell_um=100.0)
