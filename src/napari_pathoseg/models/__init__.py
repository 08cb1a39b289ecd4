"""Models of every task: the registry, model cards, checkpoint I/O and the checks on checkpoints.

* :mod:`~napari_pathoseg.models.registry` — ``list_models``, ``load_model``, ``register_model``;
* :mod:`~napari_pathoseg.models.cards` — ``ModelCard``;
* :mod:`~napari_pathoseg.models.tasks` — the task -> loader and architecture -> validator tables;
* :mod:`~napari_pathoseg.models.checkpoint` — safetensors + JSON checkpoints, never pickles;
* :mod:`~napari_pathoseg.models.validation` — config schemas, network size, finite weights.
"""

from __future__ import annotations

__all__ = ["cards", "checkpoint", "registry", "tasks", "validation"]
