"""Open napari with a slide and the plugin's docks (the demo's GUI branch)."""

from __future__ import annotations

from pathlib import Path


#: Every dock, in the order they are tabbed (the first one stays in front).
DOCKS = ("Slide", "Stain", "Nuclei", "Lesions", "Tissue", "Malignancy", "Slide classification", "Review", "Fine-tune", "Export", "Cohort")


def launch_viewer(path: str | Path, *, run: bool = True):
    """Open ``path`` in a new viewer with the napari-pathoseg docks; block in the event loop."""
    import napari

    viewer = napari.Viewer(title="napari-pathoseg")
    viewer.open(str(path), plugin="napari-pathoseg")
    for widget in DOCKS:
        viewer.window.add_plugin_dock_widget("napari-pathoseg", widget, tabify=widget != "Slide")
    if run:
        napari.run()
    return viewer
