"""The "Export" dock: export labels/shapes layers in a worker, Stop, errors, and import over a slide."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def _nuclei(n_side: int = 6, size: int = 240) -> np.ndarray:
    rng = np.random.default_rng(0)
    lab = np.zeros((size, size), np.int32)
    k = 0
    step = size // n_side
    for r in range(n_side):
        for c in range(n_side):
            k += 1
            r0, c0 = r * step + rng.integers(2, 6), c * step + rng.integers(2, 6)
            lab[r0 : r0 + rng.integers(8, 20), c0 : c0 + rng.integers(8, 20)] = k
    return lab


def _slide_layer(viewer, rgb, mpp=0.5):
    from napari_pathoseg._reader import slide_layer_data
    from napari_pathoseg.wsi.slide import Slide

    data, kwargs, _ = slide_layer_data(Slide.from_array(rgb, mpp=mpp, name="he"), name="slide")
    return viewer.add_image(data, **kwargs)


def _wait(qtbot, widget, timeout=30000):
    qtbot.waitUntil(lambda: not widget.jobs.running, timeout=timeout)


def test_export_dock_writes_labels_and_shapes_over_a_slide(make_napari_viewer, qtbot, tmp_path, he_image):
    from napari_pathoseg._widgets.export import ExportWidget

    viewer = make_napari_viewer()
    rgb = he_image[:240, :240]
    _slide_layer(viewer, rgb, mpp=0.5)
    lab = _nuclei()
    viewer.add_labels(lab, name="nuclei", scale=(0.5, 0.5))
    viewer.add_shapes([np.array([[10, 10], [10, 100], [100, 100], [100, 10]])], shape_type="polygon", name="tumour",
                      scale=(0.5, 0.5))
    widget = ExportWidget(viewer)
    qtbot.addWidget(widget)
    assert widget.slide_combo.currentText() == "slide"
    assert [n for n, _ in widget._table_state()] == ["nuclei", "tumour"]
    assert not widget.export_btn.isEnabled()  # no output yet
    assert "output" in widget.export_btn.toolTip()
    widget.set_layer_class("nuclei", "Tumor cell", (10, 200, 30))
    widget.set_layer_class("tumour", "Tumor")
    widget.model_edit.setText("nuclei-lite")
    widget.out_edit.setText(str(tmp_path / "out.geojson"))
    assert widget.export_btn.isEnabled()
    widget.export_btn.click()
    _wait(qtbot, widget)
    assert len(widget.results) == 2
    nuclei = json.loads((tmp_path / "out_nuclei.geojson").read_text())
    assert len(nuclei["features"]) == lab.max()
    props = nuclei["features"][0]["properties"]
    assert props["objectType"] == "detection"
    assert props["classification"] == {"name": "Tumor cell", "color": [10, 200, 30]}
    assert props["metadata"] == {"model": "nuclei-lite"}
    assert {"Area µm^2", "Hematoxylin OD mean", "Eosin OD mean"} <= set(props["measurements"])
    assert (tmp_path / "out_nuclei.csv").exists()
    tumour = json.loads((tmp_path / "out_tumour.geojson").read_text())["features"][0]
    assert tumour["properties"]["objectType"] == "annotation"
    assert tumour["properties"]["classification"]["name"] == "Tumor"
    ring = np.asarray(tumour["geometry"]["coordinates"][0])
    np.testing.assert_allclose(ring.min(axis=0), [10.5, 10.5])

    # open it back over the slide: labels placed with the slide's scale
    widget.set_checked(["nuclei"])
    job = widget.open_geojson(tmp_path / "out_nuclei.geojson")
    qtbot.waitUntil(lambda: job.ended, timeout=30000)
    assert job.error is None
    layer = viewer.layers["out_nuclei detections"]
    assert layer.data.max() == lab.max()
    np.testing.assert_allclose(layer.scale, (0.5, 0.5))
    # in the slide's physical units, like the slide layer (the scale bar reads µm, not pixels)
    assert tuple(str(u) for u in layer.units) == tuple(str(u) for u in viewer.layers["slide"].units[-2:])
    assert "micrometer" in str(layer.units[0])


def test_export_dock_stop_and_errors(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    from napari_pathoseg._widgets import export as export_mod
    from napari_pathoseg._widgets.export import ExportWidget

    errors = []
    monkeypatch.setattr(export_mod, "show_error", lambda msg: errors.append(msg))
    monkeypatch.setattr("napari_pathoseg._widgets._common.show_error", lambda msg: errors.append(msg))
    monkeypatch.setattr(export_mod, "show_info", lambda msg: None)
    viewer = make_napari_viewer()
    big = np.arange(1, 512 * 512 + 1, dtype=np.int32).reshape(512, 512) * (np.indices((512, 512)).sum(0) % 3 == 0)
    viewer.add_labels(big, name="many")
    widget = ExportWidget(viewer)
    qtbot.addWidget(widget)
    widget.out_edit.setText(str(tmp_path / "many.geojson"))
    for box in widget.measure_boxes.values():
        box.setChecked(False)
    worker = widget.export()
    assert widget.stop_btn.isEnabled()
    widget.stop_btn.click()
    _wait(qtbot, widget, timeout=60000)
    assert not (tmp_path / "many.geojson").exists()
    assert not list(tmp_path.glob(".many*"))
    assert widget.export_btn.isEnabled() and not widget.stop_btn.isEnabled()
    assert worker is not None

    # a bad class colour from the core is shown, not raised
    viewer.layers.remove("many")
    viewer.add_labels(np.zeros((3, 8, 8), np.int32), name="stack")
    widget.refresh_layers()
    widget.out_edit.setText(str(tmp_path / "stack.geojson"))
    widget.export()
    _wait(qtbot, widget)
    assert errors and "2-D" in errors[-1]
    assert not (tmp_path / "stack.geojson").exists()


def test_confidence_comes_from_the_nuclei_table_or_is_disabled(make_napari_viewer, qtbot, tmp_path, sync_jobs):
    """The Nuclei dock keeps a per-nucleus table (with confidence) in the labels' metadata."""
    from napari_pathoseg._widgets.export import ExportWidget

    viewer = make_napari_viewer()
    lab = _nuclei()
    plain = viewer.add_labels(lab, name="painted", scale=(0.5, 0.5))
    widget = ExportWidget(viewer)
    qtbot.addWidget(widget)
    box = widget.measure_boxes["confidence"]
    # no probability layer and no table: the box cannot be used, and says why
    assert not box.isEnabled() and not box.isChecked() and "Probability" in box.toolTip()

    rng = np.random.default_rng(1)
    ids = np.unique(lab[lab > 0])
    conf = {int(i): round(float(c), 4) for i, c in zip(ids, rng.uniform(0.5, 1.0, ids.size))}
    table = [{"id": i, "x": 0.0, "y": 0.0, "area_um2": 1.0, "confidence": c} for i, c in conf.items()]
    del table[3]  # a nucleus missing from the table (e.g. painted after segmentation): no value
    missing = int(ids[3])
    viewer.add_labels(lab, name="nuclei", scale=(0.5, 0.5), metadata={"model": "nuclei-lite", "table": table})
    widget.set_checked(["nuclei"])
    assert box.isEnabled() and "table" in box.toolTip()
    box.setChecked(True)
    widget.out_edit.setText(str(tmp_path / "conf.geojson"))
    job = widget.export()
    assert job.ended and job.error is None
    feats = json.loads((tmp_path / "conf.geojson").read_text())["features"]
    assert len(feats) == ids.size
    assert sum("Confidence" in f["properties"]["measurements"] for f in feats) == ids.size - 1
    with open(tmp_path / "conf.csv", newline="") as fh:
        rows = {int(r["label"]): r["Confidence"] for r in csv.DictReader(fh)}
    assert rows[missing] == ""  # no value rather than a wrong one
    got = {label: float(v) for label, v in rows.items() if label != missing}
    assert got.keys() == {i for i in conf if i != missing}
    np.testing.assert_allclose([got[i] for i in sorted(got)], [conf[i] for i in sorted(got)], atol=1e-4)
    # both layers checked: measured where there is a table, and the tooltip names the other
    widget.set_checked(["nuclei", plain.name])
    assert box.isEnabled() and "painted" in box.toolTip()
