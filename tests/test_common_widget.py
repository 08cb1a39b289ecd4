"""The helpers every dock shares (`_widgets/_common.py`)."""

from __future__ import annotations

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


def test_report_error_shows_input_errors_as_is_and_bugs_with_their_type(common, monkeypatch, caplog):
    from napari_pathoseg.errors import PathosegError

    shown = []
    monkeypatch.setattr(common, "show_error", shown.append)
    assert common.report_error(PathosegError("bad.svs is empty"), action="Opening") == "bad.svs is empty"
    assert common.report_error(ValueError("boom"), action="Export") == "Export failed: ValueError: boom"
    assert shown == ["bad.svs is empty", "Export failed: ValueError: boom"]
    assert [r.exc_info is not None for r in caplog.records if r.levelname == "ERROR"] == [True]


def test_adopt_units_and_follow_slide_units(common, make_napari_viewer):
    viewer = make_napari_viewer()
    slide = viewer.add_image(np.zeros((64, 80, 3), np.uint8), rgb=True, scale=(0.5, 0.5), units=("µm", "µm"))
    common.follow_slide_units(viewer, lambda v: [slide])
    shapes = viewer.add_shapes(name="drawn")  # napari's default: pixels
    points = viewer.add_points(np.zeros((1, 2)), name="marks")
    assert str(shapes.units[0]) == str(points.units[0]) == "micrometer"
    assert viewer.layers.extent.units is not None
    # a layer with physical units of its own keeps them; pixels next to pixels stay pixels
    nm = viewer.add_labels(np.zeros((4, 4), np.uint8), units=("nm", "nm"))
    assert str(nm.units[0]) == "nanometer"
    plain = viewer.add_image(np.zeros((4, 4)), name="plain")
    assert not common.adopt_units(plain, viewer.add_image(np.zeros((4, 4)), name="pixels"))


def test_display_and_small_levels(common):
    import dask.array as da

    small = np.arange(100 * 80, dtype=np.uint32).reshape(100, 80)
    assert common.display_levels(small) == [small]
    big = np.zeros((3000, 2200), np.uint32)
    big[::7, ::5] = 3
    levels = common.display_levels(big)
    assert levels[0] is big and [lv.shape for lv in levels[1:]] == [(1500, 1100), (750, 550), (375, 275)]
    np.testing.assert_array_equal(levels[2], big[::4, ::4])
    assert all(lv.flags["C_CONTIGUOUS"] for lv in levels[1:])
    lazy = [da.ones((4096, 4096), chunks=512), da.ones((2048, 2048), chunks=512), da.ones((1024, 1024), chunks=512)]
    loaded = common.load_small_levels(lazy, max_pixels=2048 * 2048)
    assert hasattr(loaded[0], "chunks") and all(isinstance(lv, np.ndarray) for lv in loaded[1:])


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
