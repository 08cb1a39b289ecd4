"""Whole-slide images: open_slide (lazy dask pyramids with µm scale), the pyramidal-TIFF writer, synthetic and mosaic slides."""
