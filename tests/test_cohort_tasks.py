"""The lesion and tissue batch tasks end to end on tiny random-weight checkpoints (plumbing, not accuracy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_pathoseg.cohort.manifest import read_manifest
from napari_pathoseg.cohort.runner import CohortError, run_cohort
from napari_pathoseg.cohort.summary import read_summary
from test_cohort import make_cohort


def tiny_lesion(path, he_image):
    from napari_pathoseg.methods.lesion.data import stain_normalizer
    from napari_pathoseg.methods.lesion.network import LesionFPN, get_preset
    from napari_pathoseg.models.checkpoint import save_checkpoint

    cfg = get_preset("lesion-lite", blocks=[1, 1, 1, 1], base_width=4, stem_channels=8, fpn_channels=8,
                     head_channels=8, block_size=32, tile_size=128)
    cfg.stain = stain_normalizer().fit(he_image[:256, :256]).to_dict()
    torch.manual_seed(0)
    net = LesionFPN(cfg)
    with torch.no_grad():
        net.head[-1].bias.fill_(0.0)
    save_checkpoint(path, {"net": net.state_dict()}, cfg.to_dict(), {"command": "test"}, kind="m3")
    return path


def tiny_tissue(path):
    from napari_pathoseg.methods.tissue.network import TissuePSPNet, get_preset
    from napari_pathoseg.models.checkpoint import save_checkpoint

    cfg = get_preset("tissue-lite", widths=[4, 8, 8, 8, 8, 8, 8], ppm_channels=4, tile_size=64, batch1=2, batch2=2)
    torch.manual_seed(0)
    save_checkpoint(path, {"net": TissuePSPNet(cfg).state_dict()}, cfg.to_dict(),
                    {"command": "test", "classes": list(cfg.classes)}, kind="m5")
    return path, list(cfg.classes)


def test_lesion_and_tissue_tasks_write_their_outputs_and_figures(tmp_path, he_image, make_pyramid_tiff, one_torch_thread):
    from napari_pathoseg.cohort.results import slide_results

    slides = read_manifest(make_cohort(tmp_path / "slides", he_image, make_pyramid_tiff, good=1, corrupt=False))
    with pytest.raises(CohortError, match="no lesion model named 'nope'"):
        run_cohort(slides, task="lesion", out_dir=tmp_path / "l", model="nope", workers=1, processes=False)

    lesion = tiny_lesion(tmp_path / "lesion.safetensors", he_image)
    res = run_cohort(slides, task="lesion", out_dir=tmp_path / "l", model=str(lesion), workers=1, processes=False, dashboard=None)
    row = read_summary(tmp_path / "l" / "summary.csv")[0]
    assert row["status"] == "ok", row["error"]
    assert 0.0 <= float(row["lesion_fraction"]) <= 1.0 and float(row["tissue_mm2"]) > 0
    opened = slide_results(tmp_path / "l", "slide0")
    mask = next(ly for ly in opened.layers if ly.kind == "labels")
    assert res.n_ok == 1 and mask.levels[0].shape[1] * mask.downsample == pytest.approx(256, abs=8)

    tissue, classes = tiny_tissue(tmp_path / "tissue.safetensors")
    run_cohort(slides, task="tissue", out_dir=tmp_path / "t", model=str(tissue), workers=1, processes=False, dashboard=None)
    row = read_summary(tmp_path / "t" / "summary.csv")[0]
    assert row["status"] == "ok", row["error"]
    fractions = [float(row[k]) for k in row if k.endswith("_fraction")]
    assert len(fractions) == len(classes) and sum(fractions) == pytest.approx(1.0, abs=0.01)
    ids = np.asarray(slide_results(tmp_path / "t", "slide0").layers[0].levels[0])
    assert ids.max() <= len(classes)
