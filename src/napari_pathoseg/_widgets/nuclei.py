"""The "Nuclei" dock: segment nuclei on the view, a drawn rectangle or the whole slide.

The run goes through the dock job controller (:mod:`napari_pathoseg._widgets._jobs`): the model
is loaded and the slide segmented in a background thread (tissue tiles only, in every mode),
the result layers are prepared there too (a multiscale pyramid for large results), and the GUI
thread only adds them. Stop keeps the nuclei of the tiles already finished.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QComboBox, QDoubleSpinBox, QProgressBar, QPushButton, QWidget

from napari_pathoseg._widgets._common import (
    ask_open_file,
    display_levels,
    follow_slide_units,
    form,
    grid_placement,
    hbox,
    layer_named,
    refill_combo,
    status_label,
    stop_button,
    vbox,
    watch_layer_list,
)
from napari_pathoseg._widgets._jobs import JobController, add_layer_in_turns
from napari_pathoseg._widgets._region import (
    REGIONS,
    add_region_rectangle,
    chosen_region,
)
from napari_pathoseg._widgets.slide import slide_layers, slide_of_layer
from napari_pathoseg.errors import PathosegError
from napari_pathoseg.events import Progress
from napari_pathoseg.methods.nuclei.segment import NucleiResult, iter_segment_nuclei

if TYPE_CHECKING:
    import napari

__all__ = ["NucleiWidget", "place_result", "nucleus_models", "small_labels"]

logger = logging.getLogger(__name__)

TASK = "nuclei"


def place_result(slide_layer: Any, result: NucleiResult) -> dict[str, Any]:
    """Scale, translate and units that put a result (model grid) exactly over ``slide_layer``."""
    x, y, _, _ = result.region
    return grid_placement(slide_layer, row=y, col=x, downsample=result.scale)


def nucleus_models() -> list[Any]:
    """The registered models of the nuclei task (shipped first); each maps ``name`` and ``path``."""
    from napari_pathoseg.models.registry import list_models

    try:
        return list(list_models(task=TASK))
    except TypeError:  # a registry without tasks: every model is a nucleus model unless it says otherwise
        return [m for m in list_models() if (m.get("task") or TASK) == TASK]


@dataclass
class NucleiLayers:
    """A segmentation result with its layer data prepared off the GUI thread."""

    result: NucleiResult
    labels: list[Any]
    normalized: list[Any] | None

    @property
    def cancelled(self) -> bool:
        return bool(getattr(self.result, "cancelled", False))


def segment_job(slide: Any, model_ref: str, *, region: Any, mpp: float | None, work_dir: str | None, cancel: Any):
    """The dock's job: load the model, segment the tissue tiles, prepare the layers (worker thread)."""
    from napari_pathoseg.models.registry import load_model

    yield Progress(0, 0, "loading the model…", stage="model")
    model = load_model(model_ref, task=TASK)
    for ev in iter_segment_nuclei(
        slide, model, region=region, mpp=mpp, tissue_only=True, cancel=cancel, work_dir=work_dir
    ):
        if isinstance(ev, NucleiResult):
            yield Progress(ev.tiles, max(ev.tiles, getattr(ev, "tiles_total", 0) or ev.tiles), "preparing the layers…")
            norm = ev.normalized
            # no tissue tile: nothing was normalised (the engine may give a blank 2-D array)
            normalized = display_levels(norm) if norm is not None and norm.ndim == 3 and ev.tiles else None
            yield NucleiLayers(ev, display_levels(small_labels(ev.labels)), normalized)
        else:
            yield ev


#: Results up to this many pixels become uint16 in the job when their ids fit (see :func:`small_labels`).
SMALL_LABELS_PIXELS = 64 << 20


def small_labels(labels: Any) -> Any:
    """``labels`` as uint16 when every id fits and it holds at most :data:`SMALL_LABELS_PIXELS` (call in the job).

    napari hashes uint32 label ids into texture values on the GUI thread every time it draws a new
    part (0.1-0.3 s for a slide-sized level); uint8/uint16 ids go to the texture as they are. The
    ids stay the same. Larger results (memory-mapped) stay as they are.
    """
    arr = labels
    if getattr(arr, "dtype", None) is None or arr.dtype.itemsize <= 2 or int(np.prod(arr.shape)) > SMALL_LABELS_PIXELS:
        return labels
    arr = np.asarray(arr)
    if arr.size == 0 or (arr.min() >= 0 and arr.max() <= np.iinfo(np.uint16).max):
        return arr.astype(np.uint16)
    return labels


class NucleiWidget(QWidget):
    """Segment nuclei with a shipped or user model; results as Labels over the slide."""

    def __init__(self, napari_viewer: "napari.Viewer") -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._tmps: list[tempfile.TemporaryDirectory] = []
        self._models: dict[str, str] = {}

        self.layer_combo = QComboBox()
        self.model_combo = QComboBox()
        self.model_btn = QPushButton("Checkpoint…")
        self.region_combo = QComboBox()
        self.region_combo.addItems(REGIONS)
        self.shapes_combo = QComboBox()
        self.draw_btn = QPushButton("Draw…")
        self.draw_btn.setToolTip("Add a rectangle layer over the slide and start drawing")
        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setDecimals(4)
        self.mpp_spin.setRange(0.0, 100.0)
        self.mpp_spin.setSingleStep(0.05)
        self.mpp_spin.setSpecialValueText("from slide")
        self.mpp_spin.setToolTip("µm per pixel of the image; 'from slide' uses the slide's own")
        self.run_btn = QPushButton("Segment nuclei")
        self.stop_btn = stop_button()
        self.progress = QProgressBar()
        self.status = status_label()

        vbox(
            self,
            form(
                ("Slide", self.layer_combo),
                ("Model", hbox((self.model_combo, 1), self.model_btn)),
                ("Region", self.region_combo),
                ("Rectangle layer", hbox((self.shapes_combo, 1), self.draw_btn)),
                ("µm/px", self.mpp_spin),
            ),
            hbox(self.run_btn, self.stop_btn),
            self.progress,
            self.status,
            stretch_end=True,
        )
        self.jobs = JobController(
            self,
            progress=self.progress,
            status=self.status,
            stop_button=self.stop_btn,
            run_buttons=[self.run_btn],
            why_not=self._why_not,
            action="Nucleus segmentation",
        )

        self.run_btn.clicked.connect(self._on_run)
        self.model_btn.clicked.connect(self._on_browse_model)
        self.draw_btn.clicked.connect(self._on_draw)
        self.layer_combo.currentIndexChanged.connect(self.jobs.refresh)
        self.region_combo.currentIndexChanged.connect(self.jobs.refresh)
        self.shapes_combo.currentIndexChanged.connect(self.jobs.refresh)
        self.model_combo.currentIndexChanged.connect(self.jobs.refresh)
        watch_layer_list(self.viewer, self._refresh)
        follow_slide_units(self.viewer, slide_layers)
        self.refresh_models()
        self._refresh()

    # ------------------------------------------------------------------ state
    def refresh_models(self, select: str | None = None) -> None:
        """Fill the model list with the registry's nucleus models (shipped and user)."""
        current = select or self.model_combo.currentText()
        try:
            models = nucleus_models()
        except PathosegError as exc:
            show_error(str(exc))
            models = []
        for m in models:
            self._models[m["name"]] = str(m["path"])
        refill_combo(self.model_combo, list(self._models), current=current)
        self.jobs.refresh()

    def _refresh(self, event: Any = None) -> None:
        from napari.layers import Shapes

        refill_combo(self.layer_combo, [ly.name for ly in slide_layers(self.viewer)])
        refill_combo(self.shapes_combo, [ly.name for ly in self.viewer.layers if isinstance(ly, Shapes)])
        self.jobs.refresh()

    def _why_not(self) -> str:
        if not self.layer_combo.currentText():
            return "Open a slide first (File > Open or the Slide dock)."
        if not self.model_combo.currentText():
            return "No nucleus model: choose a checkpoint file."
        if self.region_combo.currentText() == "Drawn rectangle" and not self.shapes_combo.currentText():
            return "Draw a rectangle on the slide first (Draw…)."
        return ""

    def slide_layer(self) -> Any:
        return layer_named(self.viewer, self.layer_combo.currentText())

    # ------------------------------------------------------------------ callbacks
    def _on_browse_model(self) -> None:
        path = ask_open_file(self, "Nucleus model checkpoint", "Checkpoints (*.safetensors)")
        if path:
            self.add_model_path(path)

    def add_model_path(self, path: str) -> None:
        """Make a checkpoint file selectable (and select it)."""
        name = Path(path).name
        self._models[name] = path
        if self.model_combo.findText(name) < 0:
            self.model_combo.addItem(name)
        self.model_combo.setCurrentText(name)

    def _on_draw(self) -> Any:
        """Add a rectangle layer in the slide's units, chosen for "Drawn rectangle", in draw mode."""
        shapes = add_region_rectangle(self.viewer, self.slide_layer(), "nuclei region")
        self.shapes_combo.setCurrentText(shapes.name)
        self.region_combo.setCurrentText("Drawn rectangle")
        return shapes

    def current_region(self) -> tuple[int, int, int, int] | None:
        """Level-0 (x, y, w, h) of the chosen region; ``None`` for the whole slide."""
        return chosen_region(self.viewer, self.slide_layer(), self.region_combo.currentText(),
                             self.shapes_combo.currentText())

    def _on_run(self) -> None:
        layer = self.slide_layer()
        slide = slide_of_layer(layer) if layer is not None else None
        if slide is None:
            show_error("Choose a slide layer opened by napari-pathoseg.")
            return
        try:
            region = self.current_region()
        except PathosegError as exc:
            show_error(str(exc))
            return
        mpp = self.mpp_spin.value() or None
        model_ref = self._models.get(self.model_combo.currentText(), self.model_combo.currentText())
        work_dir = None
        if region is None:  # whole slide: labels as files, kept while the dock lives
            tmp = tempfile.TemporaryDirectory(prefix="pathoseg-nuclei-")
            self._tmps.append(tmp)
            work_dir = tmp.name
        self.jobs.start(
            lambda token: segment_job(slide, model_ref, region=region, mpp=mpp, work_dir=work_dir, cancel=token),
            done_type=NucleiLayers,
            on_event=self._on_progress,
            on_done=lambda prepared, _l=layer: self._on_done(_l, prepared),
            message="loading the model…",
        )

    def _on_progress(self, ev: Any) -> None:
        if isinstance(ev, Progress) and ev.total:
            self.status.setText(f"{ev.done}/{ev.total} tiles · {ev.message}")

    def _on_done(self, slide_layer: Any, prepared: NucleiLayers) -> None:
        result = prepared.result
        place = place_result(slide_layer, result)
        name = f"{slide_layer.name} nuclei"
        norm_name = f"{slide_layer.name} normalised"
        for n in (name, norm_name):
            if n in self.viewer.layers:
                self.viewer.layers.remove(n)

        metadata = {
            "model": result.model,
            "region_xywh": list(result.region),
            "table": result.table,
            "mpp": result.mpp,
            "cancelled": prepared.cancelled,
            # the slide under the labels: the Export dock and the GeoJSON writer read it
            "slide": slide_layer.metadata.get("slide"),
            "pathoseg_slide": slide_of_layer(slide_layer),
            "object_type": "detection",
            "class_name": "Nucleus",
        }

        def add_normalized() -> None:
            from napari.layers import Image

            levels = prepared.normalized
            image = Image(
                levels if len(levels) > 1 else levels[0], multiscale=len(levels) > 1, name=norm_name, rgb=True,
                contrast_limits=(0, 255), visible=False, **place,
            )
            self.viewer.add_layer(image)  # hidden: nothing to draw yet
            # below the labels, like before
            if name in self.viewer.layers:
                self.viewer.layers.move(self.viewer.layers.index(norm_name), self.viewer.layers.index(name))
            self.viewer.layers.selection.active = slide_layer

        # the labels layer in short steps (added hidden, shown, the slide selected again), then the
        # normalised image in a turn of its own: napari stays responsive between them
        from napari.layers import Labels

        levels = prepared.labels
        labels = Labels(levels if len(levels) > 1 else levels[0], multiscale=len(levels) > 1, name=name,
                        opacity=0.6, metadata=metadata, **place)
        add_layer_in_turns(self.viewer, labels, select=slide_layer,
                           then=add_normalized if prepared.normalized is not None else None,
                           action="Adding the nuclei")
        if prepared.cancelled:
            total = getattr(result, "tiles_total", 0) or result.tiles
            self.status.setText(f"stopped: {result.n_nuclei} nuclei in the {result.tiles} of {total} tiles finished are kept")
            show_info(f"Stopped: the {result.n_nuclei} nuclei of {result.tiles} finished tiles are kept")
            return
        self.status.setText(
            f"{result.n_nuclei} nuclei · {result.tiles} tiles · {result.timings.get('total_s', 0):.1f} s ({result.model})"
        )
        show_info(f"{result.n_nuclei} nuclei found")

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt API
        self.jobs.shutdown()
        super().closeEvent(event)
