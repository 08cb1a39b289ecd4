"""The nucleus models the docks offer: registry entries of task ``"nuclei"``."""

from __future__ import annotations

import logging
from typing import Any

from napari_pathoseg.errors import PathosegError

__all__ = ["DEFAULT_MODEL", "nuclei_model_names", "nuclei_models"]

logger = logging.getLogger(__name__)

#: The shipped nucleus model, offered when the registry lists none.
DEFAULT_MODEL = "nuclei-lite"


def nuclei_models() -> list[Any]:
    """Registered models of task ``"nuclei"``, shipped first (``models.registry.list_models``).

    Each entry is a mapping (``entry["name"]``, ``entry["path"]``, ``entry["preset"]``...).
    Registry errors are logged and give an empty list; entries of other tasks are left out
    even from a registry that cannot filter by task.
    """
    from napari_pathoseg.models.registry import list_models

    try:
        try:
            models = list_models(task="nuclei")
        except TypeError:  # a registry without tasks
            models = list_models()
    except PathosegError as exc:
        logger.warning("cannot list models: %s", exc)
        return []
    return [m for m in models if m.get("name") and (m.get("task") or "nuclei") == "nuclei"]


def nuclei_model_names() -> list[str]:
    """Names of the nucleus models (the shipped default when none can be listed)."""
    return [str(m["name"]) for m in nuclei_models()] or [DEFAULT_MODEL]
