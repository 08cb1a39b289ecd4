"""The helpers every dock shares (`_widgets/_common.py`)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytestmark = pytest.mark.gui


@pytest.fixture
def common():
    from napari_pathoseg._widgets import _common

    return _common


def test_refill_combo_keeps_the_choice_silently(common, qtbot):
    from qtpy.QtWidgets import QComboBox

    combo = QComboBox()
    qtbot.addWidget(combo)
    changes = []
    combo.currentIndexChanged.connect(changes.append)
    common.refill_combo(combo, ["a", "b", "c"])
    combo.setCurrentText("b")
    changes.clear()
    common.refill_combo(combo, ["c", "b"])
    assert combo.currentText() == "b" and combo.count() == 2
    common.refill_combo(combo, ["x", "y"], fallback=1)  # "b" is gone: item 1
    assert combo.currentText() == "y"
    common.refill_combo(combo, ["x", "y", "z"], current="z")
    assert combo.currentText() == "z"
    common.refill_combo(combo, [])
    assert combo.currentIndex() == -1
    assert changes == [] and not combo.signalsBlocked()


def test_layout_helpers_place_items_with_stretch(common, qtbot):
    from qtpy.QtWidgets import QFormLayout, QLineEdit, QPushButton, QWidget

    parent = QWidget()
    qtbot.addWidget(parent)
    edit, btn = QLineEdit(), QPushButton("Browse…")
    row = common.hbox((edit, 1), btn)
    assert [row.itemAt(i).widget() for i in range(row.count())] == [edit, btn]
    assert (row.stretch(0), row.stretch(1)) == (1, 0)
    fields = common.form(("File", row), ("Name", QLineEdit()))
    assert isinstance(fields, QFormLayout) and fields.rowCount() == 2
    status = common.status_label("ready")
    column = common.vbox(parent, fields, (status, 2), stretch_end=True)
    assert parent.layout() is column
    assert column.itemAt(0).layout() is fields and column.itemAt(1).widget() is status
    assert column.stretch(1) == 2 and column.itemAt(2).spacerItem() is not None
    assert status.wordWrap() and status.text() == "ready"
    assert not common.stop_button().isEnabled()


def test_layer_helpers(common, make_napari_viewer):
    viewer = make_napari_viewer()
    seen = []
    common.watch_layer_list(viewer, lambda event=None: seen.append(len(viewer.layers)))
    layer = viewer.add_image(np.zeros((4, 4)), name="img")
    assert common.layer_named(viewer, "img") is layer
    assert common.layer_named(viewer, "missing") is None and common.layer_named(viewer, "") is None
    viewer.layers.remove(layer)
    assert seen == [1, 0]


def test_docked_widgets_finds_docks_by_class(common, make_napari_viewer):
    from qtpy.QtWidgets import QLabel, QWidget

    class Probe(QWidget):
        pass

    viewer = make_napari_viewer()
    probe = Probe()
    viewer.window.add_dock_widget(probe, name="probe")
    viewer.window.add_dock_widget(QLabel("other"), name="other")
    assert common.docked_widgets(viewer, Probe) == [probe]
    assert common.docked_widgets(object(), Probe) == []  # no window: nothing


def test_file_dialogs_fill_the_edit(common, qtbot, monkeypatch):
    from qtpy.QtWidgets import QFileDialog, QLineEdit

    edit = QLineEdit("old")
    qtbot.addWidget(edit)
    calls = []
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a: (calls.append(a[1:]), ("/x/slide.svs", ""))[1])
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a: "")
    assert common.ask_open_file(edit, "Open slide", "Slides (*.svs)", into=edit) == "/x/slide.svs"
    assert edit.text() == "/x/slide.svs" and calls == [("Open slide", "", "Slides (*.svs)")]
    assert common.ask_directory(edit, "Folder", into=edit) == ""  # cancelled: the edit is kept
    assert edit.text() == "/x/slide.svs"


def test_worker_wiring(common, qtbot, monkeypatch):
    from napari.qt.threading import thread_worker
    from qtpy.QtWidgets import QLabel, QProgressBar

    from napari_pathoseg.errors import PathosegError

    shown = []
    monkeypatch.setattr(common, "show_error", shown.append)
    status, bar, stop = QLabel(), QProgressBar(), common.stop_button()
    stop.setEnabled(True)

    # Stop: sets the token, says so, disables the button; nothing to stop -> False
    assert not common.request_stop(None, status=status)
    cancel = threading.Event()
    assert common.request_stop(cancel, status=status, message="halt", stop_button=stop)
    assert cancel.is_set() and status.text() == "halt" and not stop.isEnabled()

    # progress: an unknown total leaves the bar alone
    bar.setRange(0, 0)
    common.show_progress(bar, 3, 0)
    assert (bar.minimum(), bar.maximum()) == (0, 0)
    common.show_progress(bar, 3, 10)
    assert (bar.maximum(), bar.value()) == (10, 3)
    common.idle_progress(bar, 1)
    assert (bar.maximum(), bar.value()) == (1, 1)

    # errors: shown, written on the status line, the bar idle
    bar.setRange(0, 0)
    assert common.show_worker_error(PathosegError("bad.svs is empty"), action="Opening", status=status,
                                    progress=bar) == "bad.svs is empty"
    assert status.text() == "bad.svs is empty" and shown[-1] == "bad.svs is empty"
    assert (bar.maximum(), bar.value()) == (1, 0)
    text = common.show_worker_error(ValueError("boom"), action="Export", status=status)
    assert text == "Export failed: ValueError: boom" == shown[-1]

    # connect_worker: every named signal reaches its slot; the worker is not started
    @thread_worker(ignore_errors=True)
    def job(n):
        for i in range(n):
            yield i
        return "done"

    got = {"yielded": [], "returned": [], "finished": 0}
    worker = common.connect_worker(
        job(3),
        yielded=got["yielded"].append,
        returned=got["returned"].append,
        errored=None,
        finished=lambda: got.__setitem__("finished", got["finished"] + 1),
    )
    assert not worker.is_running
    with qtbot.waitSignal(worker.finished, timeout=10_000):
        worker.start()
    qtbot.waitUntil(lambda: got["finished"] == 1, timeout=10_000)
    assert got["yielded"] == [0, 1, 2] and got["returned"] == ["done"]


def test_grid_placement_puts_coarse_pixels_exactly_over_the_slide(common, make_napari_viewer):
    viewer = make_napari_viewer()
    slide = viewer.add_image(np.zeros((64, 80, 3), np.uint8), rgb=True, scale=(0.5, 0.25),
                             translate=(10.0, 20.0), units=("micrometer", "micrometer"))
    # an 8x-coarser array whose pixel (0, 0) covers level-0 rows 16..24, cols 8..16
    place = common.grid_placement(slide, row=16, col=8, downsample=8)
    labels = viewer.add_labels(np.ones((2, 3), np.uint8), **place)
    assert "micrometer" in str(labels.units[0])
    # the world position of the coarse pixel's centre is the centre of the level-0 block
    np.testing.assert_allclose(labels.data_to_world((0, 0)), slide.data_to_world((16 + 3.5, 8 + 3.5)))
    np.testing.assert_allclose(labels.data_to_world((1, 2)), slide.data_to_world((24 + 3.5, 24 + 3.5)))
    # anisotropic downsample (a review tile of 128 x 96 level-0 px stored as 64 x 64)
    place = common.grid_placement(slide, row=0, col=0, downsample=(2.0, 1.5))
    assert place["scale"] == (1.0, 0.375)
    lab2 = viewer.add_labels(np.ones((64, 64), np.uint8), **place)
    np.testing.assert_allclose(lab2.data_to_world((0, 0)), slide.data_to_world((0.5, 0.25)))
