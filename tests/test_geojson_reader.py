"""File > Open of an exported GeoJSON lands over the slide in µm, as the Export dock's own import does."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from napari_pathoseg._reader import slide_layer_data
from napari_pathoseg.errors import GeoJSONError
from napari_pathoseg.export import run_export_labels
from napari_pathoseg.export.napari_io import geojson_layer_data, get_geojson_reader
from napari_pathoseg.export.reader import read_members
from napari_pathoseg.export.slide_record import MEMBER, slide_from_members
from napari_pathoseg.wsi.slide import open_slide

LEVEL = 1
ORIGIN = (700, 500)  # (row, col) of the crop in level-1 pixels


@pytest.fixture
def exported(tmp_path, sample_svs, shared_data):
    """Real MoNuSeg nuclei placed as a level-1 crop of the bundled slide, exported over it.

    The GeoJSON goes to a folder without the slide, so only what the file records can place it.
    """
    mask = np.asarray(Image.open(shared_data / "monuseg_train" / "instance_masks" / "TCGA-21-5784-01Z-00-DX1.png"))
    labels = mask[:180, :240].astype(np.int32)
    (tmp_path / "slides").mkdir()
    (tmp_path / "results").mkdir()
    slide_path = tmp_path / "slides" / "CMU-1-Small-Region.svs"
    shutil.copyfile(sample_svs, slide_path)
    out = tmp_path / "results" / "nuclei.geojson"
    with open_slide(slide_path) as slide:  # open while the test shows its layer
        res = run_export_labels(out, labels, slide=slide, level=LEVEL, origin=ORIGIN, measure=["area"])
        with open(res.measurements_path, newline="", encoding="utf-8") as fh:
            label_of = {row["id"]: int(row["label"]) for row in csv.DictReader(fh)}
        yield {"path": out, "labels": labels, "slide_layer": slide_layer_data(slide), "meta": slide.metadata,
               "label_of": label_of}


def _world_centroids(labels: np.ndarray, scale, translate) -> dict[int, np.ndarray]:
    """World centre of each label's pixels (pixel (i, j) of a layer is at (i, j) * scale + translate)."""
    out = {}
    for k in np.unique(labels[labels > 0]).tolist():
        out[k] = np.argwhere(labels == k).mean(axis=0) * np.asarray(scale) + np.asarray(translate)
    return out


def test_file_open_puts_exported_objects_where_they_are_on_the_slide_layer(exported):
    path, labels, meta = exported["path"], exported["labels"], exported["meta"]
    _, slide_kw, _ = exported["slide_layer"]
    mpp = np.asarray(slide_kw["scale"])
    assert slide_kw["units"] == ("µm", "µm") and np.allclose(mpp, 0.499)
    reader = get_geojson_reader(str(path))
    (back, kw, kind), = reader(str(path))
    assert kind == "labels"
    assert np.allclose(kw["scale"], mpp) and kw["units"] == ("µm", "µm")
    assert kw["metadata"]["slide"]["mpp_x"] == meta.mpp_x
    # where the slide layer shows each nucleus: level-1 pixel (i, j) of the crop has its centre at
    # level-0 index ((i + o + 0.5) * ds - 0.5), at world index * mpp on the slide layer
    ds = float(meta.level_downsamples[LEVEL])
    want = {}
    for k in np.unique(labels[labels > 0]).tolist():
        ij = np.argwhere(labels == k).mean(axis=0)
        want[k] = ((ij + np.asarray(ORIGIN) + 0.5) * ds - 0.5) * mpp
    got = _world_centroids(back, kw["scale"], kw["translate"])
    index_label = [exported["label_of"][i] for i in kw["features"]["id"]]
    err = np.array([np.abs(got[n + 1] - want[index_label[n]]).max() for n in range(len(index_label))])
    assert len(err) == len(want) > 20
    assert err.max() < 0.5 * 0.499 * ds  # within half a label pixel, in µm
    # the same layer as the Export dock's "Open GeoJSON over slide" (the slide layer's metadata given)
    (dock, dock_kw, _), = geojson_layer_data(path, slide_metadata=meta)
    assert np.array_equal(dock, back)
    assert dock_kw["scale"] == kw["scale"] and dock_kw["translate"] == kw["translate"] and dock_kw["units"] == kw["units"]


def test_the_file_records_its_slide_and_foreign_files_stay_in_pixels(exported, tmp_path):
    path = exported["path"]
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith('{"type":"FeatureCollection","pathoseg":{"slide":{"name":"CMU-1-Small-Region.svs"')
    assert "/" not in json.loads(first[: first.index(',"features"')] + "}")[MEMBER]["slide"]["name"]
    rec = slide_from_members(read_members(path), path=path)
    assert rec["level_dimensions"][0] == [2220, 2967] and rec["mpp_y"] == 0.499
    # the same objects without the record (a foreign file): level-0 pixel units, as documented
    doc = json.loads(path.read_text(encoding="utf-8"))
    foreign = tmp_path / "results" / "foreign.geojson"
    foreign.write_text(json.dumps({"type": "FeatureCollection", "features": doc["features"]}), encoding="utf-8")
    (_, kw, _), = get_geojson_reader(str(foreign))(str(foreign))
    assert kw["scale"] == (1.0, 1.0) and kw["units"] == ("pixel", "pixel") and "slide" not in kw["metadata"]
    # a damaged record is reported, not silently ignored
    bad = tmp_path / "results" / "bad.geojson"
    bad.write_text(json.dumps({"type": "FeatureCollection", MEMBER: {"slide": {"mpp_x": "half"}}, "features": []}))
    with pytest.raises(GeoJSONError, match="mpp_x must be a finite number"):
        geojson_layer_data(bad)


@pytest.mark.gui
def test_viewer_open_overlays_the_slide(exported, make_napari_viewer):
    from napari.layers import Layer

    viewer = make_napari_viewer()
    data, kw, kind = exported["slide_layer"]
    slide = viewer.add_layer(Layer.create(data, kw, kind))
    layers = viewer.open(str(exported["path"]), plugin="napari-pathoseg")
    (objects,) = layers
    assert tuple(objects.units) == tuple(slide.units)
    ds = float(exported["meta"].level_downsamples[LEVEL])
    labels = exported["labels"]
    order = [exported["label_of"][i] for i in objects.features["id"]]
    for k in np.unique(labels[labels > 0]).tolist()[:5]:
        ij = np.argwhere(labels == k).mean(axis=0)
        level0 = (ij + np.asarray(ORIGIN) + 0.5) * ds - 0.5  # slide layer data coordinates
        idx = order.index(k) + 1
        pq = np.argwhere(np.asarray(objects.data) == idx).mean(axis=0)
        np.testing.assert_allclose(objects.data_to_world(pq), slide.data_to_world(level0), atol=0.5 * 0.499 * ds)
