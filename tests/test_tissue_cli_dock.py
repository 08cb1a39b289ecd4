"""pathoseg tissue / tissue-train on the CLI (bad input: one line, exit 2) and the Tissue dock in a viewer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

WSSS = "wsss4luad_tissue_masks"


@pytest.fixture
def tiny_tissue_model(tmp_path):
    """A random-init PSPNet checkpoint at the lite structure, windows of 64 px at 2 µm/px, naming its classes."""
    from napari_pathoseg.methods.tissue.network import TissuePSPNet, get_preset
    from napari_pathoseg.models.checkpoint import save_checkpoint

    cfg = get_preset("tissue-lite", widths=[4, 8, 8, 8, 8, 8, 8], ppm_channels=4, tile_size=64, mpp=2.0)
    torch.manual_seed(0)
    path = tmp_path / "tiny-tissue.safetensors"
    save_checkpoint(path, {"net": TissuePSPNet(cfg).state_dict()}, cfg.to_dict(),
                    {"command": "test", "task": "tissue", "classes": cfg.classes}, kind="m5")
    return path


def test_cli_tissue_map_and_bad_input(tmp_path, shared_data, tiny_tissue_model, capsys, one_torch_thread):
    import json

    import tifffile

    from napari_pathoseg.cli.main import main

    img = shared_data / WSSS / "images" / "test_00.png"
    out = tmp_path / "map.tif"
    assert main(["tissue", str(img), "--out", str(out), "--model", str(tiny_tissue_model), "--mpp", "1.0",
                 "--probs", str(tmp_path / "p.tif")]) == 0
    info = json.loads(capsys.readouterr().out)
    ids = tifffile.imread(out)
    assert ids.dtype == np.uint8 and ids.shape == (301, 225)  # the image's own grid
    assert info["classes"] == {"1": "tumour epithelium", "2": "stroma", "3": "normal"}
    assert sum(a["pixels"] for a in info["areas"].values()) == np.prod(info["shape"])
    assert abs(sum(a["fraction"] for k, a in info["areas"].items() if k != "background") - 1) < 1e-6
    assert tifffile.imread(tmp_path / "p.tif").shape[0] == 4
    capsys.readouterr()
    bad = tmp_path / "bad.tif"
    # no µm/px recorded and no --mpp
    assert main(["tissue", str(img), "--out", str(bad), "--model", str(tiny_tissue_model)]) == 2
    assert "--mpp" in capsys.readouterr().err and not bad.exists()
    # classes that the model does not have
    assert main(["tissue", str(img), "--out", str(bad), "--model", str(tiny_tissue_model), "--mpp", "1",
                 "--classes", "tumour,necrosis"]) == 2
    assert "has classes" in capsys.readouterr().err and not bad.exists()
    # never overwrite the input; a model of another task
    assert main(["tissue", str(img), "--out", str(img), "--model", str(tiny_tissue_model), "--mpp", "1"]) == 2
    assert main(["tissue", str(img), "--out", str(bad), "--model", "nuclei-lite", "--mpp", "1"]) == 2
    # training labels with an unknown class, and a malformed vector
    csv = tmp_path / "labels.csv"
    csv.write_text(f"image,classes\n{img},stroma;necrosis\n")
    assert main(["tissue-train", "--labels", str(csv), "--classes", "tumour,stroma", "--out", str(tmp_path / "r")]) == 2
    assert "unknown class 'necrosis'" in capsys.readouterr().err
    csv.write_text(f"image,labels\n{img},\"[1, 2]\"\n")
    assert main(["tissue-train", "--labels", str(csv), "--classes", "tumour,stroma", "--out", str(tmp_path / "r")]) == 2
    assert "zeros/ones" in capsys.readouterr().err and not (tmp_path / "r" / "stage1").exists()
    # tiles need WSSS4LUAD's masks; corrections need another run's pseudo masks
    assert main(["tissue-train", "--labels", str(csv), "--classes", "tumour,stroma", "--tiles", "96",
                 "--out", str(tmp_path / "r")]) == 2
    assert "used whole" in capsys.readouterr().err
    assert main(["tissue-train", "--tiles", "96", "--correct", "5", "--out", str(tmp_path / "r")]) == 2
    assert "--pseudo-from" in capsys.readouterr().err
    assert main(["tissue-train", "--tiles", "8", "--out", str(tmp_path / "r")]) == 2
    assert "from 32 to 1024" in capsys.readouterr().err and not (tmp_path / "r" / "stage1").exists()


@pytest.mark.gui
def test_tissue_dock_rectangle(make_napari_viewer, sample_svs, tiny_tissue_model, sync_jobs, one_torch_thread,
                               tmp_path):
    from napari_pathoseg._widgets.tissue import TissueWidget

    viewer = make_napari_viewer()
    w = TissueWidget(viewer)
    viewer.window.add_dock_widget(w)
    assert not w.run_btn.isEnabled()
    viewer.open(str(sample_svs), plugin="napari-pathoseg")
    slide_layer = viewer.layers[0]
    w._models["tiny"] = str(tiny_tissue_model)
    w.model_combo.addItem("tiny")
    w.model_combo.setCurrentText("tiny")
    w.mode_combo.setCurrentIndex(1)  # fast
    sy, sx = slide_layer.scale
    r0, c0, r1, c1 = 1024, 512, 1280, 896  # level-0 pixels; 64 x 96 px at 2 µm/px
    viewer.add_shapes([np.array([[r0 * sy, c0 * sx], [r0 * sy, c1 * sx], [r1 * sy, c1 * sx], [r1 * sy, c0 * sx]])],
                      shape_type="rectangle", name="roi")
    w.region_combo.setCurrentText("Drawn rectangle")
    w.shapes_combo.setCurrentText("roi")
    assert w.run_btn.isEnabled()
    w.run_btn.click()
    lab = viewer.layers["CMU-1-Small-Region.svs tissue"]
    assert lab.data.dtype == np.uint8 and set(np.unique(lab.data)) <= {0, 1, 2, 3}
    assert abs(lab.data.shape[0] - 64) <= 2 and str(lab.units[0]) == "micrometer"
    assert list(lab.features["class"]) == ["background", "tumour epithelium", "stroma", "normal"]
    assert w.table.rowCount() == 3 and w.table.item(1, 0).text() == "stroma"
    fractions = [float(w.table.item(r, 3).text()) for r in range(3)]
    assert sum(fractions) == pytest.approx(1.0, abs=0.01)
    w.opacity.setValue(30)
    assert lab.opacity == pytest.approx(0.3)
    # the class regions as QuPath annotations with their class, on level-0 pixels of the slide
    import json

    assert w.export_btn.isEnabled()
    out = tmp_path / "tissue.geojson"
    w.start_export(str(out))
    feats = json.loads(out.read_text())["features"]
    assert feats and {f["properties"]["objectType"] for f in feats} == {"annotation"}
    names = {f["properties"]["classification"]["name"] for f in feats}
    assert names <= {"tumour epithelium", "stroma", "normal"}
    xy = np.array([c for f in feats for ring in f["geometry"]["coordinates"]
                   for c in (ring if f["geometry"]["type"] == "Polygon" else ring[0])], float)
    assert xy[:, 0].min() >= c0 - 4 and xy[:, 0].max() <= c1 + 4 and xy[:, 1].min() >= r0 - 4
    assert "regions" in w.status.text()
