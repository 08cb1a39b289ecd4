"""The Tissue dock's training panel: tag tiles on the slide with the classes they contain, train, overlay.

The user adds a *tag layer* (a Shapes layer of rectangles with a ``classes`` feature shown as
text), draws tiles on the slide, selects some and tags them ("tumour; stroma"); **Train**
reads the tiles and trains both M5 stages in the background on the dock's job controller
(progress per epoch, Stop keeps a resumable checkpoint), registers the model under the name
given, selects it in the dock and maps the dock's region (view, rectangle or slide) with it.
Tag parsing (unknown class, no class) fails with one line naming the tile.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QGroupBox,
    QLineEdit,
    QPushButton,
    QSpinBox,
)

from napari_pathoseg._widgets._common import (
    adopt_units,
    form,
    hbox,
    layer_named,
    refill_combo,
    vbox,
)
from napari_pathoseg.errors import PathosegError
from napari_pathoseg.events import Progress
from napari_pathoseg.methods.tissue.labels import parse_class_names

if TYPE_CHECKING:
    from napari_pathoseg._widgets.tissue import TissueWidget

__all__ = ["TissueTrainPanel", "shape_rects", "tag_layer_labels", "tag_train_job"]

logger = logging.getLogger(__name__)

TAG_FEATURE = "classes"


def shape_rects(shapes_layer: Any, slide_layer: Any) -> list[tuple[int, int, int, int]]:
    """Level-0 (x, y, w, h) bounding box of every shape of ``shapes_layer`` over ``slide_layer``."""
    out = []
    for verts in shapes_layer.data:
        v = np.asarray(verts, dtype=float)[:, -2:]
        world = np.array([shapes_layer.data_to_world(p) for p in v])
        data = np.array([slide_layer.world_to_data(w) for w in world])[:, -2:]
        r0, c0 = np.round(data.min(axis=0)).astype(int)
        r1, c1 = np.round(data.max(axis=0)).astype(int)
        out.append((int(c0), int(r0), max(1, int(c1 - c0)), max(1, int(r1 - r0))))
    return out


def tag_layer_labels(shapes_layer: Any, classes: list[str]) -> list[tuple[int, ...]]:
    """The multi-hot label of every tile of a tag layer (its ``classes`` feature); an untagged tile is an error."""
    if len(shapes_layer.data) == 0:
        raise PathosegError("Draw tiles (rectangles) in the tag layer and tag them first.")
    feats = shapes_layer.features
    if TAG_FEATURE not in feats:
        raise PathosegError(f"{shapes_layer.name}: no '{TAG_FEATURE}' tags; use 'New tag layer' and 'Tag selected'.")
    return [parse_class_names(t, classes, where=f"{shapes_layer.name}, tile {i + 1}")
            for i, t in enumerate(feats[TAG_FEATURE].astype(str).tolist())]


def tag_train_job(slide: Any, rects: list, labels: list, classes: list[str], *, mpp: float, out_dir: str,
                  register_as: str, epochs: int, steps: int, slide_mpp: float | None, cancel: Any,
                  preset: str = "tissue-lite"):
    """The training job (worker thread): read the tiles, train both stages, register; Progress per epoch."""
    from napari_pathoseg.methods.tissue.pipeline import StageStart
    from napari_pathoseg.methods.tissue.tags import (
        TagTrainDone,
        iter_train_tags,
        read_tagged_patches,
    )
    from napari_pathoseg.training.engine import EpochEvent

    yield Progress(0, 0, f"reading {len(rects)} tagged tiles…", stage="tiles")
    patches = read_tagged_patches(slide, rects, labels, mpp=mpp, slide_mpp=slide_mpp)
    total, done, stage = 2 * epochs, 0, ""
    for ev in iter_train_tags(patches, classes, out_dir=out_dir, register_as=register_as, mpp=mpp, preset=preset,
                              epochs1=epochs, steps1=steps, epochs2=epochs, steps2=steps, cancel=cancel,
                              resume=(Path(out_dir) / "stage1" / "last.safetensors").is_file()):
        if isinstance(ev, StageStart):
            stage = ev.stage
            yield Progress(done, total, ev.message, stage=stage)
        elif isinstance(ev, EpochEvent):
            done += 1
            yield Progress(done, total, f"{stage} epoch {ev.epoch + 1}: loss {ev.losses.get('loss', float('nan')):.3f}",
                           stage=stage)
        elif isinstance(ev, TagTrainDone):
            yield ev


class TissueTrainPanel(QGroupBox):
    """Tag tiles, train a tissue model from the tags, register it and overlay its map."""

    def __init__(self, dock: TissueWidget) -> None:
        super().__init__("Train from tagged tiles")
        self.dock = dock
        self.viewer = dock.viewer
        self.preset = "tissue-lite"
        self.classes_edit = QLineEdit("tumour epithelium, stroma, normal")
        self.tag_combo = QComboBox()
        self.new_btn = QPushButton("New tag layer")
        self.tag_edit = QLineEdit()
        self.tag_edit.setPlaceholderText("classes of the selected tiles, e.g. tumour epithelium; stroma")
        self.tag_btn = QPushButton("Tag selected")
        self.name_edit = QLineEdit("my-tissue")
        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setRange(0.05, 20.0)
        self.mpp_spin.setDecimals(3)
        self.mpp_spin.setValue(1.0)
        self.epochs_spin = QSpinBox()
        self.epochs_spin.setRange(1, 200)
        self.epochs_spin.setValue(10)
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 1000)
        self.steps_spin.setValue(10)
        self.train_btn = QPushButton("Train")
        vbox(self,
             form(("Classes", self.classes_edit), ("Tag layer", self.tag_combo)),
             hbox(self.new_btn),
             form(("Tag", self.tag_edit)),
             hbox(self.tag_btn),
             form(("Model name", self.name_edit), ("Train at µm/px", self.mpp_spin), ("Epochs per stage", self.epochs_spin),
                  ("Steps per epoch", self.steps_spin)),
             hbox(self.train_btn))
        self.new_btn.clicked.connect(self.new_tag_layer)
        self.tag_btn.clicked.connect(self._on_tag)
        self.train_btn.clicked.connect(self._on_train)

    # ------------------------------------------------------------------ state
    def classes(self) -> list[str]:
        names = [c.strip() for c in self.classes_edit.text().split(",") if c.strip()]
        if not names or len({n.lower() for n in names}) != len(names):
            raise PathosegError("Name the classes once each, separated by commas (e.g. tumour, stroma).")
        return names

    def refresh(self) -> None:
        from napari.layers import Shapes

        refill_combo(self.tag_combo, [ly.name for ly in self.viewer.layers
                                      if isinstance(ly, Shapes) and TAG_FEATURE in ly.features])

    def tag_layer(self) -> Any:
        return layer_named(self.viewer, self.tag_combo.currentText())

    def run_dir(self, name: str) -> Path:
        from napari_pathoseg.models.registry import registry_path

        return registry_path().parent / "runs" / f"tissue-{name}"

    # ------------------------------------------------------------------ actions
    def new_tag_layer(self) -> Any:
        """Add an empty tag layer over the dock's slide, in rectangle mode."""
        slide_layer = self.dock.slide_layer()
        name = f"{self.dock.layer_combo.currentText() or 'slide'} tissue tags"
        layer = self.viewer.add_shapes(name=name, shape_type="rectangle", edge_color="yellow", face_color=[0, 0, 0, 0],
                                       edge_width=4, features={TAG_FEATURE: np.array([], dtype=object)},
                                       text={"string": "{" + TAG_FEATURE + "}", "color": "yellow", "size": 10})
        layer.feature_defaults = {TAG_FEATURE: ""}
        if slide_layer is not None:
            adopt_units(layer, slide_layer)
        layer.mode = "add_rectangle"
        self.refresh()
        self.tag_combo.setCurrentText(layer.name)
        return layer

    def tag_selected(self, text: str) -> int:
        """Tag the selected tiles of the tag layer with ``text`` (class names); returns how many were tagged."""
        layer = self.tag_layer()
        if layer is None:
            raise PathosegError("Add a tag layer first ('New tag layer') and draw tiles in it.")
        parse_class_names(text, self.classes(), where="the tag")
        sel = sorted(layer.selected_data)
        if not sel:
            raise PathosegError("Select the tiles to tag first (select mode, click or drag over them).")
        feats = layer.features.copy()
        feats.loc[sel, TAG_FEATURE] = text.strip()
        layer.features = feats
        layer.refresh_text()
        return len(sel)

    def _on_tag(self) -> None:
        try:
            n = self.tag_selected(self.tag_edit.text())
        except PathosegError as exc:
            show_error(str(exc))
            return
        self.dock.status.setText(f"tagged {n} tile(s): {self.tag_edit.text().strip()}")

    def _on_train(self) -> None:
        from napari_pathoseg._widgets.slide import slide_of_layer

        slide_layer = self.dock.slide_layer()
        slide = slide_of_layer(slide_layer) if slide_layer is not None else None
        layer = self.tag_layer()
        try:
            if slide is None:
                raise PathosegError("Choose a slide layer opened by napari-pathoseg.")
            if layer is None:
                raise PathosegError("Add a tag layer ('New tag layer'), draw tiles and tag them first.")
            classes = self.classes()
            labels = tag_layer_labels(layer, classes)
            rects = shape_rects(layer, slide_layer)
            name = self.name_edit.text().strip()
            if not name:
                raise PathosegError("Give the model a name.")
        except PathosegError as exc:
            show_error(str(exc))
            return
        from napari_pathoseg.methods.tissue.tags import TagTrainDone

        out = str(self.run_dir(name))
        slide_mpp = self.dock.mpp_spin.value() or None
        epochs, steps, mpp = self.epochs_spin.value(), self.steps_spin.value(), self.mpp_spin.value()
        preset = self.preset
        self.dock.jobs.start(
            lambda token: tag_train_job(slide, rects, labels, classes, mpp=mpp, out_dir=out, register_as=name,
                                        epochs=epochs, steps=steps, slide_mpp=slide_mpp, cancel=token, preset=preset),
            done_type=TagTrainDone, on_done=self._on_trained, message="reading the tagged tiles…",
            action="Tissue training",
        )

    def _on_trained(self, done: Any) -> None:
        if done.cancelled or done.model_name is None:
            self.dock.status.setText(f"training stopped; Train again continues it ({done.message})")
            show_info("Training stopped: a resumable checkpoint was kept")
            return
        self.dock.refresh_models(select=done.model_name)
        self.dock.status.setText(done.message)
        show_info(f"Registered tissue model {done.model_name}; mapping the dock's region with it")
        from qtpy.QtCore import QTimer

        QTimer.singleShot(0, self.dock._on_run)  # after this job has ended
