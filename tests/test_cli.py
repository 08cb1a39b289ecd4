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
    """The README's main job: the whole sample slide's nuclei with the shipped model.

    Also the pin of the whole-slide nuclei: 3921 nuclei on the sample's tissue before and after
    nuclei moved onto the inference engine (one whole-sample run in the suite, not two)."""
    import numpy as np
    import tifffile

    assert main(["demo", "--headless", "--out", str(tmp_path / "demo")]) == 0
    d = json.loads(capsys.readouterr().out)
    nuc = d["nuclei"]
    assert nuc["model"] == "nuclei-lite"
    assert abs(nuc["n_nuclei"] - 3921) <= 4  # pinned: the shipped model on the sample's tissue
    lab = tifffile.imread(nuc["labels"])
    assert lab.shape == (2967, 2220) and lab.dtype == np.uint32
    assert len(np.unique(lab)) - 1 == nuc["n_nuclei"]
    assert (tmp_path / "demo" / "nuclei_overlay.png").stat().st_size > 10000
    assert not list((tmp_path / "demo").glob(".nuclei-*"))


def test_every_command_module_is_discovered():
    """cli/<group>.py modules register themselves: no list to keep in main.py."""
    import pkgutil

    import napari_pathoseg.cli as pkg
    from napari_pathoseg.cli.main import build_parser, command_modules

    found = {m.rsplit(".", 1)[1] for m in command_modules()}
    on_disk = {m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_") and m.name != "main"}
    assert found == on_disk and {"slide", "nuclei", "stain"} <= found
    choices = build_parser()._subparsers._group_actions[0].choices
    assert {"info", "tiles", "demo", "nuclei", "normalize"} <= set(choices)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["tiles", "{svs}", "--size", "0"], "--size: must be an integer >= 16 and <= 16384, got '0'"),
        (["tiles", "{svs}", "--mpp", "nan"], "--mpp: must be a finite number"),
        (["tiles", "{svs}", "--mpp", "-1"], "--mpp: must be a number >= 0.01"),
        (["tiles", "{svs}", "--min-tissue", "1.5"], "--min-tissue: must be a number >= 0 and <= 1"),
        (["tiles", "{svs}", "--overlap", "x"], "--overlap: must be an integer >= 0, got 'x'"),
        (["info", "{missing}"], "does not exist"),
    ],
)
def test_bad_argument_values_are_one_line_at_the_parser(argv, needle, sample_svs, tmp_path, capsys):
    argv = [a.format(svs=sample_svs, missing=tmp_path / "nope.svs") for a in argv]
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], cap.err
    assert lines[0].startswith(f"pathoseg {argv[0]}: error:")


def test_tiles_csv_refuses_to_overwrite_the_slide(make_pyramid_tiff, tmp_path, capsys):
    import numpy as np

    slide = make_pyramid_tiff("s.tif", np.full((256, 256, 3), 200, np.uint8), levels=1)
    before = slide.read_bytes()
    assert main(["tiles", str(slide), "--csv", str(slide)]) == 2
    assert "also an input" in capsys.readouterr().err
    assert slide.read_bytes() == before
