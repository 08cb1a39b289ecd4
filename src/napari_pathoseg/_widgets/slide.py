"""The "Slide" dock: open a slide, see its metadata and thumbnail, toggle a tissue mask."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QWidget,
)

from napari_pathoseg._widgets._common import (
    ask_open_file,
    connect_worker,
    grid_placement,
    hbox,
    layer_named,
    refill_combo,
    report_error,
    vbox,
    watch_layer_list,
)
from napari_pathoseg._reader import slide_layer_data
from napari_pathoseg.errors import PathosegError
from napari_pathoseg.wsi.slide import SLIDE_EXTENSIONS, Slide, open_slide
from napari_pathoseg.tiling import tissue_mask

if TYPE_CHECKING:
    import napari

__all__ = ["SlideWidget", "slide_layers", "slide_of_layer"]

logger = logging.getLogger(__name__)


def slide_layers(viewer: "napari.Viewer") -> list:
    """Image layers of ``viewer`` that hold a pathoseg slide (results over a slide are not listed)."""
    from napari.layers import Image

    return [
        ly
        for ly in viewer.layers
        if isinstance(ly, Image) and ly.rgb and isinstance(ly.metadata.get("pathoseg_slide"), Slide)
    ]


def slide_of_layer(layer: Any) -> Slide | None:
    """The slide behind a layer opened by napari-pathoseg, or None."""
    s = getattr(layer, "metadata", {}).get("pathoseg_slide")
    return s if isinstance(s, Slide) else None


def _pixmap(rgb: np.ndarray, max_side: int = 280) -> QPixmap:
    rgb = np.ascontiguousarray(rgb[..., :3])
    h, w = rgb.shape[:2]
    img = QImage(rgb.data, w, h, 3 * w, QImage.Format_RGB888).copy()
    return QPixmap.fromImage(img).scaled(max_side, max_side, Qt.KeepAspectRatio, Qt.SmoothTransformation)


class SlideWidget(QWidget):
    """Open a whole-slide image, show its metadata and thumbnail, show/hide its tissue mask."""

    def __init__(self, napari_viewer: "napari.Viewer") -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._worker = None

        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("slide file (.svs, .ndpi, .mrxs, .tif, ...)")
        self.browse_btn = QPushButton("Browse…")
        self.open_btn = QPushButton("Open")

        self.layer_combo = QComboBox()
        self.meta_text = QPlainTextEdit()
        self.meta_text.setReadOnly(True)
        self.meta_text.setMinimumHeight(140)
        self.thumb = QLabel("no slide")
        self.thumb.setAlignment(Qt.AlignCenter)
        self.thumb.setMinimumHeight(160)
        self.mask_check = QCheckBox("Show tissue mask")
        self.status = QLabel("")

        vbox(
            self,
            hbox(self.path_edit, self.browse_btn),
            self.open_btn,
            QLabel("Slide layer:"),
            self.layer_combo,
            self.thumb,
            self.meta_text,
            self.mask_check,
            self.status,
            stretch_end=True,
        )

        self.browse_btn.clicked.connect(self._on_browse)
        self.open_btn.clicked.connect(self._on_open)
        self.path_edit.returnPressed.connect(self._on_open)
        self.layer_combo.currentIndexChanged.connect(self._on_layer_changed)
        self.mask_check.toggled.connect(self._on_mask_toggled)
        watch_layer_list(self.viewer, self._refresh_layers)
        self._refresh_layers()

    # ------------------------------------------------------------------ helpers
    def current_layer(self):
        return layer_named(self.viewer, self.layer_combo.currentText())

    def _refresh_layers(self, event: Any = None) -> None:
        refill_combo(self.layer_combo, [ly.name for ly in slide_layers(self.viewer)])
        self._on_layer_changed()

    # ------------------------------------------------------------------ callbacks
    def _on_browse(self) -> None:
        pattern = "Slides (" + " ".join(f"*{e}" for e in SLIDE_EXTENSIONS) + ");;All files (*)"
        if ask_open_file(self, "Open slide", pattern, into=self.path_edit):
            self._on_open()

    def _on_open(self) -> None:
        path = self.path_edit.text().strip()
        if not path:
            show_error("Choose a slide file first.")
            return
        self.open_btn.setEnabled(False)
        self.status.setText(f"opening {Path(path).name}…")
        worker = connect_worker(
            _open_worker(path),
            returned=self._on_opened,
            errored=self._on_error,
            finished=lambda: self.open_btn.setEnabled(True),
        )
        self._worker = worker
        worker.start()

    def _on_opened(self, result: tuple[Slide, np.ndarray]) -> None:
        slide, _thumb = result
        data, kwargs, _ = slide_layer_data(slide)
        layer = self.viewer.add_image(data, **kwargs)
        self.status.setText("")
        self._refresh_layers()
        self.layer_combo.setCurrentText(layer.name)
        show_info(f"Opened {layer.name}")

    def _on_error(self, exc: Exception) -> None:
        self.status.setText("")
        report_error(exc, action="Opening the slide")

    def _on_layer_changed(self, *args: Any) -> None:
        layer = self.current_layer()
        slide = slide_of_layer(layer) if layer is not None else None
        if slide is None:
            self.meta_text.setPlainText("")
            self.thumb.setText("no slide")
            return
        d = slide.metadata.to_dict()
        show = {k: d[k] for k in ("path", "format", "vendor", "levels", "mpp_x", "mpp_y", "objective_power", "bounds_x", "bounds_y", "associated_images", "tile_size")}
        self.meta_text.setPlainText(json.dumps(show, indent=1, default=str))
        try:
            self.thumb.setPixmap(_pixmap(slide.thumbnail(max_size=512)))
        except PathosegError as exc:
            self.thumb.setText(str(exc))
        name = f"{layer.name} tissue"
        self.mask_check.blockSignals(True)
        self.mask_check.setChecked(name in self.viewer.layers and self.viewer.layers[name].visible)
        self.mask_check.blockSignals(False)

    def _on_mask_toggled(self, checked: bool) -> None:
        layer = self.current_layer()
        slide = slide_of_layer(layer) if layer is not None else None
        if slide is None:
            return
        name = f"{layer.name} tissue"
        if name in self.viewer.layers:
            self.viewer.layers[name].visible = checked
            return
        if not checked:
            return
        try:
            mask, ds = tissue_mask(slide)
        except PathosegError as exc:
            show_error(str(exc))
            return
        # a mask pixel covers ds level-0 pixels: centred on them
        self.viewer.add_labels(mask.astype(np.uint8), name=name, opacity=0.35, **grid_placement(layer, downsample=ds))


@thread_worker(ignore_errors=True)  # errors go to SlideWidget._on_error
def _open_worker(path: str):
    slide = open_slide(path)
    thumb = slide.thumbnail(max_size=512)
    return slide, thumb
