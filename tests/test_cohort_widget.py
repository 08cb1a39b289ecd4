"""The Cohort dock: run a cohort (synchronous jobs, in-process cluster), live table, open a result."""

from __future__ import annotations

import numpy as np
import pytest

from test_cohort import make_cohort


@pytest.fixture
def dock(make_napari_viewer, sync_jobs):
    from napari_pathoseg._widgets.cohort import CohortWidget

    viewer = make_napari_viewer()
    widget = CohortWidget(viewer)
    widget.processes = False  # workers as threads of the test process: no process start-up
    viewer.window.add_dock_widget(widget)
    return viewer, widget


def test_dock_runs_a_cohort_and_opens_a_finished_slide(dock, tmp_path, he_image, make_pyramid_tiff, one_torch_thread):
    viewer, w = dock
    assert not w.run_btn.isEnabled() and "manifest" in w.run_btn.toolTip()
    assert w.task_combo.currentText() == "nuclei" and w.model_combo.currentText() == "nuclei-lite"
    folder = make_cohort(tmp_path / "slides", he_image, make_pyramid_tiff, good=1)
    w.source_edit.setText(str(folder))
    w.out_edit.setText(str(tmp_path / "out"))
    w.workers_spin.setValue(1)
    assert w.run_btn.isEnabled()
    w.run_btn.click()
    cols = [w.table.horizontalHeaderItem(c).text() for c in range(w.table.columnCount())]
    table = {w.table.item(r, 0).text(): {c: w.table.item(r, i).text() for i, c in enumerate(cols)}
             for r in range(w.table.rowCount())}
    assert table["broken"]["status"] == "failed" and "broken.tif" in table["broken"]["error"]
    assert table["slide0"]["status"] == "ok" and int(table["slide0"]["n_nuclei"]) > 20
    assert "1 ok, 1 failed" in w.status.text()

    # a failed slide has nothing to open; a finished one opens with its labels over it
    n_layers = len(viewer.layers)
    w._on_open_row(0)
    assert len(viewer.layers) == n_layers and "no finished result" in w.status.text()
    w._on_open_row(1)
    slide_layer, labels = viewer.layers[-2], viewer.layers[-1]
    assert labels.name == "slide0 labels" and slide_layer.name == "slide0.tif"
    assert int(np.asarray(labels.data).max()) == int(table["slide0"]["n_nuclei"])
    assert tuple(labels.units) == tuple(slide_layer.units)
    assert np.allclose(labels.scale, slide_layer.scale)

    # a second run skips the finished slide, redoes the failed one
    w.run_btn.click()
    statuses = {w.table.item(r, 0).text(): w.table.item(r, 1).text() for r in range(w.table.rowCount())}
    assert statuses == {"broken": "failed", "slide0": "skipped"}


def test_dock_refuses_a_bad_manifest(dock, tmp_path):
    viewer, w = dock
    (tmp_path / "m.csv").write_text("path\nx.svs\n")
    w.source_edit.setText(str(tmp_path / "m.csv"))
    w.out_edit.setText(str(tmp_path / "out"))
    w.run_btn.click()
    assert "needs a 'slide' column" in w.status.text()
    assert not w.jobs.running
