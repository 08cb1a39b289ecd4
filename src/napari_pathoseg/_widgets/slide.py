"""The "Slide" dock: open a slide, see its metadata and thumbnail, toggle a tissue mask.

Opening (the slide, its thumbnail, its coarse levels) and the tissue mask run as background jobs
(:mod:`napari_pathoseg._widgets._jobs`); the GUI thread only adds the prepared layers.
"""

from __future__ import annotations

import json
import logging
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import (
    QCheckBox,
    QProgressBar,
    QComboBox,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QWidget,
)

from napari_pathoseg._widgets._common import (
    ask_open_file,
    grid_placement,
    hbox,
    layer_named,
    load_small_levels,
    refill_combo,
    status_label,
    vbox,
    watch_layer_list,
)
from napari_pathoseg._widgets._jobs import JobController, add_layer_in_turns
from napari_pathoseg._reader import slide_layer_data
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
    img = QImage(rgb.tobytes(), w, h, 3 * w, QImage.Format.Format_RGB888).copy()  # bytes: every Qt binding
    return QPixmap.fromImage(img).scaled(max_side, max_side, Qt.AspectRatioMode.KeepAspectRatio, Qt.TransformationMode.SmoothTransformation)


class SlideWidget(QWidget):
    """Open a whole-slide image, show its metadata and thumbnail, show/hide its tissue mask."""

    def __init__(self, napari_viewer: "napari.Viewer") -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._thumbs: weakref.WeakKeyDictionary[Slide, np.ndarray] = weakref.WeakKeyDictionary()
        self._shown: Slide | None = None

        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("slide file (.svs, .ndpi, .mrxs, .tif, ...)")
        self.browse_btn = QPushButton("Browse…")
        self.open_btn = QPushButton("Open")

        self.layer_combo = QComboBox()
        self.meta_text = QPlainTextEdit()
        self.meta_text.setReadOnly(True)
        self.meta_text.setMinimumHeight(140)
        self.thumb = QLabel("no slide")
        self.thumb.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.thumb.setMinimumHeight(160)
        self.mask_check = QCheckBox("Show tissue mask")
        self.progress = QProgressBar()
        self.progress.setMaximumHeight(8)
        self.progress.setTextVisible(False)
        self.status = status_label()

        vbox(
            self,
            hbox(self.path_edit, self.browse_btn),
            self.open_btn,
            QLabel("Slide layer:"),
            self.layer_combo,
            self.thumb,
            self.meta_text,
            self.mask_check,
            self.progress,
            self.status,
            stretch_end=True,
        )
        self.jobs = JobController(
            self, progress=self.progress, status=self.status, run_buttons=[self.open_btn],
            why_not=lambda: "" if self.path_edit.text().strip() else "Choose a slide file first.",
            on_busy=lambda running: self.mask_check.setEnabled(not running),
            action="Opening the slide",
        )
        #: thumbnails of slides opened elsewhere (File > Open), read in the background
        self.thumb_jobs = JobController(self, action="Reading the thumbnail")

        self.browse_btn.clicked.connect(self._on_browse)
        self.open_btn.clicked.connect(self._on_open)
        self.path_edit.returnPressed.connect(self._on_open)
        self.path_edit.textChanged.connect(self.jobs.refresh)
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
        self.jobs.start(
            lambda token: _open_job(path), on_done=self._on_opened, message=f"opening {Path(path).name}…",
            abandon_on_stop=True,
        )

    def _on_opened(self, result: tuple[Slide, np.ndarray, tuple]) -> None:
        from napari.layers import Image

        slide, thumb, (data, kwargs, _) = result
        self._thumbs[slide] = thumb
        layer = Image(data, **kwargs)

        def opened() -> None:
            self._refresh_layers()
            self.layer_combo.setCurrentText(layer.name)
            show_info(f"Opened {layer.name}")

        # hidden first, shown in the next turn of the event loop, then the dock: each step < ~200 ms
        add_layer_in_turns(self.viewer, layer, then=opened, action="Opening the slide")

    def _on_layer_changed(self, *args: Any) -> None:
        layer = self.current_layer()
        slide = slide_of_layer(layer) if layer is not None else None
        if slide is not self._shown:  # the metadata and thumbnail change only with the slide
            self._shown = slide
            self._show_slide(slide)
        if slide is None:
            return
        name = f"{layer.name} tissue"
        self.mask_check.blockSignals(True)
        self.mask_check.setChecked(name in self.viewer.layers and self.viewer.layers[name].visible)
        self.mask_check.blockSignals(False)

    def _show_slide(self, slide: Slide | None) -> None:
        if slide is None:
            self.meta_text.setPlainText("")
            self.thumb.setText("no slide")
            return
        d = slide.metadata.to_dict()
        keys = ("path", "format", "vendor", "levels", "mpp_x", "mpp_y", "objective_power", "bounds_x", "bounds_y", "associated_images", "tile_size")
        self.meta_text.setPlainText(json.dumps({k: d[k] for k in keys}, indent=1, default=str))
        thumb = self._thumbs.get(slide)
        if thumb is not None:
            self.thumb.setPixmap(_pixmap(thumb))
            return
        self.thumb.setText("reading the thumbnail…")
        self.thumb_jobs.stop()

        def shown(img: np.ndarray, _s: Slide = slide) -> None:
            self._thumbs[_s] = img
            if self._shown is _s:
                self.thumb.setPixmap(_pixmap(img))

        def failed(exc: BaseException) -> None:
            self.thumb.setText(str(exc))

        self.thumb_jobs.start(
            lambda token: slide.thumbnail(max_size=512), on_done=shown, on_error=failed, abandon_on_stop=True
        )

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

        def add_mask(result: tuple[np.ndarray, float]) -> None:
            from napari.layers import Image

            mask, ds = result
            if name in self.viewer.layers:
                return
            # a mask pixel covers ds level-0 pixels: centred on them. An image layer (tissue in green,
            # background transparent): a Labels layer costs napari ~0.3-0.5 s more on the GUI thread
            # (its drawing tools), and this mask is only looked at
            mask_layer = Image(mask, name=name, opacity=0.35, colormap=_tissue_colormap(), contrast_limits=(0, 1),
                               interpolation2d="nearest", blending="translucent",
                               **grid_placement(layer, downsample=ds))
            # the check box follows the mask once it is shown (it is added hidden)
            add_layer_in_turns(self.viewer, mask_layer, select=layer, then=self._on_layer_changed,
                               action="The tissue mask")

        def failed(exc: BaseException) -> None:
            self.mask_check.blockSignals(True)
            self.mask_check.setChecked(False)
            self.mask_check.blockSignals(False)

        self.jobs.start(
            lambda token: _mask_job(slide), on_done=add_mask, on_error=failed, message="finding the tissue…",
            action="The tissue mask", abandon_on_stop=True,
        )

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt API
        self.jobs.shutdown()
        self.thumb_jobs.shutdown()
        super().closeEvent(event)


def _open_job(path: str) -> tuple[Slide, np.ndarray, tuple]:
    """Open the slide, read its thumbnail and the coarse levels napari shows first (worker thread)."""
    slide = open_slide(path)
    thumb = slide.thumbnail(max_size=512)
    data, kwargs, layer_type = slide_layer_data(slide)
    if kwargs.get("multiscale"):
        data = load_small_levels(data)
    return slide, thumb, (data, kwargs, layer_type)


def _tissue_colormap() -> Any:
    """Background transparent, tissue green."""
    from napari.utils.colormaps import Colormap

    return Colormap([[0.0, 0.0, 0.0, 0.0], [0.1, 0.85, 0.35, 1.0]], name="pathoseg tissue", interpolation="zero")


def _mask_job(slide: Slide) -> tuple[np.ndarray, float]:
    mask, ds = tissue_mask(slide)
    return mask.astype(np.uint8), ds
