"""QuPath GeoJSON export/import, measurements, napari reader/writers and the CLI."""

from __future__ import annotations

import csv
import gzip
import json
import re
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import shapely
from PIL import Image
from skimage.measure import regionprops

from napari_pathoseg.errors import CancelledError, GeoJSONError, PathosegError
from napari_pathoseg.export import (
    LevelTransform,
    iter_export_labels,
    layer_placement,
    rasterize,
    read_geojson,
    run_export_labels,
    run_export_shapes,
    transform_from_layer,
)
from napari_pathoseg.export.geojson import OBJECT_TYPES, ExportError, write_labels_tiff
from napari_pathoseg.export.measurements import measure_labels, measure_window
from napari_pathoseg.export.napari_io import geojson_layer_data, get_geojson_reader, write_labels_geojson, write_shapes_geojson

MONUSEG = ("TCGA-21-5784-01Z-00-DX1", "TCGA-A7-A13E-01Z-00-DX1")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


# ---------------------------------------------------------------------------- helpers
def monuseg_mask(shared_data: Path, image_id: str) -> np.ndarray:
    return np.asarray(Image.open(shared_data / "monuseg_train" / "instance_masks" / f"{image_id}.png")).astype(np.int32)


def monuseg_polygons(shared_data: Path, image_id: str) -> list[np.ndarray]:
    """The original XML polygons as (N, 2) (row, col) arrays."""
    with gzip.open(shared_data / "monuseg_train" / "annotations_xml" / f"{image_id}.xml.gz") as fh:
        root = ET.parse(fh).getroot()
    out = []
    for region in root.iter("Region"):
        pts = [(float(v.get("Y")), float(v.get("X"))) for v in region.iter("Vertex")]
        if len(pts) >= 3:
            out.append(np.asarray(pts))
    return out


def label_of_id(csv_path: Path) -> dict[str, int]:
    with open(csv_path, newline="", encoding="utf-8") as fh:
        return {row["id"]: int(row["label"]) for row in csv.DictReader(fh)}


def per_object_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of each label of ``a`` with the same label in ``b``."""
    ids = np.unique(a)
    ids = ids[ids != 0]
    inter = np.bincount(a[(a == b) & (a != 0)], minlength=int(a.max()) + 1)
    area_a = np.bincount(a.ravel(), minlength=int(a.max()) + 1)
    area_b = np.bincount(b.ravel(), minlength=max(int(b.max()), int(a.max())) + 1)[: int(a.max()) + 1]
    return inter[ids] / (area_a[ids] + area_b[ids] - inter[ids])


def check_qupath_rules(path: Path) -> dict:
    """Assert the rules of qupath-geojson.md on a written file; returns the parsed JSON."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["type"] == "FeatureCollection"
    assert isinstance(doc["features"], list)
    ids = set()
    for f in doc["features"]:
        assert f["type"] == "Feature"
        assert UUID_RE.match(f["id"]), f["id"]
        assert uuid.UUID(f["id"]).version == 4
        ids.add(f["id"])
        props = f["properties"]
        assert props["objectType"] in OBJECT_TYPES
        if "classification" in props:
            cls = props["classification"]
            assert isinstance(cls["name"], str) and cls["name"]
            assert len(cls["color"]) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in cls["color"])
        for value in props.get("measurements", {}).values():
            assert isinstance(value, (int, float)) and np.isfinite(value)
        for value in props.get("metadata", {}).values():
            assert isinstance(value, str)
        geom = f["geometry"]
        assert geom["type"] in ("Polygon", "MultiPolygon", "LineString", "Point")
        polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"] if geom["type"] == "MultiPolygon" else []
        if geom["type"] == "MultiPolygon":
            assert len(polys) > 1, "a single-part MultiPolygon must be written as a Polygon"
        for poly in polys:
            for ring in poly:
                assert ring[0] == ring[-1], "rings must be closed"
                assert len(ring) >= 4
        assert shapely.geometry.shape(geom).is_valid
    assert len(ids) == len(doc["features"]), "ids must be unique"
    return doc


# ---------------------------------------------------------------------------- coordinates
def test_level_transform_maps_pixel_corners_with_downsample_origin_and_bounds():
    t = LevelTransform(downsample=(4.0, 4.0), origin=(10.0, 20.0), bounds=(50.0, 100.0))
    xy = t.continuous_to_xy(np.array([[0.0, 0.0], [1.0, 2.0]]))
    np.testing.assert_allclose(xy, [[20 * 4 - 100, 10 * 4 - 50], [22 * 4 - 100, 11 * 4 - 50]])
    rc = np.array([[3.2, 7.9], [0.0, 0.0]])
    np.testing.assert_allclose(t.xy_to_index(t.index_to_xy(rc)), rc)
    with pytest.raises(PathosegError, match="downsample"):
        LevelTransform(downsample=(0.0, 1.0))


def test_layer_transform_round_trip_and_slide_layer_identity():
    meta = {"level_downsamples": [1.0, 4.0], "mpp_x": 0.25, "mpp_y": 0.25, "bounds_x": 7, "bounds_y": 3}
    # a layer exactly over the slide layer (scale = mpp, translate 0) is level 0
    t0 = transform_from_layer(scale=(0.25, 0.25), translate=(0, 0), slide_metadata=meta)
    assert t0.downsample == (1.0, 1.0) and t0.origin == (0.0, 0.0) and t0.bounds == (3.0, 7.0)
    t = LevelTransform(downsample=(4.0, 4.0), origin=(12.0, 30.0), bounds=(3.0, 7.0))
    place = layer_placement(t, meta)
    back = transform_from_layer(scale=place["scale"], translate=place["translate"], slide_metadata=meta)
    np.testing.assert_allclose(back.downsample, t.downsample)
    np.testing.assert_allclose(back.origin, t.origin)


# ---------------------------------------------------------------------------- labels export
def test_monuseg_labels_round_trip_is_exact_and_follows_qupath_rules(shared_data, tmp_path):
    for image_id in MONUSEG:
        lab = monuseg_mask(shared_data, image_id)
        out = tmp_path / f"{image_id}.geojson"
        res = run_export_labels(out, lab, measure=["area"], chunk_size=256, halo=32)
        n = len(np.unique(lab)) - 1
        assert res.n_objects + res.n_skipped == n and res.n_skipped == 0
        doc = check_qupath_rules(out)
        assert len(doc["features"]) == n
        assert {f["properties"]["objectType"] for f in doc["features"]} == {"detection"}
        assert {f["properties"]["classification"]["name"] for f in doc["features"]} == {"Nucleus"}
        objs = read_geojson(out)
        ids = label_of_id(res.measurements_path)
        back = rasterize(objs, shape=lab.shape, values=[ids[o.id] for o in objs])
        iou = per_object_iou(lab, back)
        assert iou.min() >= 0.98, (image_id, iou.min())
        assert np.array_equal(back, lab)  # pixel-edge outlines: exact


def test_monuseg_xml_polygons_through_shapes_export_and_import(shared_data, tmp_path):
    polys = monuseg_polygons(shared_data, MONUSEG[0])
    assert len(polys) > 300
    out = tmp_path / "xml.geojson"
    res = run_export_shapes(out, polys, shape_types="polygon", classification="Nucleus", object_type="detection")
    assert res.n_objects == len(polys)
    check_qupath_rules(out)
    objs = read_geojson(out)
    t = LevelTransform()
    ious = []
    for rc, obj in zip(polys, objs):
        original = shapely.make_valid(shapely.Polygon(t.index_to_xy(rc)))
        inter = original.intersection(obj.geometry).area
        ious.append(inter / original.union(obj.geometry).area)
    assert min(ious) >= 0.98
    # rasterised import vs direct rasterisation of the XML polygons: the same pixels
    from skimage.draw import polygon as draw_polygon

    lab = rasterize(objs, shape=(1000, 1000))
    for k in (0, 10, 100):
        direct = np.zeros((1000, 1000), bool)
        rr, cc = draw_polygon(polys[k][:, 0], polys[k][:, 1], shape=direct.shape)
        direct[rr, cc] = True
        got = lab == k + 1
        assert (direct & got).sum() / (direct | got).sum() >= 0.98


def test_exact_coordinates_at_level_with_origin_and_bounds(tmp_path):
    meta = {"level_downsamples": [1.0, 2.0, 8.0], "level_dimensions": [[4000, 3000], [2000, 1500], [500, 375]],
            "bounds_x": 100, "bounds_y": 50, "mpp_x": 0.5, "mpp_y": 0.5}
    lab = np.zeros((20, 30), np.int32)
    lab[3:5, 4:7] = 1  # 2 x 3 pixels at level 1
    out = tmp_path / "o.geojson"
    run_export_labels(out, lab, slide_metadata=meta, level=1, origin=(10, 20), measure=["area", "perimeter"])
    doc = check_qupath_rules(out)
    f = doc["features"][0]
    ring = np.asarray(f["geometry"]["coordinates"][0])
    # level-1 continuous corners rows 13..15, cols 24..27 -> level 0 x2, minus bounds
    assert ring[:, 0].min() == 24 * 2 - 100 and ring[:, 0].max() == 27 * 2 - 100
    assert ring[:, 1].min() == 13 * 2 - 50 and ring[:, 1].max() == 15 * 2 - 50
    assert shapely.Polygon(ring).exterior.is_ccw  # RFC 7946 orientation
    assert f["properties"]["measurements"]["Area µm^2"] == pytest.approx(6 * 1.0 * 1.0)
    # import with the same slide and level gives the same labels back
    objs = read_geojson(out, slide_metadata=meta)
    back = rasterize(objs, shape=lab.shape, transform=LevelTransform.for_slide(meta, level=1, origin=(10, 20)))
    assert np.array_equal(back, lab)


def test_holes_multipart_and_chunk_borders(tmp_path):
    lab = np.zeros((90, 90), np.int32)
    lab[5:25, 5:25] = 1
    lab[10:15, 10:15] = 0  # hole
    lab[12, 12] = 2  # island inside the hole (another object)
    lab[40:44, 40:44] = 3
    lab[60:64, 70:74] = 3  # second part of object 3
    lab[28:88, 30:35] = 4  # long object across many chunks, larger than the halo
    lab[44:46, 44:46] = 5  # touches object 3 only diagonally
    out = tmp_path / "h.geojson"
    res = run_export_labels(out, lab, measure=[], chunk_size=16, halo=4, measurements_path=tmp_path / "h.csv")
    assert res.n_objects == 5
    doc = check_qupath_rules(out)
    ids = label_of_id(tmp_path / "h.csv")
    by_label = {ids[f["id"]]: f["geometry"] for f in doc["features"]}
    assert by_label[1]["type"] == "Polygon" and len(by_label[1]["coordinates"]) == 2  # shell + hole
    assert by_label[3]["type"] == "MultiPolygon" and len(by_label[3]["coordinates"]) == 2
    assert by_label[4]["type"] == "Polygon"
    objs = read_geojson(out)
    back = rasterize(objs, shape=lab.shape, values=[ids[o.id] for o in objs])
    assert np.array_equal(back, lab)
    # the same with one big chunk, and from a dask array
    res2 = run_export_labels(tmp_path / "h2.geojson", da.from_array(lab, chunks=17), measure=[], chunk_size=1024)
    objs2 = read_geojson(res2.path)
    areas = sorted(round(o.geometry.area, 6) for o in objs2)
    assert areas == sorted(round(o.geometry.area, 6) for o in objs)


def test_classes_colours_metadata_and_bad_input(tmp_path):
    lab = np.zeros((40, 40), np.uint16)
    lab[2:8, 2:8] = 1
    lab[20:30, 20:30] = 2
    out = tmp_path / "c.geojson"
    run_export_labels(
        out, lab, classification="Tumor", classes={2: "Lymphocyte"}, color=None,
        metadata={"model": "nuclei-lite", "version": 1}, object_metadata={2: {"review": "accepted"}},
        measure=[], object_type="annotation",
    )
    doc = check_qupath_rules(out)
    props = sorted((f["properties"] for f in doc["features"]), key=lambda p: p["classification"]["name"])
    assert props[0]["classification"] == {"name": "Lymphocyte", "color": props[0]["classification"]["color"]}
    assert props[1]["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    assert props[0]["metadata"] == {"model": "nuclei-lite", "version": "1", "review": "accepted"}
    assert props[1]["metadata"] == {"model": "nuclei-lite", "version": "1"}
    assert {p["objectType"] for p in props} == {"annotation"}
    run_export_labels(tmp_path / "u.geojson", lab, classification=None, measure=[])
    assert all("classification" not in f["properties"] for f in check_qupath_rules(tmp_path / "u.geojson")["features"])
    with pytest.raises(ExportError, match="2-D"):
        run_export_labels(tmp_path / "x.geojson", np.zeros((2, 4, 4), int))
    with pytest.raises(ExportError, match="integers"):
        run_export_labels(tmp_path / "x.geojson", np.zeros((4, 4), float))
    with pytest.raises(ExportError, match="objectType"):
        run_export_labels(tmp_path / "x.geojson", lab, object_type="nucleus")
    with pytest.raises(PathosegError, match="unknown measurement"):
        run_export_labels(tmp_path / "x.geojson", lab, measure=["roundness"])
    with pytest.raises(ExportError, match="colour"):
        run_export_labels(tmp_path / "x.geojson", lab, color=(300, 0, 0))
    with pytest.raises(ExportError, match="max_object_pixels"):
        run_export_labels(tmp_path / "x.geojson", lab, chunk_size=24, halo=0, max_object_pixels=50, measure=[])
    assert not list(tmp_path.glob("x.*")) and not list(tmp_path.glob(".x.geojson*"))


def test_cancel_leaves_no_file(tmp_path):
    rng = np.random.default_rng(0)
    lab = (rng.random((256, 256)) > 0.7).astype(np.int32) * np.arange(256 * 256).reshape(256, 256)
    out = tmp_path / "big.geojson"
    gen = iter_export_labels(out, lab, chunk_size=32, measure=[])
    next(gen), next(gen), next(gen)
    gen.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CancelledError):
        run_export_labels(out, lab, chunk_size=32, measure=[], cancel=lambda: True)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- measurements
def test_measurements_match_regionprops_on_real_nuclei(shared_data):
    lab = monuseg_mask(shared_data, MONUSEG[1])
    m = measure_labels(lab, measure=["area", "perimeter", "eccentricity", "solidity"], pixel_size=(0.25, 0.25))
    props = regionprops(lab)
    assert m["label"].tolist() == [p.label for p in props]
    np.testing.assert_allclose(m["area"], [p.area * 0.0625 for p in props])
    np.testing.assert_allclose(m["perimeter"], [p.perimeter * 0.25 for p in props], atol=1e-9)
    np.testing.assert_allclose(m["eccentricity"], [p.eccentricity for p in props], atol=1e-9)
    np.testing.assert_allclose(m["centroid_row"], [p.centroid[0] for p in props])
    # solidity: pixel area over the convex hull of the pixel-edge outline (QuPath's definition)
    sk = np.array([p.solidity for p in props])
    assert np.all((m["solidity"] > 0) & (m["solidity"] <= 1.0))
    assert np.median(np.abs(m["solidity"] - sk)) < 0.05


def test_stain_and_confidence_measurements(shared_data, tmp_path):
    from skimage.color import rgb2hed

    from napari_pathoseg.wsi.slide import Slide

    image_id = MONUSEG[0]
    rgb = np.asarray(Image.open(shared_data / "monuseg_train" / "images" / f"{image_id}.png").convert("RGB"))
    lab = monuseg_mask(shared_data, image_id)
    prob = np.random.default_rng(1).random(lab.shape)
    slide = Slide.from_array(rgb, mpp=0.25)
    out = tmp_path / "s.geojson"
    res = run_export_labels(out, lab, slide=slide, probability=prob, chunk_size=300, halo=40)
    hed = rgb2hed(rgb)
    ids = label_of_id(res.measurements_path)
    feats = {ids[f["id"]]: f["properties"]["measurements"] for f in check_qupath_rules(out)["features"]}
    for label in (1, 57, 200):
        mask = lab == label
        m = feats[label]
        assert m["Hematoxylin OD mean"] == pytest.approx(hed[..., 0][mask].mean(), rel=1e-9)
        assert m["Eosin OD mean"] == pytest.approx(hed[..., 1][mask].mean(), rel=1e-9)
        assert m["Confidence"] == pytest.approx(prob[mask].mean(), rel=1e-9)
        assert m["Area µm^2"] == pytest.approx(mask.sum() * 0.0625)
    with open(res.measurements_path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == res.n_objects
    assert {"id", "label", "class", "centroid_x", "centroid_y", "Area µm^2", "Confidence"} <= set(rows[0])
    # labels at half resolution (not a level of this slide) read resampled slide pixels
    small = lab[::2, ::2]
    res2 = run_export_labels(tmp_path / "l1.geojson", small, slide=slide, downsample=2.0, measure=["hematoxylin"],
                             chunk_size=200)
    ids2 = label_of_id(res2.measurements_path)
    feats2 = {ids2[f["id"]]: f["properties"]["measurements"] for f in check_qupath_rules(res2.path)["features"]}
    for label in (57, 200):
        assert feats2[label]["Hematoxylin OD mean"] == pytest.approx(feats[label]["Hematoxylin OD mean"], abs=0.02)
    with pytest.raises(ExportError, match="probability"):
        run_export_labels(tmp_path / "p.geojson", lab, probability=prob[:10])


def test_measure_window_errors():
    lab = np.zeros((8, 8), int)
    lab[2:4, 2:4] = 1
    with pytest.raises(PathosegError, match="slide's pixels"):
        measure_window(lab, np.array([1]), measure=["hematoxylin"])
    with pytest.raises(PathosegError, match="probability"):
        measure_window(lab, np.array([1]), measure=["confidence"], probability=np.zeros((3, 3)))


# ---------------------------------------------------------------------------- shapes export
def test_shapes_export_types_repair_and_measurements(tmp_path):
    meta = {"level_downsamples": [1.0], "level_dimensions": [[1000, 1000]], "mpp_x": 0.5, "mpp_y": 0.5,
            "bounds_x": 0, "bounds_y": 0}
    square = np.array([[10, 10], [10, 110], [110, 110], [110, 10]], float)
    bowtie = np.array([[200, 200], [300, 300], [300, 200], [200, 300]], float)  # self-intersecting
    ellipse = np.array([[400, 400], [400, 500], [450, 500], [450, 400]], float)
    path = np.array([[600, 600], [650, 700], [700, 650]], float)
    degenerate = np.array([[5, 5], [5, 5], [5, 5]], float)
    out = tmp_path / "s.geojson"
    res = run_export_shapes(
        out, [square, bowtie, ellipse, path, degenerate],
        shape_types=["rectangle", "polygon", "ellipse", "path", "polygon"],
        slide_metadata=meta, classes=["Tumor", "Stroma", None, "Other", None], classification="Region*",
        names=["a", "b", "c", "d", "e"],
    )
    assert res.n_objects == 4 and res.n_skipped == 1
    doc = check_qupath_rules(out)
    f = doc["features"]
    assert [x["geometry"]["type"] for x in f] == ["Polygon", "MultiPolygon", "Polygon", "LineString"]
    assert [x["properties"]["classification"]["name"] for x in f] == ["Tumor", "Stroma", "Region*", "Other"]
    assert [x["properties"]["name"] for x in f] == ["a", "b", "c", "d"]
    assert {x["properties"]["objectType"] for x in f} == {"annotation"}
    assert f[0]["properties"]["measurements"]["Area µm^2"] == pytest.approx(100 * 100 * 0.25)
    assert f[2]["properties"]["measurements"]["Area µm^2"] == pytest.approx(np.pi * 25 * 50 * 0.25, rel=0.01)
    assert f[0]["geometry"]["coordinates"][0][0] in ([10.5, 10.5], [110.5, 10.5], [110.5, 110.5], [10.5, 110.5])
    assert res.measurements_path.exists()


# ---------------------------------------------------------------------------- import
def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _square(x0=0, y0=0, s=10):
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x0 + s, y0], [x0 + s, y0 + s], [x0, y0 + s], [x0, y0]]]}


def test_import_accepts_old_and_new_qupath_forms(tmp_path):
    new = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": str(uuid.uuid4()), "geometry": _square(),
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [1, 2, 3]},
                        "measurements": {"Area": 100.0, "Missing": None}, "metadata": {"review": "accepted"},
                        "name": "lesion"}},
        {"type": "Feature", "geometry": _square(20, 20),
         "properties": {"objectType": "cell", "nucleusGeometry": _square(22, 22, 4)}},
    ]}
    objs = read_geojson(_write(tmp_path / "new.geojson", new))
    assert [o.object_type for o in objs] == ["annotation", "cell"]
    assert objs[0].classification.name == "Tumor" and objs[0].classification.color == (1, 2, 3)
    assert objs[0].measurements["Area"] == 100.0 and np.isnan(objs[0].measurements["Missing"])
    assert objs[0].metadata == {"review": "accepted"} and objs[0].name == "lesion"
    assert objs[1].nucleus_geometry.area == 16
    old = [  # bare list, object_type, colorRGB packed int, measurement list, plain string class
        {"type": "Feature", "geometry": _square(),
         "properties": {"object_type": "detection", "classification": {"name": "Stroma", "colorRGB": -6895466},
                        "measurements": [{"name": "Area", "value": 3.5}], "isLocked": False}},
        {"type": "Feature", "geometry": _square(30, 30), "properties": {"classification": "Immune cells", "type": "tile"}},
    ]
    objs = read_geojson(_write(tmp_path / "old.geojson", old))
    assert [o.object_type for o in objs] == ["detection", "tile"]
    packed = -6895466 & 0xFFFFFF
    assert objs[0].classification.color == ((packed >> 16) & 255, (packed >> 8) & 255, packed & 255)
    assert objs[0].measurements == {"Area": 3.5}
    assert objs[1].classification.name == "Immune cells"
    assert objs[1].classification.color == (160, 90, 160)
    one = read_geojson(_write(tmp_path / "one.geojson", new["features"][0]))
    assert len(one) == 1


def test_import_streams_large_files_in_small_blocks(tmp_path):
    from napari_pathoseg.export import reader as gj

    feats = [{"type": "Feature", "geometry": _square(i, i), "properties": {"objectType": "detection",
              "measurements": {"v": i + 0.125}}} for i in range(500)]
    path = _write(tmp_path / "many.geojson", {"features": feats, "type": "FeatureCollection"})
    with open(path, encoding="utf-8") as fh:
        stream = gj._StreamJSON(fh, path, block=37)  # values straddle block borders
        assert stream.peek() == "{"
    objs = []
    orig = gj._StreamJSON.__init__

    def small_blocks(self, fh, p, block=1 << 20):
        orig(self, fh, p, block=53)

    gj._StreamJSON.__init__ = small_blocks
    try:
        objs = read_geojson(path)
    finally:
        gj._StreamJSON.__init__ = orig
    assert len(objs) == 500
    assert [o.measurements["v"] for o in objs] == [i + 0.125 for i in range(500)]


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": ', "not valid JSON"),
        ("hello", "not a GeoJSON"),
        ('{"type": "FeatureCollection"}', "without a 'features'"),
        ('{"type": "Topology"}', "no features"),
        ('[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1]]]}}]', "unreadable"),
        ('[{"type": "Feature", "geometry": null, "properties": {"objectType": "annotation"}}]', "no geometry"),
        ('[{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]}, '
         '"properties": {"objectType": "nucleus"}}]', "not a QuPath object type"),
        ('[{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]}, '
         '"properties": {"measurements": {"a": "x"}}}]', "not a number"),
        ('[{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]}, '
         '"properties": {"classification": {"name": "T", "color": [1, 2, 999]}}}]', "outside 0-255"),
        ('[1, 2]', "not a Feature"),
    ],
)
def test_import_rejects_malformed_files(tmp_path, text, match):
    path = tmp_path / "bad.geojson"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(GeoJSONError, match=match) as info:
        read_geojson(path)
    assert "bad.geojson" in str(info.value)


def test_import_invalid_geometry_and_far_outside(tmp_path):
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}
    path = _write(tmp_path / "inv.geojson", [{"type": "Feature", "geometry": bowtie, "properties": {}}])
    with pytest.raises(GeoJSONError, match="invalid geometry"):
        read_geojson(path)
    fixed = read_geojson(path, repair=True)[0].geometry
    assert fixed.is_valid and fixed.area == pytest.approx(50.0)
    meta = {"level_dimensions": [[1000, 800]], "level_downsamples": [1.0], "bounds_x": 0, "bounds_y": 0}
    ok = _write(tmp_path / "edge.geojson", [{"type": "Feature", "geometry": _square(995, 795, 20)}])
    assert len(read_geojson(ok, slide_metadata=meta)) == 1
    far = _write(tmp_path / "far.geojson", [{"type": "Feature", "geometry": _square(50000, 100, 20)}])
    with pytest.raises(GeoJSONError, match="far outside the slide"):
        read_geojson(far, slide_metadata=meta)
    assert len(read_geojson(far)) == 1  # without a slide nothing to check


def test_write_labels_tiff_streams_tiles(tmp_path):
    import tifffile

    objs = [shapely.box(10, 20, 40, 30), shapely.box(600, 500, 700, 620), shapely.Point(5, 5)]
    out = write_labels_tiff(tmp_path / "l.tif", objs, shape=(700, 800), tile=256)
    arr = tifffile.imread(out)
    assert arr.shape == (700, 800)
    assert np.array_equal(arr, rasterize(objs, shape=(700, 800), dtype=arr.dtype))
    assert (arr == 1).sum() == 30 * 10 and (arr == 2).sum() == 100 * 120 and not (arr == 3).any()


# ---------------------------------------------------------------------------- napari reader / writers
def test_reader_hook_and_layers(tmp_path):
    assert get_geojson_reader(str(tmp_path / "a.tif")) is None
    assert get_geojson_reader([str(tmp_path / "a.geojson"), str(tmp_path / "b.svs")]) is None
    feats = [
        {"type": "Feature", "geometry": _square(100, 100, 50),
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
        {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [10, 10]]},
         "properties": {"objectType": "annotation"}},
    ] + [
        {"type": "Feature", "geometry": _square(10 * i, 300, 6), "properties": {"objectType": "detection",
         "classification": {"name": "Nucleus", "color": [0, 0, 255]}}} for i in range(20)
    ]
    path = _write(tmp_path / "objs.geojson", {"type": "FeatureCollection", "features": feats})
    reader = get_geojson_reader(str(path))
    layers = reader(str(path))
    kinds = [t for _, _, t in layers]
    assert kinds == ["shapes", "labels"]
    shapes_data, shapes_kw, _ = layers[0]
    assert shapes_kw["shape_type"] == ["polygon", "path"]
    assert shapes_kw["features"]["class"] == ["Tumor", ""]
    np.testing.assert_allclose(shapes_data[0].min(axis=0), [99.5, 99.5])
    labels, labels_kw, _ = layers[1]
    assert labels.max() == 20 and (labels == 1).sum() == 36
    # the labels crop sits where the objects are (translate in level-0 pixels without a slide)
    assert labels_kw["translate"] == (300.0, 0.0)
    # many detections -> points
    pts = geojson_layer_data(path, max_label_objects=5)
    assert [t for _, _, t in pts] == ["shapes", "points"]
    assert pts[1][0].shape == (20, 2)


def test_reader_places_objects_over_a_slide(tmp_path):
    meta = {"level_downsamples": [1.0, 4.0], "level_dimensions": [[2000, 2000], [500, 500]],
            "mpp_x": 0.25, "mpp_y": 0.25, "bounds_x": 10, "bounds_y": 20}
    path = _write(tmp_path / "o.geojson", [{"type": "Feature", "geometry": _square(100, 200, 8),
                                            "properties": {"objectType": "detection"}}])
    (labels, kw, kind), = geojson_layer_data(path, slide_metadata=meta)
    assert kind == "labels" and kw["scale"] == (0.25, 0.25)
    # world position of the first labelled pixel centre = level-0 pixel (row 220, col 110) * mpp
    r, c = np.argwhere(labels == 1)[0]
    world = np.array([r, c]) * kw["scale"] + kw["translate"]
    np.testing.assert_allclose(world, [220 * 0.25, 110 * 0.25])
    assert kw["metadata"]["slide"]["bounds_x"] == 10


def test_napari_labels_writer_takes_level0_of_a_multiscale_layer(tmp_path):
    """Whole-slide nuclei layers are multiscale: File > Save as GeoJSON must use level 0."""
    lab = np.zeros((64, 64), np.uint32)
    lab[10:20, 10:20] = 1
    lab[40:50, 30:36] = 2
    MultiScaleData = pytest.importorskip("napari.layers._multiscale_data").MultiScaleData
    pyramid = MultiScaleData([lab, lab[::2, ::2]])  # what napari hands a writer for a multiscale Labels layer
    attrs = {"scale": (1.0, 1.0), "translate": (0.0, 0.0), "metadata": {}, "name": "nuclei", "multiscale": True}
    out = write_labels_geojson(str(tmp_path / "ms.geojson"), pyramid, attrs)
    doc = check_qupath_rules(Path(out[0]))
    assert len(doc["features"]) == 2


def test_napari_writers_round_trip(tmp_path):
    meta = {"level_downsamples": [1.0, 2.0], "level_dimensions": [[400, 400], [200, 200]],
            "mpp_x": 0.5, "mpp_y": 0.5, "bounds_x": 4, "bounds_y": 6}
    lab = np.zeros((50, 60), np.int32)
    lab[5:15, 5:20] = 3
    lab[30:40, 30:35] = 7
    # a layer at twice the level-0 pixel size (scale 1 µm, mpp 0.5) whose pixel edges meet level-0 pixel edges
    attrs = {"scale": (1.0, 1.0), "translate": (10.25, 20.25), "metadata": {"slide": meta, "class_name": "Nucleus"},
             "name": "nuclei", "features": {"index": [3, 7], "class": ["Tumor", "Immune cells"]}}
    out = write_labels_geojson(str(tmp_path / "lab.geojson"), lab, attrs)
    assert out == [str(tmp_path / "lab.geojson")]
    doc = check_qupath_rules(Path(out[0]))
    assert sorted(f["properties"]["classification"]["name"] for f in doc["features"]) == ["Immune cells", "Tumor"]
    (back, kw, kind), = geojson_layer_data(out[0], slide_metadata=meta)
    assert kind == "labels"
    # placed where the original layer was: same world position of the objects' top-left pixel edges
    edge_orig = np.argwhere(lab == 7).min(axis=0) * 1.0 + np.array([10.25, 20.25]) - 0.5
    k = kw["features"]["class"].index("Immune cells") + 1
    scale_b = np.array(kw["scale"])
    edge_back = np.argwhere(back == k).min(axis=0) * scale_b + np.array(kw["translate"]) - scale_b / 2
    np.testing.assert_allclose(edge_back, edge_orig)
    assert (back == k).sum() == (lab == 7).sum() * 4
    shapes = [np.array([[0, 0], [0, 10], [10, 10], [10, 0]], float)]
    s_attrs = {"scale": (0.5, 0.5), "translate": (0, 0), "metadata": {"slide": meta}, "shape_type": ["rectangle"],
               "features": {"class": ["Tumor"]}, "edge_color": np.array([[0.0, 1.0, 0.0, 1.0]])}
    out = write_shapes_geojson(str(tmp_path / "s.geojson"), shapes, s_attrs)
    f = check_qupath_rules(Path(out[0]))["features"][0]
    assert f["properties"]["classification"] == {"name": "Tumor", "color": [0, 255, 0]}
    ring = np.asarray(f["geometry"]["coordinates"][0])
    assert ring[:, 0].min() == pytest.approx(0.5 - 4) and ring[:, 1].min() == pytest.approx(0.5 - 6)
    assert write_shapes_geojson(str(tmp_path / "s.png"), shapes, s_attrs) == []


# ---------------------------------------------------------------------------- CLI
def test_cli_export_and_import(shared_data, tmp_path, make_pyramid_tiff, capsys):
    from napari_pathoseg.cli.main import main

    image_id = MONUSEG[0]
    rgb = np.asarray(Image.open(shared_data / "monuseg_train" / "images" / f"{image_id}.png").convert("RGB"))
    slide_path = make_pyramid_tiff(tmp_path / "slide.tif", rgb, levels=2, mpp=0.25)
    lab = monuseg_mask(shared_data, image_id)
    np.save(tmp_path / "labels.npy", lab)
    out = tmp_path / "nuclei.geojson"
    code = main(["export", str(tmp_path / "labels.npy"), "--slide", str(slide_path), "--out", str(out),
                 "--class", "Tumor", "--model", "nuclei-lite"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_objects"] == len(np.unique(lab)) - 1 and result["level"] == 0
    doc = check_qupath_rules(out)
    props = doc["features"][0]["properties"]
    assert props["classification"]["name"] == "Tumor" and props["metadata"] == {"model": "nuclei-lite"}
    assert {"Area µm^2", "Hematoxylin OD mean", "Eosin OD mean", "Solidity"} <= set(props["measurements"])
    assert out.with_suffix(".csv").exists()
    tif = tmp_path / "labels_back.tif"
    code = main(["import", str(out), "--slide", str(slide_path), "--out", str(tif)])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_objects"] == len(doc["features"]) and result["classes"] == {"Tumor": len(doc["features"])}
    import tifffile

    back = tifffile.imread(tif)
    assert back.shape == lab.shape
    assert ((back > 0) == (lab > 0)).mean() > 0.999
    # level 1 labels are recognised by their size; a wrong size gets a clear message
    np.save(tmp_path / "l1.npy", lab[::2, ::2])
    assert main(["export", str(tmp_path / "l1.npy"), "--slide", str(slide_path), "--out", str(tmp_path / "l1.geojson"),
                 "--no-measure"]) == 0
    assert json.loads(capsys.readouterr().out)["level"] == 1
    np.save(tmp_path / "odd.npy", lab[:333, :333])
    assert main(["export", str(tmp_path / "odd.npy"), "--slide", str(slide_path), "--out", str(tmp_path / "o.geojson")]) == 2
    assert "--level" in capsys.readouterr().err


def test_export_core_does_not_import_napari():
    code = (
        "import sys; import napari_pathoseg.export, napari_pathoseg.export.napari_io, napari_pathoseg.cli.export; "
        "bad = [m for m in ('napari', 'qtpy', 'magicgui', 'PyQt5') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_standard_library_json_writes_the_same_document(tmp_path, monkeypatch):
    import importlib
    import pkgutil

    import napari_pathoseg.export as pkg
    from napari_pathoseg.export import _encode

    lab = np.zeros((60, 60), np.int32)
    lab[5:20, 5:25] = 1
    lab[8:12, 8:12] = 0
    lab[30:50, 30:34] = 2
    lab[40:44, 50:58] = 2
    kwargs = dict(measure=["area", "eccentricity"], metadata={"model": "m"}, measurements_path=False)
    run_export_labels(tmp_path / "fast.geojson", lab, **kwargs)
    std = lambda obj: _encode._STD_ENCODER.encode(obj).encode("utf-8")  # noqa: E731
    patched = []
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if hasattr(module, "_dumps"):
            monkeypatch.setattr(module, "_dumps", std)
            patched.append(info.name)
    assert {"_encode", "geometry", "labels_export"} <= set(patched)
    run_export_labels(tmp_path / "std.geojson", lab, **kwargs)
    a = check_qupath_rules(tmp_path / "fast.geojson")["features"]
    b = check_qupath_rules(tmp_path / "std.geojson")["features"]
    for fa, fb in zip(a, b):
        fa.pop("id"), fb.pop("id")
        assert fa == fb


# ---------------------------------------------------------------------------- output files
def test_measurements_path_decides_where_the_table_goes(tmp_path):
    lab = np.zeros((30, 30), np.int32)
    lab[2:8, 2:9] = 1
    lab[15:25, 12:20] = 2
    square = np.array([[0, 0], [0, 10], [10, 10], [10, 0]], float)
    # labels: default True -> OUT.csv only when something is measured; False -> none; a path -> there
    assert run_export_labels(tmp_path / "a.geojson", lab, measure=[]).measurements_path is None
    assert run_export_labels(tmp_path / "b.geojson", lab, measure=["area"]).measurements_path == tmp_path / "b.csv"
    assert run_export_labels(tmp_path / "c.geojson", lab, measure=["area"], measurements_path=False).measurements_path is None
    (tmp_path / "t").mkdir()
    res = run_export_labels(tmp_path / "d.geojson", lab, measure=[], measurements_path=tmp_path / "t" / "d.tsv")
    assert res.measurements_path == tmp_path / "t" / "d.tsv"
    # shapes: the same rules with measure=True/False
    assert run_export_shapes(tmp_path / "e.geojson", [square], measure=False).measurements_path is None
    assert run_export_shapes(tmp_path / "f.geojson", [square]).measurements_path == tmp_path / "f.csv"
    assert run_export_shapes(tmp_path / "g.geojson", [square], measurements_path=None).measurements_path is None
    res = run_export_shapes(tmp_path / "h.geojson", [square], measure=False, measurements_path=tmp_path / "h_table.csv")
    assert res.measurements_path == tmp_path / "h_table.csv"
    with open(res.measurements_path, newline="", encoding="utf-8") as fh:
        assert next(csv.reader(fh)) == ["id", "index", "class", "centroid_x", "centroid_y"]
    written = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert written == sorted(["a.geojson", "b.geojson", "b.csv", "c.geojson", "d.geojson", "d.tsv", "e.geojson",
                              "f.geojson", "f.csv", "g.geojson", "h.geojson", "h_table.csv"])
    # a table in a folder that does not exist: a clear error naming it, and nothing written
    for run, arg in ((run_export_labels, lab), (run_export_shapes, [square])):
        with pytest.raises(ExportError, match="no_such_folder.*does not exist"):
            run(tmp_path / "z.geojson", arg, measurements_path=tmp_path / "no_such_folder" / "z.csv")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == written


def test_failed_or_cancelled_exports_leave_neither_geojson_nor_table(tmp_path):
    lab = np.zeros((64, 64), np.int32)
    lab[2:6, 2:6] = 1
    lab[30:60, 30:60] = 2  # too large for max_object_pixels, met after the table was opened
    with pytest.raises(ExportError, match="max_object_pixels"):
        run_export_labels(tmp_path / "x.geojson", lab, measure=["area"], chunk_size=16, halo=0, max_object_pixels=100)
    squares = [np.array([[0, 0], [0, 5], [5, 5], [5, 0]], float) + k for k in range(1001)]
    with pytest.raises(CancelledError):
        run_export_shapes(tmp_path / "y.geojson", squares, cancel=lambda: True)
    assert list(tmp_path.iterdir()) == []


def test_non_finite_measurements_are_left_out_of_features_and_empty_in_the_table(tmp_path):
    lab = np.zeros((20, 20), np.int32)
    lab[2:6, 2:6] = 1
    lab[10:14, 10:16] = 2
    prob = np.full(lab.shape, 0.75)
    prob[3, 3] = np.nan  # object 1's confidence is NaN
    res = run_export_labels(tmp_path / "n.geojson", lab, probability=prob, measure=["area", "confidence"])
    ids = label_of_id(res.measurements_path)
    feats = {ids[f["id"]]: f["properties"]["measurements"] for f in check_qupath_rules(res.path)["features"]}
    assert feats[1] == {"Area px^2": 16.0}
    assert feats[2] == {"Area px^2": 24.0, "Confidence": 0.75}
    with open(res.measurements_path, newline="", encoding="utf-8") as fh:
        rows = {int(r["label"]): r for r in csv.DictReader(fh)}
    assert rows[1]["Confidence"] == "" and float(rows[2]["Confidence"]) == 0.75


def test_csv_table_writer_commits_or_aborts_atomically(tmp_path):
    from napari_pathoseg._atomic import TMP_SUFFIX
    from napari_pathoseg.export.measurements import CsvTableWriter

    writer = CsvTableWriter(tmp_path / "t.csv", ["a", "b"])
    writer.write_rows([[1, float("nan")], ["x", 2.5]])
    assert not (tmp_path / "t.csv").exists() and len(list(tmp_path.glob(f".t.csv.*{TMP_SUFFIX}"))) == 1
    assert writer.commit() == tmp_path / "t.csv"
    assert (tmp_path / "t.csv").read_text(encoding="utf-8").splitlines() == ["a,b", "1,", "x,2.5"]
    assert writer.n_rows == 2
    aborted = CsvTableWriter(tmp_path / "u.csv", ["a"])
    aborted.write_rows([[1]])
    aborted.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]


def test_cli_refuses_a_level_the_slide_does_not_have(tmp_path, make_pyramid_tiff, capsys):
    from napari_pathoseg.cli.main import main

    rgb = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    slide_path = make_pyramid_tiff(tmp_path / "slide.tif", rgb, levels=2)
    lab = np.zeros((512, 512), np.int32)
    lab[10:20, 10:20] = 1
    np.save(tmp_path / "labels.npy", lab)
    assert main(["export", str(tmp_path / "labels.npy"), "--slide", str(slide_path), "--out", str(tmp_path / "o.geojson"),
                 "--level", "5"]) == 2
    assert f"--level 5 does not exist in {slide_path} (levels 0..1)" in capsys.readouterr().err
    run_export_labels(tmp_path / "ok.geojson", lab, measure=[])
    assert main(["import", str(tmp_path / "ok.geojson"), "--slide", str(slide_path), "--out", str(tmp_path / "b.tif"),
                 "--level", "-1"]) == 2
    assert f"--level -1 does not exist in {slide_path} (levels 0..1)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.npy", "ok.geojson", "slide.tif"]
