"""``pathoseg export`` / ``import`` after ``pathoseg nuclei --region``: placement, the table beside, inputs kept.

One real run of ``pathoseg nuclei`` (nuclei-lite on a 256 x 192 region of the bundled
CMU-1-Small-Region.svs) feeds every test of this module.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_pathoseg.cli.main import main

REGION = (1100, 1500, 256, 192)  # x, y, w, h in level-0 pixels
#: The placement spelled in the (deprecated) form older versions understood too.
OLD_PLACE = ("--level", "0", "--origin", str(REGION[1]), str(REGION[0]))


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def nuclei_run(tmp_path_factory, sample_svs):
    """``pathoseg nuclei SLIDE --region ... --out labels.tif --table labels.csv`` in a fresh folder."""
    folder = tmp_path_factory.mktemp("nuclei_run")
    slide = folder / "slide.svs"
    shutil.copyfile(sample_svs, slide)
    code = main(["nuclei", str(slide), "--region", ",".join(map(str, REGION)), "--out", str(folder / "labels.tif"),
                 "--table", str(folder / "labels.csv")])
    assert code == 0
    return folder


@pytest.fixture
def run(nuclei_run, tmp_path):
    """A copy of the nuclei run in this test's own folder."""
    for name in ("slide.svs", "labels.tif", "labels.csv"):
        shutil.copyfile(nuclei_run / name, tmp_path / name)
    return tmp_path


def _export(capsys, *argv) -> tuple[int, dict | None, str]:
    code = main(["export", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def _centroids(csv_path: Path, xcol: str, ycol: str) -> np.ndarray:
    with open(csv_path, newline="", encoding="utf-8") as fh:
        return np.array([(float(r[xcol]), float(r[ycol])) for r in csv.DictReader(fh)])


def _geometries(path: Path) -> list:
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    return sorted(json.dumps(f["geometry"]) for f in doc["features"])


def test_region_labels_are_placed_from_their_tiff_metadata(run, capsys):
    code, res, err = _export(capsys, run / "labels.tif", "--slide", run / "slide.svs", "--out", run / "n.geojson",
                             "--table", run / "n_table.csv")
    assert code == 0, err
    assert res["placement"] == "region_xywh of the labels" and res["level"] == 0
    assert res["origin_xy"] == [REGION[0], REGION[1]]
    nuclei = _centroids(run / "labels.csv", "x", "y")  # level-0 centroids written by `pathoseg nuclei`
    ours = _centroids(run / "n_table.csv", "centroid_x", "centroid_y")
    assert res["n_objects"] == len(nuclei) > 50
    # every exported object lies where `pathoseg nuclei` found its nucleus; its table gives pixel-index
    # centroids (pixel centres at integers), QuPath's frame has pixel centres at +0.5
    dist = np.sqrt(((ours[:, None, :] - 0.5 - nuclei[None, :, :]) ** 2).sum(-1)).min(axis=1)
    assert np.median(dist) < 0.05 and dist.max() < 1.0
    doc = json.loads((run / "n.geojson").read_text(encoding="utf-8"))
    assert {f["properties"]["metadata"]["model"] for f in doc["features"]} == {"nuclei-lite"}


def test_origin_is_x_y_like_region_and_the_old_row_col_form_still_works(run, capsys):
    import tifffile

    np.save(run / "crop.npy", tifffile.imread(run / "labels.tif"))  # the same labels without metadata
    code, _, err = _export(capsys, run / "labels.tif", "--slide", run / "slide.svs", "--out", run / "meta.geojson", "--no-table")
    assert code == 0, err
    x, y = REGION[:2]
    code, res, err = _export(capsys, run / "crop.npy", "--slide", run / "slide.svs", "--out", run / "xy.geojson",
                             "--origin", f"{x},{y}", "--no-table")
    assert code == 0, err
    assert res["placement"] == "--origin" and res["origin_xy"] == [x, y]
    assert _geometries(run / "xy.geojson") == _geometries(run / "meta.geojson")
    code, res, err = _export(capsys, run / "crop.npy", "--slide", run / "slide.svs", "--out", run / "rc.geojson",
                             "--origin", y, x, "--level", 0, "--no-table")
    assert code == 0, err
    assert "deprecated" in err and f"--origin {x},{y}" in err
    assert _geometries(run / "rc.geojson") == _geometries(run / "meta.geojson")
    # a crop pushed beyond the slide (2220 x 2967) is refused, naming the x-first convention
    code, _, err = _export(capsys, run / "crop.npy", "--slide", run / "slide.svs", "--out", run / "far.geojson",
                           "--origin", "2100,100")
    assert code == 2 and "beyond the slide" in err and "x first" in err and len(err.strip().splitlines()) == 1
    code, _, err = _export(capsys, run / "crop.npy", "--slide", run / "slide.svs", "--out", run / "bad.geojson",
                           "--origin", "1,2,3")
    assert code == 2 and "--origin takes X,Y" in err
    assert not (run / "far.geojson").exists() and not (run / "bad.geojson").exists()


def test_export_never_replaces_the_table_of_pathoseg_nuclei(run, capsys):
    before = _sha(run / "labels.csv")
    for place in (OLD_PLACE, ()):  # placed by hand as older versions needed, and from the labels' metadata
        code, _, err = _export(capsys, run / "labels.tif", "--slide", run / "slide.svs", "--out", run / "labels.geojson", *place)
        assert code == 2
        assert "labels.csv exists and is not a measurement table written by an export" in err.splitlines()[-1]
        assert "--table" in err
        assert _sha(run / "labels.csv") == before and not (run / "labels.geojson").exists()
    assert len(err.strip().splitlines()) == 1
    # asked for elsewhere, or no table: fine, and the nuclei table is still untouched
    code, res, err = _export(capsys, run / "labels.tif", "--slide", run / "slide.svs", "--out", run / "labels.geojson",
                             "--table", run / "measurements.csv")
    assert code == 0, err
    assert res["measurements_path"] == str(run / "measurements.csv")
    code, res, err = _export(capsys, run / "labels.tif", "--slide", run / "slide.svs", "--out", run / "labels.geojson",
                             "--no-table")
    assert code == 0 and res["measurements_path"] is None
    assert _sha(run / "labels.csv") == before
    # a table an export wrote beside its GeoJSON is replaced by the next export
    assert _export(capsys, run / "labels.tif", "--slide", run / "slide.svs", "--out", run / "again.geojson")[0] == 0
    first = (run / "again.csv").read_text(encoding="utf-8")
    code, res, err = _export(capsys, run / "labels.tif", "--slide", run / "slide.svs", "--out", run / "again.geojson",
                             "--measure", "area")
    assert code == 0, err
    assert (run / "again.csv").read_text(encoding="utf-8") != first
    assert (run / "again.csv").read_text(encoding="utf-8").splitlines()[0] == "id,label,class,centroid_x,centroid_y,Area µm^2"


def test_outputs_naming_an_input_are_refused(run, capsys):
    hashes = {p.name: _sha(p) for p in run.iterdir()}
    (run / "link.tif").symlink_to(run / "labels.tif")
    for out in (run / "labels.tif", run / "slide.svs", run / "link.tif"):
        code, _, err = _export(capsys, run / "labels.tif", "--slide", run / "slide.svs", "--out", out, *OLD_PLACE)
        assert code == 2 and "is also an input" in err, (out, err)
    code, _, err = _export(capsys, run / "labels.tif", "--slide", run / "slide.svs", "--out", run / "o.geojson",
                           "--table", run / "labels.tif", *OLD_PLACE)
    assert code == 2 and "--table" in err and "is also an input" in err
    assert _export(capsys, run / "labels.tif", "--slide", run / "slide.svs", "--out", run / "o.geojson", *OLD_PLACE,
                   "--measure", "area", "--table", run / "o.csv")[0] == 0
    hashes["o.csv"] = _sha(run / "o.csv")
    hashes["o.geojson"] = _sha(run / "o.geojson")
    for out in (run / "o.geojson", run / "slide.svs"):
        code = main(["import", str(run / "o.geojson"), "--slide", str(run / "slide.svs"), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and "is also an input" in err, (out, err)
    assert {p.name: _sha(p) for p in run.iterdir() if p.name != "link.tif"} == hashes
    # import over the slide the file records: the same nuclei back on the level-0 grid
    assert main(["import", str(run / "o.geojson"), "--slide", str(run / "slide.svs"), "--out", str(run / "back.tif")]) == 0
    import tifffile

    back = tifffile.imread(run / "back.tif")
    x, y, w, h = REGION
    assert np.array_equal(back[y : y + h, x : x + w] > 0, tifffile.imread(run / "labels.tif") > 0)
    assert not back[:y].any() and not back[y + h :].any()
