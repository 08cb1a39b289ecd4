"""The pathoseg command line: info, tiles, demo, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from napari_pathoseg.cli.main import main


def test_info_json(sample_svs, capsys):
    assert main(["info", str(sample_svs)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["format"] == "aperio"
    assert d["levels"][0] == {"width": 2220, "height": 2967, "downsample": 1.0}
    assert d["mpp_x"] == pytest.approx(0.499) and d["mpp_y"] == pytest.approx(0.499)


def test_info_unknown_mpp_is_null(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((50, 60, 3), np.uint8)).save(tmp_path / "a.png")
    assert main(["info", str(tmp_path / "a.png")]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["mpp_x"] is None and d["mpp_y"] is None


def test_tiles_and_csv(sample_svs, tmp_path, capsys):
    csv = tmp_path / "grid.csv"
    assert main(["tiles", str(sample_svs), "--mpp", "0.5", "--size", "256", "--overlap", "32", "--csv", str(csv)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["n_tiles"] > 20
    assert len(csv.read_text().splitlines()) == d["n_tiles"] + 1


def test_bad_slide_exit_code(tmp_path, capsys):
    p = tmp_path / "bad.svs"
    p.write_bytes(b"")
    assert main(["info", str(p)]) == 2
    assert "empty" in capsys.readouterr().err


def test_console_script_runs(sample_svs):
    out = subprocess.run(
        [sys.executable, "-m", "napari_pathoseg.cli.main", "info", str(sample_svs)],
        capture_output=True, text=True, check=True,
    )
    assert json.loads(out.stdout)["format"] == "aperio"


def test_closed_pipe_ends_quietly(sample_svs):
    """`pathoseg info SLIDE | head -1`: the reader leaves early; no traceback on stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "napari_pathoseg.cli.main", "info", str(sample_svs)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # before the command has printed anything
    _, err = proc.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
    assert proc.returncode in (0, 141)


def test_demo_headless_without_nuclei(tmp_path, capsys):
    assert main(["demo", "--headless", "--no-nuclei", "--out", str(tmp_path / "demo")]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["tissue_tiles_512"] > 0
    assert (tmp_path / "demo" / "thumbnail_tissue.png").stat().st_size > 1000
    assert "nuclei" not in d


@pytest.mark.slow
def test_demo_headless_segments_the_sample(tmp_path, capsys):
    """The README's main job: the whole sample slide's nuclei with the shipped model."""
    import numpy as np
    import tifffile

    assert main(["demo", "--headless", "--out", str(tmp_path / "demo")]) == 0
    d = json.loads(capsys.readouterr().out)
    nuc = d["nuclei"]
    assert nuc["model"] == "nuclei-lite"
    assert nuc["n_nuclei"] > 1000  # the sample holds several thousand nuclei
    lab = tifffile.imread(nuc["labels"])
    assert lab.shape == (2967, 2220) and lab.dtype == np.uint32
    assert len(np.unique(lab)) - 1 == nuc["n_nuclei"]
    assert (tmp_path / "demo" / "nuclei_overlay.png").stat().st_size > 10000
    assert not list((tmp_path / "demo").glob(".nuclei-*"))
