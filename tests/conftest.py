"""Shared fixtures: the real data in ../shared/data, the bundled sample, tiny pyramidal TIFFs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path:
    env = os.environ.get("PATHOSEG_SHARED_DATA")
    if env:
        return Path(env)
    return REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real H&E data folder (skips the test when it is absent)."""
    d = _shared_data_dir()
    if not d.is_dir():
        pytest.skip(f"shared data not found at {d}")
    return d


@pytest.fixture(scope="session")
def sample_svs() -> Path:
    """The bundled CMU-1-Small-Region.svs (2220 x 2967, 0.499 µm/px)."""
    from napari_pathoseg.wsi.slide import sample_slide_path

    return sample_slide_path()


@pytest.fixture
def make_pyramid_tiff(tmp_path):
    """Callable writing a tiled pyramidal TIFF: ``(path, image, *, levels=3, tile=256, mpp=0.5)``."""
    from napari_pathoseg.wsi.synth import write_pyramid_tiff

    def make(path, image, *, levels=3, tile=256, mpp=0.5, compression="jpeg"):
        path = Path(path)
        if not path.is_absolute():
            path = tmp_path / path
        return write_pyramid_tiff(path, np.asarray(image), levels=levels, tile=tile, mpp=mpp, compression=compression)

    return make


@pytest.fixture(scope="session")
def he_image() -> np.ndarray:
    """A real 1024 x 1024 H&E crop of the bundled sample (uint8 RGB)."""
    from napari_pathoseg.wsi.slide import open_slide, sample_slide_path

    with open_slide(sample_slide_path()) as s:
        return s.read_region(level=0, row=1920, col=768, height=1024, width=1024)


@pytest.fixture
def one_torch_thread():
    """Tiny models: one intra-op torch thread is fastest and immune to busy shared cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


#: MoNuSeg training images the strong-label fixtures crop from.
MONUSEG_STEMS = ("TCGA-18-5592-01Z-00-DX1", "TCGA-21-5784-01Z-00-DX1", "TCGA-38-6178-01Z-00-DX1")


@pytest.fixture
def make_strong_folder(tmp_path, shared_data):
    """Callable ``(size) -> Path``: real ``size``² MoNuSeg crops in ``images/`` + ``instance_masks/``."""
    from PIL import Image

    def make(size: int = 144) -> Path:
        root = tmp_path / "strong"
        (root / "images").mkdir(parents=True)
        (root / "instance_masks").mkdir()
        mon = shared_data / "monuseg_train"
        for i, stem in enumerate(MONUSEG_STEMS):
            img = np.asarray(Image.open(mon / "images" / f"{stem}.png").convert("RGB"))[300 : 300 + size, 300 : 300 + size]
            mpath = mon / "instance_masks" / f"{stem}.png"
            if not mpath.is_file():
                mpath = mon / "instance_masks_reconstructed" / f"{stem}.png"
            lab = np.asarray(Image.open(mpath))[300 : 300 + size, 300 : 300 + size].astype(np.uint16)
            Image.fromarray(img).save(root / "images" / f"crop{i}.png")
            Image.fromarray(lab).save(root / "instance_masks" / f"crop{i}.png")
        return root

    return make


@pytest.fixture
def sync_jobs(monkeypatch):
    """Dock jobs (``_widgets._jobs.JobController``) run to their end inside ``start()``: no waiting."""
    from napari_pathoseg._widgets import _jobs

    monkeypatch.setattr(_jobs, "SYNC", True)
    return _jobs
