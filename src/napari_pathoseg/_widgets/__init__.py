"""napari dock widgets: the only package that imports napari, qtpy or magicgui."""
