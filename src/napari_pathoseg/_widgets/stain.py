"""The "Stain" dock: pick a reference, preview and open a slide stain-normalised.

The dock drives :mod:`napari_pathoseg.stain` (no computation here):

* method: Macenko, Vahadane or Reinhard;
* target: a rectangle drawn in a Shapes layer, the current view, a reference image
  file, or a saved normaliser (.json); "Fit target" fits it in a background thread;
* "Preview view" normalises what the viewer shows, as an image layer over it;
* "Add normalised slide" adds the whole slide as a lazy multiscale layer (the slide's
  stains are estimated once from tissue across it; chunks are computed as viewed);
* "Add H / E layers" adds the haematoxylin and eosin concentration maps (lazy);
* "Save normaliser…" writes the fitted normaliser as JSON, to reuse a lab's reference;
* "Export TIFF…" streams the normalised slide to a pyramidal TIFF with a progress bar.

Every job runs through the dock job controller (:mod:`napari_pathoseg._widgets._jobs`):
Stop abandons a short job, and stops the TIFF export at its next tile (it leaves no file).
Layer data is prepared in the job (the coarse levels napari draws first are computed there),
so the GUI thread only adds layers. Errors are shown once as notifications, never raised.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QComboBox, QFileDialog, QLabel, QLineEdit, QProgressBar, QPushButton, QWidget

from napari_pathoseg._widgets._common import (
    adopt_units,
    ask_open_file,
    follow_slide_units,
    form,
    hbox,
    layer_named,
    load_small_levels,
    refill_combo,
    shape_rect,
    status_label,
    stop_button,
    vbox,
    view_rect,
    watch_layer_list,
)
from napari_pathoseg._widgets._jobs import JobController, in_turns
from napari_pathoseg.errors import PathosegError
from napari_pathoseg.events import Progress
from napari_pathoseg.wsi.slide import Slide
from napari_pathoseg.stain import (
    available_normalizers,
    deconvolution_pyramid,
    estimate_slide_stain,
    get_normalizer,
    load_normalizer,
    normalized_pyramid,
    read_rect,
    save_normalizer,
    write_normalized_tiff,
)
from napari_pathoseg.stain.normalizers import StainNormalizer, StainParams
from napari_pathoseg._widgets.slide import slide_layers, slide_of_layer

if TYPE_CHECKING:
    import napari

__all__ = ["StainWidget", "TARGET_MODES", "view_rect", "shape_rect"]

logger = logging.getLogger(__name__)

TARGET_RECT = "Rectangle in a Shapes layer"
TARGET_VIEW = "Current view"
TARGET_FILE = "Reference image file"
TARGET_JSON = "Saved normaliser (.json)"
TARGET_MODES = (TARGET_RECT, TARGET_VIEW, TARGET_FILE, TARGET_JSON)
#: Longest side (pixels) of a target region or preview read from the slide.
MAX_SIDE = 2048


# ---------------------------------------------------------------------- the dock


class StainWidget(QWidget):
    """Stain normalisation dock (see the module docstring)."""

    def __init__(self, napari_viewer: "napari.Viewer") -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.normalizer: StainNormalizer | None = None
        self._array_slides: dict[int, Slide] = {}
        self._sources: dict[tuple, StainParams] = {}

        self.layer_combo = QComboBox()
        self.method_combo = QComboBox()
        self.method_combo.addItems(list(available_normalizers()))
        self.target_combo = QComboBox()
        self.target_combo.addItems(list(TARGET_MODES))
        self.shapes_combo = QComboBox()
        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("reference image, or saved normaliser .json")
        self.browse_btn = QPushButton("Browse…")
        path_row = hbox(self.path_edit, self.browse_btn)
        self._path_row = QWidget()
        self._path_row.setLayout(path_row)
        path_row.setContentsMargins(0, 0, 0, 0)

        self.fit_btn = QPushButton("Fit target")
        self.target_label = QLabel("no target fitted")
        self.target_label.setWordWrap(True)
        self.preview_btn = QPushButton("Preview view")
        self.add_btn = QPushButton("Add normalised slide")
        self.deconv_btn = QPushButton("Add H / E layers")
        self.save_btn = QPushButton("Save normaliser…")
        self.export_btn = QPushButton("Export TIFF…")
        self.stop_btn = stop_button()
        self.progress = QProgressBar()
        self.status = status_label()

        vbox(
            self,
            form(
                ("Slide layer", self.layer_combo),
                ("Method", self.method_combo),
                ("Target", self.target_combo),
                ("Shapes layer", self.shapes_combo),
                ("File", self._path_row),
            ),
            self.fit_btn,
            self.target_label,
            hbox(self.preview_btn, self.add_btn),
            hbox(self.deconv_btn, self.save_btn),
            self.export_btn,
            hbox(self.progress, self.stop_btn),
            self.status,
            stretch_end=True,
        )

        self.browse_btn.clicked.connect(self._on_browse)
        self.fit_btn.clicked.connect(self._on_fit)
        self.preview_btn.clicked.connect(self._on_preview)
        self.add_btn.clicked.connect(self._on_add_normalized)
        self.deconv_btn.clicked.connect(self._on_add_deconvolution)
        self.save_btn.clicked.connect(self._on_save)
        self.export_btn.clicked.connect(self._on_export)
        self.jobs = JobController(
            self, progress=self.progress, status=self.status, stop_button=self.stop_btn,
            on_busy=lambda running: self._update_state(), action="Stain",
        )
        self.target_combo.currentIndexChanged.connect(self._update_state)
        self.method_combo.currentIndexChanged.connect(self._on_method_changed)
        self.layer_combo.currentIndexChanged.connect(self._update_state)
        watch_layer_list(self.viewer, self._refresh_layers)
        follow_slide_units(self.viewer, slide_layers)
        self._refresh_layers()

    # ------------------------------------------------------------------ layers
    def _image_layers(self) -> list:
        from napari.layers import Image

        out = []
        for ly in self.viewer.layers:
            if not isinstance(ly, Image) or ly.metadata.get("pathoseg_stain_output"):
                continue
            if slide_of_layer(ly) is not None or (ly.rgb and np.dtype(ly.dtype) == np.uint8):
                out.append(ly)
        return out

    def _refresh_layers(self, event: Any = None) -> None:
        from napari.layers import Shapes

        refill_combo(self.layer_combo, [ly.name for ly in self._image_layers()])
        refill_combo(self.shapes_combo, [ly.name for ly in self.viewer.layers if isinstance(ly, Shapes)])
        self._update_state()

    def current_layer(self) -> Any:
        return layer_named(self.viewer, self.layer_combo.currentText())

    def current_slide(self) -> Slide:
        """The slide behind the chosen layer (an RGB array layer is wrapped once)."""
        layer = self.current_layer()
        if layer is None:
            raise PathosegError("Choose a slide layer first (open a slide with the Slide dock or File > Open).")
        slide = slide_of_layer(layer)
        if slide is not None:
            return slide
        key = id(layer.data)
        if key not in self._array_slides:
            data = layer.data[0] if layer.multiscale else layer.data
            if data.ndim != 3 or data.shape[-1] != 3:
                raise PathosegError(f"Layer {layer.name!r} is not a 2-D RGB image (shape {data.shape}).")
            self._array_slides[key] = Slide.from_array(data if hasattr(data, "chunks") else np.asarray(data), name=layer.name)
        return self._array_slides[key]

    # ------------------------------------------------------------------ state
    def _busy(self) -> bool:
        return self.jobs.running

    def _update_state(self, *args: Any) -> None:
        mode = self.target_combo.currentText()
        self.shapes_combo.setEnabled(mode == TARGET_RECT)
        self._path_row.setEnabled(mode in (TARGET_FILE, TARGET_JSON))
        has_layer = self.current_layer() is not None
        fitted = self.normalizer is not None
        busy = self._busy()
        needs_layer = mode in (TARGET_RECT, TARGET_VIEW)
        self.fit_btn.setEnabled(not busy and (has_layer or not needs_layer))
        self.fit_btn.setToolTip("" if (has_layer or not needs_layer) else "Open a slide first: this target is read from it.")
        for btn in (self.preview_btn, self.add_btn, self.export_btn):
            btn.setEnabled(not busy and fitted and has_layer)
            btn.setToolTip("" if fitted else "Fit a target first.")
        self.deconv_btn.setEnabled(not busy and has_layer)
        self.save_btn.setEnabled(not busy and fitted)

    def _on_method_changed(self, *args: Any) -> None:
        if self.normalizer is not None and self.normalizer.name != self.method_combo.currentText():
            self.normalizer = None
            self.target_label.setText("method changed: fit the target again")
        self._update_state()

    def _describe_target(self) -> None:
        n = self.normalizer
        if n is None or n.target is None:
            self.target_label.setText("no target fitted")
            return
        t = n.target
        parts = [f"<b>{n.name}</b> target from {n.reference or 'an image'}"]
        if t.stain_matrix is not None:
            h, e = t.stain_matrix[:, 0], t.stain_matrix[:, 1]
            parts.append("H = " + ", ".join(f"{v:.2f}" for v in h) + "; E = " + ", ".join(f"{v:.2f}" for v in e))
        if t.lab_mean is not None:
            parts.append("Lab mean " + ", ".join(f"{v:.1f}" for v in t.lab_mean))
        self.target_label.setText("<br>".join(parts))

    # ------------------------------------------------------------------ jobs
    def _start(
        self,
        func: Callable[[], Any],
        on_done: Callable[[Any], None],
        message: str,
        *,
        cancel_job: Callable[[Any], Any] | None = None,
    ) -> None:
        """Run ``func()`` (or ``cancel_job(token)`` for a job that checks the token) in the background.

        A short job (``cancel_job`` None) is abandoned by Stop; its result is dropped.
        """
        job = cancel_job if cancel_job is not None else (lambda token: func())
        self.jobs.start(job, on_done=on_done, message=message, abandon_on_stop=cancel_job is None)

    # ------------------------------------------------------------------ target
    def _on_browse(self) -> None:
        if self.target_combo.currentText() == TARGET_JSON:
            pattern = "Stain normaliser (*.json);;All files (*)"
        else:
            pattern = "Images and slides (*.png *.jpg *.jpeg *.tif *.tiff *.svs *.ndpi *.mrxs *.scn);;All files (*)"
        path = ask_open_file(self, "Choose the target", pattern, into=self.path_edit)
        if path:
            if path.lower().endswith(".json"):
                self.target_combo.setCurrentText(TARGET_JSON)

    def _target_job(self) -> Callable[[], StainNormalizer]:
        """Capture the inputs on the GUI thread; return the job that fits in the worker."""
        mode = self.target_combo.currentText()
        method = self.method_combo.currentText()
        if mode == TARGET_JSON:
            path = self.path_edit.text().strip()
            if not path:
                raise PathosegError("Choose a saved normaliser (.json) first.")
            return lambda: load_normalizer(path)
        if mode == TARGET_FILE:
            path = self.path_edit.text().strip()
            if not path:
                raise PathosegError("Choose a reference image file first.")

            def from_file() -> StainNormalizer:
                from napari_pathoseg.wsi.slide import open_slide
                from napari_pathoseg.stain import fit_to_slide

                with open_slide(path) as ref:
                    return fit_to_slide(get_normalizer(method), ref)

            return from_file
        layer = self.current_layer()
        slide = self.current_slide()
        if mode == TARGET_VIEW:
            rect = view_rect(self.viewer, layer)
            label = f"{layer.name}, view"
        else:
            name = self.shapes_combo.currentText()
            if not name or name not in self.viewer.layers:
                raise PathosegError("Add a Shapes layer and draw a rectangle on the tissue first.")
            adopt_units(self.viewer.layers[name], layer)
            rect = shape_rect(self.viewer.layers[name], layer)
            label = f"{layer.name}, rectangle"
        r, c, h, w = rect
        reference = f"{label} (x {c:.0f}, y {r:.0f}, {w:.0f} x {h:.0f} px)"

        def from_region() -> StainNormalizer:
            img = read_rect(slide, row=r, col=c, height=h, width=w, max_side=MAX_SIDE)
            return get_normalizer(method).fit(img, what=reference, reference=reference)

        return from_region

    def _on_fit(self) -> None:
        try:
            job = self._target_job()
        except PathosegError as exc:
            show_error(str(exc))
            return
        self._start(job, self._on_fitted, "fitting the target…")

    def _on_fitted(self, norm: StainNormalizer) -> None:
        self.normalizer = norm
        if self.method_combo.currentText() != norm.name:
            self.method_combo.blockSignals(True)
            self.method_combo.setCurrentText(norm.name)
            self.method_combo.blockSignals(False)
        self._describe_target()
        show_info(f"Fitted the {norm.name} target.")

    # ------------------------------------------------------------------ source
    def _source_key(self, slide: Slide, norm: StainNormalizer) -> tuple:
        return (id(slide), norm.name, json.dumps(norm.options(), sort_keys=True))

    def _source_job(self, slide: Slide, norm: StainNormalizer) -> Callable[[], StainParams]:
        key = self._source_key(slide, norm)
        cached = self._sources.get(key)

        def get() -> StainParams:
            if cached is not None:
                return cached
            src = estimate_slide_stain(slide, norm)
            self._sources[key] = src
            return src

        return get

    def _require(self) -> tuple[Any, Slide, StainNormalizer]:
        if self.normalizer is None:
            raise PathosegError("Fit a target first.")
        layer = self.current_layer()
        return layer, self.current_slide(), self.normalizer

    def _require_or_show(self) -> tuple[Any, Slide, StainNormalizer] | None:
        """:meth:`_require`, or None after showing why it cannot run."""
        try:
            return self._require()
        except PathosegError as exc:
            show_error(str(exc))
            return None

    # ------------------------------------------------------------------ outputs
    def _on_preview(self) -> None:
        required = self._require_or_show()
        if required is None:
            return
        layer, slide, norm = required
        r, c, h, w = view_rect(self.viewer, layer)
        source = self._source_job(slide, norm)

        def job() -> tuple[np.ndarray, tuple[float, float, float, float]]:
            src = source()
            img = read_rect(slide, row=r, col=c, height=h, width=w, max_side=MAX_SIDE)
            return norm.transform(img, source=src), (r, c, h, w)

        def show(result: tuple[np.ndarray, tuple[float, float, float, float]]) -> None:
            img, (r0, c0, hh, ww) = result
            r0, c0 = max(r0, 0.0), max(c0, 0.0)
            rows0, cols0 = slide.shape
            hh, ww = min(hh, rows0 - r0), min(ww, cols0 - c0)
            f = np.array([hh / img.shape[0], ww / img.shape[1]])
            scale = np.asarray(layer.scale[-2:], float)
            translate = np.asarray(layer.translate[-2:], float) + (np.array([r0, c0]) + 0.5 * f - 0.5) * scale
            name = f"{layer.name} [{norm.name} preview]"
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
            self.viewer.add_image(
                img,
                name=name,
                rgb=True,
                scale=scale * f,
                translate=translate,
                units=layer.units,
                metadata={"pathoseg_stain_output": True},
            )

        self._start(job, show, "normalising the view…")

    def _on_add_normalized(self) -> None:
        required = self._require_or_show()
        if required is None:
            return
        layer, slide, norm = required
        source = self._source_job(slide, norm)

        def job() -> list:
            # the coarse levels napari draws first are normalised here, not on the GUI thread
            return load_small_levels(normalized_pyramid(slide, norm, source=source()))

        def show(levels: list) -> None:
            self.viewer.add_image(
                levels if len(levels) > 1 else levels[0],
                name=f"{layer.name} [{norm.name}]",
                rgb=True,
                multiscale=len(levels) > 1,
                contrast_limits=(0, 255),
                scale=layer.scale,
                translate=layer.translate,
                units=layer.units,
                metadata={"pathoseg_stain_output": True, "slide": layer.metadata.get("slide")},
            )

        self._start(job, show, "estimating the slide's stains…")

    def _on_add_deconvolution(self) -> None:
        try:
            layer = self.current_layer()
            slide = self.current_slide()
        except PathosegError as exc:
            show_error(str(exc))
            return
        norm = self.normalizer
        source = self._source_job(slide, norm) if norm is not None and norm.name != "reinhard" else None

        def job() -> dict:
            matrix = source().stain_matrix if source is not None else None
            out = {}
            for stain in ("hematoxylin", "eosin"):
                levels = load_small_levels(deconvolution_pyramid(slide, stain=stain, stain_matrix=matrix))
                top = np.asarray(levels[-1])
                hi = float(np.quantile(top, 0.995)) if top.size else 1.0
                out[stain] = (levels, max(hi, 1e-3))
            return out

        def show(result: dict) -> None:
            cmaps = {"hematoxylin": "I Purple", "eosin": "I Bordeaux"}

            def add(stain: str, levels: list, hi: float) -> None:
                self.viewer.add_image(
                    levels if len(levels) > 1 else levels[0],
                    name=f"{layer.name} [{stain}]",
                    multiscale=len(levels) > 1,
                    colormap=cmaps[stain],
                    contrast_limits=(0.0, hi),
                    blending="minimum",
                    scale=layer.scale,
                    translate=layer.translate,
                    units=layer.units,
                    metadata={"pathoseg_stain_output": True},
                )

            # one layer per turn of the event loop: napari stays responsive between them
            in_turns(*(lambda s=stain, v=value: add(s, *v) for stain, value in result.items()))

        self._start(job, show, "colour deconvolution…")

    def _on_save(self) -> None:
        if self.normalizer is None:
            show_error("Fit a target first.")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Save normaliser", f"{self.normalizer.name}-normaliser.json", "JSON (*.json)")
        if path:
            self.save_normalizer_to(path)

    def save_normalizer_to(self, path: str | Path) -> Path | None:
        """Save the fitted normaliser (errors are shown, not raised)."""
        try:
            if self.normalizer is None:
                raise PathosegError("Fit a target first.")
            out = save_normalizer(self.normalizer, path)
        except PathosegError as exc:
            show_error(str(exc))
            return None
        show_info(f"Saved {out}")
        return out

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt API
        self.jobs.shutdown()  # the TIFF export stops at its next tile and removes its files
        super().closeEvent(event)

    def _on_export(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export normalised slide", "normalised.tif", "TIFF (*.tif *.tiff)")
        if path:
            self.export_to(path)

    def export_to(self, path: str | Path, *, compression: str | None = "jpeg") -> None:
        """Write the normalised slide to ``path`` in the background (progress bar, Stop)."""
        required = self._require_or_show()
        if required is None:
            return
        _layer, slide, norm = required
        source = self._source_job(slide, norm)
        post = self.jobs.post

        def job(token: Any) -> Any:
            return write_normalized_tiff(
                slide,
                norm,
                path,
                source=source(),
                compression=compression,
                progress=lambda p: post(Progress(p.done, p.total, f"{p.done}/{p.total} tiles")),
                cancel=token.is_set,  # the writer takes a callable or a threading.Event
            )

        def done(result: Any) -> None:
            show_info(f"Wrote {result.path} ({len(result.levels)} levels, {result.tiles} tiles)")

        self._start(job, done, f"writing {Path(path).name}…", cancel_job=job)
